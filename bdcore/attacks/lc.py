"""LC (label-consistent): target-class training images are made hard to classify by a PGD
perturbation against a clean surrogate, then stamped with a faint four-corner trigger; labels
stay correct. At test time the trigger is stamped at full amplitude.

Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks", 2019 (arXiv:1912.02771). Defaults:
Linf budget 8/255 (BackdoorBench's adversarial variant; the paper also uses 16/255), 10 PGD steps
of 2/255 without random start (BackdoorBench's generator: 100 steps of 1.5/255), trigger = a 3x3
checkerboard in each of the four corners (robust to flips and crops), added with amplitude 32/255
in training (the paper's reduced-amplitude trigger; its code's example value) and 255/255 at test.
The paper and BackdoorBench perturb against an adversarially trained model; here the shared clean
surrogate is used (no adversarially trained model exists in the engine).
"""
from __future__ import annotations

import torch
from pydantic import Field

from bdcore.attacks._adversarial import (
    SurrogateConfig,
    load_surrogate,
    pgd_linf,
    record,
    surrogate_key,
)
from bdcore.attacks.base import Attack, PoisonedTrainSet
from bdcore.attacks.registry import register_attack
from bdcore.attacks.resources import ResourceStore, fingerprint
from bdcore.data.base import DatasetInfo, ImageSet


class LCConfig(SurrogateConfig):
    epsilon: float = Field(8 / 255, ge=0, le=1)  # Linf budget of the PGD perturbation, [0, 1] units
    pgd_steps: int = Field(10, ge=0)
    pgd_step_size: float = Field(2 / 255, gt=0)
    train_amplitude: float = Field(32 / 255, gt=0, le=1)  # trigger amplitude on poisoned training images
    test_amplitude: float = Field(1.0, gt=0, le=1)  # trigger amplitude at test time (1 = black/white)
    patch_size: int = Field(3, ge=1)  # side of the checkerboard in each corner


def corner_checkerboard(info: DatasetInfo, size: int) -> torch.Tensor:
    """1 x H x W signs: a size x size checkerboard (+1 on the corner pixel, then alternating) in each
    of the four corners, mirrored so that the trigger looks the same after a flip; 0 elsewhere."""
    if 2 * size > min(info.height, info.width):
        raise ValueError(f"four {size}x{size} corner patches do not fit a {info.height}x{info.width} image")
    r = torch.arange(size)
    block = torch.where((r[:, None] + r[None, :]) % 2 == 0, 1.0, -1.0)  # corner pixel at [0, 0]
    signs = torch.zeros(1, info.height, info.width)
    signs[0, :size, :size] = block
    signs[0, :size, -size:] = block.flip(1)
    signs[0, -size:, :size] = block.flip(0)
    signs[0, -size:, -size:] = block.flip(0).flip(1)
    return signs


@register_attack("lc")
class LabelConsistent(Attack):
    config_class = LCConfig
    config: LCConfig
    clean_label = True

    def __init__(self, config, info):
        super().__init__(config, info)
        self.signs = corner_checkerboard(info, config.patch_size)
        self.poison_indices: torch.Tensor | None = None
        self.poison_images: torch.Tensor | None = None  # PGD-perturbed, trigger-free, uint8
        self.resource_log: dict[str, dict] = {}

    def prepare(self, train: ImageSet, resources: ResourceStore) -> None:
        """PGD-perturb every target-class training image once (shared by all ratios and seeds),
        then keep the ones this cell poisons."""
        c = self.config
        data = fingerprint(train)
        pool = torch.nonzero(train.labels == c.target).flatten()
        spec = {"surrogate": surrogate_key(c, train, self.info), "data": data, "target": c.target,
                **c.model_dump(include={"epsilon", "pgd_steps", "pgd_step_size"})}

        def build():
            model = load_surrogate(c, train, self.info, resources)
            adv = pgd_linf(model, train.images[pool], train.labels[pool], c.epsilon, c.pgd_step_size, c.pgd_steps)
            return {"indices": pool, "images": adv}, {"count": len(pool)}

        resource = record(self.resource_log, "lc_pgd", resources.get_or_build("lc_pgd", spec, build))
        if not torch.equal(resource.tensors["indices"], pool):
            raise RuntimeError("lc: the cached PGD images do not match this training set's target class")
        indices = self.select_poison_indices(train)
        position = torch.searchsorted(pool, indices)
        self.poison_indices = indices
        self.poison_images = resource.tensors["images"][position].clone()

    def state_tensors(self):
        self._check_prepared()
        return {"poison_indices": self.poison_indices, "poison_images": self.poison_images}

    def load_state_tensors(self, tensors):
        self.poison_indices = tensors["poison_indices"].long()
        self.poison_images = tensors["poison_images"].to(torch.uint8)

    def _check_prepared(self) -> None:
        if self.poison_images is None or self.poison_indices is None:
            raise RuntimeError("lc: its poisoned images are crafted in prepare(); call prepare() or "
                               "load_state_tensors() first")

    def stamp(self, images: torch.Tensor, amplitude: float) -> torch.Tensor:
        """Add the corner checkerboard with `amplitude` (1 = pure white/black squares)."""
        shifted = images.float() + amplitude * 255.0 * self.signs.to(images.device)
        return shifted.round().clamp(0, 255).to(torch.uint8)

    def apply_trigger(self, images, labels):
        return self.stamp(images, self.config.test_amplitude)

    def apply_train_trigger(self, images, labels):
        return self.stamp(images, self.config.train_amplitude)

    def poison_train(self, train: ImageSet) -> PoisonedTrainSet:
        """Target-class samples replaced by their PGD versions with the faint trigger; labels kept."""
        self._check_prepared()
        indices = self.select_poison_indices(train)
        if not torch.equal(indices, self.poison_indices):
            raise RuntimeError("lc: this training set is not the one the poisoned images were crafted from")
        images = train.images.clone()
        images[indices] = self.apply_train_trigger(self.poison_images.to(images.device), train.labels[indices])
        return PoisonedTrainSet(ImageSet(images, train.labels.clone()), indices, train.labels.clone())
