"""NAD: fine-tune a copy of the backdoored model on clean data into a teacher, then train the backdoored
model (student) on clean data to match the teacher's attention maps at three feature stages.

Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural
Networks", ICLR 2021.

Defaults (BackdoorBench defense/nad.py, config/defense/nad/cifar10.yaml): teacher = `te_epochs` 10
epochs of fine-tuning; student also `te_epochs` 10 epochs (the yaml's `epochs` 100 is never used);
batch 256; SGD lr 0.01, momentum 0.9, weight decay 5e-4, training augmentation; the student's lr is
held at 0.01 (its adjust_learning_rate resets it every epoch and its scheduler step is commented out);
betas 500 / 1000 / 1000 (shallow to deep); p = 2; 5% clean data.
Loss: CE + sum_k beta_k * AT_k, with the attention map A = mean over channels of |a|^p, flattened per image
and L2-normalised; AT_k = mean over batch and positions of (A_student - A_teacher)^2. The paper writes the
L2 norm of the difference; the betas 500/1000/1000 are calibrated for this mean-squared form, which the
authors' code uses, so we use it too.
Stages: spatial stages are found by this rule: starting at the model, take the children that contain a
conv; if they produce feature maps (larger than 1x1) at enough spatial sizes, use for each size the last
child producing it and keep the deepest; if there is a single conv-containing child (e.g. a `features`
Sequential), descend into it (layer1..4 of PreActResNet18 / ResNet-18, the conv blocks of smallcnn, the
last conv of each resolution of VGG). A model with no such stage (ViT) is skipped.
`stages: backdoorbench` (default): BackdoorBench takes the outputs of children[:-3], [:-2] and [:-1] of
PreActResNet18, i.e. layer3 (beta1 500), layer4 (beta2 1000) and the pooled 1x1 features (beta3 1000).
A 1x1 map normalised per image is constant, so that third term is 0: the last beta belongs to the
pooled features and the others to the deepest spatial stages (layer3 / layer4 at 500 / 1000).
`stages: paper`: the outputs of the three residual groups (layer2/3/4) with the three betas in order.
With fewer stages than betas the deepest betas are used.
Deviations: the teacher runs at a constant lr 0.01; BackdoorBench's cosine schedule has T_max 100 and
is stepped once in each of its 10 epochs (lr 0.01 down to 0.0098, at most 2% away), and the engine's
cosine anneals over the run's own epochs (to 0 in 10), so constant is the closer match
(`teacher_schedule: cosine` gives that). The student's feature maps come from hooks on one forward
pass; BackdoorBench re-runs the children as Sequentials, which also updates the student's BN
statistics three more times per batch. The paper's student schedule (lr 0.1 divided by 10 every 2
epochs) is not the default.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from bdcore.defenses._batches import Batches, defense_device, fine_tune, held_out_accuracy
from bdcore.defenses._neurons import capture_outputs
from bdcore.defenses.base import (
    DefenseConfig,
    DefenseContext,
    DefenseOutcome,
    DefenseSkipped,
    PostTrainingDefense,
)
from bdcore.defenses.registry import register_defense
from bdcore.train.loop import StepContext, to_model_input


class NADConfig(DefenseConfig):
    teacher_epochs: int = Field(10, ge=1)
    epochs: int = Field(10, ge=1)  # student (BackdoorBench runs it for te_epochs too)
    lr: float = Field(0.01, gt=0)  # student
    teacher_lr: float = Field(0.01, gt=0)
    batch_size: int = Field(256, ge=1)
    betas: list[float] = Field(default_factory=lambda: [500.0, 1000.0, 1000.0])  # shallow -> deep stage
    p: float = Field(2.0, gt=0)
    schedule: Literal["cosine", "constant"] = "constant"  # student
    teacher_schedule: Literal["cosine", "constant"] = "constant"
    stages: Literal["backdoorbench", "paper"] = "backdoorbench"  # see the module docstring

    @field_validator("betas")
    @classmethod
    def _three_betas(cls, v: list[float]) -> list[float]:
        if not 1 <= len(v) <= 3:
            raise ValueError("betas: one to three stage weights (shallow to deep)")
        return v

    @model_validator(mode="after")
    def _a_spatial_beta(self) -> "NADConfig":
        if self.stages == "backdoorbench" and len(self.betas) < 2:
            raise ValueError("stages 'backdoorbench': the last beta weighs the pooled features (a zero term), "
                             "so give at least two betas")
        return self

    def spatial_betas(self) -> list[float]:
        """The betas of spatial stages, shallow to deep (BackdoorBench's last one weighs the 1x1 pooled map)."""
        return self.betas[:-1] if self.stages == "backdoorbench" else self.betas


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def attention_stages(model: nn.Module, example: torch.Tensor, count: int = 3) -> list[str]:
    """Names of up to `count` feature stages of `model` (see the module docstring for the rule)."""
    container, prefix = model, ""
    while True:
        children = [(prefix + name, m) for name, m in container.named_children() if _has_conv(m)]
        fired: list[tuple[str, tuple[int, int]]] = []
        handles = [m.register_forward_hook(
            lambda _m, _i, out, name=name: fired.append((name, tuple(out.shape[-2:])))
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1 else None)
            for name, m in children]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(example[:1])
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        last_at_size: dict[tuple[int, int], tuple[int, str]] = {}
        for order, (name, size) in enumerate(fired):
            last_at_size[size] = (order, name)
        stages = [name for _order, name in sorted(last_at_size.values())]
        if len(stages) >= count:
            return stages[-count:]
        if len(children) == 1 and any(True for _ in children[0][1].children()):
            container, prefix = children[0][1], children[0][0] + "."
            continue
        return stages


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """Mean over channels of |a|^p, flattened per image and L2-normalised."""
    a = features.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class _DistillStep:
    """CE on clean data + sum_k beta_k * AT_k(student, frozen teacher)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, stages: list[str], betas: list[float], p: float):
        self.student_modules = {name: student.get_submodule(name) for name in stages}
        self.teacher = teacher
        self.teacher_modules = {name: teacher.get_submodule(name) for name in stages}
        self.stages, self.betas, self.p = stages, betas, p
        self.epoch, self.at_sum, self.batches = -1, None, 0

    def to(self, device):
        self.teacher.to(device).eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        return self

    def __call__(self, images, labels, indices, ctx: StepContext) -> torch.Tensor:
        x = to_model_input(images, ctx)
        with capture_outputs(self.student_modules) as s_out:
            logits = ctx.model(x)
        with torch.no_grad(), capture_outputs(self.teacher_modules) as t_out:
            self.teacher(x)
        at = sum(beta * attention_loss(s_out[name], t_out[name], self.p)
                 for name, beta in zip(self.stages, self.betas))
        if ctx.epoch != self.epoch:
            self.epoch, self.at_sum, self.batches = ctx.epoch, torch.zeros((), device=x.device), 0
        self.at_sum += at.detach()
        self.batches += 1
        return F.cross_entropy(logits, labels, label_smoothing=ctx.config.label_smoothing) + at

    def mean_at_loss(self) -> float | None:
        return float(self.at_sum) / self.batches if self.batches else None


@register_defense("nad")
class NeuralAttentionDistillation(PostTrainingDefense):
    config_class = NADConfig
    config: NADConfig
    holdout_fraction = 0.0  # selects nothing: fits on the whole clean subset, as BackdoorBench

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        device = defense_device(ctx)
        model.to(device)
        example_images, _ = next(Batches(clean.train, ctx.info, device, 2, seed=cfg.seed).epoch())
        example = Batches(clean.train, ctx.info, device, 2).model_input(example_images)
        spatial_betas = cfg.spatial_betas()
        stages = attention_stages(model, example, count=len(spatial_betas))
        if not stages:
            raise DefenseSkipped(f"nad distils convolutional attention maps and {type(model).__name__} has no "
                                 "conv feature stage larger than 1x1")
        betas = spatial_betas[-len(stages):]
        val_before = held_out_accuracy(model, clean, ctx.info, device)

        teacher = copy.deepcopy(model)
        teacher_history = fine_tune(teacher, clean.train, ctx, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr,
                                    batch_size=cfg.batch_size, seed=cfg.seed, stage="nad_teacher",
                                    schedule=cfg.teacher_schedule)
        teacher_val = held_out_accuracy(teacher, clean, ctx.info, device)

        step = _DistillStep(model, teacher, stages, betas, cfg.p)
        history = fine_tune(model, clean.train, ctx, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                            seed=cfg.seed, stage="nad_student", schedule=cfg.schedule, step=step)
        student_val = held_out_accuracy(model, clean, ctx.info, device)
        return DefenseOutcome(model.to("cpu").eval(), {
            "layers": stages,
            "betas": [float(b) for b in betas],
            "stage_rule": cfg.stages,
            "val_acc_before": float(val_before),
            "teacher_val_acc": float(teacher_val),
            "student_val_acc": float(student_val),
            "teacher_final_loss": float(teacher_history[-1]["train_loss"]) if teacher_history else None,
            "final_train_loss": float(history[-1]["train_loss"]) if history else None,
            # mean AT loss (beta-weighted sum) over the last student epoch run in this process
            "final_at_loss": step.mean_at_loss(),
        })
