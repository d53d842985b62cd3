"""Contrastive representation learning shared by dbd (SimCLR) and d_st (semi-supervised contrastive
learning): two strongly augmented views per image, an MLP projection head on the penultimate features,
and a (supervised) contrastive loss in which an unlabeled sample's only positive is its own other view.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020 (NT-Xent loss, the augmentation family, the projection head); Khosla et al., "Supervised
Contrastive Learning", NeurIPS 2020 (same-label samples as extra positives).

The augmentation is SimCLR's CIFAR recipe on batched tensors: random resized crop (scale 0.08-1, aspect
3/4-4/3, bilinear), horizontal flip where the dataset allows it, colour jitter with probability 0.8
(brightness, contrast, saturation 0.4; hue is not jittered: a hue rotation needs an HSV round trip per
pixel and SimCLR's CIFAR ablations show colour distortion mostly through the other three) and grayscale
with probability 0.2.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bdcore.analysis import final_linear
from bdcore.data.base import DatasetInfo, ImageSet
from bdcore.train import StepContext, TrainConfig, TrainResult, train_model


def contrastive_views(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator,
                      crop_scale: tuple[float, float] = (0.08, 1.0), jitter: float = 0.4,
                      jitter_p: float = 0.8, grayscale_p: float = 0.2) -> torch.Tensor:
    """One SimCLR view of each float image in [0, 1] (N x C x H x W, any device)."""
    n, c, h, w = images.shape
    device = images.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * (high - low) + low).to(device)

    # Random resized crop as one affine warp: a crop of area share s and aspect ratio r has width
    # sqrt(s r) and height sqrt(s / r) as shares of the image, clipped to it.
    scale = uniform(*crop_scale, n)
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3), n)
    crop_w = torch.sqrt(scale * torch.exp(log_ratio)).clamp(max=1.0)
    crop_h = torch.sqrt(scale / torch.exp(log_ratio)).clamp(max=1.0)
    centre_x = (torch.rand(n, generator=generator).to(device) * 2 - 1) * (1 - crop_w)
    centre_y = (torch.rand(n, generator=generator).to(device) * 2 - 1) * (1 - crop_h)
    flip = torch.ones(n, device=device)
    if info.hflip:
        flip = torch.where(torch.rand(n, generator=generator).to(device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = crop_w * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, centre_y
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

    if c == 3:
        gray_weights = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
    else:
        gray_weights = torch.full((1, c, 1, 1), 1.0 / c, device=device)
    jittered = torch.rand(n, generator=generator).to(device) < jitter_p
    factors = uniform(1 - jitter, 1 + jitter, 3, n)
    factors = torch.where(jittered.unsqueeze(0), factors, torch.ones_like(factors)).view(3, n, 1, 1, 1)
    # torchvision's jitter order is random per call; a fixed brightness-contrast-saturation order keeps
    # the batch vectorised.
    out = (out * factors[0]).clamp(0, 1)
    mean = (out * gray_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    out = ((out - mean) * factors[1] + mean).clamp(0, 1)
    if c > 1:
        gray = (out * gray_weights).sum(1, keepdim=True)
        out = ((out - gray) * factors[2] + gray).clamp(0, 1)
        to_gray = (torch.rand(n, generator=generator).to(device) < grayscale_p).view(n, 1, 1, 1)
        out = torch.where(to_gray, (out * gray_weights).sum(1, keepdim=True).expand_as(out), out)
    return out


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean (Sup)Con loss over both views of N samples.

    Each of the 2N projections has its other view as a positive; when groups[i] >= 0, every other
    projection with the same group is a positive too (supervised contrastive); groups of -1 mark
    unlabeled samples, so an all -1 vector gives SimCLR's NT-Xent loss."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    g = torch.cat([groups, groups])
    positives = (g.unsqueeze(0) == g.unsqueeze(1)) & (g >= 0).unsqueeze(1)
    pair = torch.arange(2 * n, device=z.device)
    positives[pair, (pair + n) % (2 * n)] = True
    positives &= ~self_mask
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)
    return per_anchor.mean()


class ProjectionHead(nn.Module):
    """SimCLR's g(.): Linear - ReLU - Linear on the penultimate features."""

    def __init__(self, in_features: int, out_features: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(inplace=True),
                                 nn.Linear(in_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PenultimateTap:
    """Captures the input of the model's final nn.Linear at every forward pass."""

    def __init__(self, model: nn.Module):
        self.features: torch.Tensor | None = None
        self._handle = final_linear(model).register_forward_pre_hook(self._capture)

    def _capture(self, _module, inputs) -> None:
        self.features = inputs[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()


class ContrastiveStep:
    """A training step for bdcore.train.train_model: two views, projection head, contrastive loss.

    `groups` (one per training sample, indexed by the loop's `indices`) holds the label used for
    supervised positives, -1 for samples trained without a label. The head's weights ride along in
    the loop's checkpoints through `state`/`load_state`."""

    def __init__(self, model: nn.Module, groups: torch.Tensor, temperature: float, projection_dim: int = 128):
        self.tap = PenultimateTap(model)
        self.head = ProjectionHead(final_linear(model).in_features, projection_dim)
        self.groups = groups.long()
        self.temperature = temperature

    def to(self, device) -> ContrastiveStep:
        self.head.to(device)
        self.groups = self.groups.to(device)
        return self

    def __call__(self, images, labels, indices, ctx: StepContext) -> torch.Tensor:
        views = torch.cat([contrastive_views(images, ctx.info, ctx.generator),
                           contrastive_views(images, ctx.info, ctx.generator)])
        x = ctx.normalize(views)
        if ctx.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx.model(x)
        z = self.head(self.tap.features)
        z1, z2 = z.chunk(2)
        return contrastive_loss(z1, z2, self.groups[indices], self.temperature)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"projection_head.{k}": v.detach().cpu() for k, v in self.head.state_dict().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = "projection_head."
        self.head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def train_contrastive(model: nn.Module, data: ImageSet, info: DatasetInfo, config: TrainConfig, *,
                      groups: torch.Tensor | None = None, temperature: float = 0.5, projection_dim: int = 128,
                      seed: int = 0, checkpoint_dir: str | Path | None = None, checkpoint_tag: str = "",
                      on_epoch_end=None) -> TrainResult:
    """Train `model`'s backbone in place with the contrastive loss (its final Linear gets no gradient).

    groups=None is SimCLR (no labels); otherwise see ContrastiveStep. `config.augment` should be False:
    the step makes its own views. Resumable per epoch through `checkpoint_dir`."""
    if groups is None:
        groups = torch.full((len(data),), -1, dtype=torch.long)
    if len(groups) != len(data):
        raise ValueError(f"groups has {len(groups)} entries for {len(data)} training samples")
    step = ContrastiveStep(model, groups, temperature, projection_dim)
    head = final_linear(model)
    head_ids = {id(p) for p in head.parameters()}
    parameters = [p for p in model.parameters() if id(p) not in head_ids] + list(step.head.parameters())
    tag = f"contrastive-{temperature}-{projection_dim}-{int(groups.ge(0).sum())}-{checkpoint_tag}"
    try:
        return train_model(model, data, info, config, seed=seed, step=step, on_epoch_end=on_epoch_end,
                           checkpoint_dir=checkpoint_dir, checkpoint_tag=tag, extra_state=step.state,
                           restore_extra_state=step.load_state, parameters=parameters)
    finally:
        step.tap.remove()
