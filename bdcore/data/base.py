"""In-memory image datasets: uint8 N x C x H x W tensors with int64 labels.

Poisoning, augmentation and batching all act on these tensors (on the GPU when there is one),
so the training hot loop never touches PIL or a per-sample Python transform.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DatasetError(ValueError):
    """A dataset folder is missing or malformed; the message names the path and the layout."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the training loop need to know about a dataset."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False  # horizontal flip augmentation (BackdoorBench: cifar10 only)
    normalize: bool = True  # gtsrb is not normalised in BackdoorBench
    class_names: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
            "hflip": self.hflip,
            "normalize": self.normalize,
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DatasetInfo":
        return cls(
            name=data["name"],
            num_classes=int(data["num_classes"]),
            channels=int(data["channels"]),
            height=int(data["height"]),
            width=int(data["width"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            hflip=bool(data["hflip"]),
            normalize=bool(data["normalize"]),
            class_names=tuple(data.get("class_names", ())),
        )


@dataclass
class ImageSet:
    """Images (uint8, N x C x H x W) and labels (int64, N) held in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError(
                f"images must be a uint8 tensor N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise TypeError(
                f"labels must be an int64 tensor of length {self.images.shape[0]}, got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return ImageSet(self.images[indices], self.labels[indices])

    def to(self, device: torch.device | str) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class DatasetSplits:
    """A loaded dataset: its description and its train and test sets."""

    info: DatasetInfo
    train: ImageSet
    test: ImageSet


@dataclass
class DefenderData:
    """The defender's clean data: `train` for fitting, `val` (held out) for any model selection.

    `indices_*` index the original training set, so experiments can exclude them or audit them.
    """

    train: ImageSet
    val: ImageSet
    indices_train: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    indices_val: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


DATA_ROOT_ENV = "BDCORE_DATA_ROOT"


def resolve_root(dataset: str, root: str | os.PathLike | None, default_subdir: str) -> Path:
    """Where a dataset lives: the `root` argument, else $BDCORE_<NAME>_ROOT, else
    $BDCORE_DATA_ROOT/<default_subdir>, else ./data/<default_subdir>."""
    if root is not None:
        return Path(root)
    specific = os.environ.get(f"BDCORE_{dataset.upper()}_ROOT")
    if specific:
        return Path(specific)
    base = os.environ.get(DATA_ROOT_ENV)
    return Path(base) / default_subdir if base else Path("data") / default_subdir


def missing_layout_error(dataset: str, path: Path, layout: str) -> DatasetError:
    return DatasetError(
        f"{dataset}: dataset not found or malformed at {str(path)!r}. Expected layout:\n{layout}\n"
        f"Pass root=... (grid/CLI 'data_root'), or set BDCORE_{dataset.upper()}_ROOT or "
        f"{DATA_ROOT_ENV}. Nothing is downloaded."
    )
