"""scikit-learn's bundled 8x8 digits (1,797 images), upsampled to 32x32 RGB.

The default dataset of tests and the quick grid: it ships with scikit-learn, so nothing is
downloaded, and a small CNN learns it to >95% accuracy in seconds on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bdcore.data.base import DatasetInfo, DatasetSplits, ImageSet
from bdcore.data.registry import register_dataset

DIGITS_SPLIT_SEED = 0  # fixed, so every run and every test sees the same split
DIGITS_TEST_FRACTION = 0.2


@register_dataset("digits")
def load_digits(root=None, size: int = 32) -> DatasetSplits:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    # sklearn's values are 0..16 intensities; scale to 0..255 and upsample bilinearly.
    small = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    images = big.clamp(0, 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.int64)

    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    order = torch.randperm(len(labels), generator=generator)
    n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values

    train = ImageSet(images[train_idx].contiguous(), labels[train_idx].contiguous())
    mean = tuple((train.images.float() / 255).mean(dim=(0, 2, 3)).tolist())
    std = tuple((train.images.float() / 255).std(dim=(0, 2, 3)).tolist())
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        channels=3,
        height=size,
        width=size,
        mean=mean,
        std=std,
        hflip=False,  # flipped digits are different digits
        normalize=True,
        class_names=tuple(str(i) for i in range(10)),
    )
    return DatasetSplits(info, train, ImageSet(images[test_idx].contiguous(), labels[test_idx].contiguous()))
