"""LF (low frequency): the trigger is a smooth, non-negative universal adversarial perturbation of a
clean surrogate, confined to a low-pass band, added to poisoned images (dirty-label).

Zeng, Park, Mao & Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective",
ICCV 2021. The authors fit a universal perturbation toward the target class (DeepFool steps over
100 training images) and pass it through a Gaussian low-pass filter (std 6 px) after every update.

Defaults as BackdoorBench (resource/lowFrequency/universal_pert.py, gauss_smooth.py; the shipped
`<dataset>_<model>_0_255.npy` patterns; utils/bd_img_transform/patch.py SimpleAdditiveTrigger):
after every update the pattern is min-max normalised to [0, 0.2] (`value_range`), so the trigger is
non-negative with its minimum at 0 and its maximum at 0.2 = 51/255; poisoned images are
clip(image + 255 * pattern, 0, 255) in uint8 pixels; Gaussian low pass with std 6 px; target 0.

Deviations from BackdoorBench, each on purpose:
- Minibatch gradient descent on the targeted cross-entropy (untargeted for all2all) over
  `craft_samples` non-target training images, instead of per-image DeepFool over 100 images until
  a fooling rate: the same universal, filtered, normalised perturbation, much cheaper to fit.
- The filter is applied in the DFT domain (circular), so the sum stays in the filter's band;
  BackdoorBench convolves with a zero-padded 30-tap kernel.
- The surrogate sees image + pattern clipped to [0, 1] and normalised (`PixelSpaceModel`), as the
  victim does; BackdoorBench's generator feeds unclipped, unnormalised [0, 1] images to a network
  trained on normalised ones.
- Not a deviation: as BackdoorBench (one pattern per dataset and victim architecture, crafted on a
  clean model of that architecture), a cell crafts against a clean surrogate of the victim's own
  architecture (`surrogate_model` set by bdcore.cells; outside a cell, the dataset's default).
- BackdoorBench's convnext_tiny, vgg19_bn and vit_b_16 patterns are float files in [0, 0.2] that it
  adds to 0-255 pixels unscaled (a no-op after the uint8 cast); here every victim gets the 0-51 trigger.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.attacks._adversarial import (
    LowPass,
    SurrogateConfig,
    add_perturbation,
    load_surrogate,
    low_pass,
    record,
    surrogate_key,
    to_unit,
)
from bdcore.attacks.base import Attack
from bdcore.attacks.registry import register_attack
from bdcore.attacks.resources import ResourceStore, fingerprint
from bdcore.data.base import ImageSet


class LFConfig(SurrogateConfig):
    # A cell fills surrogate_model with the victim's architecture (bdcore.cells), as BackdoorBench.
    surrogate_is_victim: ClassVar[bool] = True
    value_range: float = Field(0.2, gt=0, le=1)  # the trigger spans [0, value_range], [0, 1] pixel units
    low_pass: LowPass = "gaussian"  # the authors' filter; "ideal" keeps a square DFT window
    sigma: float = Field(6.0, gt=0)  # gaussian: std in pixels (authors' gauss_smooth)
    window: int = Field(3, ge=0)  # ideal: highest integer frequency kept on each axis
    craft_samples: int = Field(500, ge=1)  # training images the universal perturbation is fitted on
    steps: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    step_size: float = Field(0.02, gt=0)  # per step, relative to the largest filtered gradient entry


def normalise_range(x: torch.Tensor, value_range: float) -> torch.Tensor:
    """Min-max rescale over the whole tensor (all channels together) onto [0, value_range]: the
    reference's projection, so the trigger only ever brightens and spans exactly that range."""
    low = x.min()
    return (x - low) * (value_range / (x.max() - low).clamp_min(1e-12))


@register_attack("lf")
class LowFrequency(Attack):
    config_class = LFConfig
    config: LFConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        self.perturbation: torch.Tensor | None = None  # C x H x W float, [0, 1] units
        self.resource_log: dict[str, dict] = {}
        self.craft_stats: dict[str, float] = {}

    def prepare(self, train: ImageSet, resources: ResourceStore) -> None:
        c = self.config
        data = fingerprint(train)
        spec = {"surrogate": surrogate_key(c, train, self.info), "data": data, "target": c.target,
                "label_mode": c.label_mode, "seed": c.seed,
                **c.model_dump(include={"value_range", "low_pass", "sigma", "window", "craft_samples", "steps",
                                        "batch_size", "step_size"})}
        if c.low_pass == "gaussian":
            spec.pop("window")
        else:
            spec.pop("sigma")

        def build():
            model = load_surrogate(c, train, self.info, resources)
            delta, stats = self._craft(model, train, resources.torch_device)
            return {"perturbation": delta}, stats

        resource = record(self.resource_log, "lf_trigger", resources.get_or_build("lf_trigger", spec, build))
        self.perturbation = resource.tensors["perturbation"].float()
        self.craft_stats = dict(resource.metadata)

    def _craft(self, model, train: ImageSet, device) -> tuple[torch.Tensor, dict]:
        c = self.config
        generator = torch.Generator().manual_seed(c.seed)
        pool = torch.arange(len(train))
        if c.label_mode == "all2one":
            pool = pool[train.labels != c.target]
        pool = pool[torch.randperm(len(pool), generator=generator)[: c.craft_samples]]
        images, labels = to_unit(train.images[pool]).to(device), train.labels[pool].to(device)
        goal = self.target_labels(labels) if c.label_mode == "all2one" else labels

        delta = torch.zeros(self.info.image_shape, device=device)
        order = torch.empty(0, dtype=torch.long)
        for _ in range(c.steps):
            if len(order) < min(c.batch_size, len(pool)):
                order = torch.cat([order, torch.randperm(len(pool), generator=generator)])
            idx, order = order[: c.batch_size].to(device), order[c.batch_size :]
            d = delta.clone().requires_grad_(True)
            loss = F.cross_entropy(model((images[idx] + d).clamp(0, 1)), goal[idx])
            if c.label_mode == "all2all":
                loss = -loss  # no single target: push every image off its own label
            (grad,) = torch.autograd.grad(loss, d)
            direction = low_pass(grad, c.low_pass, c.sigma, c.window)
            delta = delta - c.step_size * direction / direction.abs().max().clamp_min(1e-12)
            delta = normalise_range(delta, c.value_range)
        with torch.no_grad():
            shifted = model((images + delta).clamp(0, 1)).argmax(1)
            clean = model(images).argmax(1)
        stats = {"fooling_rate": float((shifted != clean).float().mean()),
                 "target_rate": float((shifted == goal).float().mean()),
                 "min": float(delta.min()), "max": float(delta.max()), "mean": float(delta.mean())}
        return delta.cpu(), stats

    def state_tensors(self):
        return {"perturbation": self._trigger()}

    def load_state_tensors(self, tensors):
        self.perturbation = tensors["perturbation"].float()

    def _trigger(self) -> torch.Tensor:
        if self.perturbation is None:
            raise RuntimeError("lf: the trigger is crafted in prepare(); call prepare() or load_state_tensors() first")
        return self.perturbation

    def apply_trigger(self, images, labels):
        return add_perturbation(images, self._trigger())
