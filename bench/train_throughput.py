#!/usr/bin/env python
"""Training throughput (images/s): bdcore's pipeline against a BackdoorBench-style baseline.

Both train the same architecture on the same BadNets-poisoned training set (same poison indices,
same relabelling), with the same batch size, epochs, optimiser (SGD lr 0.01, momentum 0.9,
weight decay 5e-4, cosine schedule), augmentation and torch thread count, in this one process.

* ours: `bdcore.train.train_model` on an `ImageSet` poisoned once up front on uint8 tensors by
  `build_attack("badnet", ...)`; augmentation is batched tensor ops (random crop pad 4, flip
  where the dataset has it).
* BackdoorBench-style: what BackdoorBench does, written from scratch here. Images are numpy HWC
  uint8 arrays in a `torch.utils.data.Dataset`; `__getitem__` makes a PIL image per sample,
  stamps the BadNets trigger on poisoned indices in PIL/numpy (Resize -> np.array ->
  `img * (trigger == 0) + trigger * (trigger > 0)` -> PIL), then runs torchvision's
  Resize, RandomCrop(pad 4), RandomHorizontalFlip (only where the dataset flips), ToTensor and
  Normalize, and returns BackdoorBench's 5-tuple (img, label, index, poisoned?, original label).
  A `DataLoader` (shuffle, drop_last=True, pin_memory on CUDA, non-persistent workers, as
  BackdoorBench) feeds a plain step: forward, cross-entropy, backward, SGD, `loss.item()`.

Each configuration gets one short untimed warm-up pass; then `--repeats` timed runs in
alternating order, reporting the median. Throughput counts the images actually trained on
(BackdoorBench's drop_last skips the last partial batch) over the wall time of the whole
training call (workers are started per epoch, as BackdoorBench's loaders do).

    .venv/bin/python bench/train_throughput.py                      # digits, smallcnn, 2 epochs
    .venv/bin/python bench/train_throughput.py --model preactresnet18 --epochs 1
    .venv/bin/python bench/train_throughput.py --json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from bdcore.attacks import build_attack
from bdcore.data import ImageSet, load_dataset
from bdcore.data.base import DatasetInfo
from bdcore.models import build_model
from bdcore.train import TrainConfig, train_model

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


class DataPathProbe(nn.Module):
    """A 'model' with one weight and no compute: training it times the data path alone
    (batching, poisoning, augmentation, normalisation, loader workers) of either pipeline."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0 * x.flatten(1)[:, :1]


def make_model(model_name: str, info: DatasetInfo) -> nn.Module:
    return DataPathProbe(info.num_classes) if model_name == "data-path" else build_model(model_name, info)


# -- ours --------------------------------------------------------------------------------------
def run_ours(model_name: str, info: DatasetInfo, data: ImageSet, epochs: int, batch_size: int,
             device: str, seed: int) -> tuple[int, float]:
    """Train with bdcore's loop; returns (images trained on, seconds)."""
    torch.manual_seed(seed)
    model = make_model(model_name, info)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=LR, momentum=MOMENTUM,
                         weight_decay=WEIGHT_DECAY, schedule="cosine", augment=True, device=device)
    started = time.perf_counter()
    train_model(model, data, info, config, seed=seed)
    return len(data) * epochs, time.perf_counter() - started


# -- BackdoorBench-style baseline ----------------------------------------------------------------
class BackdoorBenchStyleDataset(Dataset):
    """Numpy HWC uint8 images; PIL + per-sample trigger + torchvision transforms in __getitem__."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, poison_indicator: np.ndarray,
                 bd_labels: np.ndarray, trigger_hwc: np.ndarray, transform, size: tuple[int, int]):
        self.data = images_hwc
        self.targets = labels
        self.poison_indicator = poison_indicator
        self.bd_labels = bd_labels
        self.trigger = trigger_hwc
        self.bd_resize = transforms.Resize(size)  # BackdoorBench's bd image transform resizes first
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def add_trigger(self, img: Image.Image) -> Image.Image:
        arr = np.array(self.bd_resize(img))
        arr = arr * (self.trigger == 0) + self.trigger * (self.trigger > 0)
        return Image.fromarray(arr.astype(np.uint8))

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])  # as torchvision's CIFAR10 does
        original_target = int(self.targets[index])
        poisoned = int(self.poison_indicator[index])
        label = original_target
        if poisoned:
            img = self.add_trigger(img)
            label = int(self.bd_labels[index])
        return self.transform(img), label, index, poisoned, original_target


def backdoorbench_transform(info: DatasetInfo, crop_padding: int = 4):
    size = (info.height, info.width)
    steps = [transforms.Resize(size), transforms.RandomCrop(size, padding=crop_padding)]
    if info.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    if info.normalize:
        steps.append(transforms.Normalize(list(info.mean), list(info.std)))
    return transforms.Compose(steps)


def to_hwc(images: torch.Tensor) -> np.ndarray:
    arr = images.permute(0, 2, 3, 1).contiguous().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr  # grey images as HxW, like MNIST's


def build_baseline_dataset(clean: ImageSet, poisoned_labels: torch.Tensor, poison_indices: torch.Tensor,
                           trigger_chw: torch.Tensor, info: DatasetInfo) -> BackdoorBenchStyleDataset:
    indicator = np.zeros(len(clean), dtype=np.int64)
    indicator[poison_indices.numpy()] = 1
    trigger = trigger_chw.permute(1, 2, 0).numpy()
    if trigger.shape[-1] == 1:
        trigger = trigger[..., 0]
    return BackdoorBenchStyleDataset(
        to_hwc(clean.images), clean.labels.numpy(), indicator, poisoned_labels.numpy(), trigger,
        backdoorbench_transform(info), (info.height, info.width),
    )


def run_baseline(model_name: str, info: DatasetInfo, dataset: Dataset, epochs: int, batch_size: int,
                 workers: int, device: str, seed: int) -> tuple[int, float]:
    """BackdoorBench-style training; returns (images trained on, seconds)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = make_model(model_name, info)
    started = time.perf_counter()
    model.to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=dev.type == "cuda")
    seen = 0
    for _epoch in range(epochs):
        model.train()
        batch_losses = []
        for x, labels, *_other in loader:
            x, labels = x.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            optimizer.zero_grad()
            loss = criterion(model(x), labels)
            loss.backward()
            optimizer.step()
            batch_losses.append(loss.item())
            seen += len(labels)
        scheduler.step()
    model.to("cpu")
    return seen, time.perf_counter() - started


# -- driver --------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--model", default="smallcnn",
                        help="a registered model (smallcnn, preactresnet18, ...) or data-path: no compute, "
                             "the data path alone")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2,
                        help="baseline DataLoader workers (BackdoorBench's config: 4); 0 is always reported too")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (both)")
    parser.add_argument("--warmup-batches", type=int, default=2, help="batches in each untimed warm-up pass")
    parser.add_argument("--ratio", type=float, default=0.1, help="badnet poison ratio")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    busy_before = _other_cpu_use()
    if busy_before is not None and busy_before > 0.2:
        print(f"warning: other processes use {busy_before:.0%} of the CPU right now; the figures will be "
              f"low and noisy (rerun on a quiet machine)", file=sys.stderr)
    splits = load_dataset(args.dataset, root=args.data_root)
    info, clean = splits.info, splits.train
    attack = build_attack("badnet", info, ratio=args.ratio)
    poisoned = attack.poison_train(clean)  # ours: poisoned once, on tensors
    baseline_set = build_baseline_dataset(clean, poisoned.data.labels, poisoned.poison_indices,
                                          attack.pattern, info)

    worker_settings = [args.workers] + ([0] if args.workers != 0 else [])
    pipelines: dict[str, callable] = {
        "ours": lambda data, epochs: run_ours(args.model, info, data, epochs, args.batch_size, args.device, args.seed),
    }
    for w in worker_settings:
        pipelines[f"backdoorbench_w{w}"] = (
            lambda data, epochs, w=w: run_baseline(args.model, info, data, epochs, args.batch_size, w,
                                                   args.device, args.seed)
        )
    full_data = {"ours": poisoned.data}
    full_data.update({name: baseline_set for name in pipelines if name != "ours"})

    # Warm-up: one short untimed pass of each configuration on the first few batches.
    n_warm = min(len(clean), args.warmup_batches * args.batch_size)
    warm_idx = torch.arange(n_warm)
    warm_data = {"ours": poisoned.data.subset(warm_idx)}
    warm_data.update({name: torch.utils.data.Subset(baseline_set, range(n_warm)) for name in pipelines if name != "ours"})
    for name, run in pipelines.items():
        run(warm_data[name], 1)

    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    names = list(pipelines)
    others: list[float] = []  # CPU share other processes took during each timed run
    shares: dict[str, list[float | None]] = {name: [] for name in pipelines}
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            meter = OtherCpuMeter()
            images, seconds = pipelines[name](full_data[name], args.epochs)
            rates[name].append(images / seconds)
            other = meter.share()
            shares[name].append(other)
            if other is not None:
                others.append(other)

    if others and max(others) > 0.1:
        print(f"warning: other processes took up to {max(others):.0%} of the CPU during the timed runs; "
              f"the figures are contaminated (rerun on a quiet machine)", file=sys.stderr)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    ratios = {f"workers={w}": medians["ours"] / medians[f"backdoorbench_w{w}"] for w in worker_settings}
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "processor": _cpu_name(), "device": args.device,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "other_cpu_use_before": busy_before,
                    "other_cpu_use_max_during_runs": max(others) if others else None},
        "config": {"dataset": args.dataset, "train_images": len(clean), "poisoned": len(poisoned.poison_indices),
                   "model": args.model, "batch_size": args.batch_size, "epochs": args.epochs,
                   "threads": args.threads, "repeats": args.repeats, "workers": worker_settings},
        "images_per_second": {name: round(v, 1) for name, v in medians.items()},
        "runs": {name: [round(x, 1) for x in v] for name, v in rates.items()},
        "other_cpu_share_per_run": shares,
        "ratio_ours_over_backdoorbench": {k: round(v, 2) for k, v in ratios.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c = report["config"]
    print(f"train throughput: {c['dataset']} ({c['train_images']} train images, {c['poisoned']} poisoned), "
          f"{c['model']}, batch {c['batch_size']}, {c['epochs']} epochs, {c['threads']} threads, "
          f"{args.device}, median of {c['repeats']}")
    labels = {"ours": "ours (bdcore train_model)"}
    labels.update({f"backdoorbench_w{w}": f"BackdoorBench-style, workers={w}" for w in worker_settings})
    print(f"{'pipeline':<36}{'images/s':>10}   runs (other processes' CPU share)")
    for name in pipelines:
        runs = ", ".join(f"{x:.0f}" + (f" ({o:.0%})" if o is not None else "") for x, o in zip(rates[name], shares[name]))
        print(f"{labels[name]:<36}{medians[name]:>10.1f}   [{runs}]")
    for w in worker_settings:
        print(f"ratio (ours / BackdoorBench-style, workers={w}): {ratios[f'workers={w}']:.1f}x")
    return 0


class OtherCpuMeter:
    """Share of the machine's CPU time used by *other* processes over an interval: busy time in
    /proc/stat minus this process's and its reaped children's (DataLoader workers) CPU time.
    Linux only; `share()` is None elsewhere."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system, time.perf_counter()

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        capacity = wall * (os.cpu_count() or 1)
        return round(min(max((busy - own) / capacity, 0.0), 1.0), 2) if capacity > 0 else None


def _other_cpu_use(seconds: float = 1.0) -> float | None:
    meter = OtherCpuMeter()
    time.sleep(seconds)
    return meter.share()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
