"""ResNet-18 (torchvision) whose stem becomes a 3x3 stride-1 conv with no max-pool for inputs <= 64 px.
He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385)."""
from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from bdcore.data.base import DatasetInfo
from bdcore.models.registry import register_model
from bdcore.models.zoo._common import build_torchvision, is_small_input, replace_conv


@register_model("resnet18")
def resnet18(info: DatasetInfo) -> nn.Module:
    # fc has num_classes outputs; module names stay torchvision's (conv1, layer1..4, fc), so an
    # ImageNet state dict loads everywhere but the (reshaped) stem conv and the head.
    model = build_torchvision(tv_resnet18, info, stem="conv1", head="fc")
    if is_small_input(info):
        replace_conv(model, "conv1", kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    return model
