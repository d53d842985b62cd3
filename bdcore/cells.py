"""Whole experiment cells: an attack cell trains (or reuses) a backdoored model; a defense cell
repairs it and scores the repair. Both are saved as artifacts keyed by a hash of their full,
default-filled configuration, so identical cells are computed once and reused.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bdcore.artifacts import ArtifactError, load_artifact, read_metadata, save_artifact
from bdcore.attacks import Attack, PoisonedTrainSet, attack_config, build_attack
from bdcore.attacks.registry import ATTACKS, attack_names
from bdcore.attacks.resources import ResourceStore
from bdcore.clip.attacks import CLIP_ATTACKS, clip_attack_config, clip_attack_names
from bdcore.clip.defenses import CLIP_DEFENSES, clip_defense_config, clip_defense_names
from bdcore.clip.models import is_clip_model
from bdcore.data import DatasetInfo, DatasetSplits, defender_subset, load_dataset
from bdcore.defenses import DefenseContext, DefenseSkipped, InputFilter, build_defense, defense_config
from bdcore.defenses.registry import DEFENSES, defense_names
from bdcore.metrics import BackdoorMetrics, BackdoorTestSet, backdoor_metrics, defense_scores
from bdcore.models import build_model
from bdcore.train import TrainConfig, default_train_config, seed_everything, train_model

EpochCallback = Callable[[int, dict], None]
# Settings that change where or how fast a cell runs, never its result: not part of its key.
_RUNTIME_ONLY = {"device"}


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# -- method families: image-classifier methods run on classifier models, CLIP methods on `clip:` models --

def attack_method_names() -> list[str]:
    """Every registered attack: image-classifier attacks and CLIP attacks."""
    return sorted(attack_names() + clip_attack_names())


def defense_method_names() -> list[str]:
    return sorted(defense_names() + clip_defense_names())


def attack_config_class(name: str) -> type[BaseModel]:
    return (CLIP_ATTACKS if name in clip_attack_names() else ATTACKS).get(name).config_class


def defense_config_class(name: str) -> type[BaseModel]:
    return (CLIP_DEFENSES if name in clip_defense_names() else DEFENSES).get(name).config_class


def train_config_class(model: str) -> type[BaseModel]:
    """The type of an attack cell's `train` settings for `model`."""
    if is_clip_model(model):
        from bdcore.clip.cells import ClipCellTrain

        return ClipCellTrain
    return TrainConfig


def compatibility_problem(model: str, attack: str, defense: str | None = None) -> str | None:
    """Why `attack` (and `defense`) cannot run on `model`, or None: CLIP methods need a `clip:` model
    and image-classifier methods an image classifier."""
    clip = is_clip_model(model)
    family = "a CLIP model" if clip else "an image classifier"
    if attack not in attack_method_names() or (defense is not None and defense not in defense_method_names()):
        return None  # an unknown name: the registry's own error lists what exists
    if clip != (attack in clip_attack_names()):
        kind = "a CLIP attack" if not clip else "an image-classifier attack"
        return (f"attack {attack!r} is {kind} and model {model!r} is {family}: "
                f"{'CLIP' if not clip else 'image-classifier'} attacks need "
                f"{'a clip:<arch> model' if not clip else 'an image classifier'}")
    if defense is not None and clip != (defense in clip_defense_names()):
        kind = "a CLIP defense" if not clip else "an image-classifier defense"
        return (f"defense {defense!r} is {kind} and model {model!r} is {family}: "
                f"{'CLIP' if not clip else 'image-classifier'} defenses need "
                f"{'a clip:<arch> model' if not clip else 'an image classifier'}")
    return None


def cell_modules(spec: AttackCellSpec, defense: str | None = None, analysis: str | None = None) -> tuple[str, ...]:
    """The modules whose code computes a cell (an attack cell; with `defense`, that defense's cell; with
    `analysis` too, the analysis of that defense cell): the method's module, the model's, the dataset
    loader's and the cell runner. Whatever they import follows from their source (sweep.codeprint)."""
    from bdcore.data.registry import DATASETS
    from bdcore.models.registry import MODELS

    model = "bdcore.clip.models" if spec.is_clip else MODELS.module_of(spec.model)
    roots = [model, DATASETS.module_of(spec.dataset)]
    if analysis is not None:
        from bdcore.reactivation import ANALYSES

        roots += [ANALYSES.module_of(analysis), "bdcore.reactivation.cells"]
    elif defense is not None:
        roots += [(CLIP_DEFENSES if defense in clip_defense_names() else DEFENSES).module_of(defense), __name__]
    else:
        roots += [(CLIP_ATTACKS if spec.attack in clip_attack_names() else ATTACKS).module_of(spec.attack), __name__]
    return tuple(roots)


class AttackCellSpec(BaseModel):
    """One attack cell: dataset x model x attack x ratio x label mode x seed (+ parameters)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    model: str
    attack: str
    ratio: float = Field(gt=0, le=1)
    label_mode: Literal["all2one", "all2all"] = "all2one"
    target: int = Field(0, ge=0)
    seed: int = 0
    attack_params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)  # TrainConfig overrides
    data_root: str | None = None  # where the dataset lives; not part of the key
    pretrained: str | None = None  # local weights file to start from

    @property
    def is_clip(self) -> bool:
        return is_clip_model(self.model)

    def attack_config(self):
        """The attack's typed config (a CLIP attack's for `clip:` models); raises for a bad parameter
        or an attack of the other model family."""
        problem = compatibility_problem(self.model, self.attack)
        if problem:
            raise ValueError(problem)
        if self.is_clip:
            if self.label_mode != "all2one":
                raise ValueError(f"CLIP attack {self.attack!r} poisons captions toward one target class: label_mode "
                                 f"must be 'all2one', got {self.label_mode!r}")
            return clip_attack_config(self.attack, ratio=self.ratio, target=self.target, seed=self.seed,
                                      **self.attack_params)
        config = attack_config(self.attack, ratio=self.ratio, target=self.target, label_mode=self.label_mode,
                               seed=self.seed, **self.attack_params)
        if getattr(config, "surrogate_is_victim", False) and config.surrogate_model is None:
            # BackdoorBench crafts these triggers against a clean model of the victim's own architecture.
            config = config.model_copy(update={"surrogate_model": self.model})
        return config

    def train_config(self):
        """TrainConfig for image classifiers, bdcore.clip.cells.ClipCellTrain for CLIP models."""
        if self.is_clip:
            from bdcore.clip.cells import ClipCellTrain

            return ClipCellTrain(**self.train)
        return default_train_config(self.dataset, **self.train)

    def key(self) -> str:
        train = {k: v for k, v in self.train_config().model_dump().items() if k not in _RUNTIME_ONLY}
        return _digest({"dataset": self.dataset, "model": self.model, "attack": self.attack,
                        "attack_config": self.attack_config().model_dump(), "train": train,
                        "pretrained": self.pretrained})[:16]

    def name(self) -> str:
        return (f"{self.dataset}-{self.model}-{self.attack}-r{self.ratio:g}-{self.label_mode}-t{self.target}"
                f"-s{self.seed}-{self.key()[:8]}")


class DefenseCellSpec(BaseModel):
    """One defense applied to one attack cell."""

    model_config = ConfigDict(extra="forbid")

    defense: str
    params: dict[str, Any] = Field(default_factory=dict)

    def config(self, seed: int):
        params = {"seed": seed, **self.params}
        if self.defense in clip_defense_names():
            return clip_defense_config(self.defense, **params)
        return defense_config(self.defense, **params)

    def key(self, attack_key: str, seed: int) -> str:
        return _digest({"attack": attack_key, "defense": self.defense,
                        "config": self.config(seed).model_dump()})[:16]


@dataclass
class AttackCellResult:
    spec: AttackCellSpec
    path: Path
    metrics: BackdoorMetrics
    reused: bool
    seconds: float
    history: list[dict] = field(default_factory=list)


@dataclass
class DefenseCellResult:
    defense: DefenseCellSpec
    path: Path | None
    status: Literal["done", "skipped"]
    undefended: BackdoorMetrics
    metrics: BackdoorMetrics | None = None
    scores: dict[str, float] = field(default_factory=dict)  # der, rir
    diagnostics: dict = field(default_factory=dict)
    reason: str = ""
    reused: bool = False
    seconds: float = 0.0


@dataclass
class LoadedAttackCell:
    """Everything a defense or analysis needs, rebuilt from an attack artifact alone."""

    spec: AttackCellSpec
    info: DatasetInfo
    model: nn.Module
    attack: Attack
    metrics: BackdoorMetrics
    poison_indices: torch.Tensor
    path: Path

    def fresh_model(self) -> nn.Module:
        return build_model(self.spec.model, self.info)


def attack_cell_dir(out_dir: str | Path, spec: AttackCellSpec) -> Path:
    return Path(out_dir) / "attacks" / spec.name()


def defense_cell_dir(out_dir: str | Path, attack_spec: AttackCellSpec, defense: DefenseCellSpec) -> Path:
    key = defense.key(attack_spec.key(), attack_spec.seed)
    return Path(out_dir) / "defenses" / attack_spec.name() / f"{defense.defense}-{key[:8]}"


def _metrics(d: dict) -> BackdoorMetrics:
    return BackdoorMetrics(acc=d["acc"], asr=d["asr"], ra=d["ra"])


def _existing(folder: Path, key: str) -> dict | None:
    """The metadata of a complete artifact of this exact cell, else None (absent or corrupt
    artifacts are recomputed; a foreign folder with the same name is an error)."""
    if not folder.exists():
        return None
    try:
        metadata = load_artifact(folder).metadata  # verifies every hash
    except ArtifactError:
        return None
    if metadata.get("cell_key") != key:
        raise ArtifactError(f"{str(folder)!r} holds cell {metadata.get('cell_key')!r}, expected {key!r}")
    return metadata


def run_attack_cell(spec: AttackCellSpec, out_dir: str | Path, device: str = "auto",
                    on_epoch_end: EpochCallback | None = None,
                    data: DatasetSplits | None = None) -> AttackCellResult:
    """Train the backdoored model of `spec` (resuming from its last epoch checkpoint) or reuse
    its saved artifact."""
    if spec.is_clip:
        from bdcore.clip.cells import run_clip_attack_cell

        return run_clip_attack_cell(spec, out_dir, device=device, on_epoch_end=on_epoch_end, data=data)
    started = time.perf_counter()
    folder = attack_cell_dir(out_dir, spec)
    key = spec.key()
    existing = _existing(folder, key)
    if existing is not None:
        return AttackCellResult(spec, folder, _metrics(existing["metrics"]), True, 0.0, existing.get("history", []))

    attack_cfg = spec.attack_config()  # validates parameters before any data is loaded
    train_cfg = spec.train_config().model_copy(update={"device": device})
    data = data or load_dataset(spec.dataset, root=spec.data_root)
    attack = build_attack(spec.attack, data.info, **attack_cfg.model_dump())
    resources = ResourceStore(Path(out_dir) / "resources", device=device)
    attack.prepare(data.train, resources)
    poisoned = attack.poison_train(data.train)

    seed_everything(spec.seed)
    model = build_model(spec.model, data.info, pretrained=spec.pretrained)
    work = Path(out_dir) / "work" / "attacks" / spec.name()
    result = train_model(model, poisoned.data, data.info, train_cfg, seed=spec.seed,
                         step=attack.training_step(poisoned), on_epoch_end=on_epoch_end, checkpoint_dir=work,
                         checkpoint_tag=key, extra_state=attack.state_tensors,
                         restore_extra_state=attack.load_state_tensors)
    # After training: attacks that learn their trigger (generators) only have it now.
    backdoor_test = attack.backdoor_test(data.test)
    metrics = backdoor_metrics(model, data.test, backdoor_test, data.info, device=device)
    seconds = time.perf_counter() - started
    save_artifact(folder, model.state_dict(), {
        "kind": "attack",
        "cell_key": key,
        "spec": spec.model_dump(),
        "attack_config": attack_cfg.model_dump(),
        "train_config": train_cfg.model_dump(),
        "dataset_info": data.info.to_dict(),
        "poison_indices": poisoned.poison_indices.tolist(),
        "extra_indices": {k: v.tolist() for k, v in poisoned.extra_indices.items()},
        "has_poisoned_trainset": attack.has_poisoned_trainset,
        "resources": resources.used,
        "metrics": metrics.as_dict(),
        "history": result.history,
        "resumed_from_epoch": result.resumed_from_epoch,
        "seconds": seconds,
    }, extra={f"attack.{k}": v for k, v in attack.state_tensors().items()})
    shutil.rmtree(work, ignore_errors=True)
    return AttackCellResult(spec, folder, metrics, False, seconds, result.history)


def load_attack_cell(folder: str | Path) -> LoadedAttackCell:
    """Rebuild model and attack (its trigger from the saved tensors) from an attack artifact."""
    artifact = load_artifact(folder)
    meta = artifact.metadata
    if meta.get("kind") != "attack":
        raise ArtifactError(f"{str(folder)!r} is a {meta.get('kind')!r} artifact, not an attack cell")
    if meta.get("family") == "clip":
        raise ArtifactError(f"{str(folder)!r} is a CLIP attack cell: load it with "
                            "bdcore.clip.cells.load_clip_attack_cell")
    spec = AttackCellSpec(**meta["spec"])
    info = DatasetInfo.from_dict(meta["dataset_info"])
    model = build_model(spec.model, info)
    try:
        model.load_state_dict(artifact.model_state)
    except RuntimeError as exc:
        raise ArtifactError(f"artifact {str(folder)!r} does not fit model {spec.model!r}: {exc}") from exc
    model.eval()
    attack = build_attack(spec.attack, info, **meta["attack_config"])
    attack.load_state_tensors({k[len("attack."):]: v for k, v in artifact.extra.items() if k.startswith("attack.")})
    return LoadedAttackCell(spec, info, model, attack, _metrics(meta["metrics"]),
                            torch.tensor(meta["poison_indices"], dtype=torch.long), Path(folder))


def run_defense_cell(attack_dir: str | Path, defense: DefenseCellSpec, out_dir: str | Path, device: str = "auto",
                     on_epoch_end: EpochCallback | None = None,
                     data: DatasetSplits | None = None) -> DefenseCellResult:
    """Apply `defense` to the backdoored model saved at `attack_dir` and score it against the
    undefended model (ACC / ASR / RA, DER, RIR), or reuse the saved result."""
    attack_spec = AttackCellSpec(**read_metadata(attack_dir).get("spec", {}))
    problem = compatibility_problem(attack_spec.model, attack_spec.attack, defense.defense)
    if problem:
        raise ValueError(problem)
    if attack_spec.is_clip:
        from bdcore.clip.cells import run_clip_defense_cell

        return run_clip_defense_cell(attack_dir, defense, out_dir, device=device, on_epoch_end=on_epoch_end, data=data)
    started = time.perf_counter()
    cell = load_attack_cell(attack_dir)
    spec = cell.spec
    config = defense.config(spec.seed)
    folder = defense_cell_dir(out_dir, spec, defense)
    key = defense.key(spec.key(), spec.seed)
    existing = _existing(folder, key)
    if existing is not None:
        return DefenseCellResult(defense, folder, "done", cell.metrics, _metrics(existing["metrics"]),
                                 existing["scores"], existing["diagnostics"], reused=True)

    data = data or load_dataset(spec.dataset, root=spec.data_root)
    backdoor_test: BackdoorTestSet = cell.attack.backdoor_test(data.test)
    method = build_defense(defense.defense, **config.model_dump())
    work = Path(out_dir) / "work" / "defenses" / spec.name() / folder.name
    ctx = DefenseContext(info=cell.info, device=device, work_dir=work, on_epoch_end=on_epoch_end,
                         model_factory=cell.fresh_model, train_config=spec.train_config(),
                         poisoned_train=(lambda: _rebuild_poisoned(cell, data)) if cell.attack.has_poisoned_trainset
                         else None)
    seed_everything(spec.seed)
    try:
        if method.kind == "post_training":
            clean = defender_subset(data.train, config.clean_fraction, method.holdout_fraction, seed=spec.seed)
            outcome = method.repair(cell.model, clean, ctx)
        elif method.kind == "detector":
            clean = defender_subset(data.train, config.clean_fraction, method.holdout_fraction, seed=spec.seed)
            outcome = method.mitigate(cell.model, _rebuild_poisoned(cell, data), clean, ctx)
            if isinstance(method, InputFilter):  # also screens test inputs in front of the backdoored model
                outcome.diagnostics.update(method.filter_quality(cell.model, clean, data.test, backdoor_test.images, ctx))
        else:
            outcome = method.train(_rebuild_poisoned(cell, data), ctx)
    except DefenseSkipped as skipped:
        return DefenseCellResult(defense, None, "skipped", cell.metrics, reason=str(skipped),
                                 seconds=time.perf_counter() - started)
    metrics = backdoor_metrics(outcome.model, data.test, backdoor_test, cell.info, device=device)
    return finish_defense_cell(folder, key, spec, defense, config, cell.info, cell.metrics, metrics,
                               outcome.model.state_dict(), outcome.diagnostics, work, started)


def finish_defense_cell(folder: Path, key: str, spec: AttackCellSpec, defense: DefenseCellSpec, config: BaseModel,
                        info: DatasetInfo, undefended: BackdoorMetrics, metrics: BackdoorMetrics,
                        model_state: dict, diagnostics: dict, work: Path, started: float,
                        family: str | None = None) -> DefenseCellResult:
    """Score a finished defense against its undefended model, save its artifact, drop its work folder."""
    scores = defense_scores(undefended, metrics)
    seconds = time.perf_counter() - started
    save_artifact(folder, model_state, {
        "kind": "defense",
        **({"family": family} if family else {}),
        "cell_key": key,
        "attack_cell": {"key": spec.key(), "name": spec.name(), "spec": spec.model_dump()},
        "defense": defense.model_dump(),
        "defense_config": config.model_dump(),
        "dataset_info": info.to_dict(),
        "undefended_metrics": undefended.as_dict(),
        "metrics": metrics.as_dict(),
        "scores": scores,
        "diagnostics": diagnostics,
        "seconds": seconds,
    })
    shutil.rmtree(work, ignore_errors=True)
    return DefenseCellResult(defense, folder, "done", undefended, metrics, scores, diagnostics, seconds=seconds)


def _rebuild_poisoned(cell: LoadedAttackCell, data: DatasetSplits) -> PoisonedTrainSet:
    """The attack's poisoning is deterministic given its config and saved trigger; rebuild it and
    check it against the poison indices the artifact recorded."""
    if not cell.attack.has_poisoned_trainset:
        raise DefenseSkipped(f"attack {cell.spec.attack!r} produces no poisoned training set")
    poisoned = cell.attack.poison_train(data.train)
    if not torch.equal(poisoned.poison_indices.cpu(), cell.poison_indices):
        raise ArtifactError(f"{str(cell.path)!r}: rebuilt poison indices differ from the saved ones "
                            "(dataset files changed since the attack was trained?)")
    return poisoned
