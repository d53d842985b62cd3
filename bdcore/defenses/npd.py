"""NPD: insert a lightweight "neural polarizer" (1x1 conv + BN) into the frozen backdoored model and
train only it to filter trigger features out, using targeted adversarial examples as trigger stand-ins.

Zhu, Wei, Zha, Wu, "Neural Polarizer: A Lightweight and Effective Backdoor Defense via Purifying
Poisoned Features", NeurIPS 2023.

Each batch: x* = a targeted attack on the current (polarized) model toward the most confident
non-true class t, from 0, sign steps of size adv_lr projected onto an L2 ball (or an Linf box),
stopping early once `hit_rate_stop` of the batch is classified as t. Then the polarizer takes an
SGD step on  l1 * CE(f(x), y) + l2 * CE(f(x*), y) + l3 * -log(1 - p_top_non_label(x*))
+ l4 * -log(1 - p_t(x*)).

Defaults (BackdoorBench defense/npd.py, config/defense/npd/cifar10.yaml): polarizer = 1x1 conv (no
bias, identity init) + BatchNorm2d before `layer4.1.conv1` (PreAct-ResNet18); warm-up: 5 epochs of
plain SGD (no momentum, no weight decay) at lr 1e-4 on CE of the clean data, the polarizer's BN in
training mode; main phase: 50 epochs of SGD lr 0.01 held constant (the yaml names a cosine schedule
but train_npd never steps it), momentum 0.9, weight decay 5e-4, batch 128, the polarizer's BN in
evaluation mode for every batch (its statistics stay those of the warm-up; only its affine part and
the conv learn); the clean data without augmentation (BackdoorBench loads it with the test
transform); L2 budget 3.0, 2 steps, adv lr 0.1, early stop at 60% hits (Linf variant: budget 0.2,
10 steps); l1..l4 = 1, 0.4, 0.4, 0.4; clean_fraction 0.05.

Choices and deviations:
- Any model: `layer` is a dotted module path; the polarizer goes in front of that module (the
  module is replaced by a `PolarizedLayer(polarizer, layer)` wrapper, so its own keys gain a
  `.layer` infix and the polarizer's are `<layer>.polarizer.*`; `inserted_layer` in the
  diagnostics tells a loader where to rebuild it). Default (None): `layer4.1.conv1` if the model
  has it, else the last Conv2d executed in a forward pass whose input has more than one channel.
  The target may be any module whose input is an N x C x H x W tensor (the polarizer mixes
  channels); other inputs raise ValueError. An unknown path raises ValueError naming close paths;
  a model without a qualifying conv (default rule) is skipped.
- The backdoored model stays in evaluation mode (frozen BN statistics) while the polarizer trains.
- CE(f(x*), .) uses the clean label y; BackdoorBench uses the model's prediction on x, which is y
  wherever the model is right on the defender's clean data.
- The clean subset is a seeded random draw; BackdoorBench draws it class-balanced (`choose_by_class`).
- Perturbations live in [0, 1] pixel space (clamped), normalised before the model.
"""
from __future__ import annotations

import difflib
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bdcore.data.augment import Normalizer
from bdcore.defenses._batches import defense_device, fine_tune, held_out_accuracy
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, DefenseSkipped, PostTrainingDefense
from bdcore.defenses.registry import register_defense
from bdcore.train.loop import to_model_input

PREACT_LAYER = "layer4.1.conv1"


class NPDConfig(DefenseConfig):
    layer: str | None = None  # dotted module path the polarizer goes in front of
    warmup_epochs: int = Field(5, ge=0)
    warmup_lr: float = Field(1e-4, gt=0)
    epochs: int = Field(50, ge=1)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(128, ge=1)
    norm: Literal["l2", "linf"] = "l2"
    budget: float | None = Field(None, gt=0)  # None: 3.0 (l2) or 0.2 (linf)
    adv_steps: int | None = Field(None, ge=1)  # None: 2 (l2) or 10 (linf)
    adv_lr: float = Field(0.1, gt=0)
    hit_rate_stop: float = Field(0.6, ge=0, le=1)
    lambda_clean: float = Field(1.0, ge=0)
    lambda_adv: float = Field(0.4, ge=0)
    lambda_top: float = Field(0.4, ge=0)
    lambda_target: float = Field(0.4, ge=0)
    augment: bool = False  # BackdoorBench loads the clean subset with the test transform

    def attack_budget(self) -> float:
        return self.budget if self.budget is not None else (3.0 if self.norm == "l2" else 0.2)

    def attack_steps(self) -> int:
        return self.adv_steps if self.adv_steps is not None else (2 if self.norm == "l2" else 10)


class NeuralPolarizer(nn.Module):
    """1x1 conv (no bias, identity at init) + BatchNorm2d over `channels`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 0, 0].copy_(torch.eye(channels))

    def forward(self, x):
        return self.bn(self.conv(x))


class PolarizedLayer(nn.Module):
    """`layer` with the polarizer in front of it."""

    def __init__(self, polarizer: NeuralPolarizer, layer: nn.Module):
        super().__init__()
        self.polarizer = polarizer
        self.layer = layer

    def forward(self, x, *args, **kwargs):
        return self.layer(self.polarizer(x), *args, **kwargs)


def _trace_inputs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, tuple]]:
    """(name, module, input shape) of every module in execution order of one forward pass."""
    calls: list[tuple[str, nn.Module, tuple]] = []
    handles = [m.register_forward_pre_hook(
        lambda mod, inp, name=name: calls.append((name, mod, tuple(inp[0].shape) if inp and torch.is_tensor(inp[0])
                                                  else ())))
        for name, m in model.named_modules() if name]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def choose_layer(model: nn.Module, example: torch.Tensor, layer: str | None) -> tuple[str, int]:
    """The dotted path the polarizer goes before, and its width (the module's input channels)."""
    names = [name for name, _ in model.named_modules() if name]
    calls = _trace_inputs(model, example)
    if layer is None:
        if PREACT_LAYER in names:
            layer = PREACT_LAYER
        else:
            convs = [name for name, m, shape in calls if isinstance(m, nn.Conv2d) and len(shape) == 4 and shape[1] > 1]
            if not convs:
                raise DefenseSkipped(f"npd inserts its polarizer before a Conv2d and {type(model).__name__} runs none "
                                     "with a multi-channel input; set `layer` to a module taking N x C x H x W input")
            layer = convs[-1]
    elif layer not in names:
        close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
        hint = close or [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-5:]
        raise ValueError(f"npd: {type(model).__name__} has no module {layer!r}; close valid paths: {hint}")
    shapes = [shape for name, _m, shape in calls if name == layer]
    if not shapes:
        raise ValueError(f"npd: module {layer!r} is not called in the forward pass")
    if len(shapes[0]) != 4:
        raise ValueError(f"npd: the polarizer (1x1 conv + BN over channels) needs an N x C x H x W input at "
                         f"{layer!r}, which gets shape {shapes[0]}; choose a convolutional module")
    return layer, int(shapes[0][1])


def insert_polarizer(model: nn.Module, layer: str, channels: int) -> NeuralPolarizer:
    """Replace module `layer` by PolarizedLayer(polarizer, module); returns the polarizer."""
    parent_name, _, child = layer.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, child)
    device = next(original.parameters(), next(model.parameters())).device
    polarizer = NeuralPolarizer(channels).to(device)
    setattr(parent, child, PolarizedLayer(polarizer, original))
    return polarizer


class _NPDStep:
    """The training step: only the polarizer learns; the rest of the model stays in eval mode. The
    warm-up step is CE on the clean batch with the polarizer's BN in training mode; the main step
    keeps that BN in evaluation mode (BackdoorBench), so its statistics stay the warm-up's."""

    def __init__(self, polarizer: NeuralPolarizer, cfg: NPDConfig, warmup: bool = False):
        self.polarizer = polarizer
        self.cfg = cfg
        self.warmup = warmup
        self.budget = cfg.attack_budget()
        self.steps = cfg.attack_steps()
        self.stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("clean", "adv", "top", "target", "hit")}

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        if self.cfg.norm == "linf":
            return delta.clamp(-self.budget, self.budget)
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return delta * (self.budget / norms).clamp(max=1.0).view(-1, 1, 1, 1)

    def __call__(self, images, labels, indices, ctx):
        cfg, model = self.cfg, ctx.model
        model.eval()  # the loop sets training mode every epoch; the backdoored model stays frozen
        if self.warmup:
            self.polarizer.train()
            return F.cross_entropy(model(to_model_input(images, ctx)), labels)
        self.polarizer.eval()
        logits = model(to_model_input(images, ctx))
        loss_clean = F.cross_entropy(logits, labels)
        with torch.no_grad():
            target = logits.detach().scatter(1, labels.view(-1, 1), float("-inf")).argmax(1)
        # Targeted attack toward the most confident non-true class.
        delta = torch.zeros_like(images, requires_grad=True)
        for _ in range(self.steps):
            out = model(to_model_input((images + delta).clamp(0, 1), ctx))
            if float((out.argmax(1) == target).float().mean()) >= cfg.hit_rate_stop:
                break
            grad, = torch.autograd.grad(F.cross_entropy(out, target), delta)
            with torch.no_grad():
                delta = self._project(delta - cfg.adv_lr * grad.sign())
            delta.requires_grad_(True)
        adv = (images + delta.detach()).clamp(0, 1)
        out = model(to_model_input(adv, ctx))
        probs = out.softmax(1)
        loss_adv = F.cross_entropy(out, labels)
        top_other = probs.scatter(1, labels.view(-1, 1), 0.0).amax(1)
        loss_top = -torch.log((1 - top_other).clamp_min(1e-6)).mean()
        loss_target = -torch.log((1 - probs.gather(1, target.view(-1, 1)).squeeze(1)).clamp_min(1e-6)).mean()
        with torch.no_grad():
            for key, value in (("clean", loss_clean), ("adv", loss_adv), ("top", loss_top), ("target", loss_target),
                               ("hit", (out.argmax(1) == target).float().mean())):
                self.stats[key].append(value.detach())
        return (cfg.lambda_clean * loss_clean + cfg.lambda_adv * loss_adv + cfg.lambda_top * loss_top
                + cfg.lambda_target * loss_target)

    def summary(self, last: int) -> dict:
        out = {}
        for key, values in self.stats.items():
            if values:
                name = "mean_adv_hit_rate" if key == "hit" else f"final_loss_{key}"
                chosen = values if key == "hit" else values[-last:]
                out[name] = float(torch.stack(chosen).mean())
        return out


@register_defense("npd")
class NeuralPolarizerDefense(PostTrainingDefense):
    config_class = NPDConfig
    config: NPDConfig
    holdout_fraction = 0.0  # selects nothing: fits on the whole clean subset, as BackdoorBench

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        device = defense_device(ctx)
        model.to(device).eval()
        example = Normalizer(ctx.info, device)(clean.train.images[:2].to(device).float() / 255.0)
        layer, channels = choose_layer(model, example, cfg.layer)
        val_before = held_out_accuracy(model, clean, ctx.info, device)
        model.requires_grad_(False)
        polarizer = insert_polarizer(model, layer, channels)
        params = list(polarizer.parameters())
        if cfg.warmup_epochs:  # BackdoorBench: plain SGD (no momentum, no weight decay) at a constant lr
            fine_tune(model, clean.train, ctx, cfg.warmup_epochs, cfg.warmup_lr, cfg.batch_size, cfg.seed,
                      stage="npd_warmup", schedule="constant", step=_NPDStep(polarizer, cfg, warmup=True),
                      parameters=params, augment=cfg.augment, momentum=0.0, weight_decay=0.0)
        step = _NPDStep(polarizer, cfg)
        # Constant lr: BackdoorBench builds a cosine scheduler but never steps it in train_npd.
        history = fine_tune(model, clean.train, ctx, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, stage="npd",
                            schedule="constant", step=step, parameters=params, augment=cfg.augment)
        model.to(device).eval()
        batches_per_epoch = -(-len(clean.train) // min(cfg.batch_size, len(clean.train)))
        diagnostics = {
            "inserted_layer": layer,
            "polarizer_channels": channels,
            "polarizer_parameters": int(sum(p.numel() for p in params)),
            "val_acc_before": float(val_before),
            "val_acc_after": float(held_out_accuracy(model, clean, ctx.info, device)),
            "final_train_loss": float(history[-1]["train_loss"]) if history else None,
            "epochs": cfg.epochs,
            "warmup_epochs": cfg.warmup_epochs,
            **step.summary(batches_per_epoch),
        }
        model.requires_grad_(True)
        return DefenseOutcome(model.to("cpu").eval(), diagnostics)
