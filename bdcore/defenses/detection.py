"""Poisoned-sample detectors: score every sample of the poisoned training set (higher = more
suspicious) with the attack cell's backdoored model and the defender's clean subset, flag some of
them, and, as a defense, drop the flagged samples and retrain with the attack cell's training config.

A detector implements `detect`; `mitigate` (detect, drop, retrain) is shared. Detection quality is
measured by the engine against the known poison indices (`detection_quality`), never by the detector.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from bdcore.data.base import DefenderData, ImageSet
from bdcore.defenses.base import DefenseContext, DefenseOutcome, _Method
from bdcore.train import seed_everything, train_model


@dataclass
class Detection:
    """Per-sample suspicion `scores` (float, N) and the `flagged` decision (bool, N) of a detector."""

    scores: torch.Tensor
    flagged: torch.Tensor
    diagnostics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float64).detach().cpu().flatten()
        self.flagged = torch.as_tensor(self.flagged, dtype=torch.bool).detach().cpu().flatten()
        if self.scores.shape != self.flagged.shape:
            raise ValueError(f"scores {tuple(self.scores.shape)} and flagged {tuple(self.flagged.shape)} differ in shape")
        if not torch.isfinite(self.scores).all():
            raise ValueError("detection scores must be finite")


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for the `positive` mask (ties count one half), i.e. the
    probability that a random positive outscores a random negative. NaN without both classes."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positive = torch.as_tensor(positive, dtype=torch.bool).flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with average ranks for ties.
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    average = first.double() + (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def detection_quality(detection: Detection, poison_indices: torch.Tensor) -> dict[str, float | int]:
    """TPR, FPR, precision and AUROC of `detection` against the true poison set, and the counts."""
    n = detection.scores.numel()
    positive = torch.zeros(n, dtype=torch.bool)
    positive[torch.as_tensor(poison_indices, dtype=torch.long).cpu()] = True
    flagged = detection.flagged
    tp = int((flagged & positive).sum())
    fp = int((flagged & ~positive).sum())
    n_pos, n_flagged = int(positive.sum()), int(flagged.sum())
    return {
        "detection_tpr": tp / n_pos if n_pos else float("nan"),
        "detection_fpr": fp / (n - n_pos) if n > n_pos else float("nan"),
        "detection_precision": tp / n_flagged if n_flagged else float("nan"),
        "detection_auroc": auroc(detection.scores, positive),
        "n_flagged": n_flagged,
        "n_poison": n_pos,
        "n_samples": n,
    }


class PoisonDetector(_Method):
    """(backdoored model, poisoned training set, clean subset) -> Detection; as a defense, retrain
    without the flagged samples."""

    kind: ClassVar[str] = "detector"

    @abstractmethod
    def detect(self, model: nn.Module, data: ImageSet, clean: DefenderData, ctx: DefenseContext) -> Detection:
        """Score every sample of `data` (the poisoned training set, labels as poisoned). The model is
        the one trained on `data` (the attack cell's); it must not be modified."""

    def mitigate(self, model: nn.Module, poisoned, clean: DefenderData, ctx: DefenseContext) -> DefenseOutcome:
        """Detect, drop the flagged samples, retrain a fresh model of the victim's architecture with
        the attack cell's training config (resumable in ctx.work_dir). `poisoned` is a
        bdcore.attacks.PoisonedTrainSet; its poison indices are used for reporting only."""
        if ctx.model_factory is None or ctx.train_config is None:
            raise ValueError(f"{self.name} retrains and needs ctx.model_factory and ctx.train_config")
        detection = self.detect(model, poisoned.data, clean, ctx)
        if detection.scores.numel() != len(poisoned.data):
            raise ValueError(f"{self.name} scored {detection.scores.numel()} samples, expected {len(poisoned.data)}")
        kept = torch.nonzero(~detection.flagged).flatten()
        if kept.numel() == 0:
            raise ValueError(f"{self.name} flagged every training sample; nothing is left to retrain on")
        seed_everything(self.config.seed)
        fresh = ctx.model_factory()
        train_config = ctx.train_config.model_copy(update={"device": ctx.device})
        result = train_model(fresh, poisoned.data.subset(kept.to(poisoned.data.labels.device)), ctx.info, train_config,
                             seed=self.config.seed, on_epoch_end=ctx.on_epoch_end, checkpoint_dir=ctx.work_dir,
                             checkpoint_tag=f"{self.name}-retrain")
        diagnostics = {**detection.diagnostics, **detection_quality(detection, poisoned.poison_indices),
                       "retrained_on": int(kept.numel()), "retrain_epochs": len(result.history)}
        return DefenseOutcome(fresh.to("cpu").eval(), diagnostics)


class InputFilter(ABC):
    """A detector that also screens inputs at inference time, in front of the deployed model."""

    @abstractmethod
    def filter_quality(self, model: nn.Module, clean: DefenderData, clean_test: ImageSet, backdoor_images: torch.Tensor,
                       ctx: DefenseContext) -> dict[str, float]:
        """Rejection rates on triggered and clean test inputs with a boundary set on `clean` only."""
