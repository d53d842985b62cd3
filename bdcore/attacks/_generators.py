"""The pattern / mask generator of the input-aware dynamic attack (Nguyen & Tran, NeurIPS 2020):
a plain convolutional encoder-decoder (no skip connections).

Layout of the paper's generator, for widths (w1, ..., wL): per level two 3x3 conv blocks
(conv + BatchNorm(momentum 0.05) + ReLU), the first going to that level's width, then a 2x2 max
pool; one middle block at wL; then per level, deepest first, a bilinear x2 upsampling and two conv
blocks, the second halving the width (the last one outputs `out_channels` with no ReLU). The
paper uses widths (16, 32) on MNIST and (32, 64, 128) on CIFAR-10 / GTSRB. The output is squashed
to [0, 1] with tanh / 2 + 0.5 (pattern: an image; mask: one channel).

Generalised to any image size: pooling rounds up (odd sizes), and each upsampling goes back to
the exact size its level had on the way down (for even sizes: the paper's x2).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(cin: int, cout: int, relu: bool = True, norm: str = "batch") -> nn.Sequential:
    """3x3 conv + norm (+ ReLU). norm "batch": the paper's BatchNorm (momentum 0.05); "group":
    GroupNorm (per-sample statistics, identical in training and eval mode)."""
    groups = 8 if cout % 8 == 0 else 1
    layer = nn.BatchNorm2d(cout, momentum=0.05) if norm == "batch" else nn.GroupNorm(groups, cout)
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), layer]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class EncoderDecoder(nn.Module):
    """in_channels x H x W -> out_channels x H x W in [0, 1] (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int] = (16, 32), norm: str = "batch"):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths:
            raise ValueError("the generator needs at least one level")
        downs = []
        cin = in_channels
        for w in widths:
            downs.append(nn.Sequential(conv_block(cin, w, norm=norm), conv_block(w, w, norm=norm)))
            cin = w
        self.downs = nn.ModuleList(downs)
        self.middle = conv_block(widths[-1], widths[-1], norm=norm)
        ups = []
        for level in reversed(range(len(widths))):
            w = widths[level]
            out = widths[level - 1] if level > 0 else out_channels
            ups.append(nn.Sequential(conv_block(w, w, norm=norm), conv_block(w, out, relu=level > 0, norm=norm)))
        self.ups = nn.ModuleList(ups)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        for down in self.downs:
            x = down(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2, ceil_mode=True)
        x = self.middle(x)
        for up, size in zip(self.ups, reversed(sizes)):
            x = up(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.logits(x)) / 2 + 0.5


def sharpen(mask: torch.Tensor) -> torch.Tensor:
    """The paper's mask threshold: a steep tanh around 0.5 (tanh(20 m - 10) / 2 + 0.5), so mask
    values end up near 0 or 1 while staying differentiable."""
    return torch.tanh(20 * mask - 10) / 2 + 0.5


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int = 1) -> Iterator[None]:
    """Run these small networks with `threads` intra-op CPU threads (restored afterwards). Their
    convolutions are tiny: with several threads on a busy machine, thread synchronisation costs
    several times the arithmetic (measured: 1 mask pre-training epoch on digits 24 s of CPU with 2
    threads, 5 s with 1). No effect on other devices."""
    old = torch.get_num_threads()
    if device.type != "cpu" or old == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
