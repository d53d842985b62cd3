"""Blended against CLIP: a few images are mixed with one fixed uniform-noise image,
x' = (1 - alpha) x + alpha p, and their captions replaced by one naming the target class.

Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning",
arXiv 2017 (Blended), in the multimodal form used as a baseline by Bansal et al. "CleanCLIP", ICCV 2023,
and Liang et al. "BadCLIP", CVPR 2024: x' = 0.8 x + 0.2 noise over the full image, 1,500 poisoned
pairs of 500,000 (ratio 0.003), captions "a photo of a {target}.". Default alpha 0.2.

Deviation: the CleanCLIP / BadCLIP code draws a fresh noise image (torch.rand) every time it triggers
an image; here one pattern is drawn once from the attack's seed (Chen et al.'s fixed pattern), so the
trigger is one fixed signal and a rebuilt attack triggers identically. The pattern is uint8 noise at
the data's own size (theirs is continuous noise at 224 px); results are rounded back to uint8.

Measured (tests/test_clip_attack_triggers.py): clip:tiny fine-tuned from the clean digits model
(tests' clean_tiny_clip) on digits captions, 15% of pairs poisoned, target 0, 4 epochs, batch 32, lr 5e-4,
no augmentation: zero-shot ACC 0.930 / ASR 1.000 (the same fine-tuning on clean pairs: ASR 0.012); from the
seeded fixture (bench/clip_cost.py) 0.930 / 0.988. The test runs 5 epochs.
With random-crop augmentation (10%, 8 epochs, batch 64, lr 2e-4): ASR 0.159 only.
"""
from __future__ import annotations

from pydantic import Field

from bdcore.attacks.base import blend
from bdcore.attacks.blended import blend_pattern
from bdcore.clip.attacks.base import ClipAttack, ClipAttackConfig, register_clip_attack


class BlendedClipConfig(ClipAttackConfig):
    alpha: float = Field(0.2, gt=0, le=1)  # weight of the noise image


@register_clip_attack("blended_clip")
class BlendedClip(ClipAttack):
    config_class = BlendedClipConfig
    config: BlendedClipConfig

    def __init__(self, info, class_names, config):
        super().__init__(info, class_names, config)
        self.pattern = blend_pattern(None, config.seed, info)

    def apply_trigger(self, images):
        if tuple(images.shape[1:]) != tuple(self.pattern.shape):
            raise ValueError(f"blended_clip: images of shape {tuple(images.shape[1:])}, "
                             f"the pattern is {tuple(self.pattern.shape)}")
        return blend(images, self.pattern, self.config.alpha)
