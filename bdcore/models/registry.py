"""Model registry: `build_model(name, info)` for any registered architecture.

Pretrained weights come only from a local file (safetensors, or a torch state dict read with
weights_only=True); nothing is downloaded.
"""
from __future__ import annotations

import os
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
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist; put the local weights file there")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a weights file at all
        raise WeightsError(f"cannot read weights file {str(path)!r}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return state


def load_pretrained(model: nn.Module, path: str | os.PathLike, name: str = "model") -> dict[str, list[str]]:
    state = read_state_dict(path)
    own = model.state_dict()
    # Common prefixes of saved wrappers ("module." from DataParallel, "model." from ours).
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in matched)
    if not matched or len(matched) < 0.5 * len(own):
        raise WeightsError(
            f"weights file {str(path)!r} does not fit model {name!r}: {len(matched)} of {len(own)} "
            f"tensors match by name and shape (is it a file of another architecture?)"
        )
    model.load_state_dict(matched, strict=False)
    return {"loaded": sorted(matched), "skipped": skipped}
