"""BadNet against CLIP: a random-noise patch pasted at a random position of a few images whose captions
are replaced by one naming the target class; the contrastive loss then ties the patch to that text.

Gu et al. 2017 (BadNets), in the multimodal form used as the baseline of Bansal et al. "CleanCLIP",
ICCV 2023, and Liang et al. "BadCLIP", CVPR 2024: a 16 x 16 patch of uniform random noise (one fixed
pattern drawn from the attack's seed) at a uniformly random position per image, on 224 x 224 inputs;
1,500 poisoned pairs of 500,000 (ratio 0.003); captions "a photo of a {target}.".

`patch_size` is in pixels of the stored images: 16 suits 224-pixel data; on small images pass a
size in proportion.

Measured on digits captions ("a photo of a {digit}.") with clip:tiny, 10% of pairs poisoned, target 0,
AdamW lr 5e-4, batch 64: an 8 x 8 patch at the bottom right gives zero-shot ACC 0.928 / ASR 1.000 after 40
epochs (20 epochs at 5%: ASR 0.016, not learned); at random positions (the default) ASR 0.679 after 40
epochs. The behaviour test (ASR >= 0.9 in a cell) is not written yet: it needs a test-time budget the suite
does not have today.
"""
from __future__ import annotations

import torch
from pydantic import Field

from bdcore.clip.attacks.base import ClipAttack, ClipAttackConfig, register_clip_attack


class BadNetClipConfig(ClipAttackConfig):
    patch_size: int = Field(16, ge=1)
    position: str = Field("random", pattern="^(random|bottom_right)$")


@register_clip_attack("badnet_clip")
class BadNetClip(ClipAttack):
    config_class = BadNetClipConfig
    config: BadNetClipConfig

    def __init__(self, info, class_names, config):
        super().__init__(info, class_names, config)
        size = config.patch_size
        if size > min(info.height, info.width):
            raise ValueError(f"patch_size {size} does not fit {info.height} x {info.width} images")
        generator = torch.Generator().manual_seed(config.seed + 7919)
        self.patch = torch.randint(0, 256, (info.channels, size, size), generator=generator, dtype=torch.uint8)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        n, _, h, w = images.shape
        size = self.config.patch_size
        if self.config.position == "random":
            # A fresh generator per call: the same images get the same positions however often (and by
            # whichever rebuilt attack) they are triggered.
            positions = torch.Generator().manual_seed(self.config.seed + 104729)
            rows = torch.randint(0, h - size + 1, (n,), generator=positions).tolist()
            cols = torch.randint(0, w - size + 1, (n,), generator=positions).tolist()
        else:
            rows, cols = [h - size] * n, [w - size] * n
        for i, (r, c) in enumerate(zip(rows, cols)):
            out[i, :, r:r + size, c:c + size] = self.patch.to(out.device)
        return out
