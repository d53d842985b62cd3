"""D-ST: poisoned samples' features are far less consistent under a rotation/translation than clean ones
(FCT, the SD module of d_br), so a model trained from scratch can learn features with labels only from
the most consistent samples and a classifier that learns those while unlearning the least consistent.

Chen, Wu, Wang, Zhang, Yin, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned Samples",
NeurIPS 2022.

Pipeline on the poisoned training set (a training-time defense gets no backdoored model):

SD module (d_br's FCT, reused): a model of the victim's architecture (ctx.model_factory()) is trained on
the poisoned set for `sd_epochs` (2) without augmentation, with the attack cell's optimiser settings
(ctx.train_config: lr, batch, schedule; sd_epochs=None takes its epochs too). FCT(x) = mean_d (f(x) -
f(T(x)))_d^2 on its penultimate features, T = rotation + translation (d_br.random_rotate_translate);
the `clean_ratio` (alpha_c 0.20) lowest-FCT share is D_c, the `poison_ratio` (alpha_p 0.05) highest is
D_p, the rest is uncertain (D_u).

ST stage 1 (`extractor_epochs` 200): a fresh model's backbone is trained on all training images with
semi-supervised contrastive learning (bdcore/defenses/_contrastive.py): two SimCLR views per image, a
projection head (discarded after), a SupCon loss in which D_c samples keep their labels (same-label D_c
samples are extra positives) and D_p and D_u samples are unlabeled (their own other view is their only
positive). D_p gets no other treatment in this stage (authors' SupConLoss_Consistency: every sample with
flag != clean loses its label).

ST stage 2 (`classifier_epochs` 10): the backbone frozen and run in evaluation mode (as the authors'
`model.eval()`), only the model's final Linear (bdcore.analysis.final_linear) learns, on D_c and D_p, with
the mixed cross-entropy  L = CE(D_c; y) - lambda CE(D_p; y)  over each batch's D_c and D_p samples (y the
given labels, poisoned for true poison), lambda = `unlearning_weight` 0.001; the uncertain set is not
used (authors' train_classifier.py loads only the clean and poison sample files). Without
`classifier_augment` the frozen features are the same every epoch, so they are computed once and the
head trains on them (same batches, loss, schedule and checkpoints as running the backbone per batch).

Defaults, with sources (github.com/SCLBD/Effective_backdoor_defense: README, ST/train_extractor.py,
ST/train_classifier.py, ST/losses.py; its ST parameters are SupContrast's):
alpha_c 0.20, alpha_p 0.05 (paper; --clean_ratio / --poison_ratio); T rotation 180 degrees + translation
0.2 (authors' FCT code, as d_br); SD model 2 epochs without augmentation (README, train_attack_noTrans.py
--epochs 2); extractor 200 epochs, SGD lr 0.5, momentum 0.9, weight decay 1e-4, batch 512, temperature
0.1, cosine schedule, projection to 128 dimensions (README and SupContrast); classifier 10 epochs, SGD lr
5, momentum 0.9, weight decay 0, batch 512, constant lr (its step decays at epochs 60/75/90 are never
reached in 10 epochs), SimCLR-style augmentation of the classifier's inputs (the authors' train
transform; `classifier_augment`), lambda 0.001 (train_classifier.py's loss).
Each stage checkpoints under ctx.work_dir/d_st_{sd,extractor,classifier} and resumes; ctx.on_epoch_end
sees every epoch of the three trainings numbered consecutively, with "d_st_stage" 0 (SD model) / 1 / 2.

Deviations, with reasons:
- No intra-class fine-tuning of the SD model (the authors fine-tune it 10 epochs with L_intra, the
  cosine similarity of class centres): not implemented, as in d_br. On digits the FCT split is the
  weak point of the paper's SD settings (measured below), which `sd_epochs` and `rotation` adjust.
- Stage-1 positives are symmetric: a labeled anchor's extra positives are the labeled same-label
  samples only. The authors' loss masks only the rows of unlabeled anchors, so a D_c anchor there also
  pulls same-label D_u / D_p samples (e.g. unflagged poison carrying the target label) towards its
  class, while the paper describes D_p and D_u as unlabeled.
- No learning-rate warm-up (SupContrast warms up 10 epochs when batch > 256; TrainConfig has none) and
  no temperature / base_temperature (0.1 / 0.07) factor on the loss (for SGD a 1.43x learning rate).
- SimCLR augmentation from _contrastive.py: crop scale 0.08-1 (SupContrast: 0.2-1), no hue jitter.
- No model selection: the authors save the classifier epoch with the best test accuracy, which reads
  the test set; the last epoch's model is returned.

Measured on digits, badnet 10%, smallcnn (undefended test fixture ACC 0.961 / ASR 0.966), 1 CPU thread:
- SD (AUROC of FCT for poison / poison samples among the 287 in D_c, chance 0.5 / 29): paper's SD
  model (2 epochs, no augmentation) with rotation 180: 0.51 / 31 (seed 0), 0.53 / 22 (seed 1); rotation 0:
  0.60 / 13, 0.71 / 11; 5 epochs, rotation 0: 0.73 / 6, 0.67 / 12; the attack's 10 augmented epochs,
  rotation 0: 0.82 / 9, 0.80 / 9 (D_p precision 0.87 / 0.93, vs 0.11-0.20 for the no-augmentation
  models). The 9 poison samples in D_c at 10 epochs (seed 0) are relabeled ones (true classes 1-9).
- ST: the paper's classifier schedule cannot fit on digits: D_c + D_p is 358 samples, so batch 512 makes
  one step per epoch (10 steps in all); lr 5 diverges on smallcnn's features (ACC 0.12) and lr 0.5 for
  20 epochs reaches ACC 0.25-0.40. The features are fine (a standardised linear probe on D_c: ACC 0.87
  after 20 contrastive epochs at lr 0.5, 0.93 at lr 0.05 after 15) but offset and low-variance (mean
  0.31, per-dimension std 0.04-0.24), so plain SGD on the head needs many steps: batch 32, lr 0.5,
  100 epochs (1,200 steps), no augmentation (the strong views cost 16 points: ACC 0.74 vs 0.90).
- ST with the paper's SD (2 epochs, rotation 180; 31 poison in D_c) and the digits ST schedule below:
  ACC 0.766 / ASR 0.676 (seed 0). Poison in D_c carries the target label into the supervised positives
  (most likely how the backdoor survives): with 12 poison samples in D_c (seed 1, 5-epoch SD model)
  ASR stays at 0.52.
- Digits schedule (tests/test_defense_d_st.py): the SD model trained with the attack's config
  (sd_epochs=None, sd_augment=True: 10 epochs, augmentation) and rotation 0, extractor 20 epochs at batch
  256 and lr 0.05, classifier batch 32 / lr 0.5 / 100 epochs / no augmentation, lambda 0.001:
  seed 0 ACC 0.903 / ASR 0.112 (RA 0.788), seed 1 ACC 0.925 / ASR 0.000 (RA 0.891); in the pytest session
  (2 threads) ACC 0.914 / ASR 0.159 (RA 0.763; AUROC 0.84, D_p precision 0.94, 8 poison in D_c),
  the ACC bar (0.911) met by one test image. With sd_epochs 5 (no augmentation) instead: seed 0 0.922 / 0.009,
  seed 1 0.939 / 0.520. A larger lambda makes the unbounded ascent on D_p diverge: 0.1 -> ACC 0.733 /
  ASR 0.000 (loss -23), 1.0 -> ACC 0.078.
- Time on one thread of the (shared) machine: SD model 12.7 s (10 epochs; 2 epochs 2.3 s), extractor
  70-89 s (3.5-4.5 s an epoch at batch 256), classifier 12-14 s (100 epochs of 12 steps) with the backbone
  run on every batch; with the features cached (no augmentation), back to back on a loaded machine: 1
  thread 28.3 -> 5.1 s, 2 threads 177 -> 35 s, the same weights either way.

The poison indices are read only for the diagnostics (split quality), never by the method.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.analysis import final_linear
from bdcore.defenses._contrastive import PenultimateTap, contrastive_views, train_contrastive
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, StageEpochs, TrainingTimeDefense
from bdcore.defenses.d_br import DBR, DBRConfig
from bdcore.defenses.detection import detection_quality
from bdcore.defenses.registry import register_defense
from bdcore.train import StepContext, TrainConfig, seed_everything, train_model
from bdcore.train.loop import to_model_input


class DSTConfig(DefenseConfig):
    # SD module (d_br's FCT split)
    clean_ratio: float = Field(0.20, gt=0, lt=1)  # alpha_c: lowest-FCT share, labels kept (D_c)
    poison_ratio: float = Field(0.05, gt=0, lt=1)  # alpha_p: highest-FCT share, unlearned (D_p)
    rotation: float = Field(180.0, ge=0, le=180)  # FCT transform: degrees, uniform in [-rotation, rotation]
    translate: float = Field(0.2, ge=0, lt=1)  # FCT transform: max shift as a share of width / height
    sd_epochs: int | None = Field(2, ge=1)  # SD model's epochs; None: the attack's (ctx.train_config)
    sd_augment: bool = False  # SD model trained without augmentation (authors' train_attack_noTrans.py)
    # ST stage 1: semi-supervised contrastive feature extractor
    extractor_epochs: int = Field(200, ge=0)
    extractor_lr: float = Field(0.5, gt=0)
    extractor_batch_size: int = Field(512, ge=1)
    extractor_weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.1, gt=0)
    projection_dim: int = Field(128, ge=1)
    # ST stage 2: linear classifier on the frozen extractor, mixed cross-entropy
    classifier_epochs: int = Field(10, ge=0)
    classifier_lr: float = Field(5.0, gt=0)
    classifier_batch_size: int = Field(512, ge=1)
    classifier_weight_decay: float = Field(0.0, ge=0)
    classifier_augment: bool = True  # SimCLR views of the training images (authors' SupContrast transform)
    unlearning_weight: float = Field(1e-3, ge=0)  # lambda: weight of -CE on D_p in the mixed loss
    momentum: float = Field(0.9, ge=0)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, poison: torch.Tensor,
                        unlearning_weight: float) -> torch.Tensor:
    """Mean CE over the batch's D_c samples minus `unlearning_weight` times the mean CE over its D_p
    samples (`poison` True), with their given (possibly poisoned) labels; a side absent from the
    batch contributes nothing."""
    loss = logits.new_zeros(())
    clean = ~poison
    if clean.any():
        loss = loss + F.cross_entropy(logits[clean], labels[clean])
    if poison.any() and unlearning_weight > 0:
        loss = loss - unlearning_weight * F.cross_entropy(logits[poison], labels[poison])
    return loss


class MixedCrossEntropyStep:
    """Stage 2 training step: the backbone runs frozen in evaluation mode (its BatchNorm statistics
    stay the extractor's), only the final Linear learns, with the mixed cross-entropy.

    Without augmentation a sample's frozen features are the same in every epoch, so they are computed
    once and each batch indexes them (`images`: the training subset's uint8 images, in the loop's
    order of `indices`). They are computed at the first batch, not before the loop, so that they come
    from the model as the loop holds it (device, memory format, autocast, a resumed checkpoint's
    weights) and a run resumed after its last epoch computes none. `cache_features=False` runs the
    backbone on every batch, as the augmented path must."""

    FEATURE_BATCH = 512  # samples per forward pass when filling the cache (bounds its memory)

    def __init__(self, model, poison: torch.Tensor, unlearning_weight: float, augment: bool,
                 images: torch.Tensor | None = None, cache_features: bool = True):
        self.tap = PenultimateTap(model)
        self.head = final_linear(model)
        self.poison = poison.bool()
        self.unlearning_weight = unlearning_weight
        self.augment = augment
        self.cache_features = cache_features and not augment
        if self.cache_features and images is None:
            raise ValueError("caching the frozen features needs the training images")
        self.images = images
        self.features: torch.Tensor | None = None

    def to(self, device) -> MixedCrossEntropyStep:
        self.poison = self.poison.to(device)
        return self

    def backbone_features(self, images: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        with torch.no_grad():
            ctx.model(to_model_input(images, ctx))
        return self.tap.features.detach()

    def cached_features(self, ctx: StepContext) -> torch.Tensor:
        if self.features is None:
            images = self.images
            self.features = torch.cat([
                self.backbone_features(images[i:i + self.FEATURE_BATCH].to(ctx.device).float().div_(255.0), ctx)
                for i in range(0, len(images), self.FEATURE_BATCH)])
            self.images = None  # the cache replaces them
        return self.features

    def __call__(self, images, labels, indices, ctx: StepContext) -> torch.Tensor:
        ctx.model.eval()  # the loop sets training mode each epoch; the extractor is frozen
        if self.cache_features:
            features = self.cached_features(ctx)[indices]
        else:
            if self.augment:
                images = contrastive_views(images, ctx.info, ctx.generator)
            features = self.backbone_features(images, ctx)
        logits = self.head(features)
        return mixed_cross_entropy(logits, labels, self.poison[indices], self.unlearning_weight)


@register_defense("d_st")
class DST(TrainingTimeDefense):
    config_class = DSTConfig
    config: DSTConfig

    def sd_module(self) -> DBR:
        cfg = self.config
        return DBR(DBRConfig(clean_ratio=cfg.clean_ratio, poison_ratio=cfg.poison_ratio, rotation=cfg.rotation,
                             translate=cfg.translate, seed=cfg.seed))

    def train(self, poisoned, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        if ctx.model_factory is None:
            raise ValueError("d_st trains a model from scratch and needs ctx.model_factory")
        base = ctx.train_config or TrainConfig()
        data = poisoned.data
        stages = StageEpochs(ctx.on_epoch_end, "d_st_stage")
        stage_loss: dict[str, float | None] = {}
        stage_epochs: dict[str, int] = {}
        stage_seconds: dict[str, float] = {}

        def checkpoint(stage: str) -> Path | None:
            return Path(ctx.work_dir) / f"d_st_{stage}" if ctx.work_dir is not None else None

        def record(stage: str, result, epochs: int) -> None:
            stage_loss[stage] = result.history[-1]["train_loss"] if result.history else None
            stage_epochs[stage] = epochs
            stage_seconds[stage] = result.seconds
            stages.advance(epochs)

        # SD module: a model of the victim's architecture trained on the poisoned set, then FCT.
        sd_config = base.model_copy(update={"epochs": cfg.sd_epochs or base.epochs, "augment": cfg.sd_augment,
                                            "device": ctx.device})
        seed_everything(cfg.seed)
        sd_model = ctx.model_factory()
        result = train_model(sd_model, data, ctx.info, sd_config, seed=cfg.seed, on_epoch_end=stages.reporter(0),
                             checkpoint_dir=checkpoint("sd"), checkpoint_tag="d_st-sd")
        record("sd", result, sd_config.epochs)
        sd = self.sd_module()
        detection = sd.detect(sd_model, data, None, ctx)
        del sd_model
        n_clean, n_poison = detection.diagnostics["n_clean_set"], detection.diagnostics["n_poison_set"]
        order = torch.argsort(detection.scores, stable=True)
        clean_rows, poison_rows = order[:n_clean], order[-n_poison:]
        groups = torch.full((len(data),), -1, dtype=torch.long)
        groups[clean_rows] = data.labels.cpu()[clean_rows]
        # Checkpoint tags name what each stage's fingerprint (TrainConfig, seed, data size) misses: the
        # split, and the settings outside TrainConfig, so another run's checkpoint is never resumed.
        split = hashlib.sha256(groups.numpy().tobytes() + detection.flagged.numpy().tobytes()).hexdigest()[:16]
        extractor_tag = f"d_st-extractor-{split}-{cfg.temperature}-{cfg.projection_dim}"
        # The classifier's checkpoint holds the whole model, so its tag also names the extractor's run.
        classifier_tag = (f"d_st-classifier-{extractor_tag}-{cfg.extractor_epochs}-{cfg.extractor_lr}-"
                          f"{cfg.extractor_batch_size}-{cfg.extractor_weight_decay}-{cfg.momentum}-"
                          f"{cfg.unlearning_weight}-{cfg.classifier_augment}")

        # ST stage 1: SupCon with D_c's labels; D_p and the uncertain samples are unlabeled.
        seed_everything(cfg.seed)
        model = ctx.model_factory()
        if cfg.extractor_epochs > 0:
            extractor_config = TrainConfig(
                epochs=cfg.extractor_epochs, lr=cfg.extractor_lr, batch_size=cfg.extractor_batch_size,
                momentum=cfg.momentum, weight_decay=cfg.extractor_weight_decay, schedule="cosine", augment=False,
                amp=base.amp, channels_last=base.channels_last, device=ctx.device)
            result = train_contrastive(model, data, ctx.info, extractor_config, groups=groups,
                                       temperature=cfg.temperature, projection_dim=cfg.projection_dim, seed=cfg.seed,
                                       checkpoint_dir=checkpoint("extractor"), checkpoint_tag=extractor_tag,
                                       on_epoch_end=stages.reporter(1))
            record("extractor", result, cfg.extractor_epochs)

        # ST stage 2: the final Linear on D_c (CE) and D_p (-lambda CE); the uncertain set is unused.
        rows = torch.cat([clean_rows, poison_rows]).sort().values
        poison_flags = torch.zeros(len(data), dtype=torch.bool)
        poison_flags[poison_rows] = True
        if cfg.classifier_epochs > 0:
            classifier_config = TrainConfig(
                epochs=cfg.classifier_epochs, lr=cfg.classifier_lr, batch_size=cfg.classifier_batch_size,
                momentum=cfg.momentum, weight_decay=cfg.classifier_weight_decay, schedule="constant", augment=False,
                amp=base.amp, channels_last=base.channels_last, device=ctx.device)
            classifier_data = data.subset(rows.to(data.labels.device))
            step = MixedCrossEntropyStep(model, poison_flags[rows], cfg.unlearning_weight, cfg.classifier_augment,
                                         images=classifier_data.images)
            try:
                result = train_model(model, classifier_data, ctx.info, classifier_config,
                                     seed=cfg.seed, step=step, on_epoch_end=stages.reporter(2),
                                     checkpoint_dir=checkpoint("classifier"), checkpoint_tag=classifier_tag,
                                     parameters=list(step.head.parameters()))
            finally:
                step.tap.remove()
            record("classifier", result, cfg.classifier_epochs)

        model.to("cpu").eval()
        quality = detection_quality(detection, poisoned.poison_indices)
        positive = torch.zeros(len(data), dtype=torch.bool)
        positive[torch.as_tensor(poisoned.poison_indices, dtype=torch.long).cpu()] = True
        return DefenseOutcome(model, {
            **detection.diagnostics,
            **quality,
            "clean_set_poison": int(positive[clean_rows].sum()),
            "poison_set_poison": int(positive[poison_rows].sum()),
            "sd_epochs": stage_epochs.get("sd", 0),
            "extractor_epochs": stage_epochs.get("extractor", 0),
            "classifier_epochs": stage_epochs.get("classifier", 0),
            "final_sd_loss": stage_loss.get("sd"),
            "final_extractor_loss": stage_loss.get("extractor"),
            "final_classifier_loss": stage_loss.get("classifier"),
            "sd_seconds": stage_seconds.get("sd"),
            "extractor_seconds": stage_seconds.get("extractor"),
            "classifier_seconds": stage_seconds.get("classifier"),
        })
