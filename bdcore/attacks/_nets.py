"""Small encoder / decoder / U-Net blocks for attacks whose trigger comes from a trained network
(ssba's StegaStamp encoder, poison_ink's injection network), and the plumbing they share:
seeded construction, a short Adam training loop, straight-through uint8 quantisation, and
deterministic inference on whatever device the images are on.

Every network takes any image size (odd sizes included) and any number of channels; nothing here
uses batch statistics or dropout, so an eval-mode forward pass depends only on the weights.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_relu(cin: int, cout: int, stride: int = 1, norm: bool = False) -> nn.Sequential:
    """3x3 convolution ('same' padding; stride 2 halves the size, rounding up) + ReLU, with
    GroupNorm in between when `norm` (per-sample statistics: no batch dependence, no running
    averages, identical in training and eval mode)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1)]
    if norm:
        layers.append(nn.GroupNorm(8 if cout % 8 == 0 else 1, cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """A U-Net: a 3x3 stem, one stride-2 conv per further level, nearest upsampling back to each
    skip connection's size, a merge conv on [skip, upsampled], and a 1x1 head that also sees the
    network input (as StegaStamp's encoder concatenates its inputs before the last layer)."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int] = (16, 32, 64), norm: bool = False):
        super().__init__()
        widths = list(widths)
        if not widths:
            raise ValueError("a U-Net needs at least one level")
        self.stem = conv_relu(in_channels, widths[0], norm=norm)
        self.downs = nn.ModuleList(conv_relu(widths[i], widths[i + 1], 2, norm) for i in range(len(widths) - 1))
        self.ups = nn.ModuleList(conv_relu(widths[i + 1], widths[i], norm=norm) for i in range(len(widths) - 1))
        self.merges = nn.ModuleList(conv_relu(2 * widths[i], widths[i], norm=norm) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0] + in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for i in reversed(range(len(self.ups))):
            skip = skips[i]
            y = self.ups[i](F.interpolate(y, size=skip.shape[-2:], mode="nearest"))
            y = self.merges[i](torch.cat([skip, y], dim=1))
        return self.head(torch.cat([y, x], dim=1))


class SecretEncoder(nn.Module):
    """StegaStamp's encoder: the bit string goes through a dense layer to a small
    channels x h x w map (h, w <= `secret_map`), is upsampled to the image size, concatenated
    with the image and fed to a U-Net whose output is the residual (unbounded logits; the caller
    squashes and scales it)."""

    def __init__(self, channels: int, height: int, width: int, bits: int, widths: Sequence[int] = (16, 32, 64),
                 secret_map: int = 16, norm: bool = True, secret_gain: float = 1.0):
        super().__init__()
        self.channels, self.height, self.width = channels, height, width
        self.map_h, self.map_w = min(height, secret_map), min(width, secret_map)
        self.secret_dense = nn.Linear(bits, channels * self.map_h * self.map_w)
        self.secret_gain = secret_gain
        self.unet = UNet(2 * channels, channels, widths, norm=norm)

    def forward(self, images: torch.Tensor, secrets: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        s = self.secret_gain * self.secret_dense(2 * secrets - 1).view(n, self.channels, self.map_h, self.map_w)
        s = F.interpolate(s, size=images.shape[-2:], mode="nearest")
        return self.unet(torch.cat([images - 0.5, s], dim=1))


class BitDecoder(nn.Module):
    """StegaStamp's decoder without its spatial transformer: stride-2 conv stages, average pooled
    to a fixed 4 x 4 grid (so any image size works), then two dense layers -> one logit per bit."""

    def __init__(self, channels: int, bits: int, widths: Sequence[int] = (32, 64, 128), hidden: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for w in widths:
            layers += [conv_relu(cin, w, stride=2, norm=True), conv_relu(w, w, norm=True)]
            cin = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Linear(cin * 16, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, bits))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(highpass(images)).flatten(1))


def highpass(images: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """Image minus its 3x3 local mean (replicate padding), amplified: a fixed steganalysis-style
    pre-filter that removes most image content and keeps fine residual patterns."""
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return gain * (images - blurred)


# -- training helpers ---------------------------------------------------------------------------

def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with weights drawn from `seed` without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to the uint8 grid with a straight-through gradient: the networks learn
    on exactly what the attack writes out."""
    return x + ((x.clamp(0, 1) * 255).round() / 255 - x).detach()


def bounded(raw: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`scale * tanh(raw)` and a penalty on raw values deep in tanh's flat tails (|raw| > 2):
    without it a residual that saturates early (while only the decoder loss acts) gets no
    gradient from the image loss later and stays at the bound."""
    return scale * torch.tanh(raw), F.relu(raw.abs() - 2).square().mean()


def random_shift(tensors: Sequence[torch.Tensor], max_shift: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Translate every tensor of a batch by the same random offset (zero fill): a cheap stand-in
    for the crops and warps of the papers' noise / interference layers."""
    if max_shift <= 0:
        return list(tensors)
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    out = []
    for t in tensors:
        h, w = t.shape[-2:]
        padded = F.pad(t, (max_shift, max_shift, max_shift, max_shift))
        out.append(padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w])
    return out


def fit(parameters: Sequence[nn.Parameter], loss_fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]],
        images: torch.Tensor, steps: int, batch_size: int, lr: float, generator: torch.Generator,
        device: torch.device, log_every: int = 50) -> dict:
    """Adam on `loss_fn(batch in [0, 1] on device, step) -> (loss, stats)` for `steps` steps over
    random batches of the uint8 `images`; returns the averaged stats of the last `log_every` steps,
    a short history and the seconds taken."""
    started = time.perf_counter()
    optimizer = torch.optim.Adam(parameters, lr=lr)
    data = images.to(device)
    n = data.shape[0]
    history: list[dict] = []
    window: dict[str, list[float]] = {}
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for step in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor : cursor + batch_size].to(device)
        cursor += batch_size
        loss, stats = loss_fn(data[idx].float() / 255, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in stats.items():
            window.setdefault(key, []).append(float(value))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"step": step + 1, **{k: sum(v) / len(v) for k, v in window.items()}}
            history.append(record)
            window = {}
    last = history[-1] if history else {}
    return {"final": last, "history": history, "seconds": round(time.perf_counter() - started, 2)}


# -- inference ----------------------------------------------------------------------------------

@contextlib.contextmanager
def deterministic_inference(device: torch.device) -> Iterator[None]:
    """No gradients, no autocast, and (on CUDA) deterministic cuDNN kernels without autotuning,
    so the same weights give bit-identical triggers every time on a given device."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark)
    try:
        if device.type == "cuda":
            cudnn.deterministic, cudnn.benchmark = True, False
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


class DeviceCopies:
    """An eval-mode network with one copy per device it has been asked to run on."""

    def __init__(self, module: nn.Module):
        self._copies: dict[str, nn.Module] = {}
        self._module = module.cpu().eval()
        for p in self._module.parameters():
            p.requires_grad_(False)

    def on(self, device: torch.device) -> nn.Module:
        key = str(device)
        if key not in self._copies:
            self._copies[key] = self._module if device.type == "cpu" else copy.deepcopy(self._module).to(device).eval()
        return self._copies[key]


def map_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 images -> fn(float [0, 1] batch) -> float [0, 1] images, rounded back to uint8,
    batch by batch on the images' device."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    out = torch.empty_like(images)
    with deterministic_inference(images.device):
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].float() / 255
            out[start : start + batch_size] = (fn(x).clamp(0, 1) * 255).round().to(torch.uint8)
    return out
