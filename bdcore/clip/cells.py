"""CLIP experiment cells: the same attack and defense cells as for image classifiers (same specs, keys,
artifacts and result rows), for `clip:<arch>` models. An attack cell poisons image-caption pairs and
trains the CLIP on them (from its pre-trained weights, or from scratch for clip:tiny); a defense cell
repairs (post-training) or retrains (training-time) it; both are scored by zero-shot ACC / ASR / RA on the
cell's classification dataset.

bdcore.cells dispatches here for CLIP models; callers never need to import this module.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bdcore.artifacts import ArtifactError, load_artifact, save_artifact
from bdcore.atomic import atomic_write
from bdcore.clip.attacks import ClipAttack, build_clip_attack
from bdcore.clip.data import DEFAULT_TEMPLATES, ImageTextSet, captions_from_classes, defender_pairs, load_caption_table
from bdcore.clip.defenses import ClipDefenseContext, build_clip_defense
from bdcore.clip.models import ClipBundle, build_clip
from bdcore.clip.train import ClipTrainConfig, train_clip
from bdcore.clip.zeroshot import ZeroShotClassifier
from bdcore.data import DatasetInfo, DatasetSplits, load_dataset
from bdcore.data.base import ImageSet
from bdcore.metrics import BackdoorMetrics, backdoor_metrics


class ClipCellTrain(ClipTrainConfig):
    """An attack cell's CLIP training: the schedule plus where its image-caption pairs come from."""

    # A caption table (CSV / TSV / Parquet: image path + caption), e.g. a CC3M subset; without one the pairs
    # are the cell dataset's training images captioned by `templates` with their class names.
    captions: str | None = None
    image_root: str | None = None  # the table's image folder (default: the table's folder)
    pairs_limit: int | None = Field(None, ge=2)  # the first N rows of the table
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # caption templates and zero-shot prompts
    # The side length pairs and zero-shot test images are stored, and triggered, at (e.g. 224 for CC3M-style
    # pairs scored on upsampled CIFAR-10, as the CLIP papers do); default: the cell dataset's own size.
    image_size: int | None = Field(None, ge=8)

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any("{}" not in t for t in value):
            raise ValueError("every template needs a '{}' for the class name, e.g. 'a photo of a {}.'")
        return value

    def schedule(self) -> ClipTrainConfig:
        return ClipTrainConfig(**{k: getattr(self, k) for k in ClipTrainConfig.model_fields})


def _resized(images: ImageSet, size: int) -> ImageSet:
    chunks = [F.interpolate(images.images[i:i + 512].float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True).round_().clamp_(0, 255).to(torch.uint8)
              for i in range(0, len(images.images), 512)]
    return ImageSet(torch.cat(chunks) if chunks else images.images, images.labels)


def at_resolution(data: DatasetSplits, size: int | None) -> DatasetSplits:
    """The cell dataset with its images resized to size x size (unchanged when size is None or equal)."""
    if size is None or (data.info.height, data.info.width) == (size, size):
        return data
    if data.info.channels != 3:
        raise ValueError(f"CLIP cells need RGB images; dataset {data.info.name!r} has {data.info.channels} channels")
    info = dataclasses.replace(data.info, height=size, width=size)
    return DatasetSplits(info, _resized(data.train, size), _resized(data.test, size))


def training_pairs(data: DatasetSplits, train: ClipCellTrain) -> ImageTextSet:
    """The clean image-caption pairs an attack cell poisons (and a defense cell draws its clean share from),
    at the resolution of `data` (see at_resolution)."""
    if train.captions is not None:
        return load_caption_table(train.captions, train.image_root, data.info.height, limit=train.pairs_limit)
    pairs = captions_from_classes(data.train, data.info.class_names, train.templates)
    return pairs.subset(torch.arange(train.pairs_limit)) if train.pairs_limit else pairs


def zero_shot(bundle: ClipBundle, info: DatasetInfo, train: ClipCellTrain) -> ZeroShotClassifier:
    return ZeroShotClassifier(bundle, info, info.class_names, train.templates)


@dataclass
class LoadedClipAttackCell:
    """A CLIP attack cell rebuilt from its artifact: the backdoored model and the attack with its trigger."""

    spec: object  # bdcore.cells.AttackCellSpec
    info: DatasetInfo
    bundle: ClipBundle
    attack: ClipAttack
    metrics: BackdoorMetrics
    poison_indices: torch.Tensor
    path: Path


def _prepared_attack(attack: ClipAttack, bundle: ClipBundle, pairs: ImageTextSet, work: Path, device: str) -> None:
    """Run the attack's trigger preparation once: a resumed cell reloads the trigger it learned before.
    A saved state that is not a readable safetensors file (damaged, or a planted pickle) is prepared again."""
    saved = work / "attack_state.safetensors"
    if saved.is_file():
        try:
            tensors = load_file(str(saved))
        except (OSError, SafetensorError):
            tensors = None
        if tensors is not None:
            attack.load_state_tensors(tensors)
            return
    attack.prepare(bundle, pairs, device)
    state = attack.state_tensors()
    if state:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write(saved, lambda tmp: save_file(tensors, str(tmp)))


def run_clip_attack_cell(spec, out_dir, device: str = "auto", on_epoch_end=None, data: DatasetSplits | None = None):
    from bdcore.cells import AttackCellResult, _existing, _metrics, attack_cell_dir

    started = time.perf_counter()
    folder = attack_cell_dir(out_dir, spec)
    key = spec.key()
    existing = _existing(folder, key)
    if existing is not None:
        return AttackCellResult(spec, folder, _metrics(existing["metrics"]), True, 0.0, existing.get("history", []))

    attack_cfg = spec.attack_config()
    train_cfg: ClipCellTrain = spec.train_config().model_copy(update={"device": device})
    data = at_resolution(data or load_dataset(spec.dataset, root=spec.data_root), train_cfg.image_size)
    bundle = build_clip(spec.model, weights=spec.pretrained)
    pairs = training_pairs(data, train_cfg)
    attack = build_clip_attack(spec.attack, data.info, data.info.class_names, **attack_cfg.model_dump())
    work = Path(out_dir) / "work" / "attacks" / spec.name()
    _prepared_attack(attack, bundle, pairs, work, device)
    poisoned = attack.poison_pairs(pairs)
    history = train_clip(bundle, poisoned.data, train_cfg.schedule(), seed=spec.seed, checkpoint_dir=work,
                         checkpoint_tag=key, on_epoch_end=on_epoch_end)
    metrics = backdoor_metrics(zero_shot(bundle, data.info, train_cfg), data.test, attack.backdoor_test(data.test),
                               data.info, device=device)
    seconds = time.perf_counter() - started
    save_artifact(folder, bundle.model.state_dict(), {
        "kind": "attack",
        "family": "clip",
        "cell_key": key,
        "spec": spec.model_dump(),
        "attack_config": attack_cfg.model_dump(),
        "train_config": train_cfg.model_dump(),
        "dataset_info": data.info.to_dict(),
        "poison_indices": poisoned.poison_indices.tolist(),
        "pairs": len(pairs),
        "metrics": metrics.as_dict(),
        "history": history,
        "seconds": seconds,
    }, extra={f"attack.{k}": v for k, v in attack.state_tensors().items()})
    shutil.rmtree(work, ignore_errors=True)
    return AttackCellResult(spec, folder, metrics, False, seconds, history)


def load_clip_attack_cell(folder: str | Path) -> LoadedClipAttackCell:
    from bdcore.cells import AttackCellSpec, _metrics

    artifact = load_artifact(folder)
    meta = artifact.metadata
    if meta.get("kind") != "attack" or meta.get("family") != "clip":
        raise ArtifactError(f"{str(folder)!r} is not a CLIP attack cell (kind {meta.get('kind')!r}, "
                            f"family {meta.get('family', 'classifier')!r})")
    spec = AttackCellSpec(**meta["spec"])
    info = DatasetInfo.from_dict(meta["dataset_info"])
    bundle = build_clip(spec.model, architecture_only=True)
    try:
        bundle.model.load_state_dict(artifact.model_state)
    except RuntimeError as exc:
        raise ArtifactError(f"artifact {str(folder)!r} does not fit model {spec.model!r}: {exc}") from exc
    bundle.model.eval()
    attack = build_clip_attack(spec.attack, info, info.class_names, **meta["attack_config"])
    attack.load_state_tensors({k[len("attack."):]: v for k, v in artifact.extra.items() if k.startswith("attack.")})
    return LoadedClipAttackCell(spec, info, bundle, attack, _metrics(meta["metrics"]),
                                torch.tensor(meta["poison_indices"], dtype=torch.long), Path(folder))


def run_clip_defense_cell(attack_dir, defense, out_dir, device: str = "auto", on_epoch_end=None,
                          data: DatasetSplits | None = None):
    from bdcore.cells import DefenseCellResult, _existing, _metrics, defense_cell_dir, finish_defense_cell

    started = time.perf_counter()
    cell = load_clip_attack_cell(attack_dir)
    spec = cell.spec
    config = defense.config(spec.seed)
    folder = defense_cell_dir(out_dir, spec, defense)
    key = defense.key(spec.key(), spec.seed)
    existing = _existing(folder, key)
    if existing is not None:
        return DefenseCellResult(defense, folder, "done", cell.metrics, _metrics(existing["metrics"]),
                                 existing["scores"], existing["diagnostics"], reused=True)

    train_cfg: ClipCellTrain = spec.train_config()
    data = at_resolution(data or load_dataset(spec.dataset, root=spec.data_root), train_cfg.image_size)
    pairs = training_pairs(data, train_cfg)
    method = build_clip_defense(defense.defense, **config.model_dump())
    work = Path(out_dir) / "work" / "defenses" / spec.name() / folder.name
    ctx = ClipDefenseContext(info=cell.info, device=device, work_dir=work, on_epoch_end=on_epoch_end,
                             bundle_factory=lambda: build_clip(spec.model, weights=spec.pretrained),
                             train_config=train_cfg.schedule())
    torch.manual_seed(spec.seed)
    if method.kind == "post_training":
        outcome = method.repair(cell.bundle, defender_pairs(pairs, config.clean_fraction, spec.seed), ctx)
    else:
        poisoned = cell.attack.poison_pairs(pairs)
        if not torch.equal(poisoned.poison_indices.cpu(), cell.poison_indices):
            raise ArtifactError(f"{str(cell.path)!r}: rebuilt poison indices differ from the saved ones "
                                "(caption table or dataset changed since the attack was trained?)")
        outcome = method.train(poisoned.data, ctx)
    metrics = backdoor_metrics(zero_shot(outcome.bundle, cell.info, train_cfg), data.test,
                               cell.attack.backdoor_test(data.test), cell.info, device=device)
    return finish_defense_cell(folder, key, spec, defense, config, cell.info, cell.metrics, metrics,
                               outcome.bundle.model.state_dict(), outcome.diagnostics, work, started, family="clip")
