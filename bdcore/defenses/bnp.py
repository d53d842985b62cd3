"""BNP: a BN layer's running statistics summarise the (poisoned) training data; backdoor neurons are
those whose pre-activation distribution on clean data diverges most from them, so prune those.

Zheng, Tang, Li, Liu, "Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022
(BN-based pruning; the same authors' CLP paper is the ECCV 2022 one).
For every BatchNorm2d neuron: the benign distribution N(m_c, v_c) is the mean and variance of its
pre-activation (the BN input, over samples and positions) on one batch of the defender's clean data;
the hypothetical distribution N(m_r, v_r) is the BN running mean and variance (estimated on the
poisoned training set). KL(N(m_c, v_c) || N(m_r, v_r)) = log(s_r / s_c) + (v_c + (m_c - m_r)^2) / (2 v_r)
- 1/2; within each layer, neurons with KL > mean + u * std are pruned (BN scale and shift and the
feeding conv filter zeroed). No fine-tuning.

Defaults: u = 3 (paper / authors' code / BackdoorBench); one batch of 256 clean images (BackdoorBench's
config; the authors' code uses 500, `batch_size: 500`), drawn with the config seed from the defender's fitting
part (`clean.train`). Deviations: pruned neurons output 0 (the authors zero only the BN scale,
leaving the shift as a constant); the KL uses the standard-deviation ratio (BackdoorBench's copy
takes the log of the variance ratio, twice the paper's term); variances include the BN eps. Nothing
is selected, so clean.val is used only for the reported held-out accuracy.
"""
from __future__ import annotations

import torch
from pydantic import Field

from bdcore.defenses._batches import Batches, defense_device, held_out_accuracy
from bdcore.defenses._neurons import prune_unit_channels, require_batchnorm, total_channels
from bdcore.defenses._preactivation import collect_preactivations, seeded_batch, summary, upper_outliers
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, PostTrainingDefense
from bdcore.defenses.registry import register_defense


class BNPConfig(DefenseConfig):
    u: float = Field(3.0, ge=0)  # prune KL > mean + u * std within a layer
    batch_size: int = Field(256, ge=2)  # clean images whose pre-activation statistics are compared


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x.transpose(0, 1).flatten(1), dim=1)
    return mean, var


def gaussian_kl(mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)), elementwise."""
    return 0.5 * torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5


@register_defense("bnp")
class BNPruning(PostTrainingDefense):
    config_class = BNPConfig
    config: BNPConfig
    holdout_fraction = 0.0  # selects nothing: fits on the whole clean subset, as BackdoorBench

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        device = defense_device(ctx)
        model.to(device).eval()
        batch = seeded_batch(clean.train, cfg.batch_size, cfg.seed)
        batches = Batches(batch, ctx.info, device, batch_size=len(batch))
        x = batches.model_input(batches.data.images.float().div(255.0))
        units = require_batchnorm(model, "bnp", x[:1])
        val_before = held_out_accuracy(model, clean, ctx.info, device)

        moments = collect_preactivations(model, units, x, _moments)
        per_layer, kl_summary, pruned = {}, {}, 0
        with torch.no_grad():
            for unit, (mean_c, var_c) in zip(units, moments):
                eps = unit.norm.eps
                var_r = unit.norm.running_var.float() + eps
                kl = gaussian_kl(mean_c, var_c + eps, unit.norm.running_mean.float(), var_r)
                idx = upper_outliers(kl, cfg.u)
                prune_unit_channels(unit, idx)
                per_layer[unit.name] = int(idx.numel())
                kl_summary[unit.name] = summary(kl)
                pruned += int(idx.numel())
        channels = total_channels(units)
        val_after = held_out_accuracy(model, clean, ctx.info, device)
        return DefenseOutcome(model.to("cpu").eval(), {
            "u": float(cfg.u),
            "clean_batch_size": len(batch),
            "pruned_channels": pruned,
            "total_channels": channels,
            "pruned_fraction": pruned / max(channels, 1),
            "pruned_per_layer": per_layer,
            "kl_per_layer": kl_summary,
            "val_acc_before": val_before,
            "val_acc_after": val_after,
        })
