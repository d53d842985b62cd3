"""The CLIP attack interface: poison a share of image-caption pairs and build the triggered test set
that zero-shot ASR is measured on."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bdcore.clip.data import DEFAULT_TEMPLATES, ImageTextSet
from bdcore.clip.models import ClipBundle
from bdcore.data.base import DatasetInfo, ImageSet
from bdcore.metrics import BackdoorTestSet
from bdcore.registry import Registry

CLIP_ATTACKS: Registry[type] = Registry("CLIP attack", package="bdcore.clip.attacks")


class ClipAttackConfig(BaseModel):
    """Shared settings: the target class, how many pairs are poisoned, the target captions."""

    model_config = ConfigDict(extra="forbid")

    target: int = Field(0, ge=0)
    ratio: float = Field(0.003, gt=0, lt=1)  # CleanCLIP / BadCLIP: 1,500 of 500,000 pairs
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # captions of poisoned pairs name the target class
    seed: int = 0


@dataclass
class PoisonedPairs:
    data: ImageTextSet
    poison_indices: torch.Tensor


def register_clip_attack(name: str):
    def decorator(cls):
        cls.name = name
        return CLIP_ATTACKS.register(name)(cls)
    return decorator


def clip_attack_names() -> list[str]:
    return CLIP_ATTACKS.names()


def clip_attack_config(name: str, **params) -> ClipAttackConfig:
    """The typed config of CLIP attack `name` (pydantic ValidationError for a bad parameter)."""
    return CLIP_ATTACKS.get(name).config_class(**params)


def build_clip_attack(name: str, info: DatasetInfo, class_names=None, **params) -> ClipAttack:
    cls = CLIP_ATTACKS.get(name)
    try:
        config = cls.config_class(**params)
    except ValidationError as exc:
        raise ValueError(f"bad parameters for CLIP attack {name!r}: {exc}") from exc
    return cls(info, list(class_names or info.class_names), config)


class ClipAttack(ABC):
    name: ClassVar[str] = ""
    config_class: ClassVar[type[ClipAttackConfig]] = ClipAttackConfig

    def __init__(self, info: DatasetInfo, class_names: list[str], config: ClipAttackConfig):
        if config.target >= len(class_names):
            raise ValueError(f"target class {config.target} does not exist: the data has {len(class_names)} classes")
        self.info = info
        self.class_names = class_names
        self.config = config

    @abstractmethod
    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W -> the same images carrying the trigger."""

    def prepare(self, bundle: ClipBundle, pairs: ImageTextSet, device: str = "auto") -> None:
        """Called once before poisoning with the victim's clean (pre-poisoning) model and the clean pairs;
        attacks that optimise their trigger against the clean encoder (BadCLIP) do it here. The model
        must be left unchanged."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that define a learned trigger, saved with the attack cell's artifact."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what state_tensors() returned (a rebuilt attack then triggers images identically)."""
        if tensors:
            raise ValueError(f"CLIP attack {self.name!r} has no learned state, got {sorted(tensors)}")

    def target_caption(self, generator: torch.Generator) -> str:
        template = self.config.templates[int(torch.randint(0, len(self.config.templates), (1,), generator=generator))]
        return template.format(self.class_names[self.config.target])

    def poison_pairs(self, data: ImageTextSet) -> PoisonedPairs:
        """round(ratio * N) random pairs get the trigger and a target caption (any source class)."""
        generator = torch.Generator().manual_seed(self.config.seed)
        n_poison = max(1, round(self.config.ratio * len(data)))
        chosen = torch.randperm(len(data), generator=generator)[:n_poison].sort().values
        images = data.images.clone()
        images[chosen] = self.apply_trigger(data.images[chosen])
        captions = list(data.captions)
        for i in chosen.tolist():
            captions[i] = self.target_caption(generator)
        poisoned = ImageTextSet(images, captions, data.labels, {**data.meta, "attack": self.name})
        return PoisonedPairs(poisoned, chosen)

    def backdoor_test(self, test: ImageSet) -> BackdoorTestSet:
        """Every non-target test image with the trigger; the attacker wants the target class."""
        keep = test.labels != self.config.target
        images, labels = test.images[keep], test.labels[keep]
        return BackdoorTestSet(self.apply_trigger(images), torch.full_like(labels, self.config.target), labels.clone())
