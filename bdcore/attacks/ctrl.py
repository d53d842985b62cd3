"""CTRL: add a fixed magnitude at two high DCT frequencies of every 32x32 window of the chrominance
channels (Cb, Cr) of the YCbCr image, on target-class samples only, labels kept (clean-label).

Li, Pang, Xi, Du, Ji, Yao & Wang, "An Embarrassingly Simple Backdoor Attack on Self-supervised
Learning", ICCV 2023. Defaults: YCbCr, channels Cb and Cr, window 32, frequencies (15, 15) and
(31, 31), magnitude 100 on the 0..255 scale of an orthonormal DCT (the authors' CIFAR-10 setting;
some reimplementations quote 50 for the paper's text). The authors' code converts with kornia's
YUV rather than YCbCr (color_space="yuv" reproduces that). Here the victim is a supervised
classifier: poison indices come from the target class (REFERENCE.md), the same trigger is used at
test time. Images smaller than the window are one window; see bdcore/attacks/_frequency.py.
"""
from __future__ import annotations

from pydantic import Field, NonNegativeInt

from bdcore.attacks._frequency import ColorSpace, FrequencyTriggerAttack, FrequencyTriggerConfig
from bdcore.attacks.registry import register_attack


class CtrlConfig(FrequencyTriggerConfig):
    magnitude: float = Field(100.0, gt=0)
    window_size: int = Field(32, ge=1)
    positions: tuple[tuple[NonNegativeInt, NonNegativeInt], ...] = ((15, 15), (31, 31))
    channels: tuple[int, ...] = (1, 2)  # Cb, Cr
    color_space: ColorSpace = "ycbcr"


@register_attack("ctrl")
class Ctrl(FrequencyTriggerAttack):
    config_class = CtrlConfig
    config: CtrlConfig
    clean_label = True
