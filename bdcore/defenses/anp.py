"""ANP: backdoor neurons are the ones whose small adversarial perturbation collapses the model, so
learn per-neuron masks that stay accurate under such perturbations and prune the low-mask neurons.

Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021.

Neurons are BatchNorm2d channels. As BackdoorBench's NoisyBatchNorm2d, each neuron's BN scale gets
the coefficient (mask + delta) and its shift (1 + xi); per batch, delta and xi start uniform in
[-eps, eps] and take `anp_steps` signed ascent steps of size eps / anp_steps on the clean loss (not
clipped back into the box, as in both BackdoorBench and the authors' code; `clip_noise` clips),
then the masks take an SGD step on alpha * L(masks) + (1 - alpha) * L(masks, perturbed) and are
clipped to [0, 1]. The masks are learnt on a copy of the model in training mode (batch statistics).
Pruning, as the reference's `pruning`, sets only the BN scale (weight) of a neuron whose mask is
<= the threshold to 0 (its BN shift and conv filter stay); the result is a plain state dict.

Defaults (BackdoorBench config/defense/anp/*.yaml and defense/anp.py): 2000 iterations, batch 256,
eps 0.4, one perturbation step, alpha 0.2, mask SGD lr 0.01 (the yaml's `lr`) momentum 0.9, masks
start at 1; clean_fraction 0.05; pruning_by threshold over 0, 0.05, ..., 0.90 (pruning_max 0.90,
pruning_step 0.05), acc_ratio 0.1. The authors' code uses batch 128 and mask lr 0.2.

Deviations:
- Selection: BackdoorBench keeps, among the thresholds whose TEST accuracy is within acc_ratio
  (relative) of the unpruned model's, the one with the lowest TEST attack success rate: it reads
  the test set and the trigger. Here the threshold is the largest of the sweep whose accuracy on
  the defender's held-out clean part drops by less than `acc_ratio` relative to the unpruned
  model's (a rise is no drop); when none qualifies nothing is pruned (threshold None). A fixed
  `threshold` (the paper's own experiments use 0.2) skips the selection.
- pruning_by "number" (prune the k lowest masks) is not offered; both configs use "threshold".
- Batches are epochs of the clean part without replacement (the reference samples with
  replacement).
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
    iterations: int = Field(2000, ge=1)  # nb_iter
    batch_size: int = Field(256, ge=1)  # BackdoorBench config (the authors' code: 128)
    eps: float = Field(0.4, ge=0)  # neuron perturbation budget (anp_eps)
    anp_steps: int = Field(1, ge=1)
    alpha: float = Field(0.2, ge=0, le=1)  # weight of the unperturbed loss (anp_alpha)
    mask_lr: float = Field(0.01, gt=0)  # BackdoorBench config `lr` (the authors' code: 0.2)
    mask_momentum: float = Field(0.9, ge=0)
    clip_noise: bool = False  # keep the perturbation in [-eps, eps] (the paper's box; neither code does)
    augment: bool = True
    pruning_max: float = Field(0.90, gt=0, le=1)
    pruning_step: float = Field(0.05, gt=0, le=1)
    threshold: float | None = Field(None, ge=0, le=1)  # fixed threshold instead of held-out selection
    acc_ratio: float = Field(0.1, gt=0, le=1)  # tolerated held-out accuracy drop, relative


def threshold_grid(step: float, maximum: float) -> list[float]:
    """The reference's sweep 0, step, ..., maximum (threshold 0 prunes masks that reached 0)."""
    count = int(round(maximum / step))
    return [round(step * i, 6) for i in range(0, count + 1)]


def relative_drop(before: float, after: float) -> float:
    """Held-out accuracy lost by pruning, relative to the unpruned model's (the reference's
    acc_ratio measure; a rise counts as no drop)."""
    return (before - after) / before if before > 0 else 0.0


def select_threshold(thresholds: list[float], val_accs: list[float], val_before: float,
                     acc_ratio: float) -> float | None:
    """The largest threshold whose relative held-out drop is below `acc_ratio` (strict, as the
    reference's `< acc_ratio`; 1e-9 absorbs float error at the boundary); None if none is."""
    ok = [t for t, acc in zip(thresholds, val_accs) if relative_drop(val_before, acc) < acc_ratio - 1e-9]
    return max(ok) if ok else None


def prune_by_threshold_on_val(model, units: list[Unit], mask_values: list[torch.Tensor], clean, info, device,
                              thresholds: list[float], acc_ratio: float, fixed: float | None) -> dict:
    """Prune `model`'s neurons whose mask is <= a threshold chosen on the held-out clean data (the
    largest of `thresholds` within `acc_ratio`, see select_threshold) or `fixed`. Pruning zeroes
    the BN scale only, as the reference. Leaves `model` pruned; returns the sweep's diagnostics."""
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
            pruned_by_threshold.append(masks.zero_scale_at_most(t))
            val_by_threshold.append(held_out_accuracy(model, clean, info, device))
        chosen = select_threshold(thresholds, val_by_threshold, val_before, acc_ratio)
        model.load_state_dict(original)
    else:
        chosen = fixed
    pruned = masks.zero_scale_at_most(chosen) if chosen is not None else 0
    total = total_channels(units)
    return {
        "threshold": None if chosen is None else float(chosen),  # None: nothing qualified, nothing pruned
        "threshold_selected_on": "fixed" if fixed is not None else "held_out_accuracy",
        "selection_rule": "largest threshold with held-out (before - after) / before < acc_ratio",
        "acc_ratio": float(acc_ratio),
        "thresholds": [float(t) for t in (thresholds if fixed is None else [])],
        "val_acc_by_threshold": [float(a) for a in val_by_threshold],
        "val_rel_drop_by_threshold": [float(relative_drop(val_before, a)) for a in val_by_threshold],
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


def _adversarial_noise(model, x, y, perturbation: _NeuronPerturbation, cfg: ANPConfig,
                       generator: torch.Generator) -> None:
    """Set the neuron noise for this batch as the reference does: uniform in [-eps, eps], then
    `anp_steps` signed ascent steps of eps / anp_steps on the clean loss. Like BackdoorBench and
    the authors' code, the result is not clipped back into the box (it can reach 2 eps) unless
    `clip_noise`."""
    step_size = cfg.eps / cfg.anp_steps
    with torch.no_grad():
        for n in perturbation.noise():
            n.copy_(torch.rand(n.shape, generator=generator).to(n.device) * 2 * cfg.eps - cfg.eps)
    perturbation.perturb = True
    for _ in range(cfg.anp_steps):
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, perturbation.noise())
        with torch.no_grad():
            for n, g in zip(perturbation.noise(), grads):
                n.add_(step_size * g.sign())
                if cfg.clip_noise:
                    n.clamp_(-cfg.eps, cfg.eps)


def _learn_anp_masks(model, units: list[Unit], batches: Batches, cfg: ANPConfig, generator: torch.Generator):
    masks = SoftMasks(units)
    perturbation = _NeuronPerturbation(units, masks)
    optimizer = torch.optim.SGD(masks.parameters(), lr=cfg.mask_lr, momentum=cfg.mask_momentum)
    stream = batches.forever()
    loss_sum = torch.zeros(())
    model.train()
    try:
        for _ in range(cfg.iterations):
            x01, y = next(stream)
            x = batches.model_input(x01)
            if cfg.eps > 0:
                _adversarial_noise(model, x, y, perturbation, cfg, generator)
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
            cfg.acc_ratio, cfg.threshold)
        diagnostics.update({"iterations": cfg.iterations, "mean_mask_loss": mean_loss,
                            "final_loss_natural": last_nat, "final_loss_perturbed": last_rob,
                            "masks_below_0.2": int(sum(int((m < 0.2).sum()) for m in mask_values))})
        return DefenseOutcome(model.to("cpu").eval(), diagnostics)
