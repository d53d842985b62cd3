"""Shared pieces of the attacks that craft their trigger against a clean surrogate model (lf, lc,
trojannn): the surrogate settings every such config carries, the surrogate's cache spec, pixel
conversions, Linf PGD in pixel space and low-pass filtering in the DFT domain.

All crafting happens on float images in [0, 1] through `PixelSpaceModel`, so budgets such as
"8/255" mean the same thing for every dataset whatever its normalisation.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bdcore.attacks.base import AttackConfig
from bdcore.attacks.resources import (
    PixelSpaceModel,
    Resource,
    ResourceStore,
    clean_surrogate,
    surrogate_spec,
)
from bdcore.data.base import DatasetInfo, ImageSet

SURROGATE_SEED = 0  # one clean surrogate per (data, architecture, budget), shared by every attack


class SurrogateConfig(AttackConfig):
    """Settings of the clean model the trigger is crafted against."""

    surrogate_model: str | None = None  # None = resources.default_surrogate_model(dataset)
    surrogate_epochs: int | None = Field(None, ge=1)  # None = the dataset's default training budget


def surrogate_key(config: SurrogateConfig, train: ImageSet, info: DatasetInfo) -> dict[str, Any]:
    """The surrogate's cache key, to include in the spec of every resource crafted against it."""
    return surrogate_spec(train, info, config.surrogate_model, config.surrogate_epochs, SURROGATE_SEED)


def load_surrogate(config: SurrogateConfig, train: ImageSet, info: DatasetInfo,
                   resources: ResourceStore) -> PixelSpaceModel:
    """The cached clean surrogate (trained on first use), frozen, taking [0, 1] float images."""
    net = clean_surrogate(resources, train, info, model=config.surrogate_model, epochs=config.surrogate_epochs,
                          seed=SURROGATE_SEED)
    wrapped = PixelSpaceModel(net, info).to(resources.torch_device).eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped


def record(log: dict[str, dict[str, Any]], kind: str, resource: Resource) -> Resource:
    """Note where a resource came from (attack.resource_log): its folder and whether it was reused."""
    log[kind] = {"path": None if resource.path is None else str(resource.path), "reused": resource.reused}
    return resource


# -- pixels -------------------------------------------------------------------------------------

def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8)


def add_perturbation(images: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
    """uint8 images + a float perturbation in [0, 1] units, rounded and clamped back to uint8."""
    shifted = images.float() + perturbation.to(images.device).float() * 255.0
    return shifted.round().clamp(0, 255).to(torch.uint8)


# -- PGD ------------------------------------------------------------------------------------------

def pgd_linf(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float, step_size: float,
             steps: int, targeted: bool = False, batch_size: int = 256) -> torch.Tensor:
    """Linf PGD (Madry et al.) on uint8 `images`, no random start: signed-gradient steps that raise
    the cross-entropy on `labels` (or lower it when `targeted`), projected on the epsilon ball and
    [0, 1]. Returns uint8 images within floor(epsilon * 255) intensity levels of the originals."""
    device = next(model.parameters()).device
    out = []
    sign = -1.0 if targeted else 1.0
    for start in range(0, images.shape[0], batch_size):
        x0 = to_unit(images[start : start + batch_size]).to(device)
        y = labels[start : start + batch_size].to(device)
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(x), y)
            (grad,) = torch.autograd.grad(loss, x)
            x = x.detach() + sign * step_size * grad.sign()
            x = torch.min(torch.max(x, x0 - epsilon), x0 + epsilon).clamp(0, 1)
        out.append(x.detach().cpu())
    adv = torch.cat(out) if out else torch.empty(0, *images.shape[1:])
    # Rounding to uint8 must not leave the ball: clip the integer change to the budget.
    levels = math.floor(epsilon * 255 + 1e-6)
    change = (adv * 255).round() - images.float()
    return (images.float() + change.clamp(-levels, levels)).clamp(0, 255).to(torch.uint8)


# -- low-pass filtering ---------------------------------------------------------------------------

LowPass = Literal["gaussian", "ideal"]


def frequency_index(n: int, device=None) -> torch.Tensor:
    """Signed integer DFT frequency of each bin (0, 1, ..., -1) for a length-n signal."""
    return torch.fft.fftfreq(n, d=1.0 / n, device=device)


def low_pass_response(height: int, width: int, kind: LowPass, sigma: float, window: int,
                      device=None) -> torch.Tensor:
    """H x W transfer function of the filter on the full (fft2) spectrum. gaussian: the DFT of a
    Gaussian blur of std `sigma` pixels, exp(-2 pi^2 sigma^2 |f|^2); ideal: 1 where both integer
    frequencies are within `window` (a square window around DC), 0 elsewhere."""
    ky, kx = frequency_index(height, device), frequency_index(width, device)
    if kind == "gaussian":
        fy, fx = ky / height, kx / width
        return torch.exp(-2 * math.pi**2 * sigma**2 * (fy[:, None] ** 2 + fx[None, :] ** 2))
    if kind == "ideal":
        return ((ky.abs()[:, None] <= window) & (kx.abs()[None, :] <= window)).float()
    raise ValueError(f"unknown low-pass filter {kind!r}; use 'gaussian' or 'ideal'")


def low_pass(x: torch.Tensor, kind: LowPass, sigma: float, window: int) -> torch.Tensor:
    """Filter the last two (spatial) dims of `x` in the DFT domain (circular boundary)."""
    response = low_pass_response(x.shape[-2], x.shape[-1], kind, sigma, window, x.device)
    return torch.fft.ifft2(torch.fft.fft2(x) * response).real


def spectral_energy_within(x: torch.Tensor, window: int) -> float:
    """Share of the DFT energy of `x` (summed over leading dims) whose integer frequencies are
    both within `window` of DC: how low-frequency a pattern is."""
    power = torch.fft.fft2(x.float()).abs() ** 2
    power = power.reshape(-1, x.shape[-2], x.shape[-1]).sum(0)
    inside = low_pass_response(x.shape[-2], x.shape[-1], "ideal", 0.0, window, x.device).bool()
    return float(power[inside].sum() / power.sum().clamp_min(1e-20))


# -- internal activations -------------------------------------------------------------------------

def capture_input(module: nn.Module) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """Record what `module` receives on each forward pass: (get, remove)."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module, inputs):
        store["x"] = inputs[0]

    handle = module.register_forward_pre_hook(hook)
    return (lambda: store["x"]), handle.remove
