"""White-box re-activation: one universal perturbation, optimised with the defended model's gradients,
added to already-triggered inputs (Zhu et al., "Breaking the False Sense of Security in Backdoor
Defense through Re-Activation Attack", NeurIPS 2024, Sec. 4.1; code: github.com/JulieCarlon/
Backdoor-Reactivation-Attack, reattack/wb_attack.py).

A perturbation this small (Linf 0.05) rarely turns a clean model's inputs into the target class; when
it does turn a *defended* model's triggered inputs, the backdoor was dormant, not removed. The same
budget is therefore also spent on a clean model of the same training and on the undefended model,
and all three ASRs are reported.

Optimisation, as the paper's code: 1,000 poisoned training samples, random start; each of the 50
outer steps sweeps them once in a fresh random order, in batches of 128 (the incomplete last batch
is dropped, as its loader's drop_last: 7 batches, 896 samples per outer step), and makes 5 inner
steps on each batch before the next: 50 x 7 x 5 = 1,750 steps. The transfer attack
(bdcore.reactivation.transfer) uses the same loop.

Deviation: the paper's code runs plain SGD (lr 0.05) on the raw pixel gradient, which here is ~1e-3,
so the perturbation would hardly move; each step here moves `lr x eps` along the normalised gradient
(its sign for Linf, its unit-L2 direction for L2) and projects back into the budget.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field
from torch import nn

from bdcore.data.augment import Normalizer
from bdcore.data.base import DatasetInfo
from bdcore.reactivation.base import (
    Analysis,
    AnalysisContext,
    BudgetConfig,
    PoisonedSamples,
    frozen,
    perturbed_asr,
    perturbed_inputs,
    project,
    random_start,
    reactivation_loss,
    register_analysis,
)


class UapConfig(BudgetConfig):
    outer_steps: int = Field(50, ge=1)
    inner_steps: int = Field(5, ge=1)
    lr: float = Field(0.05, gt=0)  # step size as a share of eps (see the module docstring)
    batch_size: int = Field(128, ge=1)  # at most the number of samples
    drop_last: bool = True  # skip each outer step's incomplete last batch, as the paper's loader


def normalised_gradient(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / grad.norm().clamp_min(1e-12)


def optimise_uap(models: Sequence[nn.Module], samples: PoisonedSamples, info: DatasetInfo, config: UapConfig,
                 device: torch.device, combine: Literal["average", "stepwise", "momentum"] = "average",
                 momentum: float = 0.9) -> torch.Tensor:
    """A C x H x W perturbation (pixel scale) that pushes the triggered samples to their target labels
    on `models`: their mean loss (`average`), one model per step in turn (`stepwise`), or the mean
    loss with gradient momentum (`momentum`, as MI-FGSM accumulates L1-normalised gradients)."""
    if not models:
        raise ValueError("optimise_uap needs at least one model")
    if len(samples) == 0:
        raise ValueError("optimise_uap needs at least one poisoned sample")
    models = [frozen(m, device) for m in models]
    generator = torch.Generator().manual_seed(config.seed)
    delta = random_start(tuple(samples.triggered.shape[1:]), config.norm, config.eps, generator).to(device)
    normalize = Normalizer(info, device)
    step = config.lr * config.eps
    velocity = torch.zeros_like(delta)
    turn = 0
    for _outer in range(config.outer_steps):
        for batch in outer_batches(len(samples), config, generator):
            images = samples.triggered[batch].to(device)
            targets = samples.target_labels[batch].to(device)
            for _inner in range(config.inner_steps):
                delta.requires_grad_(True)
                chosen = [models[turn % len(models)]] if combine == "stepwise" else models
                turn += 1
                x = perturbed_inputs(images, delta, normalize)
                loss = sum(reactivation_loss(m(x), targets) for m in chosen) / len(chosen)
                (grad,) = torch.autograd.grad(loss, delta)
                if combine == "momentum":
                    velocity = momentum * velocity + grad / grad.abs().sum().clamp_min(1e-12)
                    grad = velocity
                with torch.no_grad():
                    delta = project(delta - step * normalised_gradient(grad, config.norm), config.norm, config.eps)
    return delta.detach()


def batches_per_outer_step(n: int, config: UapConfig) -> int:
    size = max(1, min(config.batch_size, n))
    return n // size if config.drop_last else -(-n // size)


def outer_batches(n: int, config: UapConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """One outer step's batches: the n samples in a fresh random order, in batches of
    min(batch_size, n), the incomplete last one dropped if `drop_last`."""
    order = torch.randperm(n, generator=generator)
    size = min(config.batch_size, n)
    return [order[i * size:(i + 1) * size] for i in range(batches_per_outer_step(n, config))]


def budget_of(config: UapConfig, samples: int | None = None) -> dict[str, Any]:
    """The budget spent on `samples` poisoned samples (default: config.samples); steps are
    outer x batches per outer step x inner."""
    n = config.samples if samples is None else samples
    return {"norm": config.norm, "eps": config.eps,
            "steps": config.outer_steps * batches_per_outer_step(n, config) * config.inner_steps, "samples": n}


@register_analysis("reactivate_wb")
class WhiteBoxReactivation(Analysis):
    """ASR of triggered test inputs plus a universal perturbation optimised on the defended model's
    gradients; the same budget on the clean reference and on the undefended model as controls."""

    config_class = UapConfig

    def reactivated_asr(self, model: nn.Module, ctx: AnalysisContext) -> float:
        delta = optimise_uap([model], ctx.fit.head(self.config.samples), ctx.info, self.config, ctx.device)
        return perturbed_asr(model, ctx.evaluate, delta, ctx.info, ctx.device)

    def run(self, ctx: AnalysisContext) -> dict[str, Any]:
        out: dict[str, Any] = {"asr_reactivated_wb": self.reactivated_asr(ctx.defended, ctx)}
        out["asr_reactivated_wb_undefended"] = ctx.shared(
            "undefended", lambda: {"asr": self.reactivated_asr(ctx.backdoored, ctx)})["asr"]
        if ctx.clean_model is not None:
            out["asr_reactivated_wb_clean"] = ctx.shared(
                "clean", lambda: {"asr": self.reactivated_asr(ctx.clean_model(), ctx)})["asr"]
        out["budget"] = budget_of(self.config, len(ctx.fit.head(self.config.samples)))
        return out
