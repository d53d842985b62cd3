"""DBD: poisoned samples cluster with their target class only when the backbone learns from their labels,
so DBD learns the backbone without labels (SimCLR), finds the samples whose labels disagree with it, and
finishes training semi-supervised with those samples' labels removed.

Huang, Li, Wu, Qin, Ren, "Backdoor Defense via Decoupling the Training Process", ICLR 2022.

Three stages on the poisoned training set, one fresh model (ctx.model_factory()):

1. Self-supervised backbone: SimCLR (bdcore/defenses/_contrastive.py) on all training images, no labels;
   the projection head is discarded afterwards.
2. Warm-up: the backbone frozen (evaluation mode), the classifier head (the model's final Linear) trained
   on every sample's given label with the symmetric cross-entropy (SCE = alpha CE + beta RCE, RCE with
   log 0 clipped to -4, Wang et al. ICCV 2019), which resists the noisy (poisoned) labels. Then every
   sample's SCE loss is computed (evaluation mode, no augmentation); the `epsilon` (0.5) share with the
   lowest loss keeps its label, the rest becomes unlabeled.
3. Semi-supervised fine-tuning of the whole model with MixMatch (Berthelot et al. NeurIPS 2019): per
   iteration a labeled batch and an unlabeled batch (two augmentations each), the unlabeled labels
   guessed as the sharpened (T) mean prediction of the two views, MixUp (Beta(alpha, alpha), lambda
   taken >= 0.5) over the union, CE on the labeled part plus lambda_u * ramp-up * MSE on the unlabeled.

Defaults (the authors' released configuration for CIFAR-10, also BackdoorBench's config/defense/dbd):
SimCLR batch 512, SGD lr 0.4 cosine, momentum 0.9, weight decay 1e-4, temperature 0.5, 100 epochs (the
checkpoint BackdoorBench fine-tunes from); SCE alpha 0.1, beta 1; epsilon 0.5; MixMatch batch 64, 1024
iterations per epoch, T 0.5, alpha 0.75, lambda_u 15 with a linear ramp-up over `rampup_epochs` (120);
warm-up and fine-tuning with Adam lr 0.002; 10 warm-up epochs and 190 fine-tuning epochs (the paper's
200-epoch second phase). Augmentation in stages 2 and 3 is the attack cell's (ctx.train_config: random
crop, flip where the dataset has it). Each stage checkpoints under ctx.work_dir/dbd_<stage> and resumes
(a resumed MixMatch stage restores the weights, Adam state and RNG states, and starts a fresh shuffle of
both sets); ctx.on_epoch_end sees every epoch numbered consecutively, with "dbd_stage" 1/2/3. On CUDA,
SimCLR and MixMatch run in mixed precision when the attack cell's config asks for it (amp).

Deviations, with reasons:
- The classifier is the victim architecture's final Linear, not the authors' extra two-layer MLP head:
  the defended model must be the cell's architecture to be scored and compared like any other.
- SimCLR's hue jitter is left out (see _contrastive.py).
- MixMatch's per-batch interleaving (a BatchNorm trick for multi-GPU splits) is replaced by one forward
  pass over the whole mixed batch, which is what interleaving emulates.

Measured on digits, badnet 10%, smallcnn (undefended ACC 0.961 / ASR 0.966), seed 0:
- The paper's SimCLR lr 0.4 collapses smallcnn's representation (loss constant at 6.155 from epoch 3);
  lr 0.05 for 15 epochs at batch 256 gives a kNN accuracy of 0.96 on the features, and only 24% of the
  poison samples have a target-label nearest neighbour (the target label holds 19% of the set).
- The paper's warm-up lr 0.002 leaves the head unfit in digits' 230 steps (SCE 2.96, split AUROC 0.52);
  lr 0.1: SCE 1.41, split AUROC 0.93, 135 of the 144 poison samples unlabeled.
- Test schedule (tests/test_defense_dbd.py: SimCLR 10 epochs, warm-up lr 0.1, MixMatch 10 epochs x 12
  iterations): split AUROC 0.89, ACC 0.944 / ASR 0.003 / RA 0.935 (2 threads). With SimCLR 15 epochs and
  20 iterations: 0.883 / 0.006 (2 threads), 0.919 / 0.003 (1 thread); with 40 iterations 0.861-0.964
  depending on threads and seed. The backdoor goes every time; clean accuracy varies with so few
  MixMatch iterations (the paper runs ~2 x 10^5).
- 77 s on 2 idle threads with SimCLR 15 epochs and 10 x 20 iterations (25.7 x ft in bench/defense_cost.py).

The poison indices are read only for the diagnostics (split quality), never by the method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bdcore.analysis import final_linear
from bdcore.data.augment import Normalizer, augment_batch
from bdcore.data.base import ImageSet
from bdcore.defenses._contrastive import train_contrastive
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, StageEpochs, TrainingTimeDefense
from bdcore.defenses.detection import Detection, detection_quality
from bdcore.defenses.registry import register_defense
from bdcore.device import pick_device
from bdcore.train import TrainConfig, seed_everything
from bdcore.train.loop import Checkpointer, run_fingerprint


class DBDConfig(DefenseConfig):
    simclr_epochs: int = Field(100, ge=1)
    simclr_batch_size: int = Field(512, ge=2)
    simclr_lr: float = Field(0.4, gt=0)
    simclr_weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.5, gt=0)
    warmup_epochs: int = Field(10, ge=1)
    sce_alpha: float = Field(0.1, ge=0)
    sce_beta: float = Field(1.0, ge=0)
    epsilon: float = Field(0.5, gt=0, lt=1)  # share of samples that keep their label
    semi_epochs: int = Field(190, ge=0)
    semi_iterations: int = Field(1024, ge=1)  # MixMatch iterations per epoch
    semi_batch_size: int = Field(64, ge=1)
    warmup_lr: float = Field(0.002, gt=0)  # Adam
    lr: float = Field(0.002, gt=0)  # Adam, MixMatch fine-tuning
    lambda_u: float = Field(15.0, ge=0)
    rampup_epochs: int = Field(120, ge=1)
    sharpen_temperature: float = Field(0.5, gt=0)
    mixup_alpha: float = Field(0.75, gt=0)


def symmetric_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
                            reduction: str = "mean") -> torch.Tensor:
    """alpha CE(y, p) + beta RCE, RCE = -sum_k p_k log q_k with q the one-hot label, log 0 := -4."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    p_label = F.softmax(logits.float(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    rce = 4.0 * (1.0 - p_label)  # the non-label probability mass times -log_clip(0) = 4
    loss = alpha * ce + beta * rce
    return loss.mean() if reduction == "mean" else loss


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    p = p.pow(1.0 / temperature)
    return p / p.sum(1, keepdim=True)


def mixmatch_loss(model: nn.Module, model_input: Callable, labeled: tuple[torch.Tensor, torch.Tensor],
                  unlabeled: tuple[torch.Tensor, torch.Tensor], num_classes: int, cfg: DBDConfig,
                  ramp: float, generator: torch.Generator) -> tuple[torch.Tensor, float, float]:
    """One MixMatch loss. `labeled` = (augmented images, labels); `unlabeled` = two augmentations of
    the same images. Returns (loss, labeled CE, unlabeled MSE)."""
    x, y = labeled
    u1, u2 = unlabeled
    with torch.no_grad():
        guess = (F.softmax(model(model_input(u1)).float(), 1) + F.softmax(model(model_input(u2)).float(), 1)) / 2
        guess = sharpen(guess, cfg.sharpen_temperature)
    inputs = torch.cat([x, u1, u2])
    targets = torch.cat([F.one_hot(y, num_classes).float(), guess, guess])
    lam = float(torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample())
    lam = max(lam, 1.0 - lam)  # the mix stays closer to its first input, so the labeled/unlabeled split holds
    perm = torch.randperm(len(inputs), generator=generator).to(inputs.device)
    mixed = lam * inputs + (1 - lam) * inputs[perm]
    mixed_targets = lam * targets + (1 - lam) * targets[perm]
    logits = model(model_input(mixed)).float()
    n = len(x)
    labeled_ce = -(mixed_targets[:n] * F.log_softmax(logits[:n], 1)).sum(1).mean()
    unlabeled_mse = (F.softmax(logits[n:], 1) - mixed_targets[n:]).pow(2).mean()
    return labeled_ce + cfg.lambda_u * ramp * unlabeled_mse, float(labeled_ce.detach()), float(unlabeled_mse.detach())


@register_defense("dbd")
class DecouplingBasedDefense(TrainingTimeDefense):
    config_class = DBDConfig
    config: DBDConfig

    def train(self, poisoned, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        if ctx.model_factory is None:
            raise ValueError("dbd trains a model from scratch and needs ctx.model_factory")
        base = ctx.train_config or TrainConfig()
        data = poisoned.data
        device = pick_device(ctx.device)
        seed_everything(cfg.seed)
        model = ctx.model_factory()
        stages = StageEpochs(ctx.on_epoch_end, "dbd_stage")

        def folder(stage: str) -> Path | None:
            return Path(ctx.work_dir) / f"dbd_{stage}" if ctx.work_dir is not None else None

        # 1. self-supervised backbone
        simclr = TrainConfig(epochs=cfg.simclr_epochs, batch_size=cfg.simclr_batch_size, lr=cfg.simclr_lr,
                             momentum=0.9, weight_decay=cfg.simclr_weight_decay, schedule="cosine", augment=False,
                             amp=base.amp, channels_last=base.channels_last, device=ctx.device)
        history = train_contrastive(model, data, ctx.info, simclr, temperature=cfg.temperature, seed=cfg.seed,
                                    checkpoint_dir=folder("simclr"), checkpoint_tag="dbd",
                                    on_epoch_end=stages.reporter(1)).history
        simclr_loss = history[-1]["train_loss"] if history else None
        stages.advance(cfg.simclr_epochs)
        model.to(device)
        normalize = Normalizer(ctx.info, device)
        on_device = data.to(device)

        # 2. warm-up of the classifier on the frozen backbone, then the loss-based split
        head = final_linear(model)
        warmup_history = self._warmup(model, head, on_device, normalize, base, ctx, folder("warmup"), stages.reporter(2))
        stages.advance(cfg.warmup_epochs)
        losses = self._sample_losses(model, on_device, normalize)
        n_labeled = max(1, int(len(data) * cfg.epsilon))
        order = torch.argsort(losses, stable=True)
        labeled_idx, unlabeled_idx = order[:n_labeled].sort().values, order[n_labeled:].sort().values
        flagged = torch.zeros(len(data), dtype=torch.bool)
        flagged[unlabeled_idx] = True
        split = Detection(losses, flagged, {})

        # 3. MixMatch fine-tuning of the whole model
        semi_history = self._mixmatch(model, on_device.subset(labeled_idx.to(device)),
                                      on_device.subset(unlabeled_idx.to(device)), normalize, base, ctx,
                                      folder("mixmatch"), stages.reporter(3))
        model.eval().to("cpu")
        quality = detection_quality(split, poisoned.poison_indices)
        return DefenseOutcome(model, {
            "n_labeled": n_labeled,
            "n_unlabeled": len(data) - n_labeled,
            # The split as a detector of poison: "flagged" = stripped of its label.
            "split_auroc": quality["detection_auroc"],
            "split_poison_unlabeled": quality["detection_tpr"],
            "split_labeled_poison": int(quality["n_poison"] - round(quality["detection_tpr"] * quality["n_poison"])),
            "sce_loss_threshold": float(losses[order[n_labeled - 1]]),
            "simclr_epochs": cfg.simclr_epochs,
            "warmup_epochs": cfg.warmup_epochs,
            "semi_epochs": cfg.semi_epochs,
            "final_simclr_loss": simclr_loss,
            "final_warmup_loss": warmup_history[-1]["train_loss"] if warmup_history else None,
            "final_mixmatch_loss": semi_history[-1]["train_loss"] if semi_history else None,
        })

    def _checkpointer(self, folder: Path | None, data: ImageSet, stage: str) -> Checkpointer | None:
        if folder is None:
            return None
        run = TrainConfig(epochs=1, lr=self.config.lr, schedule="constant")
        return Checkpointer(folder, run_fingerprint(run, self.config.seed, data, f"dbd-{stage}-{self.config.model_dump_json()}"))

    def _warmup(self, model, head: nn.Linear, data: ImageSet, normalize, base: TrainConfig, ctx: DefenseContext,
                folder, report) -> list[dict]:
        """Train only `head` with SCE; the backbone stays frozen, BatchNorm statistics included."""
        cfg = self.config
        optimizer = torch.optim.Adam(head.parameters(), lr=cfg.warmup_lr)
        generator = torch.Generator().manual_seed(cfg.seed)
        head_ids = {id(p) for p in head.parameters()}
        backbone = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
        for p in backbone:
            p.requires_grad_(False)
        try:
            return self._warmup_epochs(model, optimizer, generator, data, normalize, base, ctx, folder, report)
        finally:
            for p in backbone:
                p.requires_grad_(True)

    def _warmup_epochs(self, model, optimizer, generator, data: ImageSet, normalize, base: TrainConfig,
                       ctx: DefenseContext, folder, report) -> list[dict]:
        cfg = self.config
        checkpointer = self._checkpointer(folder, data, "warmup")
        start, history = checkpointer.load(model, [optimizer], [], generator) if checkpointer else (0, [])
        for epoch in range(start, cfg.warmup_epochs):
            model.eval()  # frozen backbone: no BatchNorm statistics drift; the Linear head has no train mode
            order = torch.randperm(len(data), generator=generator).to(data.labels.device)
            total, batches = 0.0, 0
            for begin in range(0, len(data), base.batch_size):
                idx = order[begin:begin + base.batch_size]
                images = data.images[idx]
                if base.augment:
                    images = augment_batch(images, ctx.info, generator, base.crop_padding)
                loss = symmetric_cross_entropy(model(normalize(images)), data.labels[idx], cfg.sce_alpha, cfg.sce_beta)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, batches = total + float(loss.detach()), batches + 1
            record = {"epoch": epoch + 1, "train_loss": total / max(batches, 1), "lr": cfg.warmup_lr}
            history.append(record)
            if checkpointer is not None:
                checkpointer.save(epoch + 1, model, [optimizer], [], generator, history)
            report(epoch + 1, record)
        return history

    @torch.no_grad()
    def _sample_losses(self, model, data: ImageSet, normalize, batch_size: int = 512) -> torch.Tensor:
        """Every sample's SCE loss, evaluation mode, no augmentation (CPU float)."""
        cfg = self.config
        model.eval()
        out = [symmetric_cross_entropy(model(normalize(data.images[i:i + batch_size])), data.labels[i:i + batch_size],
                                       cfg.sce_alpha, cfg.sce_beta, reduction="none").cpu()
               for i in range(0, len(data), batch_size)]
        return torch.cat(out)

    def _mixmatch(self, model, labeled: ImageSet, unlabeled: ImageSet, normalize, base: TrainConfig,
                  ctx: DefenseContext, folder, report) -> list[dict]:
        cfg = self.config
        if cfg.semi_epochs == 0:
            return []
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        checkpointer = self._checkpointer(folder, labeled, "mixmatch")
        start, history = checkpointer.load(model, [optimizer], [], generator) if checkpointer else (0, [])

        def augment(images: torch.Tensor) -> torch.Tensor:
            if base.augment:
                images = augment_batch(images, ctx.info, generator, base.crop_padding)
            return images.float().div_(255.0)

        def draws(data: ImageSet):
            while True:  # endless reshuffled passes: MixMatch counts iterations, not epochs
                order = torch.randperm(len(data), generator=generator).to(data.labels.device)
                for begin in range(0, len(data) - min(cfg.semi_batch_size, len(data)) + 1, cfg.semi_batch_size):
                    yield order[begin:begin + cfg.semi_batch_size]

        labeled_draws, unlabeled_draws = draws(labeled), draws(unlabeled)
        device = labeled.labels.device
        use_amp = base.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        for epoch in range(start, cfg.semi_epochs):
            model.train()
            totals = torch.zeros(3)
            for iteration in range(cfg.semi_iterations):
                ramp = min(1.0, (epoch + iteration / cfg.semi_iterations) / cfg.rampup_epochs)
                li, ui = next(labeled_draws), next(unlabeled_draws)
                images_u = unlabeled.images[ui]
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    loss, lx, lu = mixmatch_loss(model, normalize, (augment(labeled.images[li]), labeled.labels[li]),
                                                 (augment(images_u), augment(images_u)), ctx.info.num_classes, cfg,
                                                 ramp, generator)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                totals += torch.tensor([float(loss.detach()), lx, lu])
            mean = (totals / cfg.semi_iterations).tolist()
            record = {"epoch": epoch + 1, "train_loss": mean[0], "labeled_ce": mean[1], "unlabeled_mse": mean[2],
                      "lr": cfg.lr}
            history.append(record)
            if checkpointer is not None:
                checkpointer.save(epoch + 1, model, [optimizer], [], generator, history)
            report(epoch + 1, record)
        return history
