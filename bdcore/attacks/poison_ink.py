"""Poison Ink: the trigger is the image's own edge map "filled with ink" of a fixed colour,
hidden in the image by a trained injection network. Dirty-label.

Zhang, Chen, Huang, Liao, Zhang, Feng, Hua & Yu, "Poison Ink: Robust and Invisible Backdoor
Attack", IEEE TIP 2022. The reference projects ship pre-poisoned images; here the engine trains
the injection network on the attacked training set itself (a cached resource, kind
"poison_ink_injector") and poisons on the fly.

Trigger pattern: a Canny-style edge map computed in torch (Gaussian blur, Sobel gradients,
non-maximum suppression, double threshold relative to each image's strongest gradient, hysteresis)
coloured with the ink colour (R, G, B) = (240, 120, 20) as in the paper (grey images: its
luminance; other channel counts: the colour repeated). Injection network (IN): a U-Net on
[image, coloured edge map] whose output, bounded to +-`residual_scale` levels by a tanh, is added
to the image. Guidance extractor (GE): a U-Net (GroupNorm) that must recover the coloured edge
map from a poisoned image and a blank map from a clean one, behind an interference layer (same
random shift for input and target, uint8 rounding, Gaussian noise). Loss as the paper's without
its discriminator: L = w_inv * ||x_p - x||^2 + ||GE(x_p) - T||^2 + lambda * ||GE(x)||^2, the
invisibility term ramped in after an extraction-only phase (as for ssba, to train fast).

Simplifications against the paper (to train in seconds on a CPU): the IN predicts a bounded
residual rather than the whole image; no PatchGAN discriminator (adversarial loss); a reduced
interference layer (shift, rounding, noise; no blur, JPEG or colour jitter); small U-Nets; the
GE also sees a fixed high-pass copy of its input; a penalty keeps the residual's tanh out of its
flat tails; edge thresholds are ours. At this budget the GE is weak (on digits it recovers about
0.38 of the ink on edge pixels of poisoned images vs 0.18 on clean ones) but the IN has learnt to
write a fixed tint along each image's edges, which the victim learns as the trigger (the tint is
the code the GE reads, not visibly the ink colour). Defaults: ink (240, 120, 20), residual bound
24/255, invisibility weight 3, lambda 1, at least 150 training steps and at least 2 passes over
the training set at batch 32, Adam lr 2e-3, the first third without the invisibility loss
(digits: 150 steps, ~20-30 s on 2 CPU cores, mean |change| 3.5/255, 14/255 on edge pixels).
On CIFAR-scale data with a GPU raise `steps` and the widths.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.attacks._nets import (
    DeviceCopies,
    UNet,
    bounded,
    deterministic_inference,
    fit,
    highpass,
    map_batches,
    quantize,
    random_shift,
    seeded,
)
from bdcore.attacks.base import Attack, AttackConfig
from bdcore.attacks.registry import register_attack
from bdcore.attacks.resources import (
    ResourceStore,
    fingerprint,
    load_module_tensors,
    module_tensors,
)
from bdcore.data.base import ImageSet

RESOURCE_KIND = "poison_ink_injector"
_VERSION = 2  # bump when the training procedure changes: old cached networks are then not reused


class PoisonInkConfig(AttackConfig):
    ink_color: tuple[int, int, int] = (240, 120, 20)  # the paper's trigger colour (R, G, B)
    edge_sigma: float = Field(1.0, ge=0)  # Gaussian blur before the Sobel gradients (0: none)
    edge_low: float = Field(0.1, gt=0, lt=1)  # hysteresis thresholds, fractions of the image's max gradient
    edge_high: float = Field(0.25, gt=0, lt=1)
    residual_scale: float = Field(24.0, gt=0, le=255)  # max |change| in intensity levels (tanh bound)
    steps: int | None = Field(None, ge=1)  # injection-network training steps; None: max(150, 2 epochs)
    extract_only_steps: int | None = Field(None, ge=0)  # no invisibility loss at first; None: steps // 3
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    inv_weight: float = Field(3.0, ge=0)  # invisibility (mean squared change, images in [0, 1])
    clean_weight: float = Field(1.0, ge=0)  # lambda: blank extraction from clean images
    noise_std: float = Field(2.0, ge=0)  # interference-layer Gaussian noise (intensity levels)
    max_shift: int = Field(2, ge=0)  # interference-layer random translation (pixels)
    injector_widths: tuple[int, ...] = (8, 16, 32)
    extractor_widths: tuple[int, ...] = (8, 16, 32)
    injector_seed: int = 0  # seed of the networks' initialisation and training batches


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """t shifted so that out[y, x] = t[y + dy, x + dx] (zero outside)."""
    padded = F.pad(t, (1, 1, 1, 1))
    h, w = t.shape[-2:]
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def edge_map(images: torch.Tensor, sigma: float = 1.0, low: float = 0.1, high: float = 0.25,
             hysteresis_steps: int = 8) -> torch.Tensor:
    """Canny-style binary edge map (N x 1 x H x W float 0/1) of float [0, 1] images."""
    gray = images.mean(1, keepdim=True) if images.shape[1] != 3 else \
        (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if sigma > 0:
        k = _gaussian_kernel(sigma).to(images.device)
        r = k.numel() // 2
        gray = F.conv2d(F.pad(gray, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        gray = F.conv2d(F.pad(gray, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().contiguous().view(1, 1, 3, 3))
    magnitude = torch.sqrt(gx**2 + gy**2)
    # Non-maximum suppression along the gradient direction quantised to 0/45/90/135 degrees.
    angle = torch.remainder(torch.rad2deg(torch.atan2(gy, gx)), 180.0)
    sector = torch.remainder(torch.round(angle / 45.0), 4)
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for s, (dy, dx) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1)]):
        local_max = (magnitude >= _shift(magnitude, dy, dx)) & (magnitude >= _shift(magnitude, -dy, -dx))
        keep |= (sector == s) & local_max
    thin = torch.where(keep, magnitude, torch.zeros_like(magnitude))
    peak = thin.flatten(1).amax(1).view(-1, 1, 1, 1).clamp_min(1e-6)
    strong, weak = thin >= high * peak, thin >= low * peak
    strong &= thin > 1e-6
    for _ in range(hysteresis_steps):
        grown = weak & (F.max_pool2d(strong.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, strong):
            break
        strong = grown
    return strong.float()


def ink_colour(config_colour: tuple[int, int, int], channels: int) -> torch.Tensor:
    """The ink colour as a C-vector in [0, 1]."""
    rgb = torch.tensor(config_colour, dtype=torch.float32) / 255
    if channels == 3:
        return rgb
    if channels == 1:
        return (rgb * torch.tensor([0.299, 0.587, 0.114])).sum().view(1)
    return rgb.repeat(math.ceil(channels / 3))[:channels]


@register_attack("poison_ink")
class PoisonInk(Attack):
    config_class = PoisonInkConfig
    config: PoisonInkConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        if config.edge_low > config.edge_high:
            raise ValueError(f"poison_ink: edge_low ({config.edge_low}) must not exceed edge_high ({config.edge_high})")
        self.colour = ink_colour(config.ink_color, info.channels)
        self.injector: DeviceCopies | None = None
        self.extractor: DeviceCopies | None = None
        self.stats: dict = {}
        self.resource_log: dict[str, dict] = {}

    # -- trigger pattern -------------------------------------------------------------------------
    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """Binary edge maps (N x 1 x H x W) of float [0, 1] or uint8 images."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        cfg = self.config
        return edge_map(x, cfg.edge_sigma, cfg.edge_low, cfg.edge_high)

    def trigger_pattern(self, x: torch.Tensor) -> torch.Tensor:
        """The coloured edge map (N x C x H x W in [0, 1]) of float [0, 1] images."""
        return self.edges(x) * self.colour.to(x.device).view(1, -1, 1, 1)

    # -- networks ------------------------------------------------------------------------------
    def _build_injector(self) -> UNet:
        c = self.info.channels
        return UNet(2 * c, c, self.config.injector_widths)

    def _build_extractor(self) -> UNet:
        c = self.info.channels
        return UNet(2 * c, c, self.config.extractor_widths, norm=True)

    def _inject(self, injector: UNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(poisoned image before rounding, saturation penalty of the bounded residual)."""
        pattern = self.trigger_pattern(x)
        residual, saturation = bounded(injector(torch.cat([x - 0.5, pattern - 0.5], dim=1)),
                                       self.config.residual_scale / 255)
        return x + residual, saturation

    @staticmethod
    def _extract(extractor: UNet, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(extractor(torch.cat([x - 0.5, highpass(x)], dim=1)))

    def training_steps(self, n_train: int) -> int:
        cfg = self.config
        return cfg.steps or max(150, math.ceil(2 * n_train / cfg.batch_size))

    def resource_spec(self, train: ImageSet) -> dict:
        cfg = self.config
        steps = self.training_steps(len(train))
        return {
            "version": _VERSION, "data": fingerprint(train), "shape": list(self.info.image_shape),
            "ink_color": list(cfg.ink_color), "edges": [cfg.edge_sigma, cfg.edge_low, cfg.edge_high],
            "residual_scale": cfg.residual_scale, "steps": steps,
            "extract_only_steps": cfg.extract_only_steps if cfg.extract_only_steps is not None else steps // 3,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "inv_weight": cfg.inv_weight,
            "clean_weight": cfg.clean_weight, "noise_std": cfg.noise_std, "max_shift": cfg.max_shift,
            "injector_widths": list(cfg.injector_widths), "extractor_widths": list(cfg.extractor_widths),
            "seed": cfg.injector_seed,
        }

    def prepare(self, train: ImageSet, resources: ResourceStore) -> None:
        spec = self.resource_spec(train)
        resource = resources.get_or_build(RESOURCE_KIND, spec, lambda: self._train(train, spec, resources.torch_device))
        self.load_state_tensors(resource.tensors)
        self.resource_log[RESOURCE_KIND] = {"path": None if resource.path is None else str(resource.path),
                                            "reused": resource.reused}
        self.stats = {"training": resource.metadata, **self.extraction_quality(train.images[:256])}

    def _train(self, train: ImageSet, spec: dict, device: torch.device):
        cfg = self.config
        injector = seeded(self._build_injector, cfg.injector_seed).to(device).train()
        extractor = seeded(self._build_extractor, cfg.injector_seed + 1).to(device).train()
        generator = torch.Generator().manual_seed(cfg.injector_seed)
        noise = cfg.noise_std / 255
        free, total = spec["extract_only_steps"], spec["steps"]
        ramp = max(1, (total - free) // 2)

        def interfere(images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            images, target = random_shift([images, target], cfg.max_shift, generator)
            return images + noise * torch.randn(images.shape, generator=generator).to(device), target

        def loss_fn(x: torch.Tensor, step: int):
            pattern = self.trigger_pattern(x)
            injected, saturation = self._inject(injector, x)
            poisoned = quantize(injected.clamp(0, 1))
            seen, target = interfere(poisoned, pattern)
            clean_seen, _ = interfere(x, pattern)
            extract = (self._extract(extractor, seen) - target).square().mean()
            blank = self._extract(extractor, clean_seen).square().mean()
            inv = (poisoned - x).square().mean()
            weight = 0.0 if step < free else cfg.inv_weight * min(1.0, (step - free + 1) / ramp)
            with torch.no_grad():
                change = (poisoned - x).abs().mean() * 255
            return extract + cfg.clean_weight * blank + weight * inv + saturation, {
                "extract": extract.detach(), "blank": blank.detach(), "mean_abs_change": change}

        result = fit(list(injector.parameters()) + list(extractor.parameters()), loss_fn, train.images, total,
                     cfg.batch_size, cfg.lr, generator, device)
        tensors = {**module_tensors(injector, "injector."), **module_tensors(extractor, "extractor.")}
        return tensors, {**result, "device": str(device)}

    # -- state ---------------------------------------------------------------------------------
    def state_tensors(self):
        if self.injector is None:
            raise RuntimeError("poison_ink: call prepare() (or load_state_tensors) before using the attack")
        return {**module_tensors(self.injector.on(torch.device("cpu")), "injector."),
                **module_tensors(self.extractor.on(torch.device("cpu")), "extractor.")}

    def load_state_tensors(self, tensors):
        injector = load_module_tensors(self._build_injector(), tensors, "injector.")
        extractor = load_module_tensors(self._build_extractor(), tensors, "extractor.")
        self.injector, self.extractor = DeviceCopies(injector), DeviceCopies(extractor)

    # -- trigger -------------------------------------------------------------------------------
    def apply_trigger(self, images, labels):
        if self.injector is None:
            raise RuntimeError("poison_ink: call prepare() (or load_state_tensors) before applying the trigger")
        injector = self.injector.on(images.device)
        return map_batches(lambda x: self._inject(injector, x)[0], images)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """The guidance extractor's estimate of the coloured edge map (float, N x C x H x W)."""
        if self.extractor is None:
            raise RuntimeError("poison_ink: call prepare() (or load_state_tensors) before extracting")
        extractor = self.extractor.on(images.device)
        with deterministic_inference(images.device):
            return self._extract(extractor, images.float() / 255)

    def extraction_quality(self, images: torch.Tensor) -> dict[str, float]:
        """How well the guidance extractor works on `images` (uint8): mean squared error of its
        output against the coloured edge map for poisoned images and against a blank map for clean
        ones, next to the error of always answering blank."""
        poisoned = self.apply_trigger(images, torch.zeros(len(images), dtype=torch.long))
        with deterministic_inference(images.device):
            target = self.trigger_pattern(images.float() / 255)
        return {"extract_mse_poisoned": float((self.extract(poisoned) - target).square().mean()),
                "extract_mse_clean": float(self.extract(images).square().mean()),
                "extract_mse_blank_answer": float(target.square().mean())}
