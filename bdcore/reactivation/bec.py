"""Backdoor existence coefficient (BEC): how much of the backdoored model's trigger response a defended
model still computes (Zhu et al., "Breaking the False Sense of Security in Backdoor Defense through
Re-Activation Attack", NeurIPS 2024, Sec. 3; code: github.com/JulieCarlon/Backdoor-Reactivation-Attack, BEC/).

1. In the backdoored model, rank every feature layer's neurons by trigger-activated change (TAC):
   the mean over (poisoned, clean) pairs of the L2 norm of the neuron's activation change (per
   channel of a conv layer, per unit of a linear layer).
2. For the top 10% neurons (also 5% and 20%; int(share x neurons) of them, at least one), linear CKA
   between the backdoored model's and the other model's activations of those neurons on the same
   500 poisoned test samples (a seeded random choice of the backdoor test set); mean over layers.
3. Min-max normalise: BEC = (CKA(defended) - CKA(clean)) / (CKA(backdoored) - CKA(clean)), so a clean
   model of the same training scores 0 and the backdoored model itself 1 (CKA with itself is 1).

Defaults (the paper's code): feature layers of a ResNet are its block convs, every Conv2d inside
`layer1`..`layer4` except the projection shortcuts (`shortcut` / `downsample`): 16 layers on
PreAct-ResNet18, no stem `conv1` (also inside a wrapper, e.g. a CLIP ResNet's `visual.layer1...`);
top 10% / 5% / 20%; 2,200 TAC pairs (`samples`); 500 CKA samples (`cka_samples`); forward passes of
250 images (`batch_size`; the paper's code: 250 pairs, memory only).

Deviations:
- TAC ranks neurons on 2,200 pairs of the *training* split (`samples`, from the analysis context),
  the paper's code on 2,200 pairs of the test split: ranking neurons is a selection, which the project
  never makes on the test set (and the context carries clean versions only of training samples).
  The CKA itself, a measurement like ASR, is on poisoned test samples as in the paper.
- Architectures other than ResNets (the paper only uses PreAct-ResNet18) use every Conv2d; a model
  with fewer than two (a vision transformer, e.g. a CLIP ViT behind bdcore.clip.ZeroShotClassifier)
  uses its Linear layers instead, with the last axis as neurons. Layers that do not run on an image
  input (a CLIP text tower) are ignored.
- Only the top-20% neurons' activations are kept for the CKA (the smaller shares are their first
  ones), so PreAct-ResNet18's layer1 maps fit in memory; the CKA values are the same.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator

import torch
from pydantic import Field
from torch import nn

from bdcore.data.augment import Normalizer
from bdcore.metrics import BackdoorTestSet
from bdcore.reactivation.base import Analysis, AnalysisConfig, AnalysisContext, PoisonedSamples, register_analysis

TOP_SHARES = (0.05, 0.10, 0.20)


class BecConfig(AnalysisConfig):
    samples: int = Field(2200, ge=2)  # (poisoned, clean) training pairs TAC ranks neurons on
    cka_samples: int = Field(500, ge=2)  # poisoned test samples the CKA is computed on
    batch_size: int = Field(250, ge=1)  # images per forward pass


def feature_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose neurons BEC ranks (see the module docstring)."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    blocks = [name for name in convs if re.search(r"(^|\.)layer\d+\.", name)
              and not any(part in ("shortcut", "downsample") for part in name.split("."))]
    if blocks:  # a ResNet: its block convs, as the paper's code
        return blocks
    if len(convs) >= 2:
        return convs
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def neuron_view(output: Any) -> torch.Tensor:
    """A layer's output as batch x neurons x rest (channels of a conv map, units of a linear output)."""
    out = output[0] if isinstance(output, tuple) else output
    if out.dim() != 4:  # linear units: neurons on the last axis, batch first
        out = out.reshape(out.shape[0], -1, out.shape[-1]).transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1)


@contextlib.contextmanager
def hooked(model: nn.Module, layers: list[str], keep: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Calls keep(layer name, neuron_view(output)) on every forward pass of the named layers."""
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(lambda _m, _i, output, name=name: keep(name, neuron_view(output)))
             for name in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def tac_ranking(model: nn.Module, pairs: PoisonedSamples, layers: list[str], info, device: torch.device,
                batch_size: int = 250) -> dict[str, torch.Tensor]:
    """layer name -> TAC of each neuron: the mean over pairs of the L2 norm of its activation change
    between the poisoned and the clean input. Streamed: each forward pass holds a poisoned half and
    its clean half, and only the per-neuron sums are kept."""
    sums: dict[str, torch.Tensor] = {}

    def keep(name: str, out: torch.Tensor) -> None:
        half = out.shape[0] // 2
        change = (out[:half].float() - out[half:].float()).norm(dim=2).sum(0).cpu()
        sums[name] = sums[name] + change if name in sums else change

    model.eval().to(device)
    normalize = Normalizer(info, device)
    step = max(1, batch_size // 2)  # pairs per forward pass: batch_size images
    with hooked(model, layers, keep):
        for start in range(0, len(pairs), step):
            both = torch.cat([pairs.triggered[start:start + step], pairs.clean[start:start + step]])
            model(normalize(both.to(device)))
    return {name: total / len(pairs) for name, total in sums.items()}


@torch.no_grad()
def layer_activations(model: nn.Module, images: torch.Tensor, neurons: dict[str, torch.Tensor], info,
                      device: torch.device, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """layer name -> N x len(neurons[name]) x rest activations (float32, CPU) of uint8 images, for
    the chosen neurons of each layer, in the order given."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in neurons}

    def keep(name: str, out: torch.Tensor) -> None:
        captured[name].append(out[:, neurons[name].to(out.device)].float().cpu())

    model.eval().to(device)
    normalize = Normalizer(info, device)
    with hooked(model, list(neurons), keep):
        for start in range(0, images.shape[0], batch_size):
            model(normalize(images[start:start + batch_size].to(device)))
    return {name: torch.cat(parts) for name, parts in captured.items() if parts}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two N x D feature matrices (Kornblith et al. 2019), in its N x N Gram form so
    that wide feature maps cost nothing extra."""
    x = (x - x.mean(0, keepdim=True)).double()
    y = (y - y.mean(0, keepdim=True)).double()
    kx, ky = x @ x.T, y @ y.T
    denominator = kx.norm() * ky.norm()
    if denominator <= 0:
        return 0.0
    return float((kx * ky).sum() / denominator)


def top_count(neurons: int, share: float) -> int:
    """int(share x neurons) as the paper's code (torch.topk of int(len x share)), at least one so that
    a tiny layer still counts."""
    return max(1, int(neurons * share))


def top_neurons(tac: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of the top `share` neurons by TAC, largest first."""
    return tac.argsort(descending=True)[: top_count(tac.numel(), share)]


def cka_by_share(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                 ranking: dict[str, torch.Tensor]) -> dict[float, float]:
    """Mean over layers of the CKA on each share of top-TAC neurons; `reference` and `other` hold the
    top max(TOP_SHARES) neurons of each layer, largest TAC first, so a share is a prefix."""
    out = {}
    for share in TOP_SHARES:
        values = []
        for name, tac in ranking.items():
            k = top_count(tac.numel(), share)
            values.append(linear_cka(reference[name][:, :k].flatten(1), other[name][:, :k].flatten(1)))
        out[share] = sum(values) / len(values)
    return out


def cka_probe(test: BackdoorTestSet, n: int, seed: int) -> torch.Tensor:
    """A seeded random choice of up to n triggered test images (the paper's code takes the first two
    shuffled batches of 250 of the backdoor test set)."""
    chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return test.images[chosen]


def normalised(similarity: float, clean_similarity: float) -> float:
    """BEC from CKA: clean reference -> 0, backdoored model (CKA 1 with itself) -> 1."""
    span = 1.0 - clean_similarity
    return (similarity - clean_similarity) / span if span > 1e-9 else float("nan")


@register_analysis("bec")
class BackdoorExistence(Analysis):
    """BEC of the defended model at the top 5/10/20% trigger-activated neurons."""

    config_class = BecConfig

    def run(self, ctx: AnalysisContext) -> dict[str, Any]:
        if ctx.clean_model is None:
            raise ValueError("bec needs a clean reference model of the same training (its score 0)")
        pairs = ctx.fit.head(self.config.samples)
        if pairs.clean is None:
            raise ValueError("bec needs the clean version of each poisoned sample (for TAC)")
        if len(pairs) < 2:
            raise ValueError(f"bec needs at least 2 poisoned training samples, got {len(pairs)}")
        probe = cka_probe(ctx.evaluate, self.config.cka_samples, self.config.seed)
        if probe.shape[0] < 2:
            raise ValueError(f"bec needs at least 2 poisoned test samples, got {probe.shape[0]}")
        ranking = tac_ranking(ctx.backdoored, pairs, feature_layers(ctx.backdoored), ctx.info, ctx.device,
                              self.config.batch_size)
        if not ranking:
            raise ValueError(f"bec found no feature layer that runs on images in {type(ctx.backdoored).__name__}")
        neurons = {name: top_neurons(tac, max(TOP_SHARES)) for name, tac in ranking.items()}
        act = lambda model: layer_activations(model, probe, neurons, ctx.info, ctx.device,  # noqa: E731
                                              self.config.batch_size)
        backdoored = act(ctx.backdoored)
        defended = cka_by_share(backdoored, act(ctx.defended), ranking)
        reference = ctx.shared("clean", lambda: {str(k): v for k, v in cka_by_share(
            backdoored, act(ctx.clean_model()), ranking).items()})
        scores = {share: normalised(defended[share], reference[str(share)]) for share in TOP_SHARES}
        return {
            "bec": scores[0.10], "bec_top5": scores[0.05], "bec_top20": scores[0.20],
            "cka_defended": defended[0.10], "cka_clean": reference[str(0.10)],
            "budget": {"tac_samples": len(pairs), "cka_samples": int(probe.shape[0]), "layers": len(ranking)},
        }
