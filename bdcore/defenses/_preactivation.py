"""What BNP and EP share: the pre-activations of BatchNorm neurons (the BN layer's input, one
channel per neuron) on one seeded batch, outlier thresholds `mean +- u * std` per layer, and summaries.

Both methods come from Zheng, Tang, Li, Liu, "Pre-activation Distributions Expose Backdoor
Neurons", NeurIPS 2022.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bdcore.data.base import ImageSet
from bdcore.defenses._neurons import Unit


def seeded_batch(data: ImageSet, size: int, seed: int) -> ImageSet:
    """`size` samples of `data` drawn without replacement by a generator seeded with `seed`
    (all of it when it is smaller)."""
    if len(data) <= size:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size]
    return data.subset(order.sort().values.to(data.labels.device))


@torch.no_grad()
def collect_preactivations(model: nn.Module, units: list[Unit], x: torch.Tensor,
                           reduce: Callable[[torch.Tensor], object]) -> list:
    """One forward pass of `x` (model-ready input) in evaluation mode; for each unit, `reduce`
    applied to the input tensor of its BN layer (N x C x H x W). Reducing inside the hook keeps
    only per-neuron summaries in memory."""
    store: dict[int, object] = {}
    handles = [unit.norm.register_forward_pre_hook(
        lambda _m, inp, i=i: store.__setitem__(i, reduce(inp[0].detach().float())))
        for i, unit in enumerate(units)]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [store.get(i) for i in range(len(units))]


def upper_outliers(values: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of finite `values` above mean + u * std of the layer's finite values."""
    finite = torch.isfinite(values)
    if int(finite.sum()) < 2:
        return torch.empty(0, dtype=torch.long)
    v = values[finite]
    threshold = v.mean() + u * v.std()
    return torch.nonzero(finite & (values > threshold)).flatten().cpu()


def lower_outliers(values: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of finite `values` below mean - u * std of the layer's finite values."""
    return upper_outliers(-values, u)


def summary(values: torch.Tensor) -> dict[str, float]:
    """min / mean / std / max of the finite values, as plain floats (NaN when there are none)."""
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0:
        nan = float("nan")
        return {"min": nan, "mean": nan, "std": nan, "max": nan}
    return {"min": float(v.min()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "max": float(v.max())}
