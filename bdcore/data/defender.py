"""The defender's clean subset: a seeded share of the clean training set, with a held-out part.

Any model selection a defense makes (pruning level, threshold, checkpoint) uses `val`; nothing in
the engine ever selects on the test set.
"""
from __future__ import annotations

import torch

from bdcore.data.base import DefenderData, ImageSet


def defender_subset(
    clean_train: ImageSet, fraction: float = 0.05, val_fraction: float = 0.2, seed: int = 0
) -> DefenderData:
    """Draw `fraction` of the clean training set (stratification is not assumed by the reference),
    and hold out `val_fraction` of that draw for selection."""
    if not 0 < fraction <= 1:
        raise ValueError(f"clean subset fraction must be in (0, 1], got {fraction}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {val_fraction}")
    n = len(clean_train)
    n_take = max(2, int(round(n * fraction)))
    generator = torch.Generator().manual_seed(10_007 + seed)  # independent of the poisoning draw
    chosen = torch.randperm(n, generator=generator)[:n_take]
    n_val = max(1, int(round(n_take * val_fraction))) if val_fraction > 0 else 0
    val_idx, train_idx = chosen[:n_val].sort().values, chosen[n_val:].sort().values
    return DefenderData(
        train=clean_train.subset(train_idx),
        val=clean_train.subset(val_idx),
        indices_train=train_idx,
        indices_val=val_idx,
    )
