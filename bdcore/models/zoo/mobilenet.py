"""MobileNetV3-Large (torchvision), classifier[-1] with num_classes outputs.
Howard et al., "Searching for MobileNetV3", ICCV 2019 (arXiv:1905.02244)."""
from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v3_large as tv_mobilenet_v3_large

from bdcore.data.base import DatasetInfo
from bdcore.models.registry import register_model
from bdcore.models.zoo._common import build_torchvision


@register_model("mobilenet_v3_large")
def mobilenet_v3_large(info: DatasetInfo) -> nn.Module:
    return build_torchvision(tv_mobilenet_v3_large, info, stem="features.0.0", head="classifier.3")
