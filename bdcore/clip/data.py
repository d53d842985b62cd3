"""Image-text data: a caption table (CSV or Parquet: image path + caption, e.g. a CC3M-style subset in a
local folder), or captions generated from a classification dataset with prompt templates."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bdcore.data.base import ImageSet

# CLIP's zero-shot prompt, the template CleanCLIP / BadCLIP caption classification data with.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
IMAGE_COLUMNS = ("image", "filepath", "image_path", "path")
CAPTION_COLUMNS = ("caption", "title", "text")


@dataclass
class ImageTextSet:
    """uint8 images (N x C x H x W) with one caption each; `labels` when the captions come from classes."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise TypeError("ImageTextSet.images must be a uint8 N x C x H x W tensor")
        if len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.captions)} captions")

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, indices) -> ImageTextSet:
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        labels = self.labels[idx] if self.labels is not None else None
        return ImageTextSet(self.images[idx], [self.captions[i] for i in idx.tolist()], labels, dict(self.meta))


def captions_from_classes(data: ImageSet, class_names: tuple[str, ...] | list[str],
                          templates: tuple[str, ...] | list[str] = DEFAULT_TEMPLATES, seed: int = 0) -> ImageTextSet:
    """One caption per image: a template (drawn at random when several) filled with its class name."""
    if not class_names:
        raise ValueError("captions need class names; this dataset's info has none")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template needs a '{}' where the class name goes, e.g. 'a photo of a {}.'")
    generator = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, len(templates), (len(data),), generator=generator).tolist()
    labels = data.labels.cpu()
    captions = [templates[c].format(class_names[int(y)]) for c, y in zip(choice, labels.tolist())]
    return ImageTextSet(data.images.cpu(), captions, labels.clone(), {"templates": list(templates)})


CAPTION_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
_ACCEPTED_TABLE = (f"a CSV or Parquet file (.csv, .tsv or .parquet) with an image path column "
                   f"({'/'.join(IMAGE_COLUMNS)}) and a caption column ({'/'.join(CAPTION_COLUMNS)})")


def _table_header(path: Path) -> tuple[list[str], int]:
    """Column names and whether there is a row (0 or 1) of a caption table, from its header (CSV / TSV:
    the first two lines) or its Parquet footer: a multi-gigabyte table costs nothing to check."""
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_metadata(path)
            return list(meta.schema.to_arrow_schema().names), min(meta.num_rows, 1)
        head = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", nrows=1)
        return [str(c) for c in head.columns], len(head)
    except pd.errors.EmptyDataError:
        return [], 0
    except (OSError, ValueError) as exc:  # not a table of that format (pyarrow and pandas raise ValueErrors)
        raise ValueError(f"cannot read caption table {str(path)!r} as {path.suffix[1:].upper()}: "
                         f"{' '.join(str(exc).split())}; expected {_ACCEPTED_TABLE}") from exc


def check_caption_table(path: str | Path) -> tuple[str, str]:
    """The (image, caption) column names of the caption table at `path`, after a cheap check that
    load_caption_table will accept it: the file is there, of a known format, with both columns and a
    row. Reads only the header or the Parquet footer. FileNotFoundError / ValueError say what is wrong."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"caption table {str(path)!r} {what}; expected {_ACCEPTED_TABLE}")
    if path.suffix not in CAPTION_TABLE_SUFFIXES:
        raise ValueError(f"caption table {str(path)!r}: use {_ACCEPTED_TABLE}")
    columns, rows = _table_header(path)
    image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if image_col is None or caption_col is None:
        raise ValueError(f"caption table {str(path)!r} has columns {columns}; it needs one of "
                         f"{list(IMAGE_COLUMNS)} and one of {list(CAPTION_COLUMNS)}")
    if not rows:
        raise ValueError(f"caption table {str(path)!r} has no rows")
    return image_col, caption_col


def load_caption_table(path: str | Path, image_root: str | Path | None = None, image_size: int = 224,
                       limit: int | None = None) -> ImageTextSet:
    """Read a CSV/TSV/Parquet caption table; image paths are relative to `image_root` (default: the
    table's folder). Images are resized to image_size x image_size RGB."""
    import pandas as pd
    from PIL import Image

    path = Path(path)
    image_col, caption_col = check_caption_table(path)
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    else:
        table = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    if limit is not None:
        table = table.iloc[:limit]
    root = Path(image_root) if image_root is not None else path.parent
    images = []
    for row, rel in enumerate(table[image_col].astype(str)):
        file = (root / rel).resolve()
        if not file.is_relative_to(root.resolve()):
            raise ValueError(f"caption table row {row}: image path {rel!r} leaves the image folder {str(root)!r}")
        try:
            with Image.open(file) as img:
                arr = np.asarray(img.convert("RGB").resize((image_size, image_size), Image.BICUBIC))
        except (OSError, ValueError) as exc:
            raise ValueError(f"caption table row {row}: cannot read image {str(file)!r}: {exc}") from exc
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    if not images:
        raise ValueError(f"caption table {str(path)!r} has no rows")
    return ImageTextSet(torch.stack(images), table[caption_col].astype(str).tolist(), None, {"source": str(path)})


def defender_pairs(pairs: ImageTextSet, fraction: float, seed: int = 0) -> ImageTextSet:
    """The defender's clean pairs: `fraction` of the clean (pre-poisoning) training pairs, drawn with a
    generator independent of the poisoning draw (as bdcore.data.defender_subset does for images)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"clean pair fraction must be in (0, 1], got {fraction}")
    n_take = max(2, int(round(len(pairs) * fraction)))
    generator = torch.Generator().manual_seed(10_007 + seed)
    return pairs.subset(torch.randperm(len(pairs), generator=generator)[:n_take].sort().values)


def augment_captions(captions: list[str], generator: torch.Generator, p: float = 0.1) -> list[str]:
    """EDA-style text augmentation (Wei & Zou, EMNLP 2019) as CleanCLIP and RoCLIP use it: each caption
    gets one of random deletion (each word dropped with probability p) or random swap (round(p * words),
    at least one, pairs of words exchanged). EDA's synonym operations need WordNet, which this engine
    does not ship (no downloads), so they are left out."""
    out = []
    for caption in captions:
        words = caption.split()
        if len(words) < 2:
            out.append(caption)
            continue
        if float(torch.rand((), generator=generator)) < 0.5:
            keep = (torch.rand(len(words), generator=generator) >= p).tolist()
            kept = [w for w, k in zip(words, keep) if k]
            words = kept or [words[int(torch.randint(0, len(words), (1,), generator=generator))]]
        else:
            for _ in range(max(1, round(p * len(words)))):
                i, j = torch.randint(0, len(words), (2,), generator=generator).tolist()
                words[i], words[j] = words[j], words[i]
        out.append(" ".join(words))
    return out
