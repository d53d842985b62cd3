"""The attack interface: an attack poisons data (and may own training).

`poison_train` returns the poisoned training set with its poison indices; `backdoor_test` returns
every non-target test image with the trigger. Ratio = poisoned samples / all training samples;
dirty-label attacks draw poison indices from all classes, clean-label ones from the target class.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from bdcore.attacks.resources import ResourceStore
from bdcore.data.base import DatasetInfo, ImageSet
from bdcore.metrics import BackdoorTestSet
from bdcore.train.loop import TrainStep


class AttackConfig(BaseModel):
    """Settings every attack shares; subclasses add their paper's parameters."""

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(0.1, gt=0, le=1)  # poisoned samples / all training samples
    target: int = Field(0, ge=0)  # all2one target class
    label_mode: Literal["all2one", "all2all"] = "all2one"  # all2all: y -> (y + 1) mod K
    seed: int = 0


@dataclass
class PoisonedTrainSet:
    """The training set the victim trains on, and which samples were poisoned."""

    data: ImageSet
    poison_indices: torch.Tensor
    original_labels: torch.Tensor
    extra_indices: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. cover samples


class Attack(ABC):
    """Base class; register subclasses with `@register_attack("name")`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AttackConfig]] = AttackConfig
    clean_label: ClassVar[bool] = False  # True: poison only target-class samples, keep labels
    has_poisoned_trainset: ClassVar[bool] = True  # False for attacks that only act in training
    # True when the trigger is learnt while the victim trains (generators trained jointly): the
    # trigger exists only in a trained attack cell's artifact, not after `prepare` alone.
    trigger_learned_in_training: ClassVar[bool] = False

    def __init__(self, config: AttackConfig, info: DatasetInfo):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if config.target >= info.num_classes:
            raise ValueError(f"target class {config.target} is out of range for {info.name} ({info.num_classes} classes)")
        if self.clean_label and config.label_mode == "all2all":
            raise ValueError(f"{self.name} is a clean-label attack (it poisons target-class samples and keeps "
                             "their labels), so it supports label_mode 'all2one' only, not 'all2all'")
        self.config = config
        self.info = info

    # -- resources -------------------------------------------------------------------------
    def prepare(self, train: ImageSet, resources: ResourceStore) -> None:
        """Build (or fetch from `resources`' cache) what the trigger needs: surrogate models,
        optimised triggers, encoder networks, perturbed images. Default: nothing.

        Everything needed afterwards must end up in `state_tensors()`: an attack restored with
        `load_state_tensors` alone (no `prepare`) must give identical `apply_trigger`,
        `apply_train_trigger` and `poison_train` results (defense cells rebuild it that way)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the config, rebuild the trigger (saved in the attack artifact)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of state_tensors: restore the trigger from an artifact."""

    # -- trigger and labels ----------------------------------------------------------------
    @abstractmethod
    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return uint8 images with the (test-time) trigger applied."""

    def apply_train_trigger(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The trigger used in poisoned training samples; the test-time one unless overridden."""
        return self.apply_trigger(images, labels)

    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.config.label_mode == "all2all":
            return (labels + 1) % self.info.num_classes
        return torch.full_like(labels, self.config.target)

    # -- poisoning -------------------------------------------------------------------------
    def batch_poison_count(self, batch_size: int, generator: torch.Generator | None = None) -> int:
        """How many samples of a batch an attack that poisons per batch poisons: int(ratio x B), and
        when ratio x B < 1 one sample with probability ratio x B, so that the expected poisoned share
        is the ratio at any batch size (BackdoorBench's generalize_to_lower_pratio; without it a
        ratio of 0.005 at batch 128 poisons nothing). Draws from `generator` only in that case."""
        expected = self.config.ratio * batch_size
        if expected >= 1:
            return min(batch_size, int(expected))
        return int(torch.rand((), generator=generator).item() < expected)

    def poison_count(self, n_train: int) -> int:
        return max(1, int(round(self.config.ratio * n_train)))

    def select_poison_indices(self, train: ImageSet) -> torch.Tensor:
        """Seeded draw: from all classes (dirty-label) or the target class only (clean-label)."""
        generator = torch.Generator().manual_seed(self.config.seed)
        labels = train.labels.cpu()
        pool = torch.arange(len(labels))
        if self.clean_label:
            pool = pool[labels == self.config.target]
        count = self.poison_count(len(labels))
        if count > len(pool):
            raise ValueError(
                f"{self.name}: ratio {self.config.ratio} needs {count} poisoned samples but only {len(pool)} "
                f"{'target-class ' if self.clean_label else ''}samples exist"
            )
        return pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values

    def poison_train(self, train: ImageSet) -> PoisonedTrainSet:
        indices = self.select_poison_indices(train)
        images, labels = train.images.clone(), train.labels.clone()
        images[indices] = self.apply_train_trigger(train.images[indices], train.labels[indices])
        if not self.clean_label:
            labels[indices] = self.target_labels(train.labels[indices])
        return PoisonedTrainSet(ImageSet(images, labels), indices, train.labels.clone())

    def backdoor_test(self, test: ImageSet) -> BackdoorTestSet:
        """All non-target test images with the trigger (all2all: every image)."""
        keep = test.labels != self.config.target if self.config.label_mode == "all2one" else torch.ones_like(test.labels, dtype=torch.bool)
        images, labels = test.images[keep], test.labels[keep]
        return BackdoorTestSet(self.apply_trigger(images, labels), self.target_labels(labels), labels.clone())

    # -- training --------------------------------------------------------------------------
    def training_step(self, poisoned: PoisonedTrainSet) -> TrainStep | None:
        """A custom loss for attacks that own training; None = plain cross-entropy."""
        return None


def blend(images: torch.Tensor, pattern: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """(1 - alpha) * image + alpha * pattern, rounded back to uint8 (alpha may be a mask)."""
    mixed = (1 - alpha) * images.float() + alpha * pattern.to(images.device).float()
    return mixed.round().clamp(0, 255).to(torch.uint8)
