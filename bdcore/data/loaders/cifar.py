"""CIFAR-10 and CIFAR-100 from their official "python version" archives.

Layout (as unpacked from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and
cifar-100-python.tar.gz, documented on https://www.cs.toronto.edu/~kriz/cifar.html; the same
folders torchvision.datasets.CIFAR10/CIFAR100 and BackdoorBench read):

    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/     train, test, meta

root: the folder holding the batch files, or the folder that holds cifar-10-batches-py (cifar-100-python
for CIFAR-100), e.g. where the archive was unpacked; both name the same data. $BDCORE_CIFAR10_ROOT /
$BDCORE_CIFAR100_ROOT are read the same way; $BDCORE_DATA_ROOT is the parent of every dataset folder.

Each batch is a Python 2 pickle of a dict with b"data" (uint8 N x 3072: the 1024 red, then green,
then blue values of a 32x32 image, row-major) and b"labels" (CIFAR-10) or b"fine_labels"
(CIFAR-100). The meta files hold b"label_names" / b"fine_label_names". The pickles are read with
bdcore.data.safe_pickle.SafeUnpickler, which refuses anything but numpy arrays and plain data.
Mean/std are BackdoorBench's; BackdoorBench flips CIFAR-10 horizontally, not CIFAR-100.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bdcore.data.base import DatasetError, DatasetInfo, DatasetSplits, ImageSet, missing_layout_error, subfolder_hint
from bdcore.data.registry import dataset_root, register_dataset
from bdcore.data.safe_pickle import load_pickle_file


@dataclass(frozen=True)
class _CifarSpec:
    name: str
    subdir: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool

    @property
    def layout(self) -> str:
        files = ", ".join(self.train_files + self.test_files + (self.meta_file,))
        return (
            f"  {self.subdir}/  {files}\n"
            f"  (the official CIFAR python-version pickles: dicts with b'data' uint8 N x 3072 and "
            f"b'{self.label_key}'; {self.meta_file} with b'{self.names_key}')\n"
            f"  root: the folder holding these files, or the folder that holds {self.subdir}/"
        )

    @property
    def marker(self) -> str:
        """The file that tells the batches folder from its parent."""
        return self.train_files[0]


CIFAR10 = _CifarSpec(
    name="cifar10",
    subdir="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    names_key="label_names",
    label_key="labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.247, 0.243, 0.261),
    hflip=True,
)
CIFAR100 = _CifarSpec(
    name="cifar100",
    subdir="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    names_key="fine_label_names",
    label_key="fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    hflip=False,
)


def _load_dict(path: Path) -> dict:
    obj = load_pickle_file(path)
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _field(obj: dict, key: str, path: Path):
    # The official files (Python 2) have bytes keys; accept str keys of re-saved copies too.
    for candidate in (key.encode(), key):
        if candidate in obj:
            return obj[candidate]
    found = ", ".join(repr(k) for k in obj)
    raise DatasetError(f"{path}: missing key {key!r} (found keys: {found})")


def _read_batch(path: Path, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    obj = _load_dict(path)
    data, labels = _field(obj, "data", path), _field(obj, spec.label_key, path)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        side = int(round((data.shape[-1] / 3) ** 0.5)) if isinstance(data, np.ndarray) and data.ndim == 2 else 0
        if side and 3 * side * side == data.shape[1]:
            described += f", i.e. {side}x{side} images"
        raise DatasetError(f"{path}: 'data' must be a uint8 N x 3072 array (32x32 RGB images), got {described}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: {spec.label_key!r} is not a list of integers ({exc})") from exc
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DatasetError(f"{path}: labels must lie in 0..{spec.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_split(folder: Path, files: tuple[str, ...], spec: _CifarSpec) -> ImageSet:
    batches = [_read_batch(folder / name, spec) for name in files]
    images = np.concatenate([b[0] for b in batches])  # a fresh, writable, contiguous copy
    labels = np.concatenate([b[1] for b in batches])
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))


def _read_class_names(path: Path, spec: _CifarSpec) -> tuple[str, ...]:
    names = _field(_load_dict(path), spec.names_key, path)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DatasetError(f"{path}: {spec.names_key!r} must be a list of strings")
    if len(names) != spec.num_classes:
        raise DatasetError(f"{path}: expected {spec.num_classes} class names, found {len(names)}")
    return tuple(n.decode("utf-8", errors="replace") if isinstance(n, bytes) else n for n in names)


def _check_files(spec: _CifarSpec, folder: Path) -> None:
    if not folder.is_dir():
        raise missing_layout_error(spec.name, folder, spec.layout)
    for name in spec.train_files + spec.test_files + (spec.meta_file,):
        if not (folder / name).is_file():
            raise missing_layout_error(spec.name, folder / name, spec.layout, subfolder_hint(folder, spec.marker))


def _check_cifar(spec: _CifarSpec, folder: Path) -> None:
    """Every file of the layout is there; the meta file and the (smallest) test file are read:
    30 MB, some 40 ms, which also catches images of another size (rows of other than 3072 bytes)."""
    _check_files(spec, folder)
    _read_class_names(folder / spec.meta_file, spec)
    _read_batch(folder / spec.test_files[0], spec)


def _load_cifar(spec: _CifarSpec, root) -> DatasetSplits:
    folder = dataset_root(spec.name, root)  # the batches folder, also when `root` is its parent
    _check_files(spec, folder)
    info = DatasetInfo(
        name=spec.name,
        num_classes=spec.num_classes,
        channels=3,
        height=32,
        width=32,
        mean=spec.mean,
        std=spec.std,
        hflip=spec.hflip,
        normalize=True,
        class_names=_read_class_names(folder / spec.meta_file, spec),
    )
    train = _read_split(folder, spec.train_files, spec)
    return DatasetSplits(info, train, _read_split(folder, spec.test_files, spec))


@register_dataset("cifar10", folder=CIFAR10.subdir, check=lambda folder: _check_cifar(CIFAR10, folder),
                  marker=CIFAR10.marker)
def load_cifar10(root=None) -> DatasetSplits:
    return _load_cifar(CIFAR10, root)


@register_dataset("cifar100", folder=CIFAR100.subdir, check=lambda folder: _check_cifar(CIFAR100, folder),
                  marker=CIFAR100.marker)
def load_cifar100(root=None) -> DatasetSplits:
    return _load_cifar(CIFAR100, root)
