"""The CLIP defense interface. A post-training defense maps (backdoored CLIP, defender's clean image-caption
pairs) to a CLIP; a training-time defense maps the poisoned pairs to a CLIP trained so the backdoor does
not take hold. Both are scored by zero-shot ACC / ASR like any defense.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bdcore.clip.data import ImageTextSet
from bdcore.clip.models import ClipBundle
from bdcore.clip.train import ClipTrainConfig
from bdcore.data.base import DatasetInfo
from bdcore.registry import Registry

CLIP_DEFENSES: Registry[type] = Registry("CLIP defense", package="bdcore.clip.defenses")


class ClipDefenseConfig(BaseModel):
    """Settings every CLIP defense shares."""

    model_config = ConfigDict(extra="forbid")

    # CleanCLIP fine-tunes on 100K clean pairs beside the 500K pairs the victim was trained on.
    clean_fraction: float = Field(0.2, gt=0, le=1)
    seed: int = 0


class ClipFinetuneConfig(ClipDefenseConfig):
    """A fine-tuning schedule on the defender's clean pairs: CleanCLIP's (10 epochs, lr 1e-5, batch 64)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    augment: bool = True

    def train_config(self, device: str) -> ClipTrainConfig:
        return ClipTrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                               weight_decay=self.weight_decay, augment=self.augment, device=device)


@dataclass
class ClipDefenseContext:
    """What the engine hands a CLIP defense besides its inputs."""

    info: DatasetInfo
    device: str = "auto"
    work_dir: Path | None = None  # for resumable checkpoints
    on_epoch_end: Callable[[int, dict], None] | None = None
    # The victim's model before poisoning: its pre-trained weights, or a fresh initialisation.
    bundle_factory: Callable[[], ClipBundle] | None = None
    train_config: ClipTrainConfig | None = None  # the attack cell's training schedule


@dataclass
class ClipDefenseOutcome:
    bundle: ClipBundle
    diagnostics: dict = field(default_factory=dict)


class ClipDefense(ABC):
    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    config_class: ClassVar[type[ClipDefenseConfig]] = ClipDefenseConfig

    def __init__(self, config: ClipDefenseConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config


class ClipPostTrainingDefense(ClipDefense):
    kind: ClassVar[str] = "post_training"

    @abstractmethod
    def repair(self, bundle: ClipBundle, clean: ImageTextSet, ctx: ClipDefenseContext) -> ClipDefenseOutcome:
        """Backdoored CLIP (modified in place or copied) + clean pairs -> repaired CLIP."""


class ClipTrainingTimeDefense(ClipDefense):
    kind: ClassVar[str] = "training_time"

    @abstractmethod
    def train(self, poisoned: ImageTextSet, ctx: ClipDefenseContext) -> ClipDefenseOutcome:
        """Poisoned pairs -> a CLIP trained from ctx.bundle_factory() on them, robustly."""


def register_clip_defense(name: str):
    def decorator(cls):
        cls.name = name
        return CLIP_DEFENSES.register(name)(cls)
    return decorator


def clip_defense_names() -> list[str]:
    return CLIP_DEFENSES.names()


def clip_defense_config(name: str, **params) -> ClipDefenseConfig:
    return CLIP_DEFENSES.get(name).config_class(**params)


def build_clip_defense(name: str, **params) -> ClipDefense:
    cls = CLIP_DEFENSES.get(name)
    try:
        config = cls.config_class(**params)
    except ValidationError as exc:
        raise ValueError(f"bad parameters for CLIP defense {name!r}: {exc}") from exc
    return cls(config)
