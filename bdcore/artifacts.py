"""The artifact format of a trained (attacked or defended) model: one folder holding

  model.safetensors   the weights
  extra.safetensors   other tensors (e.g. an attack's trigger), optional
  metadata.json       full config, poison indices, metrics, versions, and the sha256 of each file

It is written to a temporary folder and renamed into place, and loading verifies every hash and
never unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "bdcore-artifact"
FORMAT_VERSION = 1
METADATA = "metadata.json"
MODEL_FILE = "model.safetensors"
EXTRA_FILE = "extra.safetensors"


class ArtifactError(ValueError):
    """An artifact folder is missing, foreign, incomplete or corrupted."""


@dataclass
class Artifact:
    path: Path
    metadata: dict
    model_state: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from bdcore import __version__

    return {"bdcore": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_artifact(folder: str | os.PathLike, model_state: dict[str, torch.Tensor], metadata: dict,
                  extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an artifact folder atomically; `metadata` must be JSON-serialisable."""
    from bdcore.atomic import atomic_replace_dir

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        files = {MODEL_FILE: {k: v.detach().cpu().contiguous() for k, v in model_state.items()}}
        if extra:
            files[EXTRA_FILE] = {k: v.detach().cpu().contiguous() for k, v in extra.items()}
        hashes = {}
        for name, tensors in files.items():
            save_file(tensors, str(staging / name))
            _fsync(staging / name)
            hashes[name] = file_sha256(staging / name)
        document = dict(metadata)
        document.update({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "files": hashes,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        (staging / METADATA).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        _fsync(staging / METADATA)
        return atomic_replace_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_metadata(folder: str | os.PathLike) -> dict:
    """The metadata of an artifact folder, checked for format (not hashes: see load_artifact)."""
    folder = Path(folder)
    meta_path = folder / METADATA
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {str(folder)!r} does not exist")
    if not meta_path.is_file():
        raise ArtifactError(f"{str(folder)!r} is not a bdcore artifact: {METADATA} is missing")
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"artifact {str(folder)!r}: {METADATA} is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ArtifactError(f"{str(folder)!r} is not a bdcore artifact (metadata 'format' is not {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact {str(folder)!r} has format version {metadata.get('format_version')!r}; "
            f"this bdcore reads version {FORMAT_VERSION}"
        )
    if not isinstance(metadata.get("files"), dict) or MODEL_FILE not in metadata["files"]:
        raise ArtifactError(f"artifact {str(folder)!r}: metadata lists no {MODEL_FILE}")
    return metadata


def verify_artifact(folder: str | os.PathLike) -> dict:
    """Check an artifact without loading it (metadata, every file present, every hash); returns
    its metadata. Any problem is an ArtifactError."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    for name, expected in metadata["files"].items():
        _verify_file(folder, name, expected)
    return metadata


def _verify_file(folder: Path, name: str, expected: str) -> Path:
    if name not in (MODEL_FILE, EXTRA_FILE):
        raise ArtifactError(f"artifact {str(folder)!r}: unexpected file {name!r} in metadata")
    path = folder / name
    if not path.is_file():
        raise ArtifactError(f"artifact {str(folder)!r} is incomplete: {name} is missing")
    actual = file_sha256(path)
    if actual != expected:
        raise ArtifactError(
            f"artifact {str(folder)!r} is corrupted: {name} has sha256 {actual[:12]}..., "
            f"metadata says {str(expected)[:12]}... (truncated or modified file)"
        )
    return path


def load_artifact(folder: str | os.PathLike) -> Artifact:
    """Load and verify an artifact; any missing file or hash mismatch is an ArtifactError."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for name, expected in metadata["files"].items():
        path = _verify_file(folder, name, expected)
        try:
            loaded[name] = load_file(str(path))
        except Exception as exc:
            raise ArtifactError(f"artifact {str(folder)!r}: cannot read {name}: {exc}") from exc
    return Artifact(folder, metadata, loaded[MODEL_FILE], loaded.get(EXTRA_FILE, {}))

