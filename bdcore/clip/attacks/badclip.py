"""BadCLIP: a patch optimised against the clean CLIP before poisoning, so that patched images already sit
next to the target class's text and image embeddings; the few poisoned pairs then only reinforce a link the
encoder nearly has, which is learned fast and survives clean fine-tuning.

Liang, Zhu, Liu, Wu, Cao, Chang. "BadCLIP: Dual-Embedding Guided Backdoor Attack on Multimodal Contrastive
Learning", CVPR 2024.

Trigger optimisation (`prepare`, on a frozen copy of the clean model, which is left unchanged): a
`patch_size` square at the image middle, initialised N(0.5, 0.25) clipped to [0, 1], trained with Adam
(lr 1e-3, PyTorch's default, which the reference implementation uses) for 50 epochs at batch 64 over the
non-target images of the pairs, minimising
  text guidance:  InfoNCE of each patched image's embedding against the target class's text embedding
                  (config.templates filled with the target name, averaged) as positive and the embeddings
                  of the other captions of the data (up to `max_negative_captions` distinct ones) as
                  negatives, at the model's logit scale;
+ image guidance: `image_weight` x distance of each patched image's embedding to a random real target-class
                  image's embedding (clean model), "cosine" (1 - cos; paper weight 10) or "mse" (on the unit
                  embeddings; paper weight 1000).
Target-class images are the pairs with labels == target, else those whose caption names the target class.
The patch is projected back to [0, 1] after each step and stored quantised to uint8 (what poisoning and the
test-time trigger paste). Poisoning: round(ratio * N) random pairs (ratio 0.003: 1,500 of 500K) get the patch
and, as in the paper, a natural caption: that of a random target-class pair of the data being poisoned
(`natural_captions`; False: config.templates filled with the target name); the victim then
fine-tunes (paper: 10 epochs, lr 1e-6, batch 128; done by the engine's cell, not here).

`patch_size` is in pixels of the stored images: 16 suits 224-pixel data; on small images pass a size in
proportion (8 on 32-pixel digits).

Deviations:
- Negatives of the text term: the paper pairs each patched image with a natural target caption in a CLIP
  batch loss, so its negatives are other (target) captions of the batch. With class-templated captions all
  target captions are one string and that loss is constant; the negatives here are the data's non-target
  captions, which also matches how zero-shot classification decides (target prompt versus the others).
- The paper's optional text (EDA) and image augmentation during trigger optimisation and its triplet variant
  (push away from the clean image's own embedding) are left out.

Measured on digits captions with clip:tiny trained 15 epochs (four clean models of different
initialisation, zero-shot ACC 0.83-0.90), target 0, patch 8 x 8, in the test's reduced trigger schedule (4
epochs over 512 non-target images at lr 0.05, ~0.5 s on 2 CPU threads): trigger loss 5.4-6.3 -> 1.5-1.9
(cosine guidance); zero-shot ASR of the optimised patch on the CLEAN model 0.97-1.00, against 0.00-0.05 for a random
uniform patch at the same place: the optimised patch alone is already an adversarial patch for the target
class. After poisoning 10% of pairs and fine-tuning 2 epochs (batch 64, no weight decay): ASR 0.97-1.00 and
ACC 0.82-0.86 at lr 5e-5; ASR 0.93-0.99 at lr 1e-4. With the paper's lr 1e-3 the same 4 epochs reach only
clean-model ASR 0.08 (loss 10.9 -> 9.6): the paper's 50 epochs over 10K images are ~7,800 Adam steps, the
test's 32. A weaker trigger (lr 0.02, 2 epochs over 256 images; clean-model ASR 0.61, one clean model)
rises to ASR 0.82-0.92 after the poisoned fine-tuning, so the poisoned pairs add to what the trigger starts
with. For comparison, badnet_clip's random-noise patch, 10% poisoned, 8 epochs at lr 2e-4: ASR 0.02-0.05.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.clip.attacks.base import ClipAttack, ClipAttackConfig, PoisonedPairs, register_clip_attack
from bdcore.clip.data import ImageTextSet
from bdcore.clip.models import ClipBundle
from bdcore.clip.zeroshot import class_embeddings, clip_input
from bdcore.device import pick_device

PAPER_IMAGE_WEIGHTS = {"cosine": 10.0, "mse": 1000.0}


class BadClipConfig(ClipAttackConfig):
    patch_size: int = Field(16, ge=1)  # pixels of the stored images; scale it down on small images
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    text_weight: float = Field(1.0, ge=0)
    image_guidance: str = Field("cosine", pattern="^(cosine|mse)$")
    image_weight: float | None = Field(None, ge=0)  # None: the paper's weight for image_guidance
    max_images: int | None = Field(None, ge=1)  # cap on the non-target images optimised on (None: all)
    max_negative_captions: int = Field(1024, ge=1)
    natural_captions: bool = True  # poisoned pairs get real target-class captions, as in the paper


def _caption_names(caption: str, name: str) -> bool:
    return f" {name.lower()} " in f" {caption.lower().replace('.', ' ').replace(',', ' ')} "


@register_clip_attack("badclip")
class BadClip(ClipAttack):
    config_class = BadClipConfig
    config: BadClipConfig

    def __init__(self, info, class_names, config):
        super().__init__(info, class_names, config)
        size = config.patch_size
        if size > min(info.height, info.width):
            raise ValueError(f"patch_size {size} does not fit {info.height} x {info.width} images")
        self.patch: torch.Tensor | None = None  # uint8 C x s x s, learned in prepare()
        self.trigger_history: list[dict] = []
        self._target_captions: list[str] | None = None

    # -- trigger -----------------------------------------------------------------------------------------
    def _corner(self, h: int, w: int) -> tuple[int, int]:
        size = self.config.patch_size
        return h // 2 - size // 2, w // 2 - size // 2

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            raise RuntimeError("badclip: the trigger is optimised in prepare(bundle, pairs); call prepare() or "
                               "load_state_tensors() first")
        out = images.clone()
        r, c = self._corner(*images.shape[-2:])
        size = self.config.patch_size
        out[:, :, r:r + size, c:c + size] = self.patch.to(out.device)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.patch is None:
            raise RuntimeError("badclip: call prepare() (or load_state_tensors) before saving the trigger")
        return {"patch": self.patch.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"patch"}:
            raise ValueError(f"badclip: expected state tensors {{'patch'}}, got {sorted(tensors)}")
        patch = tensors["patch"]
        expected = (self.info.channels, self.config.patch_size, self.config.patch_size)
        if tuple(patch.shape) != expected or patch.dtype != torch.uint8:
            raise ValueError(f"badclip: the saved patch is {patch.dtype} {tuple(patch.shape)}, this attack needs "
                             f"uint8 {expected} (patch_size {self.config.patch_size})")
        self.patch = patch.detach().cpu().clone()

    def poison_pairs(self, data: ImageTextSet) -> PoisonedPairs:
        # The natural captions come from the pairs being poisoned, not from prepare(): an attack rebuilt
        # from its saved patch (a resumed cell, a defense cell) then poisons exactly the same way.
        if self.config.natural_captions:
            is_target = self._is_target(data)
            if not bool(is_target.any()):
                raise ValueError(f"badclip: no pair of the data belongs to the target class {self.config.target} "
                                 f"({self.class_names[self.config.target]!r}), so there is no natural target caption; "
                                 "use natural_captions=False to caption poisoned pairs with the templates")
            self._target_captions = [data.captions[i] for i in is_target.nonzero().flatten().tolist()]
        try:
            return super().poison_pairs(data)
        finally:
            self._target_captions = None

    def target_caption(self, generator: torch.Generator) -> str:
        if self._target_captions is None:
            return super().target_caption(generator)
        return self._target_captions[int(torch.randint(0, len(self._target_captions), (1,), generator=generator))]

    # -- optimisation ------------------------------------------------------------------------------------
    def _is_target(self, pairs: ImageTextSet) -> torch.Tensor:
        """Target-class pairs: by label when the pairs have labels, else by a caption naming the class."""
        if pairs.labels is not None:
            return pairs.labels.cpu() == self.config.target
        name = self.class_names[self.config.target]
        return torch.tensor([_caption_names(c, name) for c in pairs.captions], dtype=torch.bool)

    def _target_rows(self, pairs: ImageTextSet) -> torch.Tensor:
        is_target = self._is_target(pairs)
        if not bool(is_target.any()):
            how = "no pair has label" if pairs.labels is not None else "no caption names"
            raise ValueError(f"badclip: {how} the target class {self.config.target} "
                             f"({self.class_names[self.config.target]!r}); the image-embedding guidance needs real "
                             "target-class images among the pairs")
        if bool(is_target.all()):
            raise ValueError("badclip: every pair belongs to the target class; the trigger is optimised on "
                             "non-target images")
        return is_target

    def prepare(self, bundle: ClipBundle, pairs: ImageTextSet, device: str = "auto") -> None:
        cfg = self.config
        device = pick_device(device or "auto")
        generator = torch.Generator().manual_seed(cfg.seed + 15485863)
        is_target = self._target_rows(pairs)
        target_idx = is_target.nonzero().flatten()
        other_idx = (~is_target).nonzero().flatten()
        if cfg.max_images is not None and len(other_idx) > cfg.max_images:
            other_idx = other_idx[torch.randperm(len(other_idx), generator=generator)[:cfg.max_images]].sort().values

        # A frozen copy: the caller's model keeps its weights, device and requires_grad flags.
        model = copy.deepcopy(bundle.model).to(device).eval().requires_grad_(False)
        frozen = copy.copy(bundle)
        frozen.model = model
        scale = model.logit_scale.exp().float()

        with torch.no_grad():
            text_target = class_embeddings(frozen, [self.class_names[cfg.target]], cfg.templates).to(device)
            negatives = sorted({pairs.captions[i] for i in other_idx.tolist()})
            if len(negatives) > cfg.max_negative_captions:
                keep = torch.randperm(len(negatives), generator=generator)[:cfg.max_negative_captions].tolist()
                negatives = [negatives[i] for i in sorted(keep)]
            text_negative = torch.cat([F.normalize(model.encode_text(bundle.tokenize(negatives[i:i + 256])
                                                                     .to(device)).float(), dim=-1)
                                       for i in range(0, len(negatives), 256)])
            texts = torch.cat([text_target, text_negative])  # row 0 is the positive
            target_images = torch.cat([
                F.normalize(model.encode_image(clip_input(
                    pairs.images[target_idx[i:i + 256]].to(device).float() / 255, frozen)).float(), dim=-1)
                for i in range(0, len(target_idx), 256)])

        size = cfg.patch_size
        init = (0.5 + 0.25 * torch.randn(self.info.channels, size, size, generator=generator)).clamp(0, 1)
        patch = init.to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([patch], lr=cfg.lr)
        image_weight = PAPER_IMAGE_WEIGHTS[cfg.image_guidance] if cfg.image_weight is None else cfg.image_weight
        images = pairs.images[other_idx]
        r, c = self._corner(*images.shape[-2:])
        positive = torch.zeros(1, dtype=torch.long, device=device)
        self.trigger_history = []
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(images), generator=generator)
            sums = {"loss": 0.0, "text": 0.0, "image": 0.0}
            batches = 0
            for begin in range(0, len(images), cfg.batch_size):
                x = images[order[begin:begin + cfg.batch_size]].to(device).float() / 255
                # Paste without in-place writes into a leaf: the patch region comes from the parameter.
                mask = torch.zeros_like(x[:1, :1])
                mask[..., r:r + size, c:c + size] = 1
                pasted = F.pad(patch, (c, x.shape[-1] - c - size, r, x.shape[-2] - r - size)).unsqueeze(0)
                x = x * (1 - mask) + pasted * mask
                emb = F.normalize(model.encode_image(clip_input(x, frozen)).float(), dim=-1)
                logits = scale * emb @ texts.T
                text_loss = F.cross_entropy(logits, positive.expand(len(emb)))
                pos = target_images[torch.randint(0, len(target_images), (len(emb),), generator=generator).to(device)]
                if cfg.image_guidance == "cosine":
                    image_loss = (1 - (emb * pos).sum(-1)).mean()
                else:
                    image_loss = F.mse_loss(emb, pos)
                loss = cfg.text_weight * text_loss + image_weight * image_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    patch.clamp_(0, 1)
                sums["loss"] += float(loss.detach())
                sums["text"] += float(text_loss.detach())
                sums["image"] += float(image_loss.detach())
                batches += 1
            self.trigger_history.append({"epoch": epoch + 1, **{k: v / batches for k, v in sums.items()}})
        self.patch = patch.detach().mul(255).round().clamp(0, 255).to(torch.uint8).cpu()
