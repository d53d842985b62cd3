"""Dataset registry: `load_dataset(name, root=None)` returns in-memory DatasetSplits."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from bdcore.data.base import DatasetSplits, resolve_root
from bdcore.registry import Registry

DatasetLoader = Callable[..., DatasetSplits]
FolderCheck = Callable[[Path], None]
DATASETS: Registry[DatasetLoader] = Registry("dataset", package="bdcore.data.loaders")


_FOLDERS: dict[str, str] = {}
_CHECKS: dict[str, FolderCheck] = {}
_MARKERS: dict[str, str] = {}


def register_dataset(name: str, folder: str | None = None, check: FolderCheck | None = None,
                     marker: str | None = None):
    """Decorator for a loader `fn(root: path | None, **options) -> DatasetSplits`; `folder` is
    its default folder name under $BDCORE_DATA_ROOT (default: the dataset's name). `check(folder)`
    is a cheap look at a folder (its layout, one file of it) that raises DatasetError where the
    loader would; datasets without files (digits) have none. `marker`, an entry of the dataset's own
    folder, lets a root also name the folder holding <folder> (see resolve_root)."""
    _FOLDERS[name] = folder or name
    if check is not None:
        _CHECKS[name] = check
    if marker is not None:
        _MARKERS[name] = marker
    return DATASETS.register(name)


def dataset_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder the loader of `name` reads, absolute: `root`, else $BDCORE_<NAME>_ROOT, else
    $BDCORE_DATA_ROOT/<its folder>, else ./data/<its folder>; for a dataset registered with a
    `marker`, the <its folder> inside the folder so named when it is that folder's parent."""
    DATASETS.get(name)  # unknown names list the known ones
    return resolve_root(name, root, _FOLDERS[name], _MARKERS.get(name))


def check_dataset_folder(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of `name` (as dataset_root), after a cheap check that the loader will accept it:
    the standard layout is there and one sample file has the size the dataset requires. Raises
    DatasetError naming the path and the expected layout; reads a few small files at most."""
    folder = dataset_root(name, root)
    check = _CHECKS.get(name)
    if check is not None:
        check(folder)
    return folder


def load_dataset(name: str, root: str | os.PathLike | None = None, **options) -> DatasetSplits:
    return DATASETS.get(name)(root=root, **options)


def dataset_names() -> list[str]:
    return DATASETS.names()
