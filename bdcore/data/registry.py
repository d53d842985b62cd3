"""Dataset registry: `load_dataset(name, root=None)` returns in-memory DatasetSplits."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from bdcore.data.base import DatasetSplits, resolve_root
from bdcore.registry import Registry

DatasetLoader = Callable[..., DatasetSplits]
DATASETS: Registry[DatasetLoader] = Registry("dataset", package="bdcore.data.loaders")


_FOLDERS: dict[str, str] = {}


def register_dataset(name: str, folder: str | None = None):
    """Decorator for a loader `fn(root: path | None, **options) -> DatasetSplits`; `folder` is
    its default folder name under $BDCORE_DATA_ROOT (default: the dataset's name)."""
    _FOLDERS[name] = folder or name
    return DATASETS.register(name)


def dataset_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder the loader of `name` reads: `root`, else $BDCORE_<NAME>_ROOT, else
    $BDCORE_DATA_ROOT/<its folder>, else ./data/<its folder>."""
    DATASETS.get(name)  # unknown names list the known ones
    return resolve_root(name, root, _FOLDERS[name])


def load_dataset(name: str, root: str | os.PathLike | None = None, **options) -> DatasetSplits:
    return DATASETS.get(name)(root=root, **options)


def dataset_names() -> list[str]:
    return DATASETS.names()
