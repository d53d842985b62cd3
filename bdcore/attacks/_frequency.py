"""Colour-space conversions and blockwise 2-D DCT for the frequency-domain attacks (ftrojan, ctrl).

Everything works on float tensors N x C x H x W in the 0..255 range, on the images' own device,
as plain matrix products (no FFT, no OpenCV), so the same trigger comes out on CPU and GPU.

- `to_color_space` / `from_color_space`: RGB <-> "yuv" (analog BT.601 YUV: Y = .299 R + .587 G
  + .114 B, U = .436 (B - Y) / .886, V = .615 (R - Y) / .701) or "ycbcr" (full-range BT.601 / JPEG
  YCbCr: Cb and Cr centred on 128). Both are affine, so a change added to a chroma channel maps to
  a fixed RGB change.
- `block_dct2` / `block_idct2`: the orthonormal DCT-II of every `block` tile of the last two axes
  (X = D x D^T per tile; D orthogonal, so the inverse is D^T X D). A unit coefficient at (u, v)
  is the spatial pattern d_u d_v^T, peak at most sqrt(2/h) sqrt(2/w) (2/32 for a 32 x 32 tile).
- `add_frequency_trigger`: the shared trigger of ftrojan and ctrl: convert, DCT per block, add a
  magnitude at given (row, col) frequencies of chosen channels, inverse DCT, convert back, round
  and clamp to uint8.
- `FrequencyTriggerConfig` / `FrequencyTriggerAttack`: the config fields and trigger both attacks share.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, NonNegativeInt, model_validator

from bdcore.attacks.base import Attack, AttackConfig

ColorSpace = Literal["yuv", "ycbcr"]

# Rows: output channel (Y, chroma-blue, chroma-red); columns: R, G, B.
_KR, _KB = 0.299, 0.114
_KG = 1.0 - _KR - _KB
_UK, _VK = 0.436 / (1 - _KB), 0.615 / (1 - _KR)  # ~0.492, ~0.877
_FORWARD = {
    # U = 0.436 (B - Y) / (1 - Kb), V = 0.615 (R - Y) / (1 - Kr): the analog (PAL) BT.601 YUV.
    "yuv": (
        [[_KR, _KG, _KB],
         [-_UK * _KR, -_UK * _KG, _UK * (1 - _KB)],
         [_VK * (1 - _KR), -_VK * _KG, -_VK * _KB]],
        [0.0, 0.0, 0.0],
    ),
    # Cb = 128 + (B - Y) / (2 (1 - Kb)), Cr = 128 + (R - Y) / (2 (1 - Kr)): JPEG / full-range BT.601.
    "ycbcr": (
        [[_KR, _KG, _KB],
         [-_KR / (2 * (1 - _KB)), -_KG / (2 * (1 - _KB)), 0.5],
         [0.5, -_KG / (2 * (1 - _KR)), -_KB / (2 * (1 - _KR))]],
        [0.0, 128.0, 128.0],
    ),
}
CHANNEL_NAMES = {"yuv": ("Y", "U", "V"), "ycbcr": ("Y", "Cb", "Cr")}


def _affine(space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix, offset) of RGB -> `space`, float64 on the CPU (cast and moved by the callers, so
    every device gets the same numbers and devices without float64 work too)."""
    if space not in _FORWARD:
        raise ValueError(f"unknown colour space {space!r}; known: {sorted(_FORWARD)}")
    matrix, offset = _FORWARD[space]
    return torch.tensor(matrix, dtype=torch.float64), torch.tensor(offset, dtype=torch.float64)


def to_color_space(rgb: torch.Tensor, space: ColorSpace) -> torch.Tensor:
    """Float RGB (N x 3 x H x W, 0..255) to `space` (Y first, then the two chroma channels)."""
    if rgb.shape[-3] != 3:
        raise ValueError(f"colour conversion needs 3 channels, got {rgb.shape[-3]}")
    matrix, offset = (t.to(device=rgb.device, dtype=rgb.dtype) for t in _affine(space))
    return torch.einsum("oc,...chw->...ohw", matrix, rgb) + offset.view(3, 1, 1)


def from_color_space(converted: torch.Tensor, space: ColorSpace) -> torch.Tensor:
    """Inverse of `to_color_space` (float, not rounded or clamped)."""
    if converted.shape[-3] != 3:
        raise ValueError(f"colour conversion needs 3 channels, got {converted.shape[-3]}")
    matrix, offset = _affine(space)
    inverse, offset = (t.to(device=converted.device, dtype=converted.dtype) for t in (torch.linalg.inv(matrix), offset))
    return torch.einsum("oc,...chw->...ohw", inverse, converted - offset.view(3, 1, 1))


def dct_matrix(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix: D[k, i] = a_k cos(pi (2 i + 1) k / (2 n)), a_0 = sqrt(1/n),
    a_k = sqrt(2/n); D @ x is the DCT of x, D.T @ X its inverse."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(device=device, dtype=dtype)


def _tiles(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    *lead, height, width = x.shape
    bh, bw = block
    if height % bh or width % bw:
        raise ValueError(f"a {height}x{width} array does not split into {bh}x{bw} blocks")
    return x.reshape(*lead, height // bh, bh, width // bw, bw)


def block_dct2(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of every `block` tile of the last two axes (which must split evenly);
    coefficient (u, v) of a tile sits at the tile's own (u, v) offset, as in JPEG."""
    dh, dw = (dct_matrix(n, x.device, x.dtype) for n in block)
    out = torch.einsum("uh,...ahbw,vw->...aubv", dh, _tiles(x, block), dw)
    return out.reshape(x.shape)


def block_idct2(coefficients: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Inverse of `block_dct2`."""
    dh, dw = (dct_matrix(n, coefficients.device, coefficients.dtype) for n in block)
    out = torch.einsum("uh,...aubv,vw->...ahbw", dh, _tiles(coefficients, block), dw)
    return out.reshape(coefficients.shape)


def effective_block(window: int, height: int, width: int) -> tuple[int, int]:
    """The DCT tile: `window` x `window`, or the whole image along an axis shorter than it."""
    return min(window, height), min(window, width)


def scaled_positions(positions: Sequence[tuple[int, int]], window: int,
                     block: tuple[int, int]) -> list[tuple[int, int]]:
    """Frequency positions given for a `window` tile, moved to the same relative place in a smaller
    tile (only when the image is smaller than the window): the top index window - 1 stays the top
    index block - 1, e.g. (15, 15) and (31, 31) of a 32-tile become (13, 13) and (27, 27) in 28."""
    def scale(index: int, size: int) -> int:
        return index if size == window else round(index * (size - 1) / (window - 1))

    return [(scale(row, block[0]), scale(col, block[1])) for row, col in positions]


def add_frequency_trigger(images: torch.Tensor, *, magnitude: float, positions: Sequence[tuple[int, int]],
                          channels: Sequence[int], window: int, color_space: ColorSpace | None) -> torch.Tensor:
    """Add `magnitude` to the DCT coefficients `positions` of every tile of `channels`.

    `images`: uint8 N x C x H x W. With a colour space (3-channel images) the channels index the
    converted image (0 = Y, 1 and 2 = chroma); without one they index the image's own channels.
    Rows/columns beyond the last whole tile (H or W not a multiple of the tile) are left unchanged.
    Returns uint8 (rounded, clamped to 0..255)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"expected uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
    n, _, height, width = images.shape
    block = effective_block(window, height, width)
    coords = scaled_positions(positions, window, block)
    x = images.float()
    if color_space is not None:
        x = to_color_space(x, color_space)
    h_used, w_used = height - height % block[0], width - width % block[1]
    region = x[..., :h_used, :w_used]
    coefficients = block_dct2(region[:, list(channels)], block)
    tiles = coefficients.view(n, len(channels), h_used // block[0], block[0], w_used // block[1], block[1])
    for row, col in coords:
        tiles[:, :, :, row, :, col] += magnitude
    x[:, list(channels), :h_used, :w_used] = block_idct2(coefficients, block)
    if color_space is not None:
        x = from_color_space(x, color_space)
    return x.round().clamp(0, 255).to(torch.uint8)


# -- the shared config and attack of ftrojan and ctrl ------------------------------------------
class FrequencyTriggerConfig(AttackConfig):
    """Settings of a fixed DCT-domain trigger; ftrojan and ctrl set their papers' defaults."""

    magnitude: float = Field(30.0, gt=0)  # added to each chosen DCT coefficient, 0..255 intensity scale
    window_size: int = Field(32, ge=1)  # DCT tile; the whole image along an axis shorter than it
    positions: tuple[tuple[NonNegativeInt, NonNegativeInt], ...] = ((15, 15), (31, 31))  # (row, col) in a tile
    channels: tuple[int, ...] = (1, 2)  # of the converted image: 0 = Y (luma), 1 and 2 = chroma
    color_space: ColorSpace = "yuv"

    @model_validator(mode="after")
    def _check(self):
        if not self.positions:
            raise ValueError("positions must name at least one (row, col) frequency")
        for row, col in self.positions:
            if row >= self.window_size or col >= self.window_size:
                raise ValueError(f"frequency position ({row}, {col}) lies outside a {self.window_size}x"
                                 f"{self.window_size} DCT window (indices 0..{self.window_size - 1})")
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels must be distinct and non-empty, got {list(self.channels)}")
        if any(not 0 <= ch <= 2 for ch in self.channels):
            raise ValueError(f"channels index Y/chroma/chroma (0, 1, 2), got {list(self.channels)}")
        return self


class FrequencyTriggerAttack(Attack):
    """An attack whose trigger is `add_frequency_trigger` with its config (no learned state).

    Colour images: the trigger goes into `channels` of the `color_space` image. 1-channel images
    have no chroma: only channels=(0,) is accepted there (the gray channel is the luma), anything
    else raises a ValueError naming the attack."""

    config: FrequencyTriggerConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        names = CHANNEL_NAMES[config.color_space]
        if info.channels == 1:
            if tuple(config.channels) != (0,):
                raise ValueError(
                    f"{self.name} puts its trigger into the {'/'.join(names[c] for c in config.channels)} channel(s) "
                    f"of a {config.color_space.upper()} colour image, but {info.name} images have 1 channel (no "
                    "chroma); pass channels=[0] to put the trigger into the gray (luma) channel instead")
            self._space: ColorSpace | None = None
        elif info.channels == 3:
            self._space = config.color_space
        else:
            raise ValueError(f"{self.name} needs RGB (3-channel) or gray (1-channel) images; {info.name} has "
                             f"{info.channels} channels")

    def apply_trigger(self, images, labels):
        c = self.config
        return add_frequency_trigger(images, magnitude=c.magnitude, positions=c.positions, channels=c.channels,
                                     window=c.window_size, color_space=self._space)
