"""Backdoor existence coefficient (BEC): how much of the backdoored model's trigger response a defended
model still computes (Zhu et al., "Breaking the False Sense of Security in Backdoor Defense through
Re-Activation Attack", NeurIPS 2024, Sec. 3).

1. In the backdoored model, rank every feature layer's neurons by trigger-activated change (TAC):
   the mean size of the activation change between the poisoned and the clean version of the same
   input (per channel of a conv layer, per unit of a linear layer).
2. For the top 10% neurons (also 5% and 20%), linear CKA between the backdoored model's and the
   other model's activations of those neurons on the same 500 poisoned samples; mean over layers.
3. Min-max normalise: BEC = (CKA(defended) - CKA(clean)) / (CKA(backdoored) - CKA(clean)), so a clean
   model of the same training scores 0 and the backdoored model itself 1 (CKA with itself is 1).

Feature layers are the model's Conv2d layers; a model with fewer than two (a vision transformer,
e.g. a CLIP ViT behind bdcore.clip.ZeroShotClassifier) uses its Linear layers instead, with the
last axis as neurons. Layers that do not run on an image input (a CLIP text tower) are ignored.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from bdcore.data.augment import Normalizer
from bdcore.reactivation.base import Analysis, AnalysisConfig, AnalysisContext, register_analysis

TOP_SHARES = (0.05, 0.10, 0.20)


class BecConfig(AnalysisConfig):
    samples: int = Field(500, ge=2)  # poisoned samples the CKA is computed on
    batch_size: int = Field(250, ge=1)


def feature_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose neurons BEC ranks (see the module docstring)."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) >= 2:
        return convs
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def layer_activations(model: nn.Module, images: torch.Tensor, layers: list[str], info, device: torch.device,
                      batch_size: int = 250) -> dict[str, torch.Tensor]:
    """layer name -> N x neurons x rest activations (float32, CPU) of uint8 images; the neuron axis
    is moved to 1 (channels of a conv map, units of a linear output)."""
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = []
    for name in layers:
        def keep(_module, _inputs, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            if out.dim() != 4:  # linear units: neurons on the last axis, batch first
                out = out.reshape(out.shape[0], -1, out.shape[-1]).transpose(1, 2)
            captured[name].append(out.reshape(out.shape[0], out.shape[1], -1).float().cpu())
        hooks.append(modules[name].register_forward_hook(keep))
    model.eval().to(device)
    normalize = Normalizer(info, device)
    try:
        for start in range(0, images.shape[0], batch_size):
            model(normalize(images[start:start + batch_size].to(device)))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts) for name, parts in captured.items() if parts}


def trigger_activated_change(poisoned: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per neuron: mean over samples of the L2 norm of its activation change (N x K x rest -> K)."""
    return (poisoned - clean).norm(dim=2).mean(0)


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


def top_neurons(tac: torch.Tensor, share: float) -> torch.Tensor:
    return tac.argsort(descending=True)[: max(1, round(share * tac.numel()))]


def cka_by_share(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                 ranking: dict[str, torch.Tensor]) -> dict[float, float]:
    """Mean over layers of the CKA on each share of top-TAC neurons."""
    out = {}
    for share in TOP_SHARES:
        values = []
        for name, tac in ranking.items():
            keep = top_neurons(tac, share)
            values.append(linear_cka(reference[name][:, keep].flatten(1), other[name][:, keep].flatten(1)))
        out[share] = sum(values) / len(values)
    return out


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
        samples = ctx.fit.head(self.config.samples)
        if samples.clean is None:
            raise ValueError("bec needs the clean version of each poisoned sample (for TAC)")
        if len(samples) < 2:
            raise ValueError(f"bec needs at least 2 poisoned samples, got {len(samples)}")
        layers = feature_layers(ctx.backdoored)
        act = lambda model, images: layer_activations(model, images, layers, ctx.info, ctx.device,  # noqa: E731
                                                      self.config.batch_size)
        backdoored = act(ctx.backdoored, samples.triggered)
        clean_inputs = act(ctx.backdoored, samples.clean)
        ranking = {name: trigger_activated_change(backdoored[name], clean_inputs[name]) for name in backdoored}
        if not ranking:
            raise ValueError(f"bec found no feature layer that runs on images in {type(ctx.backdoored).__name__}")
        defended = cka_by_share(backdoored, act(ctx.defended, samples.triggered), ranking)
        reference = ctx.shared("clean", lambda: {str(k): v for k, v in cka_by_share(
            backdoored, act(ctx.clean_model(), samples.triggered), ranking).items()})
        scores = {share: normalised(defended[share], reference[str(share)]) for share in TOP_SHARES}
        return {
            "bec": scores[0.10], "bec_top5": scores[0.05], "bec_top20": scores[0.20],
            "cka_defended": defended[0.10], "cka_clean": reference[str(0.10)],
            "budget": {"samples": len(samples), "layers": len(ranking)},
        }
