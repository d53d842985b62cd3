"""EP: on the poisoned training data a backdoor neuron's pre-activation is a mixture of a benign and a
far-off poisoned population, whose standardised distribution has unusually low entropy; prune those.

Zheng, Tang, Li, Liu, "Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022
(entropy-based pruning; the same authors' CLP paper is the ECCV 2022 one).
For every BatchNorm2d neuron: its pre-activation (the BN input) on one batch of the attack's poisoned
training set, reduced per sample to the spatial maximum (as in the authors' code), standardised to
zero mean and unit variance, and its differential entropy estimated by a histogram of fixed bin
width (a Gaussian has the largest entropy at a given variance; a two-population mixture less).
Within each layer, neurons with entropy < mean - u * std are pruned (BN scale and shift and the
feeding conv filter zeroed). Uses no clean data and no fine-tuning.

Defaults: u = 3 (paper / authors' code / BackdoorBench); one batch of 256 poisoned-training images
(BackdoorBench's config; the authors' batch is 500, `batch_size: 500`, and their code uses all batches), drawn
with the config seed; bin width 0.1 in standard deviations (BackdoorBench; the authors' 0.01 suits
their full 50,000-image training set, not one batch). Deviations: pruned neurons output 0 (the
authors zero only the BN scale); neurons with zero variance on the batch (dead or already pruned)
are left out of the statistics and never pruned. Needs ctx.poisoned_train (skipped without it).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from bdcore.data.augment import Normalizer
from bdcore.defenses._batches import Batches, defense_device, held_out_accuracy
from bdcore.defenses._neurons import prune_unit_channels, require_batchnorm, total_channels
from bdcore.defenses._preactivation import collect_preactivations, lower_outliers, seeded_batch, summary
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, PostTrainingDefense
from bdcore.defenses.registry import register_defense


class EPConfig(DefenseConfig):
    u: float = Field(3.0, ge=0)  # prune entropy < mean - u * std within a layer
    batch_size: int = Field(256, ge=2)  # poisoned-training images whose pre-activations are measured
    bin_width: float = Field(0.1, gt=0)  # histogram bin, in standard deviations of the neuron


def _spatial_max(x: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> C x N: each neuron's largest pre-activation per sample."""
    return x.flatten(2).amax(2).transpose(0, 1).contiguous()


def histogram_entropy(values: torch.Tensor, bin_width: float) -> torch.Tensor:
    """Per row of `values` (neurons x samples): standardise, bin with width `bin_width`, return the
    discrete entropy -sum p log p plus log(bin_width), the histogram estimate of differential entropy.
    Rows with zero variance give NaN."""
    mean = values.mean(1, keepdim=True)
    std = values.std(1, keepdim=True)
    z = (values - mean) / std
    valid = torch.isfinite(z).all(1)
    z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    low = z.min(1, keepdim=True).values
    bins = torch.floor((z - low) / bin_width).long()
    n_bins = int(bins.max()) + 1 if bins.numel() else 1
    counts = torch.zeros(values.shape[0], n_bins, device=values.device)
    counts.scatter_add_(1, bins, torch.ones_like(z))
    p = counts / values.shape[1]
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(1) + math.log(bin_width)
    return torch.where(valid, entropy, torch.full_like(entropy, float("nan")))


@register_defense("ep")
class EntropyPruning(PostTrainingDefense):
    config_class = EPConfig
    config: EPConfig
    holdout_fraction = 0.0  # selects nothing: fits on the whole clean subset, as BackdoorBench

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        device = defense_device(ctx)
        model.to(device).eval()
        normalize = Normalizer(ctx.info, device)
        noise = normalize(torch.rand(1, *ctx.info.image_shape, generator=torch.Generator().manual_seed(cfg.seed))
                          .to(device))
        units = require_batchnorm(model, "ep", noise)  # random noise traces the graph; it is not data
        poisoned = ctx.require_poisoned_train("ep")
        batch = seeded_batch(poisoned.data, cfg.batch_size, cfg.seed)
        batches = Batches(batch, ctx.info, device, batch_size=len(batch))
        x = batches.model_input(batches.data.images.float().div(255.0))

        feats = collect_preactivations(model, units, x, _spatial_max)
        per_layer, entropy_summary, pruned = {}, {}, 0
        with torch.no_grad():
            for unit, values in zip(units, feats):
                entropy = histogram_entropy(values, cfg.bin_width)
                idx = lower_outliers(entropy, cfg.u)
                prune_unit_channels(unit, idx)
                per_layer[unit.name] = int(idx.numel())
                entropy_summary[unit.name] = summary(entropy)
                pruned += int(idx.numel())
        channels = total_channels(units)
        diagnostics = {
            "u": float(cfg.u),
            "bin_width": float(cfg.bin_width),
            "clean_data_used_for_pruning": 0,
            "poisoned_batch_size": len(batch),
            "pruned_channels": pruned,
            "total_channels": channels,
            "pruned_fraction": pruned / max(channels, 1),
            "pruned_per_layer": per_layer,
            "entropy_per_layer": entropy_summary,
        }
        # Reported only (EP selects nothing): the defender's held-out clean accuracy after pruning.
        diagnostics["val_acc_after"] = held_out_accuracy(model, clean, ctx.info, device)
        return DefenseOutcome(model.to("cpu").eval(), diagnostics)
