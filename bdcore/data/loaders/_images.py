"""Helpers shared by the image-file loaders (gtsrb, tiny, imagefolder).

The leading underscore keeps the dataset registry from importing this module as a loader.
Decoding uses PIL at load time only; the result is one preallocated uint8 N x 3 x S x S tensor.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from bdcore.data.base import DatasetError, ImageSet, missing_layout_error
from bdcore.data.imageio import read_image as read_image_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp")


def natural_key(name: str) -> list:
    """Sort key that orders 'img_2' before 'img_10' (the order the datasets number files in)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files directly inside `folder` (case-insensitive suffix), in natural name order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes]
    return sorted(files, key=lambda p: natural_key(p.name))


def read_image(path: Path, size: int, *, dataset: str | None = None) -> torch.Tensor:
    """One image file as a uint8 3 x size x size tensor (RGB; PIL bilinear resize if needed).
    With `dataset` given, an image of another size is an error instead: that dataset's files all
    have one size, so another size means another dataset's files."""
    if dataset is None:
        return read_image_file(path, (size, size), channels=3)
    image = read_image_file(path, None, channels=3)
    if image.shape[1:] != (size, size):
        raise wrong_size_error(dataset, path, (image.shape[2], image.shape[1]), size)
    return image


def wrong_size_error(dataset: str, path: Path, found: tuple[int, int], size: int) -> DatasetError:
    return DatasetError(f"{path}: image is {found[0]}x{found[1]} pixels; every {dataset} image is {size}x{size} "
                        f"(is this folder another dataset, or resized files?)")


def load_image_set(
    paths: Sequence[Path], labels: Sequence[int], size: int, *, dataset: str, root: Path, layout: str,
    exact_size: bool = False,
) -> ImageSet:
    """Decode `paths` (threaded; PIL releases the GIL while decoding) into an ImageSet; images are
    resized to size x size, or refused when of another size with `exact_size`.

    An empty list means the folder does not have the expected layout.
    """
    if not paths:
        raise missing_layout_error(dataset, root, layout)
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    workers = min(8, os.cpu_count() or 1)
    strict = dataset if exact_size else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, image in enumerate(pool.map(lambda p: read_image(p, size, dataset=strict), paths)):
            images[i] = image
    return ImageSet(images, torch.tensor(list(labels), dtype=torch.int64))


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of uint8 N x C x H x W images, on the 0..1 scale."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        total_sq += (block * block).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    var = (total_sq - n * mean * mean) / max(n - 1, 1)
    return tuple(mean.tolist()), tuple(var.clamp_min(0).sqrt().tolist())
