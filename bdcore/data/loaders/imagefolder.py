"""Any class-per-folder image tree, resized to size x size (default 32).

Layout (torchvision.datasets.ImageFolder's convention, one folder per split):

    root/train/<class>/*.{png,jpg,jpeg,ppm,bmp,webp}
    root/test/<class>/*      (or root/val/<class>/* when there is no test/)

Classes are the sorted folder names under train/ (hidden folders such as .ipynb_checkpoints are
skipped); label i is the i-th name. A test class missing from train/ is an error. Mean/std are
computed from the training images; no horizontal flip.
"""
from __future__ import annotations

from pathlib import Path

from bdcore.data.base import (
    DatasetError,
    DatasetInfo,
    DatasetSplits,
    missing_layout_error,
    resolve_root,
    subfolder_hint,
)
from bdcore.data.imageio import image_size
from bdcore.data.loaders._images import IMAGE_SUFFIXES, channel_stats, list_images, load_image_set
from bdcore.data.registry import register_dataset

SUFFIXES = ",".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
IMAGEFOLDER_LAYOUT = f"""  <root>/
    train/<class>/*.{{{SUFFIXES}}}
    test/<class>/*   (or val/<class>/*)"""


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _split_dirs(folder: Path) -> tuple[Path, Path]:
    """train/ and test/ (or val/), after checking that they are there with class folders."""
    train_dir = folder / "train"
    test_dir = folder / "test" if (folder / "test").is_dir() else folder / "val"
    if not train_dir.is_dir() or not test_dir.is_dir() or not _class_dirs(train_dir):
        raise missing_layout_error("imagefolder", folder, IMAGEFOLDER_LAYOUT, subfolder_hint(folder, "train"))
    return train_dir, test_dir


def check_imagefolder(folder: Path) -> None:
    """The layout, and that the first class's first image is readable (any size: all are resized)."""
    first_class = _class_dirs(_split_dirs(folder)[0])[0]
    files = list_images(first_class)
    if not files:
        raise DatasetError(f"{first_class}: class folder has no images (*.{{{SUFFIXES}}})")
    image_size(files[0])


@register_dataset("imagefolder", check=check_imagefolder)
def load_imagefolder(root=None, size: int = 32) -> DatasetSplits:
    if int(size) != size or size < 1:
        raise ValueError(f"imagefolder: size must be a positive integer, got {size!r}")
    size = int(size)
    folder = resolve_root("imagefolder", root, "imagefolder")
    train_dir, test_dir = _split_dirs(folder)

    classes = [d.name for d in _class_dirs(train_dir)]
    class_index = {name: i for i, name in enumerate(classes)}
    train_paths, train_labels, test_paths, test_labels = [], [], [], []
    for class_dir in _class_dirs(train_dir):
        files = list_images(class_dir)
        if not files:
            raise DatasetError(f"{class_dir}: class folder has no images (*.{{{SUFFIXES}}})")
        train_paths += files
        train_labels += [class_index[class_dir.name]] * len(files)
    for class_dir in _class_dirs(test_dir):
        if class_dir.name not in class_index:
            raise DatasetError(f"{class_dir}: test class {class_dir.name!r} has no folder in {train_dir}")
        files = list_images(class_dir)
        test_paths += files
        test_labels += [class_index[class_dir.name]] * len(files)

    def image_set(paths, labels):
        return load_image_set(paths, labels, size, dataset="imagefolder", root=folder, layout=IMAGEFOLDER_LAYOUT)

    train = image_set(train_paths, train_labels)
    mean, std = channel_stats(train.images)
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(classes),
        channels=3,
        height=size,
        width=size,
        mean=mean,
        std=std,
        hflip=False,
        normalize=True,
        class_names=tuple(classes),
    )
    return DatasetSplits(info, train, image_set(test_paths, test_labels))
