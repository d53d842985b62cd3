"""Model registry: `build_model(name, info)` for any registered architecture.

Pretrained weights come only from a local file (safetensors, or a torch state dict read with
weights_only=True); nothing is downloaded.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from bdcore.data.base import DatasetInfo
from bdcore.registry import Registry

ModelFactory = Callable[[DatasetInfo], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model", package="bdcore.models.zoo")


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or of another architecture."""


def register_model(name: str):
    """Decorator for a factory `fn(info: DatasetInfo) -> nn.Module` producing logits of
    info.num_classes for inputs of info.image_shape."""
    return MODELS.register(name)


def model_names() -> list[str]:
    return MODELS.names()


def build_model(name: str, info: DatasetInfo, pretrained: str | os.PathLike | None = None) -> nn.Module:
    """Build `name` for `info`; `pretrained` is a local weights file whose tensors are loaded
    wherever names and shapes match (the classifier head is re-initialised when the class count
    differs). A file matching no tensor is an error: it is of another architecture."""
    model = MODELS.get(name)(info)
    if pretrained is not None:
        load_pretrained(model, pretrained, name)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = _existing_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a weights file at all
        raise WeightsError(f"cannot read weights file {str(path)!r}: {_load_failure(exc)}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return state


def _load_failure(exc: Exception) -> str:
    """The reason in torch.load's error, without its advice to retry with weights_only=False (never
    done here: that would run code from the file)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, flags=re.S)
    if found:
        first_sentence = re.split(r"\.\s", " ".join(found.group(1).split()), maxsplit=1)[0]
        return f"not a state dict of tensors ({first_sentence.rstrip('.')})"
    return " ".join(text.split())


def _existing_weights_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise WeightsError(f"weights file {str(path)!r} {what}; put the local weights file there")
    return path


def read_weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a weights file. A safetensors file is read from its header only (no
    tensor data), so checking a multi-gigabyte file before a sweep costs nothing."""
    path = _existing_weights_file(path)
    if path.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # a truncated or foreign file fails while its header is parsed
        raise WeightsError(f"cannot read weights file {str(path)!r}: {exc}") from exc


def _strip_wrapper_prefix(names: list[str], own: set[str]) -> str:
    """The prefix saved wrappers add ("module." from DataParallel, "model." from ours), or ""."""
    for prefix in ("module.", "model."):
        if names and all(k.startswith(prefix) for k in names) and not any(k.startswith(prefix) for k in own):
            return prefix
    return ""


def _fit(saved: dict[str, tuple[int, ...]], own: dict[str, tuple[int, ...]], path: str | os.PathLike,
         name: str) -> tuple[str, list[str], list[str]]:
    """(wrapper prefix, loadable tensor names, skipped ones) of a file for a model; WeightsError
    when fewer than half of the model's tensors match by name and shape (another architecture).
    The classifier head alone may differ: it is re-initialised for another class count."""
    prefix = _strip_wrapper_prefix(list(saved), set(own))
    shapes = {k[len(prefix):]: v for k, v in saved.items()}
    matched = sorted(k for k, v in shapes.items() if k in own and tuple(own[k]) == tuple(v))
    skipped = sorted(k for k in shapes if k not in set(matched))
    if not matched or len(matched) < 0.5 * len(own):
        first = next((k for k in own if k not in shapes or tuple(own[k]) != tuple(shapes[k])), None)
        mismatch = ""
        if first is not None:
            found = list(shapes[first]) if first in shapes else "absent"
            mismatch = f"; first mismatch: {first!r} is {list(own[first])} in the model, {found} in the file"
        raise WeightsError(
            f"weights file {str(path)!r} does not fit model {name!r}: {len(matched)} of {len(own)} "
            f"tensors match by name and shape{mismatch} (is it a file of another architecture?)"
        )
    return prefix, matched, skipped


def load_pretrained(model: nn.Module, path: str | os.PathLike, name: str = "model") -> dict[str, list[str]]:
    state = read_state_dict(path)
    own = model.state_dict()
    prefix, matched, skipped = _fit({k: tuple(v.shape) for k, v in state.items()},
                                    {k: tuple(v.shape) for k, v in own.items()}, path, name)
    model.load_state_dict({k: state[prefix + k] for k in matched}, strict=False)
    return {"loaded": matched, "skipped": skipped}


# The head's class count is not compared (another count re-initialises the head) and every dataset
# is 3 x <=64 px, which gives every registered architecture the same tensors: a stand-in input tells
# architectures apart without knowing the dataset.
_STAND_IN = DatasetInfo(name="stand-in", num_classes=10, channels=3, height=32, width=32, mean=(0.5,) * 3,
                        std=(0.25,) * 3)


def check_weights_file(path: str | os.PathLike, name: str, info: DatasetInfo | None = None) -> None:
    """Refuse, before anything trains, a weights file that `build_model(name, info, pretrained=path)`
    would refuse: missing, unreadable, or of another architecture (same rule as load_pretrained).
    Reads only a safetensors header, and builds the model on the meta device (no memory, no init)."""
    factory = MODELS.get(name)
    saved = read_weight_shapes(path)
    with torch.device("meta"):
        own = factory(info or _STAND_IN).state_dict()
    _fit(saved, {k: tuple(v.shape) for k, v in own.items()}, path, name)
