"""A small CNN for CPU tests and the quick grid: three conv-BN-ReLU blocks and a linear head.

Big enough to learn digits to >95% and to carry a backdoor; small enough for seconds-long epochs.
"""
from __future__ import annotations

from torch import nn

from bdcore.data.base import DatasetInfo
from bdcore.models.registry import register_model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@register_model("smallcnn")
def smallcnn(info: DatasetInfo) -> nn.Module:
    return SmallCNN(info.channels, info.num_classes)
