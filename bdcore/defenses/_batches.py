"""What defenses with their own optimisation loops share: batches of the defender's clean data as
model-ready tensors on the device, held-out accuracy for selection, and a resumable fine-tune.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from bdcore.data.augment import Normalizer, augment_batch
from bdcore.data.base import DatasetInfo, DefenderData, ImageSet
from bdcore.defenses.base import DefenseContext
from bdcore.device import pick_device
from bdcore.metrics import accuracy
from bdcore.train import TrainConfig, train_model


class Batches:
    """Endless or one-pass batches of an in-memory ImageSet, as float [0, 1] images (augmented on
    request) with labels, on `device`. `model_input` normalises them for the model."""

    def __init__(self, data: ImageSet, info: DatasetInfo, device: torch.device, batch_size: int,
                 augment: bool = False, seed: int = 0):
        if len(data) == 0:
            raise ValueError("the defender's clean data is empty; raise clean_fraction")
        self.data = data.to(device)
        self.info = info
        self.device = device
        self.batch_size = min(batch_size, len(data))
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        self.normalize = Normalizer(info, device)

    def model_input(self, images01: torch.Tensor) -> torch.Tensor:
        return self.normalize(images01)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.data), generator=self.generator).to(self.device)
        for start in range(0, len(self.data), self.batch_size):
            idx = order[start:start + self.batch_size]
            images = self.data.images[idx]
            if self.augment:
                images = augment_batch(images, self.info, self.generator)
            yield images.float().div_(255.0), self.data.labels[idx]

    def forever(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.epoch()


def defense_device(ctx: DefenseContext) -> torch.device:
    return pick_device(ctx.device)


def held_out_accuracy(model: nn.Module, clean: DefenderData, info: DatasetInfo, device) -> float:
    """Accuracy on the defender's held-out clean part: the only data any selection may use. A
    method that holds nothing out (holdout_fraction 0) reports it on its fitting data."""
    data = clean.val if len(clean.val) else clean.train
    acc = accuracy(model, data, info, device=device)
    model.train(False)
    return acc


def fine_tune(model: nn.Module, data: ImageSet, ctx: DefenseContext, epochs: int, lr: float, batch_size: int,
              seed: int, stage: str = "finetune", schedule: str = "cosine", step=None, parameters=None,
              **train_overrides) -> list[dict]:
    """Resumable SGD fine-tuning through the engine's training loop (checkpoints under the cell's
    work folder, one sub-folder per `stage`); returns the per-epoch history."""
    config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, schedule=schedule, device=ctx.device,
                         **train_overrides)
    checkpoint = Path(ctx.work_dir) / stage if ctx.work_dir is not None else None
    result = train_model(model, data, ctx.info, config, seed=seed, step=step, on_epoch_end=ctx.on_epoch_end,
                         checkpoint_dir=checkpoint, parameters=parameters)
    return result.history
