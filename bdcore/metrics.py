"""Backdoor metrics exactly as BackdoorBench defines them (without its metric-module bugs).

ACC: accuracy on the clean test set. ASR: share of the backdoor test set (non-target images with
the trigger) predicted as the target. RA: share of it predicted as the true label.
DER = [max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1] / 2;
RIR = [max(0, RA_def - RA_bd) - max(0, ACC_bd - ACC_def) + 1] / 2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from bdcore.data.augment import Normalizer
from bdcore.data.base import DatasetInfo, ImageSet
from bdcore.device import pick_device


@dataclass
class BackdoorTestSet:
    """Triggered non-target test images, the label the attacker wants, and the true label."""

    images: torch.Tensor  # uint8 N x C x H x W
    target_labels: torch.Tensor  # int64
    true_labels: torch.Tensor  # int64

    def __len__(self) -> int:
        return int(self.true_labels.shape[0])


@dataclass
class BackdoorMetrics:
    acc: float
    asr: float
    ra: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, info: DatasetInfo, batch_size: int = 512,
            device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted labels for uint8 images (evaluation mode, no augmentation)."""
    dev = pick_device(str(device) if device is not None else None)
    model.eval()
    model.to(dev)
    normalize = Normalizer(info, dev)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size].to(dev))
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
            out.append(model(x).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: ImageSet, info: DatasetInfo, device=None) -> float:
    if len(data) == 0:
        return float("nan")
    return float((predict(model, data.images, info, device=device) == data.labels.cpu()).float().mean())


def backdoor_metrics(model: nn.Module, clean_test: ImageSet, backdoor_test: BackdoorTestSet,
                     info: DatasetInfo, device=None) -> BackdoorMetrics:
    preds = predict(model, backdoor_test.images, info, device=device)
    asr = float((preds == backdoor_test.target_labels.cpu()).float().mean()) if len(backdoor_test) else float("nan")
    ra = float((preds == backdoor_test.true_labels.cpu()).float().mean()) if len(backdoor_test) else float("nan")
    return BackdoorMetrics(acc=accuracy(model, clean_test, info, device=device), asr=asr, ra=ra)


def der(acc_bd: float, asr_bd: float, acc_def: float, asr_def: float) -> float:
    """Defense effectiveness rating in [0, 1]: 1 = ASR fully removed at no accuracy cost."""
    return (max(0.0, asr_bd - asr_def) - max(0.0, acc_bd - acc_def) + 1) / 2


def rir(acc_bd: float, ra_bd: float, acc_def: float, ra_def: float) -> float:
    """Robust improvement rate in [0, 1]: gain in robust accuracy, less the accuracy lost."""
    return (max(0.0, ra_def - ra_bd) - max(0.0, acc_bd - acc_def) + 1) / 2


def defense_scores(undefended: BackdoorMetrics, defended: BackdoorMetrics) -> dict[str, float]:
    return {
        "der": der(undefended.acc, undefended.asr, defended.acc, defended.asr),
        "rir": rir(undefended.acc, undefended.ra, defended.acc, defended.ra),
    }
