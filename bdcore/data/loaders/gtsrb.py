"""GTSRB (German Traffic Sign Recognition Benchmark), 43 classes, resized to 32x32.

Layout (the official GTSRB files, https://benchmark.ini.rub.de/gtsrb_dataset.html, arranged as
BackdoorBench's utils/dataset/GTSRB.py and WaNet's gtsrb_download.sh read them):

    gtsrb/Train/00000/GT-00000.csv ... Train/00042/GT-00042.csv
          Train/000xx/*.ppm                  (GTSRB_Final_Training_Images.zip: Final_Training/Images/000xx)
          Test/GT-final_test.csv             (GTSRB_Final_Test_GT.zip: the test CSV *with* ClassId)
          Test/*.ppm                         (GTSRB_Final_Test_Images.zip: Final_Test/Images)

Every CSV is semicolon-separated with the header
`Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId`; `Filename` is relative to the CSV's
folder. `root` is the gtsrb folder (the one holding Train/ and Test/) or the folder that holds gtsrb/.
Only this layout is read (not the variant with Train/<int class>/ folders). Images are
resized to 32x32 with PIL's bilinear filter at load time, as BackdoorBench's Resize((32, 32)).
BackdoorBench does not normalise GTSRB (normalize=False; mean/std are the identity) nor flip it.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from bdcore.data.base import DatasetError, DatasetInfo, DatasetSplits, missing_layout_error, subfolder_hint
from bdcore.data.imageio import image_size
from bdcore.data.loaders._images import load_image_set
from bdcore.data.registry import dataset_root, register_dataset

NUM_CLASSES = 43
SIZE = 32
GTSRB_LAYOUT = """  gtsrb/
    Train/000xx/GT-000xx.csv   (xx = 00..42; semicolon CSV with header
                                Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId)
    Train/000xx/*.ppm          (the files the CSV names)
    Test/GT-final_test.csv     (same columns, including ClassId)
    Test/*.ppm"""
REQUIRED_COLUMNS = ("Filename", "ClassId")


def read_gt_csv(path: Path) -> tuple[list[Path], list[int]]:
    """The (image path, class id) rows of one GTSRB annotation CSV."""
    if not path.is_file():
        raise missing_layout_error("gtsrb", path, GTSRB_LAYOUT)
    paths, labels = [], []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=";")
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(
                f"{path}: CSV lacks column(s) {', '.join(missing)}; expected a semicolon-separated header "
                f"Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId, found {reader.fieldnames}"
            )
        for row in reader:
            try:
                label = int(row["ClassId"])
            except (TypeError, ValueError):
                raise DatasetError(f"{path}, line {reader.line_num}: bad ClassId {row['ClassId']!r}") from None
            if not 0 <= label < NUM_CLASSES or not row["Filename"]:
                raise DatasetError(
                    f"{path}, line {reader.line_num}: need a Filename and a ClassId in 0..{NUM_CLASSES - 1}"
                )
            paths.append(path.parent / row["Filename"])
            labels.append(label)
    return paths, labels


def _class_dirs(folder: Path) -> list[Path]:
    """Train/000xx, after checking that Train/ and Test/ are there."""
    train_dir, test_dir = folder / "Train", folder / "Test"
    class_dirs = []
    if train_dir.is_dir():
        class_dirs = sorted(d for d in train_dir.iterdir() if d.is_dir() and re.fullmatch(r"\d{5}", d.name))
    if not class_dirs or not test_dir.is_dir():
        raise missing_layout_error("gtsrb", folder, GTSRB_LAYOUT, subfolder_hint(folder, "Train"))
    return class_dirs


def check_gtsrb(folder: Path) -> None:
    """The layout, the first class's and the test CSV, and the first test image (its header; GTSRB
    images come in many sizes, all resized to 32x32)."""
    class_dirs = _class_dirs(folder)
    read_gt_csv(class_dirs[0] / f"GT-{class_dirs[0].name}.csv")
    paths, _ = read_gt_csv(folder / "Test" / "GT-final_test.csv")
    if not paths:
        raise missing_layout_error("gtsrb", folder / "Test" / "GT-final_test.csv", GTSRB_LAYOUT)
    image_size(paths[0])


@register_dataset("gtsrb", check=check_gtsrb, marker="Train")
def load_gtsrb(root=None) -> DatasetSplits:
    folder = dataset_root("gtsrb", root)
    class_dirs = _class_dirs(folder)
    test_dir = folder / "Test"

    train_paths, train_labels = [], []
    for class_dir in class_dirs:
        paths, labels = read_gt_csv(class_dir / f"GT-{class_dir.name}.csv")
        train_paths += paths
        train_labels += labels
    test_paths, test_labels = read_gt_csv(test_dir / "GT-final_test.csv")

    def image_set(paths, labels):
        return load_image_set(paths, labels, SIZE, dataset="gtsrb", root=folder, layout=GTSRB_LAYOUT)

    info = DatasetInfo(
        name="gtsrb",
        num_classes=NUM_CLASSES,
        channels=3,
        height=SIZE,
        width=SIZE,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        hflip=False,
        normalize=False,
        class_names=tuple(str(i) for i in range(NUM_CLASSES)),
    )
    return DatasetSplits(info, image_set(train_paths, train_labels), image_set(test_paths, test_labels))
