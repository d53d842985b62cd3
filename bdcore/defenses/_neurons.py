"""Neurons of a CNN as defenses see them: the output channels of its BatchNorm layers (and of the
conv feeding each), with soft masks for mask-learning defenses and hard, persistent pruning.

Pruning zeroes a channel's BN scale and shift (and the feeding conv's filter), so the channel
outputs exactly 0 in training and evaluation mode, and the pruned model is a plain state dict of
the victim's architecture: the artifact needs no hooks or masks to reproduce it. ANP and RNP prune
as their reference does instead, zeroing the BN scale alone (`zero_bn_scale`): the channel then
outputs its BN shift.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from bdcore.defenses.base import DefenseSkipped

NORM_TYPES = (nn.BatchNorm2d,)


@dataclass
class Unit:
    """One BN layer (`norm`) with the conv whose output it normalises, when it directly follows one."""

    name: str
    norm: nn.BatchNorm2d
    conv: nn.Conv2d | None

    @property
    def channels(self) -> int:
        return self.norm.num_features


def batchnorm_units(model: nn.Module, example: torch.Tensor) -> list[Unit]:
    """Every BatchNorm2d of `model` in registration order, each paired with the conv whose output
    tensor it normalises directly (conv -> BN in conv-BN-ReLU blocks, conv1 -> bn2 in PreAct blocks).
    A BN fed by a sum (residual joins) or by anything else has no conv. The pairing is read from
    one traced forward pass on `example` (a normalised model input, e.g. one batch or random noise
    of the input shape), not guessed from module order."""
    fed_by: dict[int, nn.Conv2d] = {}
    outputs: dict[int, nn.Conv2d] = {}
    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(
                lambda m, _i, out: outputs.__setitem__(id(out), m)))
        elif isinstance(module, NORM_TYPES):
            handles.append(module.register_forward_pre_hook(
                lambda m, inp: fed_by.__setitem__(id(m), outputs.get(id(inp[0])))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            # Keep every conv output alive during the trace so tensor ids cannot be reused.
            kept: list[torch.Tensor] = []
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    handles.append(module.register_forward_hook(lambda _m, _i, out: kept.append(out)))
            model(example[:1].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    units = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            conv = fed_by.get(id(module))
            units.append(Unit(name, module, conv if conv is not None and conv.out_channels == module.num_features
                              else None))
    return units


def require_batchnorm(model: nn.Module, method: str, example: torch.Tensor) -> list[Unit]:
    if not any(isinstance(m, NORM_TYPES) for m in model.modules()):
        raise DefenseSkipped(f"{method} works on BatchNorm2d neurons and {type(model).__name__} has none")
    return batchnorm_units(model, example)


def conv_units(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every Conv2d with the BN that directly normalises its output (or None): the layers a
    channel analysis reads (CLP combines each conv with its BN)."""
    paired = {id(u.conv): u.norm for u in batchnorm_units(model, example) if u.conv is not None}
    return [(name, m, paired.get(id(m))) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def prune_unit_channels(unit: Unit, channels: torch.Tensor | list[int]) -> None:
    """Make `channels` of the unit output 0 for good (BN scale and shift 0; the feeding conv's filters 0)."""
    idx = torch.as_tensor(channels, dtype=torch.long, device=unit.norm.weight.device)
    if idx.numel() == 0:
        return
    unit.norm.weight[idx] = 0
    unit.norm.bias[idx] = 0
    if unit.conv is not None:
        unit.conv.weight[idx.to(unit.conv.weight.device)] = 0
        if unit.conv.bias is not None:
            unit.conv.bias[idx.to(unit.conv.bias.device)] = 0


@torch.no_grad()
def zero_bn_scale(unit: Unit, channels: torch.Tensor | list[int]) -> None:
    """Set only the BN scale (weight) of `channels` to 0, leaving the BN shift and the feeding conv
    as they are: how ANP and RNP prune (BackdoorBench defense/anp.py and rnp.py `pruning`). The
    channel then outputs its constant shift instead of 0."""
    idx = torch.as_tensor(channels, dtype=torch.long, device=unit.norm.weight.device)
    if idx.numel():
        unit.norm.weight[idx] = 0


@torch.no_grad()
def prune_conv_channels(conv: nn.Conv2d, norm: nn.BatchNorm2d | None, channels: torch.Tensor | list[int]) -> None:
    """Zero output channels of a conv (and of the BN that normalises it, whose shift would otherwise
    leave a constant)."""
    idx = torch.as_tensor(channels, dtype=torch.long, device=conv.weight.device)
    if idx.numel() == 0:
        return
    conv.weight[idx] = 0
    if conv.bias is not None:
        conv.bias[idx] = 0
    if norm is not None:
        norm.weight[idx.to(norm.weight.device)] = 0
        norm.bias[idx.to(norm.bias.device)] = 0


class PrunedChannels:
    """A record of pruned (unit, channel) pairs that can be re-applied after optimiser steps, so
    fine-tuning after pruning cannot revive a pruned neuron."""

    def __init__(self) -> None:
        self._pruned: list[tuple[Unit, torch.Tensor]] = []

    def add(self, unit: Unit, channels) -> None:
        idx = torch.as_tensor(channels, dtype=torch.long)
        if idx.numel():
            self._pruned.append((unit, idx))
            prune_unit_channels(unit, idx)

    def enforce(self) -> None:
        for unit, idx in self._pruned:
            prune_unit_channels(unit, idx)

    @property
    def count(self) -> int:
        return int(sum(idx.numel() for _, idx in self._pruned))


def total_channels(units: list[Unit]) -> int:
    return int(sum(u.channels for u in units))


class SoftMasks:
    """One learnable multiplicative mask per unit channel, applied to the BN output by forward hooks
    while attached (ANP, RNP). Masks live in [0, 1] after `clamp_()`."""

    def __init__(self, units: list[Unit], init: float = 1.0):
        self.units = units
        self.masks = [nn.Parameter(torch.full((u.channels,), float(init), device=u.norm.weight.device))
                      for u in units]

    def parameters(self) -> list[nn.Parameter]:
        return list(self.masks)

    @torch.no_grad()
    def clamp_(self) -> None:
        for m in self.masks:
            m.clamp_(0.0, 1.0)

    @contextmanager
    def attached(self, scale_only: bool = False) -> Iterator["SoftMasks"]:
        """Mask the BN output while in the block; `scale_only` masks the BN scale alone (the output
        becomes mask * (out - shift) + shift), as RNP's masked BatchNorm does."""
        handles = []
        for unit, mask in zip(self.units, self.masks):
            if scale_only:
                handles.append(unit.norm.register_forward_hook(
                    lambda m, _inp, out, mask=mask: _mask_scale(m, out, mask)))
            else:
                handles.append(unit.norm.register_forward_hook(
                    lambda _m, _inp, out, mask=mask: out * mask.view(1, -1, 1, 1).to(out.dtype)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def zero_scale_at_most(self, threshold: float) -> int:
        """Zero the BN scale (only) of every channel whose mask is <= `threshold` (the reference's
        comparison); returns how many channels are at or below it."""
        count = 0
        for unit, mask in zip(self.units, self.masks):
            idx = torch.nonzero(mask.detach() <= threshold).flatten().cpu()
            zero_bn_scale(unit, idx)
            count += int(idx.numel())
        return count


def _mask_scale(norm: nn.BatchNorm2d, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BN output with its scale multiplied by `mask`: mask * (out - shift) + shift."""
    if norm.bias is None:
        return out * mask.view(1, -1, 1, 1).to(out.dtype)
    shift = norm.bias.detach().view(1, -1, 1, 1)
    return mask.view(1, -1, 1, 1).to(out.dtype) * (out - shift) + shift


@contextmanager
def capture_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the latest forward output of each named module (for feature-based losses/statistics)."""
    store: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, key=key: store.__setitem__(key, out))
               for key, m in modules.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
