"""Query-based (black-box) re-activation: a universal perturbation found by Square Attack from output
scores alone (Zhu et al., "Breaking the False Sense of Security in Backdoor Defense through
Re-Activation Attack", NeurIPS 2024, Sec. 4.2; Andriushchenko et al., "Square Attack", ECCV 2020).

Linf Square Attack, made universal: start from vertical stripes of +-eps, then repeatedly propose
setting one random square window (side sqrt(p x H x W), p from 0.1 halved on the paper's schedule)
to a random +-eps per channel, and keep the proposal when the re-activation loss over the batch of
poisoned samples (up to 500, fixed) goes down. Only the model's output scores are read.

A query is one perturbation scored on the batch (the first one included); `queries_used` never exceeds
`queries`. Only the Linf version is implemented (the paper's setting).
"""
from __future__ import annotations

import math
from typing import Any, Literal

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
    perturbed_asr,
    perturbed_inputs,
    reactivation_loss,
    register_analysis,
)

# Square Attack halves p at these iterations of a 10,000-iteration run (rescaled to other budgets).
_P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


class SquareConfig(BudgetConfig):
    norm: Literal["linf"] = "linf"
    queries: int = Field(10_000, ge=1)
    p_init: float = Field(0.1, gt=0, le=1)
    batch_size: int = Field(500, ge=1)  # poisoned samples every query is scored on


def square_share(p_init: float, iteration: int, budget: int) -> float:
    scaled = int(iteration / budget * 10_000)
    return p_init / 2 ** sum(scaled > mark for mark in _P_SCHEDULE)


class ScoreOracle:
    """The black box: loss of a perturbation from the model's scores, counting every query."""

    def __init__(self, model: nn.Module, samples: PoisonedSamples, info: DatasetInfo, device: torch.device, budget: int):
        self.model = model.eval().to(device)
        self.images = samples.triggered.to(device)
        self.targets = samples.target_labels.to(device)
        self.normalize = Normalizer(info, device)
        self.budget = budget
        self.used = 0

    @property
    def exhausted(self) -> bool:
        return self.used >= self.budget

    @torch.no_grad()
    def loss(self, delta: torch.Tensor) -> float:
        if self.exhausted:
            raise RuntimeError(f"query budget of {self.budget} spent")
        self.used += 1
        return float(reactivation_loss(self.model(perturbed_inputs(self.images, delta, self.normalize)), self.targets))


def square_uap(oracle: ScoreOracle, shape: tuple[int, int, int], eps: float, p_init: float,
               generator: torch.Generator, device: torch.device) -> torch.Tensor:
    channels, height, width = shape
    signs = lambda *size: (torch.randint(0, 2, size, generator=generator) * 2 - 1).float()  # noqa: E731
    delta = (eps * signs(channels, 1, width)).expand(channels, height, width).clone().to(device)
    best = oracle.loss(delta)
    iteration = 0
    while not oracle.exhausted:
        share = square_share(p_init, iteration, oracle.budget)
        side = max(1, min(height, width, round(math.sqrt(share * height * width))))
        top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        candidate = delta.clone()
        candidate[:, top:top + side, left:left + side] = (eps * signs(channels, 1, 1)).to(device)
        if torch.equal(candidate, delta):  # the proposal changes nothing: do not spend a query on it
            iteration += 1
            continue
        loss = oracle.loss(candidate)
        if loss < best:
            best, delta = loss, candidate
        iteration += 1
    return delta


@register_analysis("reactivate_query")
class QueryReactivation(Analysis):
    """ASR of triggered test inputs plus a Square Attack universal perturbation (scores only), with
    the queries it used; the same budget on the clean reference and the undefended model as controls."""

    config_class = SquareConfig

    def reactivated(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        samples = ctx.fit.head(min(self.config.samples, self.config.batch_size))
        oracle = ScoreOracle(model, samples, ctx.info, ctx.device, self.config.queries)
        generator = torch.Generator().manual_seed(self.config.seed)
        delta = square_uap(oracle, tuple(samples.triggered.shape[1:]), self.config.eps, self.config.p_init,
                           generator, ctx.device)
        return {"asr": perturbed_asr(model, ctx.evaluate, delta, ctx.info, ctx.device), "queries": oracle.used}

    def run(self, ctx: AnalysisContext) -> dict[str, Any]:
        mine = self.reactivated(ctx.defended, ctx)
        out: dict[str, Any] = {"asr_reactivated_query": mine["asr"], "queries_used": mine["queries"]}
        out["asr_reactivated_query_undefended"] = ctx.shared(
            "undefended", lambda: self.reactivated(ctx.backdoored, ctx))["asr"]
        if ctx.clean_model is not None:
            out["asr_reactivated_query_clean"] = ctx.shared(
                "clean", lambda: self.reactivated(ctx.clean_model(), ctx))["asr"]
        out["budget"] = {"norm": "linf", "eps": self.config.eps, "queries": self.config.queries,
                         "samples": min(self.config.samples, self.config.batch_size, len(ctx.fit))}
        return out
