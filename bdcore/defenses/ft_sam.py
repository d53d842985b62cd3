"""FT-SAM: fine-tune the backdoored model on clean data with (adaptive) sharpness-aware minimisation, whose
weight perturbation pushes the large-norm neurons that carry the backdoor away from the backdoored solution.

Zhu, Wei, Zhu, Ye, Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization",
ICCV 2023. ASAM: Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
Learning of Deep Neural Networks", ICML 2021.

Defaults (REFERENCE.md): adaptive SAM over all weights, rho 2.0, label smoothing 0.1, 100 epochs, SGD lr
0.01 cosine, momentum 0.9, weight decay 5e-4, batch 256, training augmentation, 5% clean data.
Each step: g = grad L(w) on the batch; e = rho * T^2 g / ||T g|| with T = |w| + eta (adaptive; T = 1 for
plain SAM); the optimiser then steps w with grad L(w + e) (e held fixed), i.e. the SAM update. The
perturbed loss is evaluated with torch.func.functional_call on {w + e.detach()}, so its backward gives the
gradient at w + e with respect to w. BN running statistics are updated by the first (unperturbed) pass
only; the perturbed pass uses batch statistics without recording them.
eta is 0 by default (perturbation scaled by |w|, as REFERENCE states); ASAM's paper uses eta = 0.01.
Under CUDA AMP the first gradient is taken of a scaled loss (e does not depend on the scale) and a
non-finite gradient norm gives e = 0 for that step.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from bdcore.defenses._batches import defense_device, fine_tune, held_out_accuracy
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, PostTrainingDefense
from bdcore.defenses.registry import register_defense
from bdcore.train.loop import StepContext, to_model_input

_GRAD_SCALE = 1024.0  # keeps fp16 gradients of the first pass out of underflow; e is scale-free


class FTSAMConfig(DefenseConfig):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    rho: float = Field(2.0, ge=0)
    adaptive: bool = True
    eta: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)


@contextmanager
def frozen_bn_statistics(model: nn.Module):
    """BN layers in training mode normalise with batch statistics but do not update running ones."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class SAMStep:
    """A train_model step returning the loss at the (A)SAM-perturbed weights."""

    def __init__(self, rho: float, adaptive: bool, eta: float):
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.clean_loss_sum, self.batches, self.epoch = None, 0, -1

    def __call__(self, images, labels, indices, ctx: StepContext) -> torch.Tensor:
        model = ctx.model
        smoothing = ctx.config.label_smoothing
        x = to_model_input(images, ctx)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        loss = F.cross_entropy(model(x), labels, label_smoothing=smoothing)
        grads = torch.autograd.grad(loss * _GRAD_SCALE, params, allow_unused=True)
        with torch.no_grad():
            grads = [torch.zeros_like(p) if g is None else g.float() for p, g in zip(params, grads)]
            scales = [p.detach().float().abs() + self.eta if self.adaptive else None for p in params]
            scaled = [g if s is None else g * s for g, s in zip(grads, scales)]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
            factor = torch.where(torch.isfinite(norm), self.rho / (norm + 1e-12), torch.zeros_like(norm))
            perturb = [torch.nan_to_num(g if s is None else g * s * s) * factor for g, s in zip(grads, scales)]
        perturbed = {n: p + e.to(p.dtype) for (n, p), e in zip(named, perturb)}
        with frozen_bn_statistics(model):
            logits = functional_call(model, perturbed, (x,))
        if ctx.epoch != self.epoch:
            self.epoch, self.clean_loss_sum, self.batches = ctx.epoch, torch.zeros((), device=x.device), 0
        self.clean_loss_sum += loss.detach().float()
        self.batches += 1
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)

    def mean_clean_loss(self) -> float | None:
        return float(self.clean_loss_sum) / self.batches if self.batches else None


@register_defense("ft_sam")
class FineTuningSAM(PostTrainingDefense):
    config_class = FTSAMConfig
    config: FTSAMConfig
    holdout_fraction = 0.0  # selects nothing: fits on the whole clean subset, as BackdoorBench

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        device = defense_device(ctx)
        val_before = held_out_accuracy(model, clean, ctx.info, device)
        step = SAMStep(cfg.rho, cfg.adaptive, cfg.eta)
        history = fine_tune(model, clean.train, ctx, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                            seed=cfg.seed, stage="ft_sam", schedule=cfg.schedule, step=step,
                            momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                            label_smoothing=cfg.label_smoothing)
        val_after = held_out_accuracy(model, clean, ctx.info, device)
        return DefenseOutcome(model.to("cpu").eval(), {
            "rho": float(cfg.rho),
            "adaptive": bool(cfg.adaptive),
            "epochs": int(cfg.epochs),
            "val_acc_before": float(val_before),
            "val_acc_after": float(val_after),
            "final_sam_loss": float(history[-1]["train_loss"]) if history else None,  # loss at w + e
            "final_clean_loss": step.mean_clean_loss(),  # loss at w, last epoch run in this process
        })
