"""open_clip architectures by name, `clip:<arch>` (`clip:RN50`, `clip:ViT-B-32`, ...), with weights read
only from a local file, plus `clip:tiny`, a small config that trains from scratch on a CPU for tests.

Weights: an explicit file, else the first *.safetensors / *.bin / *.pt file in
$BDCORE_WEIGHTS_ROOT/clip/<arch>/ (default root ~/.cache/bdcore/weights). Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from bdcore.models.registry import WeightsError, read_state_dict

CLIP_PREFIX = "clip:"
TINY = "tiny"
# A 2-layer ViT (patch 8 on 32x32 images) and a 2-layer text transformer, width 64: ~3.4M parameters,
# most of them the token embedding of open_clip's 49,408-token vocabulary.
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_TINY_ARCH = "bdcore-tiny-clip"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ClipBundle:
    """A CLIP model with what using it needs: its tokenizer, input size and pixel normalisation."""

    name: str
    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))


def is_clip_model(name: str) -> bool:
    return isinstance(name, str) and name.startswith(CLIP_PREFIX)


def clip_arch_names() -> list[str]:
    import open_clip

    return [TINY, *open_clip.list_models()]


def _register_tiny() -> None:
    import open_clip

    if _TINY_ARCH in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / f"{_TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(folder)


def weights_folder(arch: str) -> Path:
    root = Path(os.environ.get("BDCORE_WEIGHTS_ROOT", Path.home() / ".cache" / "bdcore" / "weights"))
    return root / "clip" / arch


def find_weights(arch: str) -> Path:
    folder = weights_folder(arch)
    found = sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    if not found:
        raise WeightsError(
            f"no weights for clip:{arch}: put the open_clip weights file (e.g. open_clip_pytorch_model.bin or "
            f"open_clip_model.safetensors) in {folder}/ or pass its path (weights: /path/to/file); "
            f"nothing is downloaded")
    return found[0]


def build_clip(name: str, weights: str | os.PathLike | None = None, architecture_only: bool = False) -> ClipBundle:
    """`clip:<arch>` with local weights (required except for clip:tiny, which starts random unless given).
    `architecture_only` builds it randomly initialised, for a caller that loads a state dict next."""
    import open_clip

    if not is_clip_model(name):
        raise ValueError(f"{name!r} is not a CLIP model name; CLIP models are named 'clip:<arch>', e.g. clip:RN50")
    arch = name[len(CLIP_PREFIX):]
    if arch == TINY:
        _register_tiny()
        open_arch = _TINY_ARCH
    elif arch in open_clip.list_models():
        open_arch = arch
    else:
        known = ", ".join(clip_arch_names()[:12])
        raise ValueError(f"unknown CLIP architecture {arch!r} in {name!r}; known: {known}, ... "
                         f"(open_clip.list_models() has them all)")
    path = Path(weights) if weights is not None else (None if arch == TINY or architecture_only else find_weights(arch))
    import logging

    # open_clip warns that it loaded no pretrained weights; ours are loaded below, or not wanted (tiny).
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(open_arch, pretrained=None)
    finally:
        logging.getLogger().setLevel(previous)
    if path is not None:
        state = read_state_dict(path)
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        own = model.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state]
        if mismatched or len(missing) > 0.1 * len(own):
            raise WeightsError(f"weights file {str(path)!r} does not fit {name}: {len(mismatched)} tensors of another "
                               f"shape, {len(missing)} of {len(own)} missing (is it a file of another architecture?)")
        model.load_state_dict(state, strict=False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    return ClipBundle(name, model.eval(), open_clip.get_tokenizer(open_arch), size, mean, std)
