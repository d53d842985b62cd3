"""FP (Fine-Pruning): backdoor behaviour hides in last-layer channels that clean inputs leave dormant;
prune the least active channels of the last conv layer, then fine-tune on clean data.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018 (with BackdoorBench's settings, Wu et al., NeurIPS 2022 Datasets & Benchmarks).
The last Conv2d of the model is the pruned layer; each channel's activation is its mean over the
defender's clean fitting data (`clean.train`) of ReLU(BN output) (ReLU(conv output) when no BN
normalises the conv). Channels are pruned least active first, in steps of 1% of the layer, while
the held-out clean accuracy (`clean.val`) stays within a 10% relative drop of the unpruned model's;
the last level within that budget is kept (conv filters and BN scale and shift zeroed), then the
model is fine-tuned on `clean.train` with the pruned channels held at zero.

Defaults: prune step 1%, max relative accuracy drop 0.10 (BackdoorBench's acc_ratio), fine-tune
100 epochs, batch 256, SGD lr 0.01 cosine, momentum 0.9, weight decay 5e-4, augmentation (ft's
recipe). Deviations: the stopping rule reads the defender's held-out clean data, never the test set
(BackdoorBench stops on test accuracy); channels are removed from the conv/BN themselves rather than
masked at the classifier input, which is the same for a conv-BN-ReLU-pool head and also defined for
other heads.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from bdcore.defenses._batches import Batches, defense_device, fine_tune, held_out_accuracy
from bdcore.defenses._neurons import conv_units, prune_conv_channels
from bdcore.defenses.base import DefenseContext, DefenseOutcome, DefenseSkipped, PostTrainingDefense
from bdcore.defenses.ft import FTConfig
from bdcore.defenses.registry import register_defense
from bdcore.train.loop import cross_entropy_step


class FPConfig(FTConfig):
    """ft's fine-tuning recipe after the pruning step."""

    prune_step: float = Field(0.01, gt=0, le=1)  # share of the layer's channels pruned per step
    max_acc_drop: float = Field(0.10, ge=0, lt=1)  # relative held-out accuracy drop the pruning may cost
    epochs: int = Field(100, ge=0)  # fine-tuning after pruning (0: prune only)


@register_defense("fp")
class FinePruning(PostTrainingDefense):
    config_class = FPConfig
    config: FPConfig

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
            raise DefenseSkipped(f"fp prunes the last Conv2d layer and {type(model).__name__} has none")
        device = defense_device(ctx)
        model.to(device).eval()
        batches = Batches(clean.train, ctx.info, device, batch_size=cfg.batch_size, seed=cfg.seed)
        example = batches.model_input(batches.data.images[:1].float().div(255.0))
        name, conv, norm = conv_units(model, example)[-1]
        measured = norm if norm is not None else conv
        channels = conv.out_channels

        # Mean activation of each channel on the clean fitting data.
        total = torch.zeros(channels, device=device)
        count = torch.zeros((), device=device)

        def accumulate(_m, _i, out):
            total.add_(torch.relu(out.detach().float()).mean((2, 3)).sum(0))
            count.add_(out.shape[0])

        handle = measured.register_forward_hook(accumulate)
        try:
            with torch.no_grad():
                for x01, _ in batches.epoch():
                    model(batches.model_input(x01))
        finally:
            handle.remove()
        activation = total / count.clamp_min(1)
        order = activation.argsort().cpu()  # least active first

        # Prune in steps while the held-out accuracy stays within budget (a mask on the layer output).
        mask = torch.ones(channels, device=device)
        handle = measured.register_forward_hook(lambda _m, _i, out: out * mask.view(1, -1, 1, 1).to(out.dtype))
        acc_unpruned = held_out_accuracy(model, clean, ctx.info, device)
        step = max(1, math.ceil(channels * cfg.prune_step))
        chosen, curve = 0, []
        try:
            for k in range(step, channels + 1, step):
                mask[order[:k].to(device)] = 0
                acc = held_out_accuracy(model, clean, ctx.info, device)
                curve.append([k, acc])
                if acc_unpruned - acc > cfg.max_acc_drop * acc_unpruned:
                    break
                chosen = k
        finally:
            handle.remove()
        pruned = order[:chosen]
        prune_conv_channels(conv, norm, pruned)
        acc_pruned = held_out_accuracy(model, clean, ctx.info, device)

        def enforce() -> None:
            prune_conv_channels(conv, norm, pruned)

        def step_fn(images, labels, indices, sctx):
            enforce()  # the previous optimiser step (momentum, weight decay) may have moved them
            return cross_entropy_step(images, labels, indices, sctx)

        history = []
        if cfg.epochs > 0:
            history = fine_tune(model, clean.train, ctx, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                seed=cfg.seed, stage="fp_finetune", schedule=cfg.schedule, step=step_fn,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            model.to(device)
            enforce()
        acc_after = held_out_accuracy(model, clean, ctx.info, device)
        return DefenseOutcome(model.to("cpu").eval(), {
            "layer": name,
            "layer_channels": channels,
            "pruned_channels": int(chosen),
            "pruned_fraction": chosen / channels,
            "prune_step_channels": step,
            "val_acc_unpruned": acc_unpruned,
            "val_acc_pruned": acc_pruned,
            "val_acc_after": acc_after,
            "val_acc_curve": curve,
            "finetune_epochs": len(history),
            "final_train_loss": float(history[-1]["train_loss"]) if history else None,
        })
