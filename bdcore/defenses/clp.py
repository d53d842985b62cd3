"""CLP: backdoor channels are unusually sensitive to their input, which shows in the weights alone as an
outlying upper bound of the channel's Lipschitz constant; prune those channels, without any data.

Zheng, Tang, Li, Liu, "Data-Free Backdoor Removal based on Channel Lipschitzness", ECCV 2022.
For a conv paired with a BN, the upper bound of channel k's Lipschitz constant (UCLC) is the largest
singular value of W_k * |gamma_k| / sqrt(running_var_k + eps), the kernel reshaped to
C_in x (kh * kw). Within each pair, channels with UCLC > mean + u * std are pruned. No data and no
fine-tuning.

Defaults: u = 3 (paper, authors' code, BackdoorBench), `pairing: module_order`, BackdoorBench's rule
(defense/clp.py CLP_prune): walk named_modules in order, pair every BatchNorm2d with the last Conv2d
registered before it, and prune by zeroing that BN's scale and shift only. On PreAct-ResNet18 this
pairs each block's bn2 with its conv1 (the conv it normalises), each bn1 with the previous block's
last conv (conv2, or the projection shortcut `shortcut.0`, registered after conv2), the first bn1
with the stem conv. A model without such a pair (no BatchNorm2d) is skipped.
`pairing: traced` is the engine's former rule: every Conv2d with the BN that directly normalises its
output (found by pushing noise of the input shape through the model once), conv filter and BN both
zeroed, convs without a BN on their weights alone.
Deviations: a BN whose width differs from its module-order conv's output, or with no conv before
it, is left alone and listed in `unpaired_bn` (BackdoorBench would fail on it or read the wrong
filters); the BN's eps is kept in the fold (BackdoorBench divides by sqrt(running_var) alone).
clean_fraction is accepted for interface uniformity and ignored.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from bdcore.data.augment import Normalizer
from bdcore.defenses._batches import defense_device
from bdcore.defenses._neurons import conv_units, prune_conv_channels
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, DefenseSkipped, PostTrainingDefense
from bdcore.defenses.registry import register_defense


class CLPConfig(DefenseConfig):
    u: float = Field(3.0, ge=0)  # prune UCLC > mean + u * std within a layer
    pairing: Literal["module_order", "traced"] = "module_order"  # see the module docstring


def module_order_pairs(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d, str, nn.Conv2d]]:
    """(bn name, bn, conv name, conv): every BatchNorm2d with the last Conv2d registered before it in
    `named_modules` order (BackdoorBench's CLP pairing), when that conv's output width is the BN's."""
    pairs, last = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last = (name, module)
        elif isinstance(module, nn.BatchNorm2d) and last is not None and last[1].out_channels == module.num_features:
            pairs.append((name, module, *last))
    return pairs


@torch.no_grad()
def channel_lipschitz(conv: torch.nn.Conv2d, norm: torch.nn.BatchNorm2d | None) -> torch.Tensor:
    """UCLC of every output channel of `conv` (with `norm` folded in when given)."""
    weight = conv.weight.detach().float().flatten(2)  # C_out x C_in/groups x (kh * kw)
    if norm is not None:
        scale = norm.weight.detach().float().abs() / torch.sqrt(norm.running_var.float() + norm.eps)
        weight = weight * scale.view(-1, 1, 1)
    return torch.linalg.matrix_norm(weight, ord=2)


@torch.no_grad()
def _zero_bn_channels(norm: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    idx = idx.to(norm.weight.device)
    norm.weight[idx] = 0
    norm.bias[idx] = 0


@register_defense("clp")
class ChannelLipschitzPruning(PostTrainingDefense):
    config_class = CLPConfig
    config: CLPConfig
    holdout_fraction = 0.0  # selects nothing: fits on the whole clean subset, as BackdoorBench

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
            raise DefenseSkipped(f"clp prunes Conv2d channels and {type(model).__name__} has none")
        device = defense_device(ctx)
        model.to(device).eval()
        layers, extra = self._layers(model, ctx, device)
        per_layer, max_uclc, pruned, channels = {}, {}, 0, 0
        for name, conv, norm in layers:
            uclc = channel_lipschitz(conv, norm)
            channels += int(uclc.numel())
            if uclc.numel() < 2:
                per_layer[name] = 0
                continue
            idx = torch.nonzero(uclc > uclc.mean() + cfg.u * uclc.std()).flatten()
            if cfg.pairing == "module_order":  # BackdoorBench zeroes the BN's scale and shift only
                _zero_bn_channels(norm, idx)
            else:
                prune_conv_channels(conv, norm, idx)
            per_layer[name] = int(idx.numel())
            max_uclc[name] = float(uclc.max())
            pruned += int(idx.numel())
        return DefenseOutcome(model.to("cpu").eval(), {
            "u": float(cfg.u),
            "pairing": cfg.pairing,
            **extra,
            "clean_data_used": 0,
            "pruned_channels": pruned,
            "total_channels": channels,
            "pruned_fraction": pruned / max(channels, 1),
            "pruned_per_layer": per_layer,
            "max_uclc_per_layer": max_uclc,
        })

    def _layers(self, model, ctx: DefenseContext, device) -> tuple[list, dict]:
        """(name, conv, bn or None) per analysed layer under the configured pairing, and diagnostics.
        module_order names a layer by its BN (what is pruned), traced by its conv."""
        if self.config.pairing == "traced":
            noise = torch.rand(1, *ctx.info.image_shape, generator=torch.Generator().manual_seed(self.config.seed))
            return conv_units(model, Normalizer(ctx.info, device)(noise.to(device))), {}
        pairs = module_order_pairs(model)
        if not pairs:
            raise DefenseSkipped(f"clp (pairing module_order, BackdoorBench's) prunes BatchNorm2d channels and "
                                 f"{type(model).__name__} has no BatchNorm2d after a Conv2d of its width; "
                                 "pairing: traced prunes convs on their weights alone")
        paired = {bn_name for bn_name, *_ in pairs}
        return [(bn_name, conv, norm) for bn_name, norm, _conv_name, conv in pairs], {
            "paired_conv": {bn_name: conv_name for bn_name, _norm, conv_name, _conv in pairs},
            "unpaired_bn": [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and n not in paired],
        }
