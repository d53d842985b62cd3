"""EfficientNet-B3 (torchvision), classifier[-1] with num_classes outputs.
Tan, Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019 (arXiv:1905.11946)."""
from __future__ import annotations

from torch import nn
from torchvision.models import efficientnet_b3 as tv_efficientnet_b3

from bdcore.data.base import DatasetInfo
from bdcore.models.registry import register_model
from bdcore.models.zoo._common import build_torchvision


@register_model("efficientnet_b3")
def efficientnet_b3(info: DatasetInfo) -> nn.Module:
    return build_torchvision(tv_efficientnet_b3, info, stem="features.0.0", head="classifier.1")
