"""BadNets: stamp a small fixed patch on poisoned images and relabel them to the target.

Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain", 2017. Default as BackdoorBench: a 3x3 white square at the bottom-right corner.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from bdcore.attacks.base import Attack, AttackConfig
from bdcore.attacks.registry import register_attack
from bdcore.data.imageio import read_image

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left", "center"]


class BadNetConfig(AttackConfig):
    patch_size: int = Field(3, ge=1)
    position: Corner | tuple[int, int] = "bottom_right"  # a corner, or (row, col) of its top-left pixel
    patch_image: str | None = None  # image file used as the patch (resized to patch_size); default white
    patch_value: int = Field(255, ge=0, le=255)  # colour of the default square


def patch_origin(position: Corner | tuple[int, int], size: int, height: int, width: int) -> tuple[int, int]:
    if isinstance(position, tuple):
        row, col = position
    else:
        row = {"top": 0, "bottom": height - size, "center": (height - size) // 2}[position.split("_")[0]]
        col = {"left": 0, "right": width - size, "center": (width - size) // 2}[position.split("_")[-1]]
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        raise ValueError(f"a {size}x{size} patch at {position} does not fit a {height}x{width} image")
    return row, col


@register_attack("badnet")
class BadNet(Attack):
    config_class = BadNetConfig
    config: BadNetConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        size = config.patch_size
        row, col = patch_origin(config.position, size, info.height, info.width)
        if config.patch_image is not None:
            patch = read_image(config.patch_image, (size, size), info.channels)
        else:
            patch = torch.full((info.channels, size, size), config.patch_value, dtype=torch.uint8)
        self.mask = torch.zeros(1, info.height, info.width, dtype=torch.bool)
        self.mask[:, row : row + size, col : col + size] = True
        self.pattern = torch.zeros(info.channels, info.height, info.width, dtype=torch.uint8)
        self.pattern[:, row : row + size, col : col + size] = patch

    def state_tensors(self):
        return {"mask": self.mask, "pattern": self.pattern}

    def load_state_tensors(self, tensors):
        self.mask, self.pattern = tensors["mask"].bool(), tensors["pattern"].to(torch.uint8)

    def apply_trigger(self, images, labels):
        return torch.where(self.mask.to(images.device), self.pattern.to(images.device), images)
