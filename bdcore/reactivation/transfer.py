"""Transfer-based re-activation: a universal perturbation optimised on *other* defended models of the
same backdoored model (surrogates) and applied to a held-out defended model that the attacker never
queries (Zhu et al., "Breaking the False Sense of Security in Backdoor Defense through Re-Activation
Attack", NeurIPS 2024, Sec. 4.3).

The surrogates' losses are combined by averaging, by taking one surrogate per step in turn
(step-wise), or by averaging with gradient momentum 0.9 (as MI-FGSM); 100 outer steps (paper), 5
inner steps each, with the white-box attack's step rule. The transferred perturbation is also applied
to the clean reference model as a control.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from bdcore.reactivation.base import Analysis, AnalysisContext, NotApplicable, perturbed_asr, register_analysis
from bdcore.reactivation.whitebox import UapConfig, budget_of, optimise_uap


class TransferConfig(UapConfig):
    outer_steps: int = Field(100, ge=1)
    combine: Literal["average", "stepwise", "momentum"] = "average"
    momentum: float = Field(0.9, ge=0, lt=1)


class NoSurrogates(NotApplicable):
    """No other defended model of the same attack cell exists to craft the perturbation on."""


@register_analysis("reactivate_transfer")
class TransferReactivation(Analysis):
    """ASR of triggered test inputs plus a perturbation crafted on surrogate defended models only."""

    config_class = TransferConfig
    needs_surrogates = True

    def run(self, ctx: AnalysisContext) -> dict[str, Any]:
        surrogates = ctx.surrogates() if ctx.surrogates is not None else []
        if not surrogates:
            raise NoSurrogates("reactivate_transfer needs at least one other finished defense of the same attack cell")
        delta = optimise_uap(surrogates, ctx.fit.head(self.config.samples), ctx.info, self.config, ctx.device,
                             combine=self.config.combine, momentum=self.config.momentum)
        out: dict[str, Any] = {
            "asr_reactivated_transfer": perturbed_asr(ctx.defended, ctx.evaluate, delta, ctx.info, ctx.device),
            "asr_reactivated_transfer_undefended": perturbed_asr(ctx.backdoored, ctx.evaluate, delta, ctx.info,
                                                                 ctx.device),
        }
        if ctx.clean_model is not None:
            out["asr_reactivated_transfer_clean"] = perturbed_asr(ctx.clean_model(), ctx.evaluate, delta, ctx.info,
                                                                  ctx.device)
        out["budget"] = {**budget_of(self.config), "combine": self.config.combine, "surrogates": len(surrogates)}
        return out
