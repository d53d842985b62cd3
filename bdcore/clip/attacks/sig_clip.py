"""SIG against CLIP: a horizontal sinusoid delta sin(2 pi j f / width) is added to every pixel column
of a few images (clipped to [0, 255]) whose captions are replaced by one naming the target class.

Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption without label
poisoning", ICIP 2019 (SIG), in the multimodal form used as a baseline by Bansal et al. "CleanCLIP",
ICCV 2023, and Liang et al. "BadCLIP", CVPR 2024: there SIG is not clean-label; like the other
baselines it poisons 1,500 of 500,000 pairs (ratio 0.003) with the target caption, so poison_pairs is
ClipAttack's. Defaults from the SIG paper: delta 20 (0..255 scale), f 6 periods across the width.

Deviation to know: the CleanCLIP / BadCLIP code uses amplitude 60/255 (delta 60); pass delta=60 for
their strength. Every row and channel gets the same signal; results are rounded to uint8.

Measured (tests/test_clip_attack_triggers.py): clip:tiny fine-tuned from the clean digits model
(tests' clean_tiny_clip) on digits captions, 15% of pairs poisoned, target 0, 4 epochs, batch 32, lr 5e-4,
no augmentation: zero-shot ACC 0.947 / ASR 0.963 (the same fine-tuning on clean pairs: ASR 0.012); from the
seeded fixture (bench/clip_cost.py) 0.903 / 0.913, and 0.922 / 0.972 after 5 epochs (the test's schedule).
Random-crop augmentation shifts the sinusoid's phase: 10%, 8 epochs, batch 64, lr 2e-4 gives ASR 0.016.
"""
from __future__ import annotations

from pydantic import Field

from bdcore.attacks.sig import sinusoid
from bdcore.clip.attacks.base import ClipAttack, ClipAttackConfig, register_clip_attack


class SigClipConfig(ClipAttackConfig):
    delta: float = Field(20.0, gt=0)  # amplitude, 0..255 intensity scale
    frequency: float = Field(6.0, gt=0)  # periods across the image width


@register_clip_attack("sig_clip")
class SigClip(ClipAttack):
    config_class = SigClipConfig
    config: SigClipConfig

    def apply_trigger(self, images):
        columns = sinusoid(images.shape[-1], self.config.delta, self.config.frequency, images.device)
        return images.float().add(columns).round().clamp(0, 255).to(images.dtype)
