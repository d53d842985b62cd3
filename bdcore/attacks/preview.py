"""Looking at a trigger: the mean change it makes per pixel, and a picture for a person to check.

The picture has one column per image and the rows: clean, poisoned (test-time trigger), the
difference amplified to the full 0..255 range, and, for attacks whose training trigger differs
(adap_blend, adap_patch, lc, ...), the training-time poisoned image and its amplified difference.
"""
from __future__ import annotations

import torch

from bdcore.attacks.base import Attack


def mean_abs_change(clean: torch.Tensor, poisoned: torch.Tensor) -> float:
    """Mean |poisoned - clean| per pixel and channel, in 0..255 intensity units."""
    if clean.shape != poisoned.shape:
        raise ValueError(f"shapes differ: {tuple(clean.shape)} vs {tuple(poisoned.shape)}")
    return float((poisoned.float() - clean.float()).abs().mean())


def _amplified(clean: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
    diff = (poisoned.float() - clean.float()).abs()
    peak = diff.flatten(1).amax(1).clamp_min(1.0).view(-1, 1, 1, 1)
    return (diff / peak * 255).round().to(torch.uint8)


def trigger_preview(attack: Attack, images: torch.Tensor, labels: torch.Tensor, border: int = 2) -> torch.Tensor:
    """A (H', W', 3) uint8 grid: rows clean / poisoned / amplified difference (and training-time
    poisoned / difference when the training trigger differs); one column per image."""
    poisoned = attack.apply_trigger(images, labels)
    rows = [images, poisoned, _amplified(images, poisoned)]
    train_poisoned = attack.apply_train_trigger(images, labels)
    if not torch.equal(train_poisoned, poisoned):
        rows += [train_poisoned, _amplified(images, train_poisoned)]
    n, c, h, w = images.shape
    grid = torch.full((len(rows) * (h + border) + border, n * (w + border) + border, 3), 255, dtype=torch.uint8)
    for r, row in enumerate(rows):
        row = row.cpu()
        if c == 1:
            row = row.expand(-1, 3, -1, -1)
        for i in range(n):
            top, left = border + r * (h + border), border + i * (w + border)
            grid[top : top + h, left : left + w] = row[i].permute(1, 2, 0)
    return grid
