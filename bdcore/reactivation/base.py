"""Shared parts of the dormant-backdoor analyses: the analysis interface and registry, the universal
perturbation budget, the re-activation loss, and how a perturbed ASR is measured.

Zhu et al., "Breaking the False Sense of Security in Backdoor Defense through Re-Activation Attack",
NeurIPS 2024: a post-training defense often leaves the backdoor dormant; one small universal
perturbation added to triggered inputs wakes it up again.

Every model here is a classifier on the engine's normalised inputs (image classifiers as they are,
CLIP models through bdcore.clip.ZeroShotClassifier), and perturbations live in pixel space [0, 1].
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from bdcore.data.augment import Normalizer
from bdcore.data.base import DatasetInfo
from bdcore.metrics import BackdoorTestSet
from bdcore.registry import Registry

ANALYSES: Registry[type] = Registry("analysis", package="bdcore.reactivation")


class NotApplicable(Exception):
    """The analysis does not apply to this cell (no surrogate models, an all2all attack, a defense
    that changed the architecture): the cell is skipped with this reason, not failed."""


class AnalysisConfig(BaseModel):
    """Settings every analysis shares: how many poisoned training samples it may use."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(1000, ge=1)  # poisoned samples (trigger applied) the analysis works on
    seed: int = 0


class BudgetConfig(AnalysisConfig):
    """A universal perturbation budget: Linf 0.05 is the paper's main setting, L2 3 its code default."""

    norm: Literal["linf", "l2"] = "linf"
    eps: float | None = Field(None, gt=0)  # None: 0.05 for linf, 3.0 for l2

    @model_validator(mode="after")
    def _default_eps(self):
        if self.eps is None:
            self.eps = 0.05 if self.norm == "linf" else 3.0
        return self


@dataclass
class PoisonedSamples:
    """Triggered non-target images (uint8), the attacker's labels, and the same images without trigger."""

    triggered: torch.Tensor
    target_labels: torch.Tensor
    clean: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.target_labels.shape[0])

    def head(self, n: int) -> PoisonedSamples:
        return PoisonedSamples(self.triggered[:n], self.target_labels[:n],
                               None if self.clean is None else self.clean[:n])


@dataclass
class AnalysisContext:
    """What an analysis gets: the models it compares and the poisoned samples it works on.

    `fit` are poisoned samples from the training split (a perturbation is optimised on them),
    `evaluate` the backdoor test set (a perturbation's ASR is measured on it). `clean_model` and
    `surrogates` are built on demand: they may cost a training run or several artifact loads."""

    info: DatasetInfo
    backdoored: nn.Module
    defended: nn.Module
    fit: PoisonedSamples
    evaluate: BackdoorTestSet
    clean_model: Callable[[], nn.Module] | None = None
    surrogates: Callable[[], list[nn.Module]] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Results of the same analysis on models shared by many cells (the clean reference, the
    # undefended model): a cache keyed by (what, model role) so that sibling cells compute them once.
    shared: Callable[[str, Callable[[], dict]], dict] = lambda _key, compute: compute()


class Analysis(ABC):
    """An analysis of one defended model: `run(ctx)` returns its result columns."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AnalysisConfig]] = AnalysisConfig
    needs_surrogates: ClassVar[bool] = False

    def __init__(self, config: AnalysisConfig):
        self.config = config

    @abstractmethod
    def run(self, ctx: AnalysisContext) -> dict[str, Any]:
        """Result columns (floats / ints) plus `budget`, a dict of what the analysis used."""


def register_analysis(name: str):
    def decorator(cls):
        cls.name = name
        return ANALYSES.register(name)(cls)

    return decorator


def analysis_names() -> list[str]:
    return ANALYSES.names()


def analysis_config(name: str, **params) -> AnalysisConfig:
    return ANALYSES.get(name).config_class(**params)


def build_analysis(name: str, **params) -> Analysis:
    cls = ANALYSES.get(name)
    return cls(cls.config_class(**params))


# -- universal perturbations -------------------------------------------------------------------

def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The closest perturbation within the budget (Linf: clip; L2: rescale onto the ball)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    length = delta.norm()
    return delta * (eps / length) if length > eps else delta


def random_start(shape: tuple[int, ...], norm: str, eps: float, generator: torch.Generator) -> torch.Tensor:
    if norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    direction = torch.randn(shape, generator=generator)
    return direction / direction.norm() * eps * float(torch.rand(1, generator=generator))


def perturbed_inputs(images: torch.Tensor, delta: torch.Tensor, normalize: Normalizer) -> torch.Tensor:
    """uint8 images + a [0, 1]-scale perturbation, clipped to valid pixels, normalised for the model."""
    return normalize((images.float() / 255.0 + delta).clamp(0, 1))


def reactivation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE toward the target class plus -log(1 - p_runner-up): the runner-up is the most likely class
    other than the target, so the loss also pushes the strongest competitor down (Zhu et al. 2024)."""
    ce = F.cross_entropy(logits, targets)
    probs = logits.softmax(1)
    others = probs.scatter(1, targets[:, None], 0.0)
    runner_up = others.max(1).values
    return ce - torch.log1p(-runner_up.clamp(max=1 - 1e-6)).mean()


@torch.no_grad()
def perturbed_asr(model: nn.Module, samples: BackdoorTestSet | PoisonedSamples, delta: torch.Tensor | None,
                  info: DatasetInfo, device: torch.device, batch_size: int = 512) -> float:
    """Share of triggered samples (+ delta) the model assigns to the attacker's label."""
    images = samples.images if isinstance(samples, BackdoorTestSet) else samples.triggered
    if len(samples) == 0:
        return float("nan")
    model.eval().to(device)
    normalize = Normalizer(info, device)
    delta = torch.zeros(1, device=device) if delta is None else delta.to(device)
    hits = 0
    for start in range(0, images.shape[0], batch_size):
        x = perturbed_inputs(images[start:start + batch_size].to(device), delta, normalize)
        hits += int((model(x).argmax(1).cpu() == samples.target_labels[start:start + batch_size].cpu()).sum())
    return hits / len(samples)


def frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in evaluation mode on `device` with no parameter gradients (the perturbation
    is what is optimised)."""
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
