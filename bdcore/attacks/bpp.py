"""BppAttack: the trigger is colour-depth reduction, each channel squeezed to a few levels with
Floyd-Steinberg dithering; negatives (a clean image plus another image's quantisation residual, true label).

Wang, Zhai & Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via
Image Quantization and Contrastive Adversarial Learning", CVPR 2022. Defaults from BackdoorBench's
default.yaml: squeeze_num 8 levels per channel (also the official code), dithering off (both codes'
default; the paper's method is `dithering: true`), negative ratio 0.1 of every batch (the official
code and BackdoorBench's original_default.yaml use 0.2: `neg_ratio: 0.2`), poison ratio 0.1.
Quantisation: round(x / 255 * (q - 1)) / (q - 1) * 255; dithering diffuses each pixel's error 7/16 right, 3/16 down-left, 5/16 down, 1/16 down-right in
float64, then rounds, as the reference; here vectorised over images and channels (pixel by pixel
along a row, one vector update per row for the row below, in the same summation order: same values).

Negative (contrastive) samples as both the official code and BackdoorBench make them: clean x_i +
(bpp(x_j) - x_j) for a random training image x_j, clamped to [0, 255], label y_i. Deviations: poison
samples are quantised once, statically (seeded indices), not a fresh share of every batch; negatives
are made among each batch's non-poisoned samples after the loop's augmentation (the reference
augments afterwards), x_j drawn from the non-poisoned training images (whose clean version is at
hand). The official code trains 1000 epochs; within digits' 10 the defaults reach ASR 0.61 only
(tests: squeeze_num 4 reaches 1.0).
"""
from __future__ import annotations

import torch
from pydantic import Field

from bdcore.attacks.base import Attack, AttackConfig
from bdcore.attacks.registry import register_attack
from bdcore.train.loop import StepContext, cross_entropy_step


class BppConfig(AttackConfig):
    squeeze_num: int = Field(8, ge=2, le=256)  # levels per channel
    dithering: bool = False  # Floyd-Steinberg error diffusion (the paper's; BackdoorBench's default is off)
    neg_ratio: float = Field(0.1, ge=0, lt=1)  # contrastive negative samples per batch (BackdoorBench 0.1)


_RINT = 1.5 * 2.0**52  # x + _RINT - _RINT rounds a float64 |x| < 2**51 to an integer, ties to even


def _rint(values: torch.Tensor) -> torch.Tensor:
    """Round float64 values half to even, as torch.round / np.round, with two additions: on the tiny
    per-pixel vectors of the dithering loop torch.round's CPU kernel is ~1000x slower when the
    machine's threads are contended."""
    return (values + _RINT) - _RINT


def squeeze(values: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest of `levels` evenly spaced values in [0, 255] (float64, not rounded to integers)."""
    return _rint(values.to(torch.float64) / 255.0 * (levels - 1)) / (levels - 1) * 255


def floyd_steinberg(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Float64 N x C x H x W (0..255) quantised to `levels` with Floyd-Steinberg error diffusion,
    scanning rows top to bottom, pixels left to right; not rounded, may leave [0, 255] slightly.
    Every step works on one pixel of all images and channels at once (an H x W x NC layout)."""
    n, c, height, width = images.shape
    img = images.to(torch.float64).permute(2, 3, 0, 1).reshape(height, width, n * c).contiguous()
    for y in range(height):
        row = img[y]
        errors = torch.empty_like(row)
        carry = None
        for x in range(width):
            old = row[x] if carry is None else row[x] + carry
            new = squeeze(old, levels)
            torch.sub(old, new, out=errors[x])
            row[x] = new
            carry = errors[x] * 0.4375
        if y + 1 < height:  # the row below, in the order a pixel-by-pixel scan adds to it
            below = img[y + 1]
            below[1:] += errors[:-1] * 0.0625
            below += errors * 0.3125
            below[:-1] += errors[1:] * 0.1875
    return img.reshape(height, width, n, c).permute(2, 3, 0, 1)


def quantize(images: torch.Tensor, levels: int, dithering: bool = True, chunk: int = 256) -> torch.Tensor:
    """uint8 images squeezed to `levels` per channel (with Floyd-Steinberg dithering), rounded.
    Chunks of 256 32x32 RGB images keep every dithering op under ATen's parallel grain size: the
    thousands of small ops stay single-threaded, which is far faster on a busy CPU."""
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float64)
        part = floyd_steinberg(part, levels) if dithering else squeeze(part, levels)
        out[start : start + chunk] = _rint(part).clamp(0, 255).to(torch.uint8)
    return out


@register_attack("bpp")
class Bpp(Attack):
    config_class = BppConfig
    config: BppConfig

    def apply_trigger(self, images, labels):
        return quantize(images, self.config.squeeze_num, self.config.dithering)

    def training_step(self, poisoned):
        mask = torch.zeros(len(poisoned.data), dtype=torch.bool)
        mask[poisoned.poison_indices.cpu()] = True
        images = poisoned.data.images.cpu()
        pool = (~mask).nonzero().squeeze(1)  # non-poisoned: the clean images are at hand
        quantized = self.apply_trigger(images[pool], poisoned.data.labels.cpu()[pool])
        return BppStep(mask, images, pool, quantized, self.config.neg_ratio)


class BppStep:
    """Cross-entropy on the batch after turning int(neg_ratio x batch) of its non-poisoned samples
    into negatives: x + (bpp(x_j) - x_j) for random clean training images x_j, clamped, true label."""

    def __init__(self, poison_mask: torch.Tensor, images: torch.Tensor, pool: torch.Tensor, quantized: torch.Tensor,
                 neg_ratio: float):
        self.poison_mask = poison_mask
        self.images = images  # uint8 training set (not copied)
        self.pool = pool  # indices of its non-poisoned images
        self.quantized = quantized  # their quantised versions, in pool order
        self.neg_ratio = neg_ratio

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        poison = self.poison_mask.to(indices.device)[indices]
        candidates = (~poison).nonzero().squeeze(1)
        n_neg = min(int(len(indices) * self.neg_ratio), len(candidates))
        if n_neg > 0 and len(self.pool) > 0:
            pick = candidates[torch.randperm(len(candidates), generator=ctx.generator)[:n_neg].to(candidates.device)]
            source = torch.randint(len(self.pool), (n_neg,), generator=ctx.generator)
            residual = (self.quantized[source].float() - self.images[self.pool[source]].float()).to(images.device)
            images = images.clone()
            images[pick] = ((images[pick].float() * 255 + residual).clamp(0, 255) / 255).to(images.dtype)
        return cross_entropy_step(images, labels, indices, ctx)
