"""Adap-Patch: each poison or cover sample (cover samples keep their true label) carries exactly
one of k patch triggers, each at its own low alpha; test time stamps several patches at full alpha.

Qi, Xie, Li, Wang & Mittal, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses", ICLR 2023. Defaults (paper, CIFAR-10): poison rate 0.003, cover rate 0.006, k = 4
training triggers at alphas 0.5, 0.2, 0.5, 0.3, test = 2 of them together at alpha 1. The paper's
patches (phoenix, firefox, a 4x4 BadNet patch, a Trojan square) are not available offline: the
default patches here are seeded random-colour squares (patch_size x patch_size, one per corner:
top-left, top-right, bottom-left, bottom-right, 1 pixel from the border), or image files via
`patch_images` (one per trigger, resized to the dataset's size; black pixels are transparent, the
convention of the authors' backdoor-toolbox).
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from bdcore.attacks._adaptive import AdaptiveAttack, AdaptiveConfig
from bdcore.attacks.base import blend
from bdcore.attacks.registry import register_attack
from bdcore.data.imageio import read_image


class AdapPatchConfig(AdaptiveConfig):
    ratio: float = Field(0.003, gt=0, le=1)  # poison rate
    cover_ratio: float = Field(0.006, ge=0, le=1)
    alphas: tuple[float, ...] = (0.5, 0.2, 0.5, 0.3)  # one per training trigger; k = len(alphas)
    test_patches: tuple[int, ...] = (0, 2)  # which triggers the test-time trigger stamps together
    test_alpha: float = Field(1.0, gt=0, le=1)
    patch_size: int = Field(6, ge=1)  # side of the default square patches
    patch_images: tuple[str, ...] | None = None  # one image file per trigger (black = transparent)
    pattern_seed: int = 0  # seed of the default patches' colours

    @model_validator(mode="after")
    def _check(self):
        k = len(self.alphas)
        if k == 0 or not all(0 < a <= 1 for a in self.alphas):
            raise ValueError(f"alphas must be one value in (0, 1] per trigger, got {self.alphas}")
        if not self.test_patches or not all(0 <= j < k for j in self.test_patches):
            raise ValueError(f"test_patches must index the {k} triggers, got {self.test_patches}")
        if self.patch_images is not None and len(self.patch_images) != k:
            raise ValueError(f"patch_images needs one file per trigger ({k}), got {len(self.patch_images)}")
        if self.patch_images is None and k > 4:
            raise ValueError(f"the default patches sit in the 4 corners: give patch_images for {k} triggers")
        return self


def default_patches(k: int, size: int, channels: int, height: int, width: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k seeded random-colour size x size squares, one per corner (1 pixel margin): patterns
    k x C x H x W uint8 and masks k x 1 x H x W bool."""
    if size + 2 > min(height, width) // 2:
        raise ValueError(f"{size}x{size} corner patches do not fit a {height}x{width} image")
    generator = torch.Generator().manual_seed(seed)
    corners = [(1, 1), (1, width - 1 - size), (height - 1 - size, 1), (height - 1 - size, width - 1 - size)]
    patterns = torch.zeros(k, channels, height, width, dtype=torch.uint8)
    masks = torch.zeros(k, 1, height, width, dtype=torch.bool)
    for j, (row, col) in enumerate(corners[:k]):
        patterns[j, :, row : row + size, col : col + size] = torch.randint(
            0, 256, (channels, size, size), generator=generator, dtype=torch.uint8)
        masks[j, :, row : row + size, col : col + size] = True
    return patterns, masks


@register_attack("adap_patch")
class AdapPatch(AdaptiveAttack):
    config_class = AdapPatchConfig
    config: AdapPatchConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        k = len(config.alphas)
        if config.patch_images is not None:
            self.patterns = torch.stack([read_image(p, (info.height, info.width), info.channels)
                                         for p in config.patch_images])
            self.masks = (self.patterns > 0).any(1, keepdim=True)
        else:
            self.patterns, self.masks = default_patches(k, config.patch_size, info.channels, info.height, info.width,
                                                        config.pattern_seed)

    def state_tensors(self):
        return {"patterns": self.patterns, "masks": self.masks}

    def load_state_tensors(self, tensors):
        self.patterns, self.masks = tensors["patterns"].to(torch.uint8), tensors["masks"].bool()

    def apply_trigger(self, images, labels):
        """Test time: the `test_patches` stamped one after another at test_alpha."""
        for j in self.config.test_patches:
            images = blend(images, self.patterns[j], self.masks[j].to(images.device).float() * self.config.test_alpha)
        return images

    def assign_patches(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Which trigger each of `count` samples gets: balanced (each used count/k times, +-1),
        in a seeded random order."""
        k = len(self.config.alphas)
        balanced = torch.arange(count) * k // max(count, 1)
        return balanced[torch.randperm(count, generator=generator)]

    def _train_trigger(self, images, generator):
        choice = self.assign_patches(images.shape[0], generator)
        alphas = torch.tensor(self.config.alphas).view(-1, 1, 1, 1) * self.masks.float()  # k x 1 x H x W
        dev = images.device
        return blend(images, self.patterns[choice].to(dev), alphas[choice].to(dev))
