"""The training loop: in-memory tensors, batched augmentation, AMP + channels_last on CUDA,
per-epoch callbacks and epoch-level checkpoint/resume (a run killed at epoch 60 resumes at 60).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from bdcore.atomic import atomic_write
from bdcore.data.augment import Normalizer, augment_batch
from bdcore.data.base import DatasetInfo, ImageSet
from bdcore.device import pick_device
from bdcore.train.config import TrainConfig


@dataclass
class StepContext:
    """What a custom training step sees besides the batch."""

    model: nn.Module
    normalize: Normalizer
    info: DatasetInfo
    config: TrainConfig
    device: torch.device
    epoch: int
    generator: torch.Generator


class TrainStep(Protocol):
    """A loss for one batch. `images` are augmented, float in [0, 1], on the device;
    `indices` index the training set. Attacks that own training supply one of these."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        ...


def cross_entropy_step(images, labels, indices, ctx: StepContext) -> torch.Tensor:
    logits = ctx.model(to_model_input(images, ctx))
    return F.cross_entropy(logits, labels, label_smoothing=ctx.config.label_smoothing)


def to_model_input(images: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    x = ctx.normalize(images)
    if ctx.config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=config.milestones, gamma=config.gamma)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


class Checkpointer:
    """Epoch-level checkpoints: one safetensors file holding the tensors (model, optimizer, RNG)
    and, as its JSON metadata, the epoch, scheduler state and history.

    A checkpoint records a fingerprint of the run (config + seed + data size); one of another
    run is ignored rather than resumed into the wrong training.
    """

    FILE = "checkpoint.safetensors"

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    @property
    def path(self) -> Path:
        return self.folder / self.FILE

    def save(self, epoch: int, model: nn.Module, optimizer, scheduler, generator: torch.Generator,
             history: list[dict], extra: dict[str, torch.Tensor] | None = None) -> None:
        tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        opt_state = optimizer.state_dict()
        for pid, state in opt_state["state"].items():
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
        tensors["rng.generator"] = generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        for k, v in (extra or {}).items():
            tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
        meta = {
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "optimizer_param_groups": opt_state["param_groups"],
            "optimizer_scalars": {
                str(pid): {n: v for n, v in s.items() if not isinstance(v, torch.Tensor)}
                for pid, s in opt_state["state"].items()
            },
            "scheduler": _jsonable(scheduler.state_dict()),
            "history": history,
        }
        # One file holds tensors and metadata, so a single rename publishes a whole checkpoint.
        atomic_write(self.path, lambda tmp: save_file(tensors, str(tmp), metadata={"bdcore": json.dumps(meta)}))

    def load(self, model: nn.Module, optimizer, scheduler, generator: torch.Generator) -> tuple[int, list[dict], dict]:
        """Restore the latest checkpoint; returns (epochs done, history, extra tensors), or
        (0, [], {}) when there is none for this run (or it is unreadable: training restarts)."""
        if not self.path.is_file():
            return 0, [], {}
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["bdcore"])
            tensors = load_file(str(self.path))
        except Exception:
            return 0, [], {}
        if meta.get("fingerprint") != self.fingerprint:
            return 0, [], {}
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state: dict[str, Any] = {"param_groups": meta["optimizer_param_groups"], "state": {}}
        for pid, scalars in meta["optimizer_scalars"].items():
            opt_state["state"][int(pid)] = dict(scalars)
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(meta["scheduler"])
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        return int(meta["epoch"]), list(meta["history"]), extra


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def run_fingerprint(config: TrainConfig, seed: int, data: ImageSet, tag: str = "") -> str:
    payload = json.dumps({"config": config.model_dump(), "seed": seed, "n": len(data), "tag": tag}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_model(
    model: nn.Module,
    data: ImageSet,
    info: DatasetInfo,
    config: TrainConfig,
    seed: int = 0,
    step: TrainStep | None = None,
    on_epoch_end: EpochCallback | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_tag: str = "",
    extra_state: Callable[[], dict[str, torch.Tensor]] | None = None,
    restore_extra_state: Callable[[dict[str, torch.Tensor]], None] | None = None,
    parameters=None,
) -> TrainResult:
    """Train `model` in place on `data` (uint8 tensors) and return the per-epoch history.

    `step` replaces plain cross-entropy (attacks that own training); `evaluate(model)` adds
    metrics to each epoch's record; `checkpoint_dir` makes the run resumable per epoch, with
    `extra_state`/`restore_extra_state` carrying a custom step's own tensors (e.g. generators).
    `parameters` restricts what the optimizer updates (default: all of the model's).
    """
    started = time.perf_counter()
    device = pick_device(config.device)
    use_amp = config.amp and device.type == "cuda"
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    if config.channels_last:  # faster convolutions with cuDNN and with oneDNN on the CPU
        model.to(memory_format=torch.channels_last)
    data = data.to(device)
    normalize = Normalizer(info, device)
    step = step or cross_entropy_step
    optimizer = make_optimizer(parameters if parameters is not None else model.parameters(), config)
    scheduler = make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    checkpointer = None
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint_dir is not None:
        checkpointer = Checkpointer(checkpoint_dir, run_fingerprint(config, seed, data, checkpoint_tag))
        start_epoch, history, extra = checkpointer.load(model, optimizer, scheduler, generator)
        if extra and restore_extra_state is not None:
            restore_extra_state(extra)
        if isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR):
            from collections import Counter

            scheduler.milestones = Counter(config.milestones)  # JSON turned its int keys into str
    result = TrainResult(resumed_from_epoch=start_epoch)

    n = len(data)
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        model.train()
        ctx = StepContext(model, normalize, info, config, device, epoch, generator)
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum, batches = torch.zeros((), device=device), 0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            images, labels = data.images[idx], data.labels[idx]
            if config.augment:
                images = augment_batch(images, info, generator, config.crop_padding)
            images = images.float().div_(255.0)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = step(images, labels, idx, ctx)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()  # summed on the device: no host sync per batch
            batches += 1
        record: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / max(batches, 1),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if evaluate is not None:
            model.eval()
            record.update(evaluate(model))
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(record["train_loss"])
        else:
            scheduler.step()
        record["epoch_seconds"] = time.perf_counter() - epoch_started
        history.append(record)
        if checkpointer is not None:
            checkpointer.save(epoch + 1, model, optimizer, scheduler, generator, history,
                              extra_state() if extra_state is not None else None)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    model.eval()
    model.to("cpu", memory_format=torch.contiguous_format)
    result.history = history
    result.seconds = time.perf_counter() - started
    return result
