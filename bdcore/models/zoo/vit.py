"""ViT-B/16 (torchvision) behind a bilinear resize of every input to 224x224, as in BackdoorBench.
Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", ICLR 2021 (arXiv:2010.11929)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from bdcore.data.base import DatasetInfo
from bdcore.models.registry import register_model
from bdcore.models.zoo._common import adapt_in_channels, replace_linear_head, trunc_normal_fan_in

IMAGE_SIZE = 224


class Resize(nn.Module):
    """Bilinear resize to size x size (antialiased when shrinking, like transforms.Resize)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ResizedViT(VisionTransformer):
    """torchvision's ViT-B/16 (patch 16, 12 layers, 12 heads, width 768, MLP 3072) that first
    resizes its input to 224x224.

    It subclasses VisionTransformer instead of wrapping it (BackdoorBench uses
    nn.Sequential(Resize, vit), whose keys gain a "1." prefix): `resize` holds no tensors, so the
    state-dict keys are exactly torchvision's vit_b_16 keys and a state dict saved from
    torchvision's own vit_b_16 loads with no prefix handling.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000):
        super().__init__(
            image_size=IMAGE_SIZE, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072
        )
        self.resize = Resize(IMAGE_SIZE)
        adapt_in_channels(self, "conv_proj", in_channels, init=trunc_normal_fan_in)
        # As BackdoorBench: heads.head becomes a freshly initialised nn.Linear(768, num_classes).
        replace_linear_head(self, "heads.head", num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.resize(x))


@register_model("vit_b_16")
def vit_b_16(info: DatasetInfo) -> nn.Module:
    return ResizedViT(in_channels=info.channels, num_classes=info.num_classes)
