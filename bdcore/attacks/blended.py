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
from bdcore.data.imageio import read_image


class BlendedConfig(AttackConfig):
    alpha: float = Field(0.2, gt=0, le=1)
    pattern_image: str | None = None  # image file, resized to the dataset's size
    pattern_seed: int = 0  # seed of the default noise pattern


@register_attack("blended")
class Blended(Attack):
    config_class = BlendedConfig
    config: BlendedConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        if config.pattern_image is not None:
            self.pattern = read_image(config.pattern_image, (info.height, info.width), info.channels)
        else:
            generator = torch.Generator().manual_seed(config.pattern_seed)
            self.pattern = torch.randint(0, 256, info.image_shape, generator=generator, dtype=torch.uint8)

    def state_tensors(self):
        return {"pattern": self.pattern}

    def load_state_tensors(self, tensors):
        self.pattern = tensors["pattern"].to(torch.uint8)

    def apply_trigger(self, images, labels):
        return blend(images, self.pattern, self.config.alpha)
