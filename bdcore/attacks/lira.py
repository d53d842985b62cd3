"""LIRA: a trigger generator T learns, jointly with the victim, an imperceptible input-specific
additive trigger x' = clip(x + eps * tanh(T(x))) (L-inf bound eps) that the victim maps to the target.

Doan, Lao, Zhao & Li, "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021
(code: sunbelbd/invisible_backdoor_attacks; BackdoorBench's `lira`). Stage I alternates, per batch,
(a) a generator step minimising the backdoor loss of a one-step look-ahead classifier
theta' = theta - lr * grad_theta[alpha * L(x, y) + beta * L(T(x), eta(y))] (second order through
the look-ahead, as the paper and its code) and (b) a classifier step on
alpha * L(x, y) + beta * L(T(x), eta(y)) with the trigger fixed. Stage II fine-tunes the classifier
on the same loss with the generator frozen. The training data is untouched
(`has_poisoned_trainset = False`); the trigger exists only after training
(`trigger_learned_in_training = True`) and is rebuilt from the generator weights in
`state_tensors`.

Defaults: eps = 0.01 (images in [0, 1]), alpha = beta = 0.5 (paper; BackdoorBench: alpha 0.5,
1 - alpha), generator Adam lr 1e-4 (`lr_atk`), stage I = 1/6 of the epochs (BackdoorBench cifar10:
50 stage-I epochs + 250 fine-tuning epochs = 300). The loop's epochs are split: the first
max(1, round(stage1_share * epochs)) run stage I, the rest stage II, so the loop's
checkpoint/resume covers both (the generator's weights travel in state_tensors, its Adam state as
the step's optimizer).

`ratio` is the share of each batch whose poisoned copy enters the backdoor loss (at least one
sample); default 1.0 = the paper's whole batch (BackdoorBench ignores `pratio` for lira).

Deviations: the generator is a small U-Net without normalisation layers (`_nets.UNet`, widths
(16, 32, 64); the references use an autoencoder with BatchNorm or a larger U-Net), so a trigger
depends on its image only; clean and poisoned samples go through the classifier in one forward
pass (BatchNorm statistics over both; the references use two); the classifier and generator are
stepped together after one backward pass (the classifier step uses the trigger from before this
batch's generator step; the reference code uses a generator copy synchronised once per epoch);
the look-ahead uses the loop's scheduled lr of the epoch (cosine / multistep computed from the
training config) and leaves BatchNorm running statistics alone; one optimiser and schedule for
both stages (the loop's) instead of a fresh SGD for stage II; poisoned images are rounded to the
uint8 grid in training too (straight-through), so |x' - x| <= eps * 255 + 0.5 levels after rounding.
The loop's recorded train_loss in stage I includes the generator's look-ahead loss.

Measured on digits + smallcnn, 10 epochs (2 stage I + 8 stage II), CPU: defaults ACC 0.936 /
ASR 1.000 / RA 0.000 (clean model 0.981: alpha = 0.5 halves the clean loss's weight in a short
budget); alpha = beta = 1 (same 1:1 balance) ACC 0.955 / ASR 1.000 / RA 0.000. Stage I costs about
15 plain steps per batch on a CPU (second-order look-ahead).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from bdcore.attacks._nets import UNet, map_batches, quantize, seeded
from bdcore.attacks.base import Attack, AttackConfig, PoisonedTrainSet
from bdcore.attacks.registry import register_attack
from bdcore.attacks.resources import load_module_tensors, module_tensors
from bdcore.data.base import ImageSet
from bdcore.train.config import TrainConfig
from bdcore.train.loop import StepContext, to_model_input


class LiraConfig(AttackConfig):
    ratio: float = Field(1.0, gt=0, le=1)  # share of each batch poisoned in the backdoor loss
    eps: float = Field(0.01, gt=0, le=1)  # L-inf bound of the trigger, images in [0, 1]
    alpha: float = Field(0.5, ge=0)  # weight of the clean loss
    beta: float = Field(0.5, gt=0)  # weight of the backdoor loss
    generator_lr: float = Field(1e-4, gt=0)  # Adam (BackdoorBench lr_atk)
    stage1_share: float = Field(1 / 6, gt=0, le=1)  # share of the epochs in stage I (joint training)
    generator_widths: tuple[int, ...] = (16, 32, 64)
    generator_seed: int = 0


class TriggerGenerator(nn.Module):
    """T(x): a U-Net on the centred image; the trigger is eps * tanh(T(x))."""

    def __init__(self, channels: int, widths):
        super().__init__()
        self.unet = UNet(channels, channels, widths, norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.unet(2 * x - 1))


def scheduled_lr(config: TrainConfig, epoch: int) -> float:
    """The model optimiser's lr during `epoch` under the loop's schedule (plateau: the base lr)."""
    if config.schedule == "cosine":
        return config.lr * (1 + math.cos(math.pi * epoch / config.epochs)) / 2
    if config.schedule == "multistep":
        return config.lr * config.gamma ** sum(1 for m in config.milestones if m <= epoch)
    return config.lr


def stage1_epochs(share: float, epochs: int) -> int:
    return min(epochs, max(1, round(share * epochs)))


class LiraStep:
    """Stage I: classifier loss + the generator's look-ahead loss (gradients reach disjoint
    parameters: the classifier sees the trigger detached, the look-ahead uses detached copies of
    the classifier's weights); the loop steps the generator's Adam (`optimizers`) with the model's
    SGD. Stage II: the classifier loss only, the generator frozen."""

    def __init__(self, attack: Lira):
        self.attack = attack
        self.generator = attack.generator
        self.optimizers = [torch.optim.Adam(self.generator.parameters(), lr=attack.config.generator_lr)]
        self.last: dict[str, float] = {}

    def to(self, device):
        self.generator.to(device)
        return self

    def __call__(self, images, labels, indices, ctx: StepContext) -> torch.Tensor:
        cfg, attack = self.attack.config, self.attack
        n = images.shape[0]
        k = attack.batch_poison_count(n, ctx.generator)  # below one per batch: one with probability ratio * n
        smoothing = ctx.config.label_smoothing
        if k == 0:  # this batch drew no poisoned sample: the clean term alone, weighted as always
            clean = F.cross_entropy(ctx.model(to_model_input(images, ctx)), labels, label_smoothing=smoothing)
            self.last = {"clean": float(clean.detach()), "backdoor": float("nan"), "generator": float("nan")}
            return cfg.alpha * clean
        source, bd_labels = images[:k], attack.target_labels(labels[:k])
        stage1 = ctx.epoch < stage1_epochs(cfg.stage1_share, ctx.config.epochs)

        def losses(logits):
            clean = F.cross_entropy(logits[:n], labels, label_smoothing=smoothing)
            return clean, F.cross_entropy(logits[n:], bd_labels)

        generator_loss = None
        if stage1:
            poisoned = attack.poison_float(source)  # differentiable in the generator
            model = ctx.model
            params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
            buffers = {name: b.clone() for name, b in model.named_buffers()}  # running stats untouched

            def forward(weights, x):
                return functional_call(model, (weights, buffers), (to_model_input(x, ctx),))

            clean, backdoor = losses(forward(params, torch.cat([images, poisoned])))
            inner = cfg.alpha * clean + cfg.beta * backdoor
            grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
            lr = scheduled_lr(ctx.config, ctx.epoch)
            ahead = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
            _, generator_loss = losses(forward(ahead, torch.cat([images, poisoned])))
            poisoned = poisoned.detach()
        else:
            with torch.no_grad():
                poisoned = attack.poison_float(source)
        clean, backdoor = losses(ctx.model(to_model_input(torch.cat([images, poisoned]), ctx)))
        loss = cfg.alpha * clean + cfg.beta * backdoor
        self.last = {"clean": float(clean.detach()), "backdoor": float(backdoor.detach()),
                     "generator": float(generator_loss.detach()) if generator_loss is not None else float("nan")}
        return loss if generator_loss is None else loss + generator_loss


@register_attack("lira")
class Lira(Attack):
    config_class = LiraConfig
    config: LiraConfig
    has_poisoned_trainset = False
    trigger_learned_in_training = True

    def __init__(self, config, info):
        super().__init__(config, info)
        self.generator = seeded(self._build_generator, config.generator_seed)
        self._copies: dict[str, nn.Module] = {}

    def _build_generator(self) -> TriggerGenerator:
        return TriggerGenerator(self.info.channels, self.config.generator_widths)

    # -- state ---------------------------------------------------------------------------------
    def state_tensors(self):
        return {k: v.detach().cpu().clone() for k, v in module_tensors(self.generator, "generator.").items()}

    def load_state_tensors(self, tensors):
        # In place: a training step (and its optimizer) holds these very parameters.
        with torch.no_grad():
            load_module_tensors(self.generator, tensors, "generator.")
        self._copies.clear()

    # -- trigger -------------------------------------------------------------------------------
    def poison_float(self, images: torch.Tensor) -> torch.Tensor:
        """Training-time poisoning of float [0, 1] images: clip(x + eps * T(x)), rounded to the
        uint8 grid with a straight-through gradient."""
        return quantize((images + self.config.eps * self.generator(images)).clamp(0, 1))

    def _generator_on(self, device: torch.device) -> nn.Module:
        if next(self.generator.parameters()).device == device:
            return self.generator
        key = str(device)
        if key not in self._copies:
            self._copies[key] = copy.deepcopy(self.generator).to(device)
        return self._copies[key]

    def apply_trigger(self, images, labels):
        self._copies.clear()  # the generator may have changed since the last call
        generator, eps = self._generator_on(images.device), self.config.eps
        return map_batches(lambda x: x + eps * generator(x), images)

    def poison_train(self, train: ImageSet) -> PoisonedTrainSet:
        """The clean training set itself: LIRA poisons inside its training step only."""
        return PoisonedTrainSet(ImageSet(train.images, train.labels), torch.empty(0, dtype=torch.long),
                                train.labels.clone())

    def training_step(self, poisoned):
        return LiraStep(self)
