"""ConvNeXt-Tiny (torchvision), last classifier layer with num_classes outputs; 32x32 inputs reach 1x1.
Liu, Mao, Wu, Feichtenhofer, Darrell, Xie, "A ConvNet for the 2020s", CVPR 2022 (arXiv:2201.03545)."""
from __future__ import annotations

from torch import nn
from torchvision.models import convnext_tiny as tv_convnext_tiny

from bdcore.data.base import DatasetInfo
from bdcore.models.registry import register_model
from bdcore.models.zoo._common import build_torchvision, trunc_normal


@register_model("convnext_tiny")
def convnext_tiny(info: DatasetInfo) -> nn.Module:
    # As in BackdoorBench: the 4x4 stride-4 patchify stem is unchanged (32x32 -> 8x8 -> ... -> 1x1).
    return build_torchvision(tv_convnext_tiny, info, stem="features.0.0", head="classifier.2", stem_init=trunc_normal(0.02))
