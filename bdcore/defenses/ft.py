"""FT: fine-tune the backdoored model on the defender's clean data so it forgets the trigger.

The fine-tuning baseline of BackdoorBench (Wu et al., "BackdoorBench: A Comprehensive Benchmark of
Backdoor Learning", NeurIPS 2022 Datasets & Benchmarks), as in Liu et al. 2018 (Fine-Pruning):
100 epochs, batch 256, SGD lr 0.01 cosine, training augmentation, 5% clean data.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from bdcore.defenses._batches import held_out_accuracy
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, PostTrainingDefense
from bdcore.defenses.registry import register_defense
from bdcore.train import TrainConfig, train_model


class FTConfig(DefenseConfig):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"


@register_defense("ft")
class FineTuning(PostTrainingDefense):
    config_class = FTConfig
    config: FTConfig
    holdout_fraction = 0.0  # selects nothing: fits on the whole clean subset, as BackdoorBench

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, schedule=cfg.schedule, device=ctx.device)
        val_before = held_out_accuracy(model, clean, ctx.info, ctx.device)
        result = train_model(model, clean.train, ctx.info, train_cfg, seed=cfg.seed, on_epoch_end=ctx.on_epoch_end,
                             checkpoint_dir=ctx.work_dir)
        return DefenseOutcome(model, {
            "clean_train_size": len(clean.train),
            "val_acc_before": val_before,
            "val_acc_after": held_out_accuracy(model, clean, ctx.info, ctx.device),
            "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
        })
