"""ANP: backdoor neurons are the ones whose small adversarial perturbation collapses the model, so
learn per-neuron masks that stay accurate under such perturbations and prune the low-mask neurons.

Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021.

Neurons are BatchNorm2d channels. Each neuron's BN scale gets the coefficient (mask + delta) and
its shift (1 + xi), with delta, xi in [-eps, eps]; per batch, delta and xi start uniform in the box
and take `anp_steps` signed ascent steps of size eps / anp_steps on the clean loss, then the masks
take an SGD step on alpha * L(masks) + (1 - alpha) * L(masks, perturbed) and are clipped to [0, 1].
As in the reference code, the masks are learnt on a copy of the model in training mode (batch
statistics); the original model is then pruned (BN scale and shift and the feeding conv filter
zeroed, see _neurons.py).

Defaults (REFERENCE.md / BackdoorBench): 2000 iterations, batch 128, eps 0.4, one perturbation
step, alpha 0.2, mask SGD lr 0.2 momentum 0.9, masks start at 1; pruning by mask threshold swept
0.05, 0.10, ..., 0.90; clean_fraction 0.05.

Deviation (selection): BackdoorBench picks the threshold with the lowest TEST attack success rate,
which reads the test set and the trigger. Here the threshold is chosen on the defender's held-out
clean part only: the largest threshold of the sweep whose held-out accuracy is at least the
unpruned model's held-out accuracy minus `max_val_acc_drop` (default 0.02); when none qualifies,
nothing is pruned. A fixed `threshold` (the paper's own experiments use 0.2) skips the selection.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.defenses._batches import Batches, defense_device, held_out_accuracy
from bdcore.defenses._neurons import SoftMasks, Unit, require_batchnorm, total_channels
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, PostTrainingDefense
from bdcore.defenses.registry import register_defense


class ANPConfig(DefenseConfig):
    iterations: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    eps: float = Field(0.4, ge=0)  # neuron perturbation budget
    anp_steps: int = Field(1, ge=1)
    alpha: float = Field(0.2, ge=0, le=1)  # weight of the unperturbed loss
    mask_lr: float = Field(0.2, gt=0)
    mask_momentum: float = Field(0.9, ge=0)
    augment: bool = True
    pruning_max: float = Field(0.90, gt=0, le=1)
    pruning_step: float = Field(0.05, gt=0, le=1)
    threshold: float | None = Field(None, ge=0, le=1)  # fixed threshold instead of held-out selection
    max_val_acc_drop: float = Field(0.02, ge=0, le=1)


def threshold_grid(step: float, maximum: float) -> list[float]:
    count = int(round(maximum / step))
    return [round(step * i, 6) for i in range(1, count + 1)]


def prune_by_threshold_on_val(model, units: list[Unit], mask_values: list[torch.Tensor], clean, info, device,
                              thresholds: list[float], max_drop: float, fixed: float | None) -> dict:
    """Prune `model`'s neurons whose mask is below a threshold chosen on the held-out clean data:
    the largest of `thresholds` keeping held-out accuracy >= unpruned - `max_drop` (or `fixed`).
    Leaves `model` pruned at the chosen threshold; returns the diagnostics of the sweep."""
    masks = SoftMasks(units)
    with torch.no_grad():
        for mine, learnt in zip(masks.masks, mask_values):
            mine.copy_(learnt.to(mine.device))
    original = copy.deepcopy(model.state_dict())
    model.eval()
    val_before = held_out_accuracy(model, clean, info, device)
    val_by_threshold: list[float] = []
    pruned_by_threshold: list[int] = []
    if fixed is None:
        for t in thresholds:  # pruning sets grow with the threshold: prune incrementally
            pruned_by_threshold.append(masks.prune_below(t))
            val_by_threshold.append(held_out_accuracy(model, clean, info, device))
        qualifying = [t for t, acc in zip(thresholds, val_by_threshold) if acc >= val_before - max_drop - 1e-9]
        chosen = max(qualifying) if qualifying else 0.0
        model.load_state_dict(original)
    else:
        chosen = fixed
    pruned = masks.prune_below(chosen) if chosen > 0 else 0
    total = total_channels(units)
    return {
        "threshold": float(chosen),
        "threshold_selected_on": "fixed" if fixed is not None else "held_out_accuracy",
        "thresholds": [float(t) for t in (thresholds if fixed is None else [])],
        "val_acc_by_threshold": [float(a) for a in val_by_threshold],
        "pruned_by_threshold": [int(n) for n in pruned_by_threshold],
        "pruned_count": int(pruned),
        "pruned_fraction": float(pruned / total) if total else 0.0,
        "total_neurons": int(total),
        "val_acc_before": float(val_before),
        "val_acc_after": float(held_out_accuracy(model, clean, info, device)),
        "mask_mean": float(torch.cat([m.flatten() for m in mask_values]).mean()),
    }


class _NeuronPerturbation:
    """Masks and multiplicative noise on BN scale/shift via forward hooks: with BN output
    y = g * xhat + b, the hooked output is (mask + delta) * (y - b) + (1 + xi) * b."""

    def __init__(self, units: list[Unit], masks: SoftMasks):
        self.units = units
        self.masks = masks
        self.delta = [torch.zeros_like(m, requires_grad=True) for m in masks.masks]
        self.xi = [torch.zeros_like(m, requires_grad=True) for m in masks.masks]
        self.perturb = False
        self.handles = [u.norm.register_forward_hook(self._hook(i)) for i, u in enumerate(units)]

    def _hook(self, i: int):
        norm, mask = self.units[i].norm, self.masks.masks[i]

        def hook(_module, _inp, out):
            shift = norm.bias.detach().view(1, -1, 1, 1) if norm.bias is not None else torch.zeros_like(out)
            if self.perturb:
                scale, shift_coef = mask + self.delta[i], 1 + self.xi[i]
                return scale.view(1, -1, 1, 1) * (out - shift) + shift_coef.view(1, -1, 1, 1) * shift
            return mask.view(1, -1, 1, 1) * (out - shift) + shift

        return hook

    def noise(self) -> list[torch.Tensor]:
        return self.delta + self.xi

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _learn_anp_masks(model, units: list[Unit], batches: Batches, cfg: ANPConfig, generator: torch.Generator):
    masks = SoftMasks(units)
    perturbation = _NeuronPerturbation(units, masks)
    optimizer = torch.optim.SGD(masks.parameters(), lr=cfg.mask_lr, momentum=cfg.mask_momentum)
    step_size = cfg.eps / cfg.anp_steps
    stream = batches.forever()
    loss_sum = torch.zeros(())
    model.train()
    try:
        for _ in range(cfg.iterations):
            x01, y = next(stream)
            x = batches.model_input(x01)
            if cfg.eps > 0:
                with torch.no_grad():
                    for n in perturbation.noise():
                        n.copy_(torch.rand(n.shape, generator=generator).to(n.device) * 2 * cfg.eps - cfg.eps)
                perturbation.perturb = True
                for _ in range(cfg.anp_steps):
                    loss = F.cross_entropy(model(x), y)
                    grads = torch.autograd.grad(loss, perturbation.noise())
                    with torch.no_grad():
                        for n, g in zip(perturbation.noise(), grads):
                            n.add_(step_size * g.sign()).clamp_(-cfg.eps, cfg.eps)
                loss_rob = F.cross_entropy(model(x), y)
            else:
                loss_rob = torch.zeros((), device=x.device)
            perturbation.perturb = False
            loss_nat = F.cross_entropy(model(x), y)
            loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            masks.clamp_()
            loss_sum = loss_sum + loss.detach().cpu()
    finally:
        perturbation.remove()
        model.eval()
    return [m.detach().clone() for m in masks.masks], float(loss_sum) / cfg.iterations, float(loss_nat.detach()), \
        float(loss_rob.detach())


@register_defense("anp")
class AdversarialNeuronPruning(PostTrainingDefense):
    config_class = ANPConfig
    config: ANPConfig

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        device = defense_device(ctx)
        model.to(device).eval()
        batches = Batches(clean.train, ctx.info, device, cfg.batch_size, augment=cfg.augment, seed=cfg.seed)
        example = batches.model_input(clean.train.images[:1].to(device).float() / 255.0)
        units = require_batchnorm(model, "anp", example)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        learner = copy.deepcopy(model)
        learner.requires_grad_(False)
        learner_units = require_batchnorm(learner, "anp", example)
        mask_values, mean_loss, last_nat, last_rob = _learn_anp_masks(learner, learner_units, batches, cfg, generator)
        del learner
        diagnostics = prune_by_threshold_on_val(
            model, units, mask_values, clean, ctx.info, device, threshold_grid(cfg.pruning_step, cfg.pruning_max),
            cfg.max_val_acc_drop, cfg.threshold)
        diagnostics.update({"iterations": cfg.iterations, "mean_mask_loss": mean_loss,
                            "final_loss_natural": last_nat, "final_loss_perturbed": last_rob,
                            "masks_below_0.2": int(sum(int((m < 0.2).sum()) for m in mask_values))})
        return DefenseOutcome(model.to("cpu").eval(), diagnostics)
