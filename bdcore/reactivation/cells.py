"""Analysis cells: one dormant-backdoor analysis of one defense cell, computed from saved artifacts.

An analysis cell loads the backdoored model (attack artifact), the defended model (defense
artifact) and, when the analysis needs them, the clean reference model and the other defended
models of the same attack cell (transfer surrogates). It works on poisoned samples of the training
split (the trigger applied to non-target images) and measures ASR on the backdoor test set.

The clean reference is "a clean model of the same training": the attack cell's model, training
settings, seed and starting weights on unpoisoned data. It is an artifact of its own (DIR/clean/...),
trained once under a file lock and shared by every attack cell with the same training.

Results are JSON files written atomically: DIR/analyses/<attack cell>/<defense folder>/<analysis>-<key>.json.
Results that do not depend on the defense (the clean reference's and the undefended model's
re-activation ASR under the same budget) are kept once per attack cell in DIR/analyses/<attack cell>/shared/.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bdcore.artifacts import ArtifactError, load_artifact, read_metadata, save_artifact
from bdcore.atomic import atomic_write_json
from bdcore.cells import AttackCellSpec, _digest, _existing
from bdcore.data import DatasetInfo, DatasetSplits, ImageSet, load_dataset
from bdcore.device import pick_device
from bdcore.metrics import accuracy
from bdcore.models import build_model
from bdcore.reactivation.base import (
    AnalysisConfig,
    AnalysisContext,
    NotApplicable,
    PoisonedSamples,
    analysis_config,
    build_analysis,
)
from bdcore.train import seed_everything, train_model


class AnalysisCellSpec(BaseModel):
    """One analysis (by registered name) with its parameters, applied to one defense cell."""

    model_config = ConfigDict(extra="forbid")

    analysis: str
    params: dict[str, Any] = Field(default_factory=dict)

    def config(self, seed: int) -> AnalysisConfig:
        return analysis_config(self.analysis, **{"seed": seed, **self.params})

    def key(self, defense_key: str, seed: int) -> str:
        return _digest({"defense": defense_key, "analysis": self.analysis,
                        "config": self.config(seed).model_dump()})[:16]


@dataclass
class AnalysisCellResult:
    analysis: AnalysisCellSpec
    path: Path
    columns: dict[str, Any]  # result columns (floats / ints)
    budget: dict[str, Any]  # what the analysis used: norm, eps, steps, queries, surrogates, ...
    reused: bool = False
    seconds: float = 0.0


# -- the clean reference model -------------------------------------------------------------

def clean_reference_key(spec: AttackCellSpec) -> str:
    train = {k: v for k, v in spec.train_config().model_dump().items() if k != "device"}
    return _digest({"dataset": spec.dataset, "model": spec.model, "train": train, "seed": spec.seed,
                    "pretrained": spec.pretrained, "clean": True})[:16]


def clean_reference_dir(out_dir: str | Path, spec: AttackCellSpec) -> Path:
    return Path(out_dir) / "clean" / f"{spec.dataset}-{spec.model.replace(':', '_')}-s{spec.seed}-{clean_reference_key(spec)[:8]}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_clean_reference(spec: AttackCellSpec, out_dir: str | Path, device: str = "auto",
                        data: DatasetSplits | None = None) -> Path:
    """Train (or reuse) the clean model of `spec`'s training; returns its artifact folder. Concurrent
    callers wait on a lock instead of training the same model twice."""
    folder = clean_reference_dir(out_dir, spec)
    key = clean_reference_key(spec)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if _existing(folder, key) is not None:
            return folder
        started = time.perf_counter()
        if spec.is_clip:
            from bdcore.clip import build_clip, train_clip
            from bdcore.clip.cells import at_resolution, training_pairs, zero_shot

            train_cfg = spec.train_config().model_copy(update={"device": device})
            data = at_resolution(data or load_dataset(spec.dataset, root=spec.data_root), train_cfg.image_size)
            bundle = build_clip(spec.model, weights=spec.pretrained)
            train_clip(bundle, training_pairs(data, train_cfg), train_cfg.schedule(), seed=spec.seed)
            state, acc = bundle.model.state_dict(), accuracy(zero_shot(bundle, data.info, train_cfg), data.test,
                                                              data.info, device=device)
        else:
            train_cfg = spec.train_config().model_copy(update={"device": device})
            data = data or load_dataset(spec.dataset, root=spec.data_root)
            seed_everything(spec.seed)
            model = build_model(spec.model, data.info, pretrained=spec.pretrained)
            train_model(model, data.train, data.info, train_cfg, seed=spec.seed)
            state, acc = model.state_dict(), accuracy(model, data.test, data.info, device=device)
        save_artifact(folder, state, {
            "kind": "clean", **({"family": "clip"} if spec.is_clip else {}), "cell_key": key,
            "spec": spec.model_dump(), "dataset_info": data.info.to_dict(), "metrics": {"acc": acc},
            "seconds": time.perf_counter() - started,
        })
    return folder


# -- models as classifiers -----------------------------------------------------------------

def _classifier(spec: AttackCellSpec, info: DatasetInfo, folder: Path) -> nn.Module:
    """The model saved in artifact `folder` as a classifier on the engine's normalised inputs (a CLIP
    model as its zero-shot classifier with the cell's prompt templates)."""
    state = load_artifact(folder).model_state
    try:
        if spec.is_clip:
            from bdcore.clip import build_clip
            from bdcore.clip.cells import zero_shot

            bundle = build_clip(spec.model, architecture_only=True)
            bundle.model.load_state_dict(state)
            bundle.model.eval()
            return zero_shot(bundle, info, spec.train_config())
        model = build_model(spec.model, info)
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise NotApplicable(f"the model saved in {str(folder)!r} is not a plain {spec.model!r} (a defense that "
                            f"changes the architecture?), so it cannot be analysed: {str(exc).splitlines()[0]}") from exc
    return model.eval()


def poisoned_samples(attack, split: ImageSet, target: int, limit: int, seed: int) -> PoisonedSamples:
    """Up to `limit` non-target images of `split` (a seeded random choice) with the attack's trigger,
    and their clean versions (for TAC)."""
    keep = torch.nonzero(split.labels != target).flatten()
    keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:limit]].sort().values
    chosen = split.subset(keep)
    triggered = attack.backdoor_test(chosen)  # every chosen image is non-target, so the order is kept
    if len(triggered) != len(keep):
        raise ValueError(f"attack {type(attack).__name__} returned {len(triggered)} triggered images for "
                         f"{len(keep)} non-target inputs")
    return PoisonedSamples(triggered.images, triggered.target_labels, chosen.images)


def analysis_dir(out_dir: str | Path, spec: AttackCellSpec, defense_dir: Path) -> Path:
    return Path(out_dir) / "analyses" / spec.name() / Path(defense_dir).name


def _shared_cache(folder: Path, prefix: str) -> Callable[[str, Callable[[], dict]], dict]:
    """A JSON cache for results shared by every defense cell of one attack cell."""

    def shared(role: str, compute: Callable[[], dict]) -> dict:
        path = folder / f"{prefix}-{role}.json"
        with _file_lock(folder / f".{prefix}-{role}.lock"):
            if path.is_file():
                try:
                    return json.loads(path.read_text())
                except ValueError:
                    pass  # a damaged cache file is recomputed
            value = compute()
            atomic_write_json(path, value)
            return value

    return shared


def run_analysis_cell(attack_dir: str | Path, defense_dir: str | Path, analysis: AnalysisCellSpec,
                      out_dir: str | Path, device: str = "auto", surrogate_dirs: Sequence[str | Path] = (),
                      data: DatasetSplits | None = None) -> AnalysisCellResult:
    """Run `analysis` on the defended model saved at `defense_dir` (of the attack cell at `attack_dir`),
    or reuse its saved result. `surrogate_dirs`: other defense cells of the same attack cell."""
    started = time.perf_counter()
    attack_meta = read_metadata(attack_dir)
    defense_meta = read_metadata(defense_dir)
    spec = AttackCellSpec(**attack_meta.get("spec", {}))
    if defense_meta.get("kind") != "defense" or defense_meta.get("attack_cell", {}).get("key") != spec.key():
        raise ArtifactError(f"{str(defense_dir)!r} is not a defense cell of attack cell {str(attack_dir)!r}")
    if spec.label_mode != "all2one":
        raise NotApplicable(f"{analysis.analysis} analyses a backdoor toward one target class: label_mode "
                            f"must be 'all2one', got {spec.label_mode!r}")
    config = analysis.config(spec.seed)
    method = build_analysis(analysis.analysis, **config.model_dump())
    key = analysis.key(defense_meta["cell_key"], spec.seed)
    folder = analysis_dir(out_dir, spec, Path(defense_dir))
    path = folder / f"{analysis.analysis}-{key[:8]}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return AnalysisCellResult(analysis, path, saved["columns"], saved["budget"], reused=True)
        except (ValueError, KeyError):
            pass  # a damaged result is recomputed

    dev = pick_device(None if device == "auto" else device)
    if spec.is_clip:
        from bdcore.clip.cells import at_resolution, load_clip_attack_cell

        cell = load_clip_attack_cell(attack_dir)
        data = at_resolution(data or load_dataset(spec.dataset, root=spec.data_root), spec.train_config().image_size)
    else:
        from bdcore.cells import load_attack_cell

        cell = load_attack_cell(attack_dir)
        data = data or load_dataset(spec.dataset, root=spec.data_root)
    info = cell.info
    fit = poisoned_samples(cell.attack, data.train, spec.target, config.samples, spec.seed)
    clean_dir: list[Path] = []

    def clean_model() -> nn.Module:
        if not clean_dir:
            clean_dir.append(run_clean_reference(spec, out_dir, device=device, data=data if not spec.is_clip else None))
        return _classifier(spec, info, clean_dir[0])

    def surrogates() -> list[nn.Module]:
        models = []
        for folder in surrogate_dirs:
            if Path(folder).resolve() == Path(defense_dir).resolve():
                continue
            with contextlib.suppress(NotApplicable):  # a defense that changed the architecture is no surrogate
                models.append(_classifier(spec, info, Path(folder)))
        return models

    ctx = AnalysisContext(
        info=info, backdoored=_classifier(spec, info, Path(attack_dir)), defended=_classifier(spec, info, Path(defense_dir)),
        fit=fit, evaluate=cell.attack.backdoor_test(data.test), clean_model=clean_model, surrogates=surrogates,
        device=dev, shared=_shared_cache(Path(out_dir) / "analyses" / spec.name() / "shared",
                                         f"{analysis.analysis}-{_digest(config.model_dump())[:8]}"))
    out = method.run(ctx)
    budget = out.pop("budget", {})
    reference = clean_dir[0] if clean_dir else clean_reference_dir(out_dir, spec)
    if reference.is_dir():  # used now, or by a sibling cell whose shared result this one reused
        budget["clean_reference"] = str(reference)
    atomic_write_json(path, {"key": key, "analysis": analysis.model_dump(), "config": config.model_dump(),
                             "columns": out, "budget": budget, "seconds": time.perf_counter() - started})
    return AnalysisCellResult(analysis, path, out, budget, seconds=time.perf_counter() - started)


__all__ = ["AnalysisCellResult", "AnalysisCellSpec", "analysis_dir", "clean_reference_dir", "poisoned_samples",
           "run_analysis_cell", "run_clean_reference"]
