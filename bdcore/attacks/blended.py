"""Blended: mix a fixed pattern image into poisoned images, x' = (1 - alpha) x + alpha p.

Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017. Default alpha 0.2 (BackdoorBench); the pattern is a seeded uniform-noise image
(the paper's random-pattern variant) unless a pattern image file is given.
"""
from __future__ import annotations

import torch
from pydantic import Field

from bdcore.attacks.base import Attack, AttackConfig, blend
from bdcore.attacks.registry import register_attack
from bdcore.data.base import DatasetInfo
from bdcore.data.imageio import read_image


class BlendedConfig(AttackConfig):
    alpha: float = Field(0.2, gt=0, le=1)
    pattern_image: str | None = None  # image file, resized to the dataset's size
    pattern_seed: int = 0  # seed of the default noise pattern


def blend_pattern(pattern_image: str | None, pattern_seed: int, info: DatasetInfo) -> torch.Tensor:
    """The pattern to blend in: an image file resized to the dataset's size, else seeded uniform noise."""
    if pattern_image is not None:
        return read_image(pattern_image, (info.height, info.width), info.channels)
    generator = torch.Generator().manual_seed(pattern_seed)
    return torch.randint(0, 256, info.image_shape, generator=generator, dtype=torch.uint8)


@register_attack("blended")
class Blended(Attack):
    config_class = BlendedConfig
    config: BlendedConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        self.pattern = blend_pattern(config.pattern_image, config.pattern_seed, info)

    def state_tensors(self):
        return {"pattern": self.pattern}

    def load_state_tensors(self, tensors):
        self.pattern = tensors["pattern"].to(torch.uint8)

    def apply_trigger(self, images, labels):
        return blend(images, self.pattern, self.config.alpha)
