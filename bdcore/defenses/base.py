"""Defense interfaces. A post-training defense maps (backdoored model, defender's clean data) to a
model; a training-time defense maps the poisoned training set to a model. Both return diagnostics.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bdcore.data.base import DatasetInfo, DefenderData
from bdcore.train.config import TrainConfig


class DefenseConfig(BaseModel):
    """Settings every defense shares; subclasses add their paper's parameters."""

    model_config = ConfigDict(extra="forbid")

    clean_fraction: float = Field(0.05, gt=0, le=1)  # defender's clean share of the training set
    seed: int = 0


class DefenseSkipped(Exception):
    """The defense does not apply to this cell (e.g. a BN method on a model without BN)."""


@dataclass
class DefenseContext:
    """What the engine hands a defense besides its inputs."""

    info: DatasetInfo
    device: str = "auto"
    work_dir: Path | None = None  # for resumable checkpoints
    on_epoch_end: Callable[[int, dict], None] | None = None
    model_factory: Callable[[], nn.Module] | None = None  # a fresh model of the victim's architecture
    train_config: TrainConfig | None = None  # the attack cell's training config
    # The attack's poisoned training set (a bdcore.attacks.PoisonedTrainSet), rebuilt on demand; None
    # when the attack has none. Post-training defenses that read BN statistics of training data use it.
    poisoned_train: Callable[[], object] | None = None

    def require_poisoned_train(self, method: str):
        if self.poisoned_train is None:
            raise DefenseSkipped(f"{method} needs the attack's poisoned training set and this cell has none")
        return self.poisoned_train()


class StageEpochs:
    """Numbers a multi-stage defense's epochs consecutively for ctx.on_epoch_end and tags each record
    with its stage: `reporter(stage)` is the epoch callback of the next stage, `advance(n)` closes a
    stage of n epochs."""

    def __init__(self, on_epoch_end: Callable[[int, dict], None] | None, key: str):
        self.on_epoch_end = on_epoch_end
        self.key = key
        self.offset = 0

    def reporter(self, stage: int) -> Callable[[int, dict], None]:
        start = self.offset

        def report(epoch: int, record: dict) -> None:
            if self.on_epoch_end is not None:
                self.on_epoch_end(start + epoch, {**record, "epoch": start + epoch, self.key: stage})
        return report

    def advance(self, epochs: int) -> None:
        self.offset += epochs


@dataclass
class DefenseOutcome:
    model: nn.Module
    diagnostics: dict = field(default_factory=dict)


class _Method(ABC):
    """What every defense has: a name, a kind, and a typed config with the paper's defaults."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    config_class: ClassVar[type[DefenseConfig]] = DefenseConfig
    # Share of the defender's clean subset held out for the method's own selection (a pruning
    # level, a threshold). A method that selects nothing sets 0 and fits on the whole subset, as
    # BackdoorBench's do; one that selects holds out 20% so nothing is chosen on the test set.
    holdout_fraction: ClassVar[float] = 0.2

    def __init__(self, config: DefenseConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config


class PostTrainingDefense(_Method):
    """(backdoored model, clean data) -> repaired model."""

    kind: ClassVar[str] = "post_training"

    @abstractmethod
    def repair(self, model: nn.Module, clean: DefenderData, ctx: DefenseContext) -> DefenseOutcome:
        ...


class TrainingTimeDefense(_Method):
    """Poisoned training set -> model trained so the backdoor does not take hold."""

    kind: ClassVar[str] = "training_time"

    @abstractmethod
    def train(self, poisoned, ctx: DefenseContext) -> DefenseOutcome:
        """`poisoned` is a bdcore.attacks.PoisonedTrainSet."""


Defense = PostTrainingDefense | TrainingTimeDefense
