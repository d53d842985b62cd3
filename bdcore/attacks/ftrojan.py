"""FTrojan: add a fixed value at a mid and a high DCT frequency of every 32x32 block of the U and V
channels of the YUV image (invisible: a small, image-wide high-frequency ripple); relabel to the target.

Wang, Yao, Xu, An, Tong & Wang, "An Invisible Black-box Backdoor Attack through
Frequency Domain", ECCV 2022. Paper defaults (CIFAR-10): YUV, channels U and V, block 32,
frequencies (15, 15) and (31, 31), magnitude 30 on the 0..255 scale of an orthonormal DCT. The
authors' code converts with OpenCV's YCrCb (and rounds to uint8 in between); we follow the paper's
YUV and stay in float until the end (color_space="ycbcr" gives the JPEG YCbCr variant). Dirty-label:
all2one and all2all. Images smaller than the block are one block; see bdcore/attacks/_frequency.py.
"""
from __future__ import annotations

from pydantic import Field, NonNegativeInt

from bdcore.attacks._frequency import ColorSpace, FrequencyTriggerAttack, FrequencyTriggerConfig
from bdcore.attacks.registry import register_attack


class FTrojanConfig(FrequencyTriggerConfig):
    magnitude: float = Field(30.0, gt=0)
    window_size: int = Field(32, ge=1)
    positions: tuple[tuple[NonNegativeInt, NonNegativeInt], ...] = ((15, 15), (31, 31))
    channels: tuple[int, ...] = (1, 2)  # U, V
    color_space: ColorSpace = "yuv"


@register_attack("ftrojan")
class FTrojan(FrequencyTriggerAttack):
    config_class = FTrojanConfig
    config: FTrojanConfig
