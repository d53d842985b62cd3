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


def resolve_root(dataset: str, root: str | os.PathLike | None, default_subdir: str,
                 marker: str | None = None) -> Path:
    """Where a dataset lives, as an absolute path (errors name it whatever the working folder): the
    `root` argument, else $BDCORE_<NAME>_ROOT, else $BDCORE_DATA_ROOT/<default_subdir>, else
    ./data/<default_subdir>.

    With `marker` (an entry the dataset's own folder holds, e.g. CIFAR-10's data_batch_1), that folder
    may also be named by its parent: a folder without `marker` but with a <default_subdir> folder inside
    means that inner folder. Both spellings then read the same files, and any caller that identifies
    the data by its folder (a sweep's dataset fingerprint) sees one folder, not two."""
    if root is not None:
        folder = Path(root)
    elif os.environ.get(f"BDCORE_{dataset.upper()}_ROOT"):
        folder = Path(os.environ[f"BDCORE_{dataset.upper()}_ROOT"])
    else:
        base = os.environ.get(DATA_ROOT_ENV)
        folder = Path(base) / default_subdir if base else Path("data") / default_subdir
    folder = folder.absolute()
    if marker is not None and not (folder / marker).exists() and (folder / default_subdir).is_dir():
        folder = folder / default_subdir
    return folder


def subfolder_hint(folder: Path, marker: str) -> str:
    """" (did you mean '<folder>/<child>'?)" when `folder` lacks `marker` but a folder inside it holds
    it (a root one level too high, the inner folder renamed), else ""."""
    try:
        if not folder.is_dir() or (folder / marker).exists():
            return ""
        inner = sorted(child for child in folder.iterdir() if child.is_dir() and (child / marker).exists())
    except OSError:  # unreadable: no hint
        return ""
    return f" (did you mean {str(inner[0].absolute())!r}?)" if inner else ""


def missing_layout_error(dataset: str, path: Path, layout: str, hint: str = "") -> DatasetError:
    return DatasetError(
        f"{dataset}: dataset not found or malformed at {str(Path(path).absolute())!r}{hint}. Expected layout:\n"
        f"{layout}\n"
        f"Pass root=... (grid/CLI 'data_root'), or set BDCORE_{dataset.upper()}_ROOT or "
        f"{DATA_ROOT_ENV}. Nothing is downloaded."
    )
