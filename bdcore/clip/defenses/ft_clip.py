"""Clean fine-tuning of a backdoored CLIP: continue contrastive image-text training on the defender's clean
pairs only, hoping the trigger-target association fades.

The baseline defense of Bansal et al. "CleanCLIP: Mitigating Data Poisoning Attacks in Multimodal
Contrastive Learning", ICCV 2023 (their "fine-tuning with the multimodal contrastive loss"), with their
schedule: 10 epochs, AdamW lr 1e-5 with cosine decay, batch 64, on 100K clean pairs (here `clean_fraction`
0.2 of the training pairs, the ratio of 100K to the 500K pairs the victim was trained on).
"""
from __future__ import annotations

from bdcore.clip.data import ImageTextSet
from bdcore.clip.defenses.base import (
    ClipDefenseContext,
    ClipDefenseOutcome,
    ClipFinetuneConfig,
    ClipPostTrainingDefense,
    register_clip_defense,
)
from bdcore.clip.models import ClipBundle
from bdcore.clip.train import train_clip


@register_clip_defense("ft_clip")
class FineTuneClip(ClipPostTrainingDefense):
    config_class = ClipFinetuneConfig
    config: ClipFinetuneConfig

    def repair(self, bundle: ClipBundle, clean: ImageTextSet, ctx: ClipDefenseContext) -> ClipDefenseOutcome:
        history = train_clip(bundle, clean, self.config.train_config(ctx.device), seed=self.config.seed,
                             checkpoint_dir=ctx.work_dir, checkpoint_tag=self.name, on_epoch_end=ctx.on_epoch_end)
        return ClipDefenseOutcome(bundle, {"clean_pairs": len(clean), "final_loss": history[-1]["train_loss"]})
