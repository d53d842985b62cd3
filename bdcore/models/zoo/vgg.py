"""VGG-19 with batch normalisation (torchvision), classifier ending in num_classes outputs.
Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015 (arXiv:1409.1556)."""
from __future__ import annotations

from torch import nn
from torchvision.models import vgg19_bn as tv_vgg19_bn

from bdcore.data.base import DatasetInfo
from bdcore.models.registry import register_model
from bdcore.models.zoo._common import build_torchvision


@register_model("vgg19_bn")
def vgg19_bn(info: DatasetInfo) -> nn.Module:
    # Kept exactly as BackdoorBench builds it: torchvision's AdaptiveAvgPool2d((7, 7)) stays, so a
    # 32x32 input (1x1 after the five max-pools) is replicated to 7x7 and the full
    # 25088-4096-4096-num_classes classifier is used (~139M parameters). This keeps results
    # comparable with BackdoorBench and lets an ImageNet vgg19_bn state dict load all but the
    # last layer (classifier.6).
    return build_torchvision(tv_vgg19_bn, info, stem="features.0", head="classifier.6")
