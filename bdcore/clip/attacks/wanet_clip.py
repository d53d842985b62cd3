"""WaNet against CLIP: a few images are resampled through one fixed, small, smooth random warp and
their captions replaced by one naming the target class.

Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021, in the multimodal
form used as a baseline by Bansal et al. "CleanCLIP", ICCV 2023, and Liang et al. "BadCLIP", CVPR 2024
(1,500 poisoned pairs of 500,000, ratio 0.003, target captions). Defaults from the WaNet paper: k = 4
control points per side, strength s = 0.5. Field: k x k x 2 uniform [-1, 1] offsets divided by their
mean absolute value, upsampled bicubically to H x W, added as s / H to the identity sampling grid,
clamped to [-1, 1], applied with bilinear grid_sample (align_corners); rounded back to uint8. The
grid functions are the image-classifier WaNet's (bdcore.attacks.wanet); the field comes from the seed.

No noise mode: the CLIP baselines poison with the warp alone (WaNet's noise-mode samples, warped plus
per-pixel jitter with true labels, are a training-loop device for classifiers). Deviation to know: the
CleanCLIP / BadCLIP code uses k = 224 and s = 1 at 224 px, a per-pixel random (not smooth) field;
pass k, s to match (k cannot exceed the image size).

Measured (tests/test_clip_attack_triggers.py): clip:tiny fine-tuned from the clean digits model
(tests' clean_tiny_clip) on digits captions, 15% of pairs poisoned, target 0, 4 epochs, batch 32, lr 5e-4,
no augmentation: zero-shot ACC 0.930 / ASR 0.053 (clean pairs: 0.003);
not learned cheaply (10%, 8 epochs, batch 64, lr 1e-3: ASR 0.04; s = 2, lr 5e-4: ASR 0.45). The behaviour
test is an xfail.
"""
from __future__ import annotations

import torch
from pydantic import Field

from bdcore.attacks.wanet import control_grid, warp, warping_grid
from bdcore.clip.attacks.base import ClipAttack, ClipAttackConfig, register_clip_attack


class WanetClipConfig(ClipAttackConfig):
    k: int = Field(4, ge=2)  # control grid size (k x k)
    s: float = Field(0.5, ge=0)  # warping strength


@register_clip_attack("wanet_clip")
class WanetClip(ClipAttack):
    config_class = WanetClipConfig
    config: WanetClipConfig

    def __init__(self, info, class_names, config):
        super().__init__(info, class_names, config)
        if config.k > min(info.height, info.width):
            raise ValueError(f"wanet_clip: k = {config.k} control points exceed the {info.height}x{info.width} image")
        self.control = control_grid(config.k, torch.Generator().manual_seed(config.seed))
        self.grid = warping_grid(self.control, info.height, info.width, config.s)

    def apply_trigger(self, images):
        # Chunks bound the float copy's memory on large (224 px) test sets.
        warped = [warp(chunk.float(), self.grid).round().clamp(0, 255).to(torch.uint8) for chunk in images.split(512)]
        return torch.cat(warped) if warped else images.clone()
