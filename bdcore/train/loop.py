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
    `indices` index the training set. Attacks that own training supply one of these.

    A step that trains parts of its own alongside the model (trigger generators) may carry
    `optimizers` (stepped after every batch with the model's optimizer, through the same AMP
    scaler) and `schedulers` (stepped once per epoch); the loop checkpoints and resumes their
    state with the model's. The parts' weights travel through `extra_state`/`restore_extra_state`.
    A step with a `to(device)` method is moved to the training device before anything else.
    """

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        ...


def step_optimizers(step) -> list[torch.optim.Optimizer]:
    return list(getattr(step, "optimizers", None) or [])


def step_schedulers(step) -> list:
    return list(getattr(step, "schedulers", None) or [])


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

    def save(self, epoch: int, model: nn.Module, optimizers: list, schedulers: list, generator: torch.Generator,
             history: list[dict], extra: dict[str, torch.Tensor] | None = None) -> None:
        """`optimizers` / `schedulers`: the model's first, then a custom step's own."""
        tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        optimizer_meta = []
        for i, optimizer in enumerate(optimizers):
            tensor_state, meta_state = _split_optimizer_state(optimizer.state_dict())
            tensors.update({f"optim{i}.{k}": v for k, v in tensor_state.items()})
            optimizer_meta.append(meta_state)
        tensors["rng.generator"] = generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        for k, v in (extra or {}).items():
            tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
        meta = {
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "optimizers": optimizer_meta,
            "schedulers": [_jsonable(scheduler.state_dict()) for scheduler in schedulers],
            "history": history,
        }
        # One file holds tensors and metadata, so a single rename publishes a whole checkpoint.
        atomic_write(self.path, lambda tmp: save_file(tensors, str(tmp), metadata={"bdcore": json.dumps(meta)}))

    def load(self, model: nn.Module, optimizers: list, schedulers: list, generator: torch.Generator,
             restore_extra: Callable[[dict[str, torch.Tensor]], None] | None = None) -> tuple[int, list[dict]]:
        """Restore the latest checkpoint; returns (epochs done, history), or (0, []) when there is
        none for this run (or it is unreadable or of another shape: training restarts). Extra
        tensors go to `restore_extra` before the optimizers load (they may hold the parameters
        a step's own optimizer updates)."""
        if not self.path.is_file():
            return 0, []
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["bdcore"])
            tensors = load_file(str(self.path))
        except Exception:
            return 0, []
        if (meta.get("fingerprint") != self.fingerprint or len(meta.get("optimizers", ())) != len(optimizers)
                or len(meta.get("schedulers", ())) != len(schedulers)):
            return 0, []
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        if extra and restore_extra is not None:
            restore_extra(extra)
        for i, (optimizer, meta_state) in enumerate(zip(optimizers, meta["optimizers"])):
            prefix = f"optim{i}."
            optimizer.load_state_dict(_join_optimizer_state(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta_state))
        for scheduler, state in zip(schedulers, meta["schedulers"]):
            scheduler.load_state_dict(state)
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        return int(meta["epoch"]), list(meta["history"])


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as (tensors keyed "<param id>.<name>", JSON-able rest)."""
    tensors = {}
    for pid, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
    scalars = {str(pid): {n: v for n, v in s.items() if not isinstance(v, torch.Tensor)}
               for pid, s in state["state"].items()}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, Any] = {"param_groups": meta["param_groups"], "state": {}}
    for pid, scalars in meta["scalars"].items():
        state["state"][int(pid)] = dict(scalars)
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state["state"].setdefault(int(pid), {})[name] = value
    return state


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
    if callable(getattr(step, "to", None)):
        step.to(device)  # its own parts live where the model trains, before their optimizer state loads
    optimizer = make_optimizer(parameters if parameters is not None else model.parameters(), config)
    scheduler = make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    optimizers = [optimizer, *step_optimizers(step)]
    schedulers = [scheduler, *step_schedulers(step)]

    checkpointer = None
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint_dir is not None:
        checkpointer = Checkpointer(checkpoint_dir, run_fingerprint(config, seed, data, checkpoint_tag))
        start_epoch, history = checkpointer.load(model, optimizers, schedulers, generator, restore_extra_state)
        for each in schedulers:
            if isinstance(each, torch.optim.lr_scheduler.MultiStepLR):
                from collections import Counter

                each.milestones = Counter(int(m) for m in each.milestones)  # JSON turned int keys into str
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
            for each in optimizers:
                each.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            for each in optimizers:
                scaler.step(each)
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
        for each in schedulers[1:]:
            each.step()
        record["epoch_seconds"] = time.perf_counter() - epoch_started
        history.append(record)
        if checkpointer is not None:
            checkpointer.save(epoch + 1, model, optimizers, schedulers, generator, history,
                              extra_state() if extra_state is not None else None)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    model.eval()
    model.to("cpu", memory_format=torch.contiguous_format)
    result.history = history
    result.seconds = time.perf_counter() - started
    return result
