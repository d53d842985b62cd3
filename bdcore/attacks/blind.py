"""Blind: the backdoor lives in the loss computation, not in the data. Each batch gets a
backdoored copy (pixel pattern + target label); the main-task and backdoor losses are balanced
per batch by MGDA, the min-norm convex combination of the two tasks' gradients.

Bagdasaryan & Shmatikov, "Blind Backdoors in Deep Learning Models", USENIX Security 2021
(code: backdoors101; BackdoorBench's `blind`, config `cifar10_mgda`). The training data is
untouched: `has_poisoned_trainset = False`, `poison_train` returns the clean set with no poison
indices, and training-time defenses (which need a poisoned set) skip blind cells.

Defaults (paper code / BackdoorBench `cifar10_mgda.yaml`): MGDA with `loss+` normalisation (each
task's gradient divided by min(loss * ||grad||, 10) before solving; the scales then weight the raw
losses); the paper's 5 x 3 black/white pixel pattern with its top-left pixel at (3, 23) of a
32 x 32 image, i.e. 9 columns from the right edge for other widths; the whole copy backdoored.

`ratio` here is the share of each batch's backdoored copy that carries the trigger and the target
label (backdoors101's `poisoning_proportion`; the rest of the copy keeps its clean images and
labels, at least one sample per batch is backdoored). Default 1.0 = the paper's and BackdoorBench's
setting (BackdoorBench ignores `pratio` and sets the proportion to 1.1, i.e. the whole copy).
Over an epoch the victim then sees ratio x N backdoored samples, as data-poisoning attacks at the
same ratio do, but none of them is ever in the training set.

Deviations: two tasks, so MGDA's closed form (exact minimiser clamped to [0, 1]; the reference
clamps to [0.001, 0.999]); no loss-threshold gate (BackdoorBench starts the attack only once the
mean main loss of the last 1000 batches is below 1.0 - on a 10-epoch digits run of 230 batches it
would never start); `start_epoch` is an epoch-level stand-in (0 by default: attack from the start,
as the paper's MGDA experiments). The pattern is applied after augmentation (as backdoors101 does).
The batch and its backdoored copy go through the model in one forward pass (backdoors101: two):
with a fully backdoored copy in its own pass, BatchNorm's batch statistics remove the trigger
(present in every sample) in training mode, and the mixed running statistics then wreck clean
accuracy in eval mode (measured on digits: ACC 0.11 with separate passes). The loop's backward
pass gets a surrogate loss with the MGDA-weighted gradient already computed for the weights (same
value, same gradient, one backward pass fewer).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.attacks.base import Attack, AttackConfig, PoisonedTrainSet
from bdcore.attacks.registry import register_attack
from bdcore.data.base import ImageSet
from bdcore.train.loop import StepContext, to_model_input

# The paper's pixel pattern (backdoors101 PatternSynthesizer): 1 = white, 0 = black, None = untouched.
PAPER_PATTERN = (
    (1, 0, 1),
    (None, 1, None),
    (None, None, 0),
    (None, 1, None),
    (1, 0, 1),
)
PAPER_TOP, PAPER_RIGHT_MARGIN = 3, 9  # (3, 23) on a 32-wide image

Normalization = Literal["loss+", "loss", "l2", "none"]


class BlindConfig(AttackConfig):
    ratio: float = Field(1.0, gt=0, le=1)  # share of each batch's backdoored copy that is backdoored
    balance: Literal["mgda", "fixed"] = "mgda"
    mgda_normalize: Normalization = "loss+"
    fixed_normal_weight: float = Field(1.0, ge=0)  # balance "fixed" only (BackdoorBench default.yaml)
    fixed_backdoor_weight: float = Field(0.9, ge=0)
    position: tuple[int, int] | None = None  # (row, col) of the pattern's top-left pixel; None: paper's
    start_epoch: int = Field(0, ge=0)  # plain training before this epoch (stand-in for the loss gate)


def gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(g.detach().float().pow(2).sum() for g in grads))


def normalizer(loss: torch.Tensor, grads: list[torch.Tensor], kind: Normalization) -> torch.Tensor:
    """The factor a task's gradient is divided by before MGDA (backdoors101's normalisations)."""
    loss = loss.detach().float()
    if kind == "l2":
        return gradient_norm(grads)
    if kind == "loss":
        return loss.clamp(max=10.0)
    if kind == "loss+":
        return (loss * gradient_norm(grads)).clamp(max=10.0)
    return torch.ones((), device=loss.device)


def mgda_two(g1: list[torch.Tensor], g2: list[torch.Tensor]) -> float:
    """c in [0, 1] minimising ||c g1 + (1 - c) g2||^2 (closed form for two tasks)."""
    d11 = sum((a.double() * a.double()).sum() for a in g1)
    d12 = sum((a.double() * b.double()).sum() for a, b in zip(g1, g2))
    d22 = sum((b.double() * b.double()).sum() for b in g2)
    denominator = float(d11 + d22 - 2 * d12)
    if denominator <= 1e-20:  # (nearly) equal gradients: every combination is the same
        return 0.5
    return float(min(1.0, max(0.0, float(d22 - d12) / denominator)))


def mgda_scales(losses: dict[str, torch.Tensor], grads: dict[str, list[torch.Tensor]],
                kind: Normalization = "loss+") -> dict[str, float]:
    """MGDA weights (summing to 1) of two tasks from their losses and parameter gradients."""
    (a, ga), (b, gb) = grads.items()
    na = normalizer(losses[a], ga, kind) + 1e-5
    nb = normalizer(losses[b], gb, kind) + 1e-5
    c = mgda_two([g / na for g in ga], [g / nb for g in gb])
    return {a: c, b: 1.0 - c}


class BlindStep:
    """The blind loss: scale_normal * CE(batch) + scale_backdoor * CE(backdoored copy)."""

    def __init__(self, attack: Blind):
        self.attack = attack
        self.last_scales: dict[str, float] = {}

    def __call__(self, images, labels, indices, ctx: StepContext) -> torch.Tensor:
        cfg = self.attack.config
        model = ctx.model
        smoothing = ctx.config.label_smoothing
        if ctx.epoch < cfg.start_epoch:
            return F.cross_entropy(model(to_model_input(images, ctx)), labels, label_smoothing=smoothing)
        bd_images, bd_labels = self.attack.backdoor_batch(images, labels, ctx.generator)
        if not len(bd_images):  # ratio x B < 1 and this batch drew no backdoored sample
            return F.cross_entropy(model(to_model_input(images, ctx)), labels, label_smoothing=smoothing)
        # One forward pass over [batch, backdoored copy]: BatchNorm sees both in its batch statistics
        # (separate passes let BN normalise a trigger present in every sample of the copy away in
        # training mode, and the running statistics then break clean accuracy in eval mode).
        logits = model(to_model_input(torch.cat([images, bd_images]), ctx))
        n = images.shape[0]
        normal = F.cross_entropy(logits[:n], labels, label_smoothing=smoothing)
        backdoor = F.cross_entropy(logits[n:], bd_labels)
        if cfg.balance == "fixed":
            scales = {"normal": cfg.fixed_normal_weight, "backdoor": cfg.fixed_backdoor_weight}
            self.last_scales = scales
            return scales["normal"] * normal + scales["backdoor"] * backdoor
        params = [p for p in model.parameters() if p.requires_grad]
        g_normal = torch.autograd.grad(normal, params, retain_graph=True, allow_unused=True)
        g_backdoor = torch.autograd.grad(backdoor, params, allow_unused=True)
        pairs = [(i, torch.zeros_like(params[i]) if a is None else a, torch.zeros_like(params[i]) if b is None else b)
                 for i, (a, b) in enumerate(zip(g_normal, g_backdoor)) if a is not None or b is not None]
        scales = mgda_scales({"normal": normal, "backdoor": backdoor},
                             {"normal": [a for _, a, _ in pairs], "backdoor": [b for _, _, b in pairs]},
                             cfg.mgda_normalize)
        self.last_scales = scales
        # The gradient of scale_n * L_n + scale_b * L_b is already known; instead of a third backward
        # pass through the network, return a surrogate with exactly that gradient and that value.
        surrogate = sum((params[i] * (scales["normal"] * a + scales["backdoor"] * b).detach()).sum()
                        for i, a, b in pairs)
        value = (scales["normal"] * normal + scales["backdoor"] * backdoor).detach()
        return value + surrogate - surrogate.detach()


@register_attack("blind")
class Blind(Attack):
    config_class = BlindConfig
    config: BlindConfig
    has_poisoned_trainset = False

    def __init__(self, config, info):
        super().__init__(config, info)
        rows, cols = len(PAPER_PATTERN), len(PAPER_PATTERN[0])
        row, col = config.position if config.position is not None else (PAPER_TOP, info.width - PAPER_RIGHT_MARGIN)
        if not (0 <= row <= info.height - rows and 0 <= col <= info.width - cols):
            raise ValueError(f"blind: the {rows}x{cols} pattern at ({row}, {col}) does not fit a "
                             f"{info.height}x{info.width} image; set `position`")
        self.mask = torch.zeros(1, info.height, info.width, dtype=torch.bool)
        self.pattern = torch.zeros(info.channels, info.height, info.width, dtype=torch.uint8)
        for r, line in enumerate(PAPER_PATTERN):
            for c, value in enumerate(line):
                if value is not None:
                    self.mask[:, row + r, col + c] = True
                    self.pattern[:, row + r, col + c] = 255 * value

    def state_tensors(self):
        return {"mask": self.mask, "pattern": self.pattern}

    def load_state_tensors(self, tensors):
        self.mask, self.pattern = tensors["mask"].bool().cpu(), tensors["pattern"].to(torch.uint8).cpu()

    def apply_trigger(self, images, labels):
        return torch.where(self.mask.to(images.device), self.pattern.to(images.device), images)

    def apply_float_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """The pattern on float [0, 1] images (the training batches)."""
        mask = self.mask.to(images.device)
        return torch.where(mask, (self.pattern.to(images.device).float() / 255).to(images.dtype), images)

    def backdoor_batch(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backdoored copy of a batch: its first batch_poison_count(B) samples (int(ratio * B);
        below one, one sample with probability ratio * B) carry the pattern and the target label,
        the others stay clean (batches come in random order); empty when that count is 0."""
        k = self.batch_poison_count(images.shape[0], generator)
        if k == 0:
            return images[:0], labels[:0]
        bd_images, bd_labels = images.clone(), labels.clone()
        bd_images[:k] = self.apply_float_trigger(images[:k])
        bd_labels[:k] = self.target_labels(labels[:k])
        return bd_images, bd_labels

    def poison_train(self, train: ImageSet) -> PoisonedTrainSet:
        """The clean training set itself: blind never touches the data."""
        return PoisonedTrainSet(ImageSet(train.images, train.labels), torch.empty(0, dtype=torch.long),
                                train.labels.clone())

    def training_step(self, poisoned):
        return BlindStep(self)
