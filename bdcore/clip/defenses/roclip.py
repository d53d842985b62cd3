"""RoCLIP: train CLIP on possibly poisoned pairs, but every few epochs pair each augmented image not with
its own caption but with the most similar caption in a large, varying pool of other captions, so a poisoned
image is rarely matched with the target caption it was planted with.

Yang, Gao & Mirzasoleiman, "Robust Contrastive Language-Image Pre-training against Data Poisoning and
Backdoor Attacks", NeurIPS 2023. A training-time defense: it trains the victim's model (its pre-trained
weights, or a fresh initialisation) on the poisoned pairs with the attack cell's own schedule.
- Matching epochs: every `match_every` (K = 2) epochs, the second of each pair; the other epochs use the
  plain CLIP loss. Images (random crop) and captions (EDA deletion / swap) are augmented in every epoch.
- Pool: a first-in-first-out queue of the caption embeddings of earlier batches (detached), refreshed every
  batch so it keeps varying; `pool_size` 65,536 captions. The paper calls it "relatively large" without
  REFERENCE.md fixing a number; on a dataset smaller than the pool it holds every caption seen.
- Matching: image i's positive is the pooled caption embedding most similar to image i's embedding; the
  loss is CLIP's symmetric InfoNCE between the batch's images and their matched captions.
Deviations: EDA without its WordNet synonym operations (not shipped); after a resume the pool starts empty
and refills within the next epoch (a matching batch with an empty pool uses the plain CLIP loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.clip.data import ImageTextSet, augment_captions
from bdcore.clip.defenses.base import (
    ClipDefenseConfig,
    ClipDefenseContext,
    ClipDefenseOutcome,
    ClipTrainingTimeDefense,
    register_clip_defense,
)
from bdcore.clip.models import ClipBundle
from bdcore.clip.train import clip_contrastive_loss, train_clip


class RoClipConfig(ClipDefenseConfig):
    pool_size: int = Field(65_536, ge=1)
    match_every: int = Field(2, ge=1)  # K: one matching epoch in every K
    text_edit_p: float = Field(0.1, ge=0, lt=1)


class RoClipLoss:
    """train_clip's loss_fn: plain CLIP loss, or nearest-pooled-caption matching in matching epochs."""

    def __init__(self, bundle: ClipBundle, data: ImageTextSet, config: RoClipConfig):
        self.bundle, self.data, self.config = bundle, data, config
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.pool: torch.Tensor | None = None
        self.matching = False
        self.matched_own_caption = 0  # diagnostics: how often an image's match was its own caption's text
        self.matched = 0

    def start_epoch(self, epoch: int) -> None:
        self.matching = epoch % self.config.match_every == self.config.match_every - 1

    def _enqueue(self, text_features: torch.Tensor) -> None:
        new = F.normalize(text_features.detach().float(), dim=-1)
        self.pool = new if self.pool is None else torch.cat([new, self.pool])[:self.config.pool_size]

    def __call__(self, model, images: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        captions = augment_captions([self.data.captions[i] for i in idx.tolist()], self.generator,
                                    self.config.text_edit_p)
        text_features = model.encode_text(self.bundle.tokenize(captions).to(tokens.device))
        image_features = model.encode_image(images)
        if self.matching and self.pool is not None:
            unit_images = F.normalize(image_features.float(), dim=-1)
            nearest = (unit_images.detach() @ self.pool.T).argmax(dim=1)
            matched = self.pool[nearest]
            own = F.normalize(text_features.detach().float(), dim=-1)
            self.matched_own_caption += int(((matched * own).sum(-1) > 0.999).sum())
            self.matched += len(idx)
            loss = clip_contrastive_loss(image_features, matched, model.logit_scale)
        else:
            loss = clip_contrastive_loss(image_features, text_features, model.logit_scale)
        self._enqueue(text_features)
        return loss


@register_clip_defense("roclip")
class RoClip(ClipTrainingTimeDefense):
    config_class = RoClipConfig
    config: RoClipConfig

    def train(self, poisoned: ImageTextSet, ctx: ClipDefenseContext) -> ClipDefenseOutcome:
        if ctx.bundle_factory is None or ctx.train_config is None:
            raise ValueError("roclip trains the victim's model: the context needs bundle_factory and train_config")
        bundle = ctx.bundle_factory()
        loss = RoClipLoss(bundle, poisoned, self.config)
        config = ctx.train_config.model_copy(update={"device": ctx.device})
        history = train_clip(bundle, poisoned, config, seed=self.config.seed, checkpoint_dir=ctx.work_dir,
                             checkpoint_tag=self.name, on_epoch_end=ctx.on_epoch_end, loss_fn=loss)
        return ClipDefenseOutcome(bundle, {"final_loss": history[-1]["train_loss"],
                                           "matched_pairs": loss.matched,
                                           "matched_own_caption_share": loss.matched_own_caption / max(loss.matched, 1)})
