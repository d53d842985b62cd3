"""I-BAU: unlearn the backdoor as a min-max problem: find the universal perturbation that most raises
the model's loss on clean data, then update the model through the implicit hypergradient of it.

Zeng, Chen, Park, Mao, Jin & Jia, "Adversarial Unlearning of Backdoors via Implicit Hypergradient",
ICLR 2022. Per round: (inner) one universal perturbation delta (1 x C x H x W) is fitted by SGD
(lr 10), one step per clean batch, maximising CE(f(x + delta), f(x)) - 0.001 * |delta|_2^2; (outer)
one Adam step per clean batch on H(delta, theta) = CE(f(x + delta on a random `outer_portion` of the
batch), y), with the implicit hypergradient dH/dtheta = dH/dtheta|_delta + (dPhi/dtheta)^T v, where
Phi(delta) = delta - 0.1 * grad_delta L_inner is the inner fixed-point map and v solves
v = (dPhi/ddelta)^T v + dH/ddelta by K fixed-point iterations (vector-Jacobian products through
torch.autograd.grad).
Defaults (BackdoorBench defense/i-bau.py, config/defense/i-bau/cifar10.yaml): Adam lr 1e-4 with
amsgrad (its optimizer factory sets amsgrad for Adam), no weight decay, n_rounds 5, K 5, batch 256,
training augmentation; inner SGD lr 10, regulariser 1e-3, fixed-point step 0.1, outer portion 0.01,
no norm bound (the L2 ball of radius 10 is commented out; `pert_l2_bound` re-enables one, in the
units of `space`). `space: normalized` (BackdoorBench): x is the normalised model input and delta is
added to it unclamped (the clamp to [0, 1] is commented out there), so an SGD step moves the input
by lr * dL/dinput; `space: pixel` adds delta to the [0, 1] image and clamps it before normalising
(the authors' code feeds unnormalised images; with CIFAR-10's std ~0.25 a pixel-space step is
~1/std^2 = 16x larger in normalised units). BN in evaluation mode throughout, as both codes do.
Deviations: the fixed-point map's inner loss uses the current batch (BackdoorBench always uses the
first batch); the outer loss perturbs at least one sample of a batch (BackdoorBench's
int(0.01 * n) is 0 below 100 images); batches are seeded.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.defenses._batches import Batches, defense_device, held_out_accuracy
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, PostTrainingDefense
from bdcore.defenses.registry import register_defense


class IBAUConfig(DefenseConfig):
    n_rounds: int = Field(5, ge=1)
    K: int = Field(5, ge=0)  # fixed-point iterations of the implicit hypergradient
    lr: float = Field(1e-4, gt=0)  # outer Adam
    batch_size: int = Field(256, ge=1)
    inner_lr: float = Field(10.0, gt=0)  # SGD on the universal perturbation
    inner_reg: float = Field(1e-3, ge=0)  # weight of |delta|_2^2 in the inner objective
    fp_step: float = Field(0.1, gt=0)  # step of the fixed-point map Phi
    outer_portion: float = Field(0.01, gt=0, le=1)  # share of each batch the outer loss perturbs
    pert_l2_bound: float | None = Field(None, gt=0)  # optional L2 ball for delta (in `space` units)
    augment: bool = True  # BackdoorBench loads the clean subset with training augmentation
    space: Literal["normalized", "pixel"] = "normalized"  # where delta lives (module docstring)
    amsgrad: bool = True  # BackdoorBench's Adam


def _perturbed_input(batches: Batches, images01: torch.Tensor, delta: torch.Tensor, space: str) -> torch.Tensor:
    """The model input of images01 carrying delta: added to the normalised input unclamped
    (BackdoorBench), or to the [0, 1] image, clamped, then normalised."""
    if space == "normalized":
        return batches.model_input(images01) + delta
    return batches.model_input((images01 + delta).clamp(0.0, 1.0))


@register_defense("i_bau")
class IBAU(PostTrainingDefense):
    config_class = IBAUConfig
    config: IBAUConfig
    holdout_fraction = 0.0  # selects nothing: fits on the whole clean subset, as BackdoorBench

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        device = defense_device(ctx)
        model.to(device).eval()
        val_before = held_out_accuracy(model, clean, ctx.info, device)
        batches = Batches(clean.train, ctx.info, device, cfg.batch_size, augment=cfg.augment, seed=cfg.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, amsgrad=cfg.amsgrad)
        generator = torch.Generator().manual_seed(cfg.seed)
        c, h, w = clean.train.images.shape[1:]

        history = []
        for _round in range(cfg.n_rounds):
            model.eval()
            delta, inner_loss = self._universal_perturbation(model, batches, (1, c, h, w), device)
            outer_sum = torch.zeros((), device=device)
            implicit_sq, direct_sq = torch.zeros((), device=device), torch.zeros((), device=device)
            steps = 0
            for images, labels in batches.epoch():
                grads, outer, direct_norm, implicit_norm = self._hypergradient(
                    model, params, batches, images, labels, delta, generator)
                optimizer.zero_grad(set_to_none=True)
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
                outer_sum += outer
                direct_sq += direct_norm
                implicit_sq += implicit_norm
                steps += 1
            history.append({
                "inner_loss": inner_loss,
                "outer_loss": float(outer_sum) / steps,
                "delta_l2": float(delta.norm()),
                "direct_grad_norm": float(direct_sq) / steps,
                "implicit_grad_norm": float(implicit_sq) / steps,
            })
        model.eval()
        diagnostics = {
            "rounds": cfg.n_rounds,
            "final_perturbation_l2": history[-1]["delta_l2"],
            "final_perturbation_linf": float(delta.abs().max()),
            "val_acc_before": val_before,
            "val_acc_after": held_out_accuracy(model, clean, ctx.info, device),
            "outer_loss_per_round": [r["outer_loss"] for r in history],
            "inner_loss_per_round": [r["inner_loss"] for r in history],
            "perturbation_l2_per_round": [r["delta_l2"] for r in history],
            # Mean norms of the hypergradient's two parts per round (the implicit one is I-BAU's).
            "direct_grad_norm_per_round": [r["direct_grad_norm"] for r in history],
            "implicit_grad_norm_per_round": [r["implicit_grad_norm"] for r in history],
        }
        return DefenseOutcome(model.to("cpu").eval(), diagnostics)

    def _universal_perturbation(self, model, batches: Batches, shape, device) -> tuple[torch.Tensor, float]:
        """One SGD step per clean batch on a shared delta, pushing predictions off the model's own labels."""
        cfg = self.config
        delta = torch.zeros(shape, device=device, requires_grad=True)
        opt = torch.optim.SGD([delta], lr=cfg.inner_lr)
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        total = torch.zeros((), device=device)
        steps = 0
        try:
            for images, _labels in batches.epoch():
                with torch.no_grad():
                    own = model(batches.model_input(images)).argmax(1)
                ce = F.cross_entropy(model(_perturbed_input(batches, images, delta, cfg.space)), own)
                loss = -ce + cfg.inner_reg * delta.pow(2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += ce.detach()
                steps += 1
        finally:
            for p, r in zip(model.parameters(), requires):
                p.requires_grad_(r)
        delta = delta.detach()
        if cfg.pert_l2_bound is not None:
            delta = delta * torch.clamp(cfg.pert_l2_bound / (delta.norm() + 1e-12), max=1.0)
        return delta, float(total) / max(steps, 1)

    def _hypergradient(self, model, params, batches: Batches, images, labels, delta, generator):
        """Implicit hypergradient of the outer loss through delta*(theta), by K fixed-point iterations."""
        cfg = self.config
        delta = delta.detach().requires_grad_(True)

        # Outer loss H(delta, theta): delta added to a random `outer_portion` of the batch.
        n = images.shape[0]
        k = max(1, int(n * cfg.outer_portion))
        chosen = torch.randperm(n, generator=generator)[:k].to(images.device)
        which = torch.zeros(n, 1, 1, 1, device=images.device)
        which[chosen] = 1.0
        outer = F.cross_entropy(model(_perturbed_input(batches, images, delta * which, cfg.space)), labels)
        grad_delta, *grad_direct = torch.autograd.grad(outer, [delta, *params], allow_unused=True)
        grad_direct = [torch.zeros_like(p) if g is None else g for g, p in zip(grad_direct, params)]

        # Fixed-point map of the inner problem: Phi(delta, theta) = delta - step * grad_delta L_inner.
        inner = -F.cross_entropy(model(_perturbed_input(batches, images, delta, cfg.space)), labels) \
            + cfg.inner_reg * delta.pow(2).sum()
        (g_inner,) = torch.autograd.grad(inner, delta, create_graph=True)
        mapped = delta - cfg.fp_step * g_inner

        # v = sum_k (dPhi/ddelta^T)^k dH/ddelta  (K terms of the Neumann series, as the fixed-point method)
        v = torch.zeros_like(delta)
        for _ in range(cfg.K):
            (jvp,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
            v = jvp + grad_delta
        implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
        implicit = [torch.zeros_like(p) if g is None else g for g, p in zip(implicit, params)]
        grads = [d + i for d, i in zip(grad_direct, implicit)]
        direct_norm = torch.sqrt(sum(g.pow(2).sum() for g in grad_direct))
        implicit_norm = torch.sqrt(sum(g.pow(2).sum() for g in implicit))
        return grads, outer.detach(), direct_norm.detach(), implicit_norm.detach()
