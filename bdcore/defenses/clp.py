"""CLP: backdoor channels are unusually sensitive to their input, which shows in the weights alone as an
outlying upper bound of the channel's Lipschitz constant; prune those channels, without any data.

Zheng, Tang, Li, Liu, "Data-Free Backdoor Removal based on Channel Lipschitzness", ECCV 2022.
For every Conv2d output channel k, with the BN that directly normalises the conv folded in
(W_k * |gamma_k| / sqrt(running_var_k + eps)), the upper bound of the channel Lipschitz constant
(UCLC) is the largest singular value of the kernel reshaped to C_in x (kh * kw). Within each conv
layer, channels with UCLC > mean + u * std are pruned (conv filter and BN scale and shift zeroed).
Convs without a BN use their weights alone. No data and no fine-tuning; random noise of the input
shape is pushed through the model once only to find which BN follows which conv.

Defaults: u = 3 (paper, authors' code, BackdoorBench). Deviation: the conv filters are zeroed as
well as the BN scale and shift (the authors zero the BN only; the channel outputs 0 either way).
clean_fraction is accepted for interface uniformity and ignored.
"""
from __future__ import annotations

import torch
from pydantic import Field

from bdcore.data.augment import Normalizer
from bdcore.defenses._batches import defense_device
from bdcore.defenses._neurons import conv_units, prune_conv_channels
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, DefenseSkipped, PostTrainingDefense
from bdcore.defenses.registry import register_defense


class CLPConfig(DefenseConfig):
    u: float = Field(3.0, ge=0)  # prune UCLC > mean + u * std within a layer


@torch.no_grad()
def channel_lipschitz(conv: torch.nn.Conv2d, norm: torch.nn.BatchNorm2d | None) -> torch.Tensor:
    """UCLC of every output channel of `conv` (with `norm` folded in when given)."""
    weight = conv.weight.detach().float().flatten(2)  # C_out x C_in/groups x (kh * kw)
    if norm is not None:
        scale = norm.weight.detach().float().abs() / torch.sqrt(norm.running_var.float() + norm.eps)
        weight = weight * scale.view(-1, 1, 1)
    return torch.linalg.matrix_norm(weight, ord=2)


@register_defense("clp")
class ChannelLipschitzPruning(PostTrainingDefense):
    config_class = CLPConfig
    config: CLPConfig

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
            raise DefenseSkipped(f"clp prunes Conv2d channels and {type(model).__name__} has none")
        device = defense_device(ctx)
        model.to(device).eval()
        noise = torch.rand(1, *ctx.info.image_shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        layers = conv_units(model, Normalizer(ctx.info, device)(noise))
        per_layer, max_uclc, pruned, channels = {}, {}, 0, 0
        for name, conv, norm in layers:
            uclc = channel_lipschitz(conv, norm)
            channels += int(uclc.numel())
            if uclc.numel() < 2:
                per_layer[name] = 0
                continue
            idx = torch.nonzero(uclc > uclc.mean() + cfg.u * uclc.std()).flatten()
            prune_conv_channels(conv, norm, idx)
            per_layer[name] = int(idx.numel())
            max_uclc[name] = float(uclc.max())
            pruned += int(idx.numel())
        return DefenseOutcome(model.to("cpu").eval(), {
            "u": float(cfg.u),
            "clean_data_used": 0,
            "pruned_channels": pruned,
            "total_channels": channels,
            "pruned_fraction": pruned / max(channels, 1),
            "pruned_per_layer": per_layer,
            "max_uclc_per_layer": max_uclc,
        })
