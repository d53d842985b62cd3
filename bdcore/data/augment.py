"""Batched tensor augmentation and batching: no PIL, no per-sample Python in the hot loop."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from bdcore.data.base import DatasetInfo, ImageSet


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to size at a random offset per image (vectorised)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device="cpu").to(images.device)
    rows = offsets[0].view(n, 1, 1) + torch.arange(h, device=images.device).view(1, h, 1)
    cols = offsets[1].view(n, 1, 1) + torch.arange(w, device=images.device).view(1, 1, w)
    batch_index = torch.arange(n, device=images.device).view(n, 1, 1)
    # Gather in N x H x W x C layout so one advanced index picks every pixel of every crop.
    cropped = padded.permute(0, 2, 3, 1)[batch_index, rows, cols]
    return cropped.permute(0, 3, 1, 2).contiguous()


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator, device="cpu").to(images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


class Normalizer:
    """uint8 -> float in [0, 1] -> (x - mean) / std, per the dataset's convention."""

    def __init__(self, info: DatasetInfo, device: torch.device | str = "cpu"):
        self.enabled = info.normalize
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
        # One fused multiply-add per pixel: (x - mean) / std = x * (1 / std) + (-mean / std).
        self.inv_std = 1.0 / self.std if self.enabled else torch.ones_like(self.std)
        self.shift = -self.mean / self.std if self.enabled else torch.zeros_like(self.mean)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (0..255) or float images already in [0, 1]."""
        if images.dtype == torch.uint8:
            return torch.addcmul(self.shift, images.float(), self.inv_std / 255.0)
        return torch.addcmul(self.shift, images.float(), self.inv_std)


def augment_batch(
    images: torch.Tensor, info: DatasetInfo, generator: torch.Generator | None = None, crop_padding: int = 4
) -> torch.Tensor:
    """BackdoorBench's training augmentation: random crop (pad 4), flip where the dataset has it."""
    if crop_padding:
        images = random_crop(images, crop_padding, generator)
    if info.hflip:
        images = random_hflip(images, generator)
    return images


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (images, labels, indices) slices of an in-memory set (on whatever device it lives)."""
    n = len(data)
    if shuffle:
        order = torch.randperm(n, generator=generator).to(data.labels.device)
    else:
        order = torch.arange(n, device=data.labels.device)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield data.images[idx], data.labels[idx], idx
