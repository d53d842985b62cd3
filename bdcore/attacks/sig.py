"""SIG: add a horizontal sinusoid x'[i, j] = x[i, j] + delta sin(2 pi j f / m) (m = width) to
target-class training images without changing their labels (clean-label), and to test images.

Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption without label
poisoning", ICIP 2019. Defaults from BackdoorBench (config/attack/sig/default.yaml): delta 40
(0..255 scale), f 6; the paper's signal has delta 20 (`delta: 20`). The same signal at training and
test time (as BackdoorBench). Every row and channel gets the same
signal, so it works for gray and colour images alike; results are rounded and clamped to uint8.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from bdcore.attacks.base import Attack, AttackConfig
from bdcore.attacks.registry import register_attack


class SigConfig(AttackConfig):
    delta: float = Field(40.0, gt=0)  # amplitude, 0..255 intensity scale (BackdoorBench 40; the paper 20)
    frequency: float = Field(6.0, gt=0)  # periods across the image width


def sinusoid(width: int, delta: float, frequency: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """delta * sin(2 pi j f / width) for the columns j = 0..width-1 (float32, shape (width,))."""
    j = torch.arange(width, dtype=torch.float64)
    return (delta * torch.sin(2 * math.pi * j * frequency / width)).to(device=device, dtype=torch.float32)


@register_attack("sig")
class Sig(Attack):
    config_class = SigConfig
    config: SigConfig
    clean_label = True

    def apply_trigger(self, images, labels):
        signal = sinusoid(images.shape[-1], self.config.delta, self.config.frequency, images.device)
        return (images.float() + signal).round().clamp(0, 255).to(torch.uint8)
