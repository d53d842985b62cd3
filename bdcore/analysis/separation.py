"""Latent separation: how well poison samples split off from clean ones in a model's feature space.

Latent-separation defenses assume poison samples form their own cluster in the penultimate layer.
The score follows Activation Clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural
Networks by Activation Clustering", 2018): take the penultimate features of every training sample
*labelled* as the target class in the poisoned set (clean target-class samples + poison samples),
centre them, reduce them to 10 dimensions, split them with 2-means, and compare the split with the
true poison/clean split:

- ari (the score to use): adjusted Rand index of the 2-means split vs poison/clean. Chance-corrected:
  1 = the clusters are exactly poison and clean, ~0 = no better than a random split, whatever the
  poison share (F1 is not: at a 50% poison share, lumping everything together already gets 0.67);
- f1: the better of the two clusters' F1 against the poison set;
- silhouette: silhouette of the TRUE poison/clean split in the reduced space (near 1 = poison
  forms a compact cluster apart from clean samples; near 0 or below = mixed in).

Reduction: PCA by default. AC uses ICA (`reduction="ica"`), but FastICA's unit-variance components
make 2-means split along whichever independent direction it lands on, so on a few hundred
samples its score moves with ICA's random start (measured on a badnet smallcnn: ARI 0.15-0.75 over
three seeds); PCA keeps the variance, so the dominant direction drives the split and the score is
stable. 2-means runs 50 restarts and keeps the lowest inertia.

A badnet model separates its poison almost perfectly; the adaptive attacks of Qi et al. (ICLR 2023)
are built to push these scores down. Cover samples carry the trigger but are not poison (their
label is true), so they count as clean here, as in the authors' evaluation.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from bdcore.attacks.base import PoisonedTrainSet
from bdcore.data.augment import Normalizer
from bdcore.data.base import DatasetInfo
from bdcore.device import pick_device


@dataclass
class SeparationScore:
    ari: float  # the chance-corrected score (see the module docstring)
    f1: float
    silhouette: float
    n_poison: int
    n_clean: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def final_linear(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear: its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head; pass `layer` to latent_features")
    return linears[-1]


@torch.no_grad()
def latent_features(model: nn.Module, images: torch.Tensor, info: DatasetInfo, layer: str | nn.Module | None = None,
                    batch_size: int = 256, device: str | torch.device | None = None) -> torch.Tensor:
    """N x D float features (CPU) of uint8 images, evaluation mode, no augmentation.

    Default: the penultimate features, i.e. what the module feeding the model's final nn.Linear
    produces, captured by a forward pre-hook on that Linear (its input, after any flatten in the
    model's forward). `layer` (a module, or its name in model.named_modules()) instead takes that
    module's output, flattened."""
    dev = pick_device(str(device) if device is not None else None)
    captured: list[torch.Tensor] = []
    if layer is None:
        handle = final_linear(model).register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    else:
        module = dict(model.named_modules())[layer] if isinstance(layer, str) else layer
        handle = module.register_forward_hook(lambda _m, _inputs, output: captured.append(output))
    was_training = model.training
    model.eval()
    model.to(dev)
    normalize = Normalizer(info, dev)
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            captured.clear()
            model(normalize(images[start : start + batch_size].to(dev)))
            out.append(captured[-1].float().flatten(1).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def separation_score(features: torch.Tensor | np.ndarray, is_poison: torch.Tensor | np.ndarray,
                     n_components: int = 10, reduction: Literal["pca", "ica"] = "pca",
                     seed: int = 0) -> SeparationScore:
    """Activation-Clustering-style separation of `features` (N x D) into poison vs clean (see the
    module docstring): centre, reduce to `n_components` (PCA or AC's ICA), 2-means, score the two
    clusters against `is_poison`. `seed` fixes the reduction's and k-means' random starts."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.metrics import adjusted_rand_score, f1_score, silhouette_score

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    y = np.asarray(is_poison).astype(bool)
    n_poison, n_clean = int(y.sum()), int((~y).sum())
    if n_poison < 2 or n_clean < 2:
        raise ValueError(f"need at least 2 poison and 2 clean samples, got {n_poison} and {n_clean}")
    x = x - x.mean(0)
    dims = min(n_components, x.shape[1], x.shape[0] - 1)
    if dims < x.shape[1]:
        with warnings.catch_warnings():  # FastICA warns when it stops at max_iter; the components still serve
            warnings.simplefilter("ignore")
            if reduction == "ica":
                x = FastICA(dims, whiten="unit-variance", random_state=seed, max_iter=1000).fit_transform(x)
            else:
                x = PCA(dims, random_state=seed).fit_transform(x)
    clusters = KMeans(2, n_init=50, random_state=seed).fit_predict(x)
    f1 = max(f1_score(y, clusters == c, zero_division=0.0) for c in (0, 1))
    return SeparationScore(
        ari=float(adjusted_rand_score(y, clusters)),
        f1=float(f1),
        silhouette=float(silhouette_score(x, y)),
        n_poison=n_poison,
        n_clean=n_clean,
    )


def poison_separation(model: nn.Module, poisoned: PoisonedTrainSet, info: DatasetInfo, target: int,
                      device: str | torch.device | None = None, **score_kwargs) -> SeparationScore:
    """separation_score over the samples labelled `target` in the poisoned training set (what AC
    inspects for that class): poison = those in poisoned.poison_indices."""
    labels = poisoned.data.labels.cpu()
    rows = torch.nonzero(labels == target).flatten()
    is_poison = torch.isin(rows, poisoned.poison_indices.cpu())
    features = latent_features(model, poisoned.data.images[rows], info, device=device)
    return separation_score(features, is_poison, **score_kwargs)
