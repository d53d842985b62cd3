"""PreActResNet-18: pre-activation residual network, CIFAR-style (3x3 stride-1 stem, no max-pool).
He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv:1603.05027)."""
from __future__ import annotations

from torch import nn

from bdcore.data.base import DatasetInfo
from bdcore.models.registry import register_model


class PreActBlock(nn.Module):
    """Basic pre-activation unit: x + conv2(relu(bn2(conv1(relu(bn1(x)))))). A projection
    shortcut (1x1 conv, named `shortcut.0` as in BackdoorBench) takes the pre-activated input
    when the stride or the width changes, as in the paper's reference code."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False))

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """conv1 -> layer1..layer4 -> global average pool -> linear, module for module BackdoorBench's
    `models/preact_resnet.py`, so its checkpoints load and every defense sees the same units.

    Deviation from the paper's reference code: no final BN-ReLU before the pool (BackdoorBench has
    none; the pooled features are the last residual sum), and PyTorch's default initialisation
    (BackdoorBench's) instead of a Kaiming-normal pass. With the adaptive pool, any input of at
    least 8x8 works (32x32 gives 4x4 at layer4, 64x64 8x8).
    """

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        in_planes = widths[0]
        for i, (width, blocks) in enumerate(zip(widths, num_blocks), start=1):
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 1 and j == 0) else 1
                layers.append(PreActBlock(in_planes, width, stride))
                in_planes = width * PreActBlock.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # PyTorch's default initialisation of every layer, as BackdoorBench's model (no init pass).
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = self.avgpool(out)
        return self.linear(out.flatten(1))


@register_model("preactresnet18")
def preactresnet18(info: DatasetInfo) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), in_channels=info.channels, num_classes=info.num_classes)
