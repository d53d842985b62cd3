"""Reading image files into uint8 C x H x W tensors (load time only; never in the hot loop)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bdcore.data.base import DatasetError


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3) -> torch.Tensor:
    """An image file as uint8 C x H x W (RGB, or grey when channels == 1), resized to
    `size` = (height, width) bilinearly when given."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises many error types for corrupt files
        raise DatasetError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, from its header only (nothing is decoded)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as exc:  # PIL raises many error types for corrupt files
        raise DatasetError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
