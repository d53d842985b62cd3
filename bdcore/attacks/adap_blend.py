"""Adap-Blend: blend a trigger with half of its 4x4 pieces masked at random into poison samples AND
into cover samples that keep their true label; test with the full trigger at a higher alpha.

Qi, Xie, Li, Wang & Mittal, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses", ICLR 2023. Defaults (paper, CIFAR-10): poison rate 0.003, cover rate 0.003, 16 pieces
with 50% masked per sample, train alpha 0.15, test alpha 0.2 with the full trigger. The paper's
trigger is the "hellokitty" image, not available offline: the default pattern here is a seeded
uniform-noise image (as `blended`'s), or any image file via `pattern_image`.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from bdcore.attacks._adaptive import AdaptiveAttack, AdaptiveConfig
from bdcore.attacks.base import blend
from bdcore.attacks.blended import blend_pattern
from bdcore.attacks.registry import register_attack


class AdapBlendConfig(AdaptiveConfig):
    ratio: float = Field(0.003, gt=0, le=1)  # poison rate
    cover_ratio: float = Field(0.003, ge=0, le=1)
    train_alpha: float = Field(0.15, gt=0, le=1)
    test_alpha: float = Field(0.2, gt=0, le=1)
    pieces: int = Field(16, ge=1)  # a square number: the trigger is split into a sqrt x sqrt grid
    mask_rate: float = Field(0.5, ge=0, lt=1)  # share of the pieces masked out per training sample
    pattern_image: str | None = None  # image file, resized to the dataset's size
    pattern_seed: int = 0  # seed of the default noise pattern

    @field_validator("pieces")
    @classmethod
    def _square(cls, value: int) -> int:
        if math.isqrt(value) ** 2 != value:
            raise ValueError(f"pieces must be a square number (4, 9, 16, ...), got {value}")
        return value


def piece_map(pieces: int, height: int, width: int) -> torch.Tensor:
    """H x W long tensor: the piece (row-major in a sqrt(pieces) grid) each pixel belongs to.
    Piece borders are rounded, so sizes not divisible by the grid still split evenly."""
    grid = math.isqrt(pieces)
    if grid > min(height, width):
        raise ValueError(f"{pieces} pieces do not fit a {height}x{width} image")
    rows = torch.arange(height) * grid // height
    cols = torch.arange(width) * grid // width
    return rows[:, None] * grid + cols[None, :]


@register_attack("adap_blend")
class AdapBlend(AdaptiveAttack):
    config_class = AdapBlendConfig
    config: AdapBlendConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        self.pieces = piece_map(config.pieces, info.height, info.width)
        self.masked_pieces = round(config.mask_rate * config.pieces)
        self.pattern = blend_pattern(config.pattern_image, config.pattern_seed, info)

    def state_tensors(self):
        return {"pattern": self.pattern}

    def load_state_tensors(self, tensors):
        self.pattern = tensors["pattern"].to(torch.uint8)

    def apply_trigger(self, images, labels):
        """Test time: the full trigger at test_alpha."""
        return blend(images, self.pattern, self.config.test_alpha)

    def piece_masks(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """count x pieces bool: True = piece kept; each row masks exactly `masked_pieces` pieces,
        chosen by a seeded permutation per sample (in order)."""
        keep = torch.ones(count, self.config.pieces, dtype=torch.bool)
        for i in range(count):
            keep[i, torch.randperm(self.config.pieces, generator=generator)[: self.masked_pieces]] = False
        return keep

    def _train_trigger(self, images, generator):
        keep = self.piece_masks(images.shape[0], generator)  # N x pieces
        alpha = keep[:, self.pieces].unsqueeze(1).float() * self.config.train_alpha  # N x 1 x H x W
        return blend(images, self.pattern, alpha.to(images.device))
