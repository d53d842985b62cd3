"""Device choice: CUDA when present (with AMP and channels_last), else the CPU."""
from __future__ import annotations

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` may be 'cpu', 'cuda', 'cuda:N' or None/'auto' (CUDA when available)."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available on this machine")
    return device
