"""CleanCLIP: fine-tune a backdoored CLIP on clean pairs with the multimodal contrastive loss plus in-modal
self-supervised losses (each image against an augmented view of itself, each caption against an augmented
caption), so every modality is learned on its own and the spurious trigger-text tie weakens.

Bansal et al. "CleanCLIP: Mitigating Data Poisoning Attacks in Multimodal Contrastive Learning", ICCV 2023.
Defaults are the paper's: L = 1 * L_CLIP + 1 * L_SS, with L_SS the mean of the image and the text InfoNCE
terms; 10 epochs, AdamW lr 1e-5 with cosine decay, batch 64, 100K clean pairs (`clean_fraction` 0.2, the
ratio of 100K to the victim's 500K pairs).
Deviations: the image views are SimCLR-style (random resized crop 0.5-1, flip where the data allows,
colour jitter, grayscale) where the authors use AutoAugment; the text views are EDA's random deletion and
swap only (its synonym operations need WordNet, which is not shipped). Both in-modal terms use CLIP's
symmetric loss with the model's own temperature.
"""
from __future__ import annotations

import torch
from pydantic import Field

from bdcore.clip.data import ImageTextSet, augment_captions
from bdcore.clip.defenses.base import (
    ClipDefenseContext,
    ClipDefenseOutcome,
    ClipFinetuneConfig,
    ClipPostTrainingDefense,
    register_clip_defense,
)
from bdcore.clip.models import ClipBundle
from bdcore.clip.train import clip_contrastive_loss, train_clip
from bdcore.clip.zeroshot import clip_input
from bdcore.defenses._contrastive import contrastive_views


class CleanClipConfig(ClipFinetuneConfig):
    crossmodal_weight: float = Field(1.0, ge=0)  # lambda_1
    inmodal_weight: float = Field(1.0, ge=0)  # lambda_2
    text_edit_p: float = Field(0.1, ge=0, lt=1)  # EDA's alpha


class CleanClipLoss:
    """train_clip's loss_fn: cross-modal CLIP loss + in-modal image and text InfoNCE."""

    def __init__(self, bundle: ClipBundle, clean: ImageTextSet, ctx: ClipDefenseContext, config: CleanClipConfig):
        self.bundle, self.clean, self.info, self.config = bundle, clean, ctx.info, config
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.last_terms: dict[str, float] = {}

    def __call__(self, model, images: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        image_features, text_features = model.encode_image(images), model.encode_text(tokens)
        crossmodal = clip_contrastive_loss(image_features, text_features, model.logit_scale)
        raw = self.clean.images[idx].float().div_(255.0)
        views = clip_input(contrastive_views(raw, self.info, self.generator, crop_scale=(0.5, 1.0)), self.bundle)
        captions = augment_captions([self.clean.captions[i] for i in idx.tolist()], self.generator,
                                    self.config.text_edit_p)
        view_features = model.encode_image(views.to(images.device))
        edited_features = model.encode_text(self.bundle.tokenize(captions).to(tokens.device))
        inmodal = (clip_contrastive_loss(image_features, view_features, model.logit_scale)
                   + clip_contrastive_loss(text_features, edited_features, model.logit_scale)) / 2
        self.last_terms = {"crossmodal": float(crossmodal.detach()), "inmodal": float(inmodal.detach())}
        return self.config.crossmodal_weight * crossmodal + self.config.inmodal_weight * inmodal


@register_clip_defense("cleanclip")
class CleanClip(ClipPostTrainingDefense):
    config_class = CleanClipConfig
    config: CleanClipConfig

    def repair(self, bundle: ClipBundle, clean: ImageTextSet, ctx: ClipDefenseContext) -> ClipDefenseOutcome:
        loss = CleanClipLoss(bundle, clean, ctx, self.config)
        history = train_clip(bundle, clean, self.config.train_config(ctx.device), seed=self.config.seed,
                             checkpoint_dir=ctx.work_dir, checkpoint_tag=self.name, on_epoch_end=ctx.on_epoch_end,
                             loss_fn=loss)
        return ClipDefenseOutcome(bundle, {"clean_pairs": len(clean), "final_loss": history[-1]["train_loss"],
                                           **{f"last_{k}_loss": v for k, v in loss.last_terms.items()}})
