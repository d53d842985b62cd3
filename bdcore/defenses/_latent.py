"""What the latent-space detectors (ac, spectral, spectre, scan) share: penultimate features of the
poisoned training set and of the defender's clean subset, grouped by label."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bdcore.analysis import latent_features
from bdcore.data.base import DatasetInfo, DefenderData, ImageSet
from bdcore.defenses._batches import defense_device
from bdcore.defenses.base import DefenseContext


@dataclass
class LatentSets:
    features: np.ndarray  # N x D, float64: the poisoned training set
    labels: np.ndarray  # N, as poisoned
    clean_features: np.ndarray  # M x D: the defender's clean subset (fit and held-out parts)
    clean_labels: np.ndarray

    def rows(self, label: int) -> np.ndarray:
        return np.nonzero(self.labels == label)[0]

    def clean_of(self, label: int) -> np.ndarray:
        return self.clean_features[self.clean_labels == label]


def paper_removal_count(n: int, removal_factor: float, eps: float) -> int:
    """How many of a label's n samples the spectral-signature papers remove: ceil(factor * eps * n)."""
    return min(n, int(np.ceil(removal_factor * eps * n)))


def all_clean(clean: DefenderData) -> ImageSet:
    """The defender's fit and held-out parts together."""
    return ImageSet(torch.cat([clean.train.images, clean.val.images]), torch.cat([clean.train.labels, clean.val.labels]))


def latent_sets(model: nn.Module, data: ImageSet, clean: DefenderData, info: DatasetInfo,
                ctx: DefenseContext) -> LatentSets:
    """Penultimate features (bdcore.analysis.latent_features) of `data` and of the whole clean subset.
    Detectors select nothing on the clean data, so its held-out part is used as well."""
    device = defense_device(ctx)
    reference = all_clean(clean)
    feats = latent_features(model, data.images, info, device=device).double().numpy()
    clean_feats = latent_features(model, reference.images, info, device=device).double().numpy()
    return LatentSets(feats, data.labels.cpu().numpy(), clean_feats, reference.labels.cpu().numpy())
