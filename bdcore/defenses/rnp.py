"""RNP: unlearn the model on a little clean data (gradient ascent) so its clean neurons break while
the backdoor survives, then learn filter masks that recover clean accuracy; low masks mark backdoor neurons.

Li, Lyu, Ma, Koren, Lyu, Li, Jiang, "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023.

1. Unlearning (neuron level, all weights of a copy): SGD ascent on the clean cross-entropy, lr
   0.01, momentum 0.9, weight decay 5e-4, batch 128, gradient norm clipped to 20, for at most 20
   epochs, stopping after the first epoch whose running clean training accuracy is <= 0.20.
2. Recovering (filter level): per-channel masks on every BatchNorm2d output of the unlearned copy
   (weights frozen), initialised at 1, minimise the clean cross-entropy; SGD lr 0.2, momentum 0.9,
   20 epochs, masks clipped to [0, 1] after each step.
3. Pruning: the ORIGINAL backdoored model's neurons whose recovered mask is below a threshold are
   pruned (BN scale/shift and feeding conv filter zeroed); thresholds swept 0.05 ... 0.90.

Defaults (REFERENCE.md / the paper): clean_fraction 0.01 (1% of the training set), the values above.
Both stages train in training mode (batch statistics), as in the reference code.

Deviation (selection): the reference sweeps thresholds and reports the test metrics of each; here
the threshold is chosen on the defender's held-out clean part only, with ANP's rule (anp.py): the
largest threshold whose held-out accuracy stays within `max_val_acc_drop` (0.02) of the unpruned
model's; `threshold` fixes it instead.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.defenses._batches import Batches, defense_device
from bdcore.defenses._neurons import SoftMasks, require_batchnorm
from bdcore.defenses.anp import prune_by_threshold_on_val, threshold_grid
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, PostTrainingDefense
from bdcore.defenses.registry import register_defense


class RNPConfig(DefenseConfig):
    clean_fraction: float = Field(0.01, gt=0, le=1)
    batch_size: int = Field(128, ge=1)
    augment: bool = True
    unlearning_lr: float = Field(0.01, gt=0)
    unlearning_epochs: int = Field(20, ge=1)
    unlearning_momentum: float = Field(0.9, ge=0)
    unlearning_weight_decay: float = Field(5e-4, ge=0)
    clean_threshold: float = Field(0.20, ge=0, le=1)  # stop unlearning at this clean training accuracy
    max_grad_norm: float = Field(20.0, gt=0)
    recovering_lr: float = Field(0.2, gt=0)
    recovering_epochs: int = Field(20, ge=1)
    recovering_momentum: float = Field(0.9, ge=0)
    pruning_max: float = Field(0.90, gt=0, le=1)
    pruning_step: float = Field(0.05, gt=0, le=1)
    threshold: float | None = Field(None, ge=0, le=1)
    max_val_acc_drop: float = Field(0.02, ge=0, le=1)


def _unlearn(model, batches: Batches, cfg: RNPConfig) -> tuple[int, float, list[float]]:
    """Gradient ascent on the clean loss until the running clean accuracy of an epoch is <= the
    threshold; returns (epochs run, last epoch's accuracy, per-epoch accuracies)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.unlearning_lr, momentum=cfg.unlearning_momentum,
                                weight_decay=cfg.unlearning_weight_decay)
    model.train()
    accuracies: list[float] = []
    for _epoch in range(cfg.unlearning_epochs):
        correct = torch.zeros(())
        seen = 0
        for x01, y in batches.epoch():
            logits = model(batches.model_input(x01))
            loss = -F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            correct = correct + (logits.detach().argmax(1) == y).sum().cpu()
            seen += len(y)
        accuracies.append(float(correct) / max(seen, 1))
        if accuracies[-1] <= cfg.clean_threshold:
            break
    model.eval()
    return len(accuracies), accuracies[-1], accuracies


def _recover(model, units, batches: Batches, cfg: RNPConfig) -> tuple[list[torch.Tensor], float]:
    masks = SoftMasks(units)
    optimizer = torch.optim.SGD(masks.parameters(), lr=cfg.recovering_lr, momentum=cfg.recovering_momentum)
    model.requires_grad_(False)
    model.train()
    loss_sum, steps = torch.zeros(()), 0
    with masks.attached():
        for _epoch in range(cfg.recovering_epochs):
            loss_sum, steps = torch.zeros(()), 0
            for x01, y in batches.epoch():
                loss = F.cross_entropy(model(batches.model_input(x01)), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                masks.clamp_()
                loss_sum = loss_sum + loss.detach().cpu()
                steps += 1
    model.eval()
    return [m.detach().clone() for m in masks.masks], float(loss_sum) / max(steps, 1)


@register_defense("rnp")
class ReconstructiveNeuronPruning(PostTrainingDefense):
    config_class = RNPConfig
    config: RNPConfig

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        device = defense_device(ctx)
        model.to(device).eval()
        batches = Batches(clean.train, ctx.info, device, cfg.batch_size, augment=cfg.augment, seed=cfg.seed)
        example = batches.model_input(clean.train.images[:1].to(device).float() / 255.0)
        units = require_batchnorm(model, "rnp", example)
        torch.manual_seed(cfg.seed)
        unlearned = copy.deepcopy(model)
        epochs, acc_reached, accuracies = _unlearn(unlearned, batches, cfg)
        mask_values, recover_loss = _recover(unlearned, require_batchnorm(unlearned, "rnp", example), batches, cfg)
        del unlearned
        diagnostics = prune_by_threshold_on_val(
            model, units, mask_values, clean, ctx.info, device, threshold_grid(cfg.pruning_step, cfg.pruning_max),
            cfg.max_val_acc_drop, cfg.threshold)
        diagnostics.update({
            "unlearning_epochs": int(epochs),
            "unlearning_acc_reached": float(acc_reached),
            "unlearning_acc_by_epoch": [float(a) for a in accuracies],
            "recovering_final_loss": float(recover_loss),
            "clean_train_size": len(clean.train),
        })
        return DefenseOutcome(model.to("cpu").eval(), diagnostics)
