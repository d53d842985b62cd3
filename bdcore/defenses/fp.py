"""FP (Fine-Pruning): backdoor behaviour hides in features that clean inputs leave dormant; prune the
least active features entering the classifier, then fine-tune on clean data.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018, in BackdoorBench's form (Wu et al., NeurIPS 2022 Datasets & Benchmarks,
`defense/fp.py`). The pruned layer is the classifier's input: the first nn.Linear of the model's last
child (`linear` of preactresnet18, `fc` of resnet18, `classifier.0` of vgg19_bn, `classifier.2` of
convnext_tiny, `heads.head` of vit_b_16), i.e. the pooled features after the last residual add. Each
feature's activation is its mean over the defender's clean fitting data (`clean.train`, with training
augmentation, as BackdoorBench's loader); features are pruned least active first, in steps of 1% of
them, by zeroing their columns of that Linear's weight, so a pruned feature is exactly zero at the
classifier's input. The last level whose held-out clean accuracy (`clean.val`) is within a 10%
relative change of the unpruned model's is kept, and the model is fine-tuned on `clean.train` with
those columns held at zero.

Defaults (BackdoorBench `config/defense/fp/cifar10.yaml`): once_prune_ratio 0.01, acc_ratio 0.1,
fine-tune 100 epochs, batch 256, SGD lr 0.01 cosine, momentum 0.9, weight decay 5e-4, clean 5%.
Deviations, each for a reason:
- the stopping rule reads the defender's held-out 20% of its clean subset, never the test set
  (BackdoorBench stops on test accuracy);
- the kept level is the last one within the budget, with exactly k features pruned at level k.
  BackdoorBench's code prunes k - 1 features at level k, and its "last good" network is the same
  object it keeps pruning, so it fine-tunes the first level beyond the budget (one step more).
Parity figures against BackdoorBench's own fp: docs/methods.md#fp.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from bdcore.defenses._batches import Batches, defense_device, fine_tune, held_out_accuracy
from bdcore.defenses.base import DefenseContext, DefenseOutcome, DefenseSkipped, PostTrainingDefense
from bdcore.defenses.ft import FTConfig
from bdcore.defenses.registry import register_defense
from bdcore.train.loop import cross_entropy_step


class FPConfig(FTConfig):
    """ft's fine-tuning recipe after the pruning step."""

    prune_step: float = Field(0.01, gt=0, le=1)  # share of the features pruned per step (once_prune_ratio)
    max_acc_drop: float = Field(0.10, ge=0, lt=1)  # relative held-out accuracy change allowed (acc_ratio)
    epochs: int = Field(100, ge=0)  # fine-tuning after pruning (0: prune only)


def classifier_input_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The Linear whose input columns fp prunes: the model's last child if it is one, else the first
    nn.Linear inside it (BackdoorBench's rule, which also names vit's `heads.head`)."""
    children = list(model.named_children())
    if children:
        last_name, last = children[-1]
        for name, module in last.named_modules():
            if isinstance(module, nn.Linear):
                return (f"{last_name}.{name}" if name else last_name), module
    raise DefenseSkipped(f"fp prunes the classifier's input features and {type(model).__name__}'s last "
                         "child has no nn.Linear")


def mean_classifier_input(model: nn.Module, layer: nn.Linear, batches: Batches) -> torch.Tensor:
    """Mean of each input feature of `layer` over one pass of `batches`."""
    total = torch.zeros(layer.in_features, device=batches.device)
    count = 0

    def accumulate(_m, inputs):
        nonlocal count
        total.add_(inputs[0].detach().float().flatten(1).sum(0))
        count += inputs[0].shape[0]

    handle = layer.register_forward_pre_hook(accumulate)
    try:
        with torch.no_grad():
            for x01, _ in batches.epoch():
                model(batches.model_input(x01))
    finally:
        handle.remove()
    return total / max(count, 1)


def zero_input_columns(layer: nn.Linear, features: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight[:, features.to(layer.weight.device)] = 0


@register_defense("fp")
class FinePruning(PostTrainingDefense):
    config_class = FPConfig
    config: FPConfig

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        name, layer = classifier_input_layer(model)
        device = defense_device(ctx)
        model.to(device).eval()
        batches = Batches(clean.train, ctx.info, device, batch_size=cfg.batch_size, augment=True, seed=cfg.seed)
        order = mean_classifier_input(model, layer, batches).argsort().cpu()  # least active first
        chosen, acc_unpruned, curve = self._prune_level(model, layer, order, clean, ctx, device)
        pruned = order[:chosen]
        zero_input_columns(layer, pruned)
        acc_pruned = held_out_accuracy(model, clean, ctx.info, device)

        def step_fn(images, labels, indices, sctx):
            zero_input_columns(layer, pruned)  # the previous optimiser step (momentum, decay) moved them
            return cross_entropy_step(images, labels, indices, sctx)

        history = []
        if cfg.epochs > 0:
            history = fine_tune(model, clean.train, ctx, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                seed=cfg.seed, stage="fp_finetune", schedule=cfg.schedule, step=step_fn,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            model.to(device)
            zero_input_columns(layer, pruned)
        return DefenseOutcome(model.to("cpu").eval(), {
            "layer": name,
            "layer_features": layer.in_features,
            "pruned_features": int(chosen),
            "pruned_fraction": chosen / layer.in_features,
            "val_acc_unpruned": acc_unpruned,
            "val_acc_pruned": acc_pruned,
            "val_acc_after": held_out_accuracy(model, clean, ctx.info, device),
            "val_acc_curve": curve,
            "clean_train_size": len(clean.train),
            "clean_val_size": len(clean.val),
            "finetune_epochs": len(history),
            "final_train_loss": float(history[-1]["train_loss"]) if history else None,
        })

    def _prune_level(self, model, layer: nn.Linear, order: torch.Tensor, clean, ctx, device):
        """Prune in steps of `prune_step` of the features while the held-out accuracy stays within
        `max_acc_drop` (relative) of the unpruned model's; returns (features kept pruned, unpruned
        accuracy, [[k, accuracy], ...]). The layer's weight is restored before returning."""
        original = layer.weight.detach().clone()
        features = layer.in_features
        acc_unpruned = held_out_accuracy(model, clean, ctx.info, device)
        step = max(1, math.ceil(features * self.config.prune_step))
        chosen, curve = 0, []
        for k in range(step, features + 1, step):
            zero_input_columns(layer, order[:k])
            acc = held_out_accuracy(model, clean, ctx.info, device)
            curve.append([k, acc])
            if acc_unpruned <= 0 or abs(acc - acc_unpruned) / acc_unpruned >= self.config.max_acc_drop:
                break
            chosen = k
        with torch.no_grad():
            layer.weight.copy_(original)
        return chosen, acc_unpruned, curve
