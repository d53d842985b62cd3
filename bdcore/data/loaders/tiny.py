"""Tiny-ImageNet-200: 64x64 RGB, one class per WordNet id; the labelled `val` split is the test set.

Layout (as unpacked from http://cs231n.stanford.edu/tiny-imagenet-200.zip, the Stanford CS231n
release; the files BackdoorBench's utils/dataset/Tiny.py reads):

    tiny-imagenet-200/wnids.txt                 one wnid per line; label = line index (file order)
    tiny-imagenet-200/words.txt                 optional "<wnid>\\t<names>" lines -> class names
    tiny-imagenet-200/train/<wnid>/images/*.JPEG
    tiny-imagenet-200/val/images/*.JPEG
    tiny-imagenet-200/val/val_annotations.txt   "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" lines

`root` may be the tiny-imagenet-200 folder itself or the folder containing it. The unlabelled
`test/` folder is not used. Grayscale JPEGs are converted to RGB. Every image is 64x64: one of another
size is an error (the folder holds another dataset), not resized.
"""
from __future__ import annotations

from pathlib import Path

from bdcore.data.base import DatasetError, DatasetInfo, DatasetSplits, missing_layout_error, subfolder_hint
from bdcore.data.imageio import image_size
from bdcore.data.loaders._images import list_images, load_image_set, wrong_size_error
from bdcore.data.registry import dataset_root, register_dataset

SIZE = 64
TINY_DIR = "tiny-imagenet-200"
TINY_LAYOUT = """  tiny-imagenet-200/
    wnids.txt                      (one WordNet id per line)
    words.txt                      (optional: <wnid>\\t<names>)
    train/<wnid>/images/*.JPEG
    val/images/*.JPEG
    val/val_annotations.txt        (<file>\\t<wnid>\\t<bbox...> per line)"""


def _read_wnids(path: Path) -> list[str]:
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise DatasetError(f"{path}: no class ids")
    if len(set(wnids)) != len(wnids):
        raise DatasetError(f"{path}: repeated class ids")
    return wnids


def _read_words(path: Path, wnids: list[str]) -> tuple[str, ...]:
    words: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, names = line.partition("\t")
            if names.strip():
                words[wnid.strip()] = names.strip()
    return tuple(words.get(w, w) for w in wnids)


def _read_val(folder: Path, class_index: dict[str, int]) -> tuple[list[Path], list[int]]:
    path = folder / "val" / "val_annotations.txt"
    if not path.is_file():
        raise missing_layout_error("tiny", path, TINY_LAYOUT)
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in class_index:
            raise DatasetError(
                f"{path}, line {number}: expected '<file>\\t<wnid listed in wnids.txt>\\t...', got {line!r}"
            )
        paths.append(folder / "val" / "images" / fields[0])
        labels.append(class_index[fields[1]])
    return paths, labels


def _tiny_folder(folder: Path) -> Path:
    """`folder` itself or its tiny-imagenet-200 subfolder, whichever holds wnids.txt."""
    if (folder / TINY_DIR / "wnids.txt").is_file():
        folder = folder / TINY_DIR
    if not (folder / "wnids.txt").is_file():
        raise missing_layout_error("tiny", folder, TINY_LAYOUT, subfolder_hint(folder, "wnids.txt"))
    return folder


def check_tiny(folder: Path) -> None:
    """The layout, and the size of the first training image (from its header): all are 64x64."""
    folder = _tiny_folder(folder)
    wnids = _read_wnids(folder / "wnids.txt")
    images_dir = folder / "train" / wnids[0] / "images"
    files = list_images(images_dir) if images_dir.is_dir() else []
    if not files:
        raise missing_layout_error("tiny", images_dir, TINY_LAYOUT)
    if not (folder / "val" / "val_annotations.txt").is_file():
        raise missing_layout_error("tiny", folder / "val" / "val_annotations.txt", TINY_LAYOUT)
    found = image_size(files[0])
    if found != (SIZE, SIZE):
        raise wrong_size_error("tiny", files[0], found, SIZE)


@register_dataset("tiny", folder=TINY_DIR, check=check_tiny, marker="wnids.txt")
def load_tiny(root=None) -> DatasetSplits:
    folder = _tiny_folder(dataset_root("tiny", root))
    wnids = _read_wnids(folder / "wnids.txt")
    class_index = {w: i for i, w in enumerate(wnids)}

    train_paths, train_labels = [], []
    for label, wnid in enumerate(wnids):
        images_dir = folder / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise missing_layout_error("tiny", images_dir, TINY_LAYOUT)
        files = list_images(images_dir)
        train_paths += files
        train_labels += [label] * len(files)
    test_paths, test_labels = _read_val(folder, class_index)

    def image_set(paths, labels):
        return load_image_set(paths, labels, SIZE, dataset="tiny", root=folder, layout=TINY_LAYOUT, exact_size=True)

    info = DatasetInfo(
        name="tiny",
        num_classes=len(wnids),
        channels=3,
        height=SIZE,
        width=SIZE,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262),
        hflip=False,
        normalize=True,
        class_names=_read_words(folder / "words.txt", wnids),
    )
    return DatasetSplits(info, image_set(train_paths, train_labels), image_set(test_paths, test_labels))
