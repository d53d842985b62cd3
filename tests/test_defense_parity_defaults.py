"""Defaults and behaviour that follow BackdoorBench (HEAD f02e353) for npd, nad, spectral, strip, clp
and i_bau: fast unit tests on tiny tensors and models (each runs in seconds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdcore.data.base import DatasetInfo, DefenderData, ImageSet
from bdcore.defenses import DefenseContext, build_defense
from bdcore.models import build_model

# Digits-like: 3 x 32 x 32, 10 classes (what bdcore's preactresnet18 is built for in the tests).
DIGITS_LIKE = DatasetInfo("digits_like", 10, 3, 32, 32, (0.3, 0.3, 0.3), (0.4, 0.4, 0.4))


def _images(n: int, info: DatasetInfo, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *info.image_shape), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n, dtype=torch.int64) % info.num_classes)


def _empty(info: DatasetInfo) -> ImageSet:
    return ImageSet(torch.zeros(0, *info.image_shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))


# -- npd ----------------------------------------------------------------------------------------------

def test_npd_main_phase_keeps_polarizer_bn_in_eval_mode_at_constant_lr(monkeypatch):
    """BackdoorBench defense/npd.py: warm-up = plain SGD lr 1e-4 on CE of clean data with the
    polarizer in train mode; main phase = SGD lr 0.01 (momentum 0.9, wd 5e-4) never scheduled, the
    polarizer in eval mode for every batch (its BN statistics stay at the warm-up's); the clean
    subset is loaded with the test transform (no augmentation)."""
    from bdcore.defenses import npd
    from bdcore.train import TrainConfig
    from bdcore.train.loop import StepContext
    from bdcore.data.augment import Normalizer

    info = DatasetInfo("tiny", 4, 3, 8, 8, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model = build_model("smallcnn", info)
    clean = DefenderData(_images(16, info), _empty(info))
    calls = []
    real = npd.fine_tune

    def spy(model, data, ctx, epochs, lr, batch_size, seed, stage="finetune", schedule="cosine", step=None,
            parameters=None, **overrides):
        bn = next(m for m in model.modules() if isinstance(m, npd.NeuralPolarizer)).bn
        record = dict(stage=stage, lr=lr, schedule=schedule, augment=overrides.get("augment"),
                      momentum=overrides.get("momentum"), weight_decay=overrides.get("weight_decay"))
        if stage == "npd_warmup":  # the warm-up loss is plain cross-entropy on the clean batch
            images, labels = data.images[:8].float() / 255, data.labels[:8]
            sctx = StepContext(model, Normalizer(ctx.info), ctx.info, TrainConfig(), torch.device("cpu"), 0,
                               torch.Generator().manual_seed(0))
            loss = step(images, labels, torch.arange(8), sctx)
            record["warmup_loss_is_ce"] = torch.allclose(loss, F.cross_entropy(model(sctx.normalize(images)), labels))
        before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
        out = real(model, data, ctx, epochs, lr, batch_size, seed, stage=stage, schedule=schedule, step=step,
                   parameters=parameters, **overrides)
        after = (bn.running_mean, bn.running_var, int(bn.num_batches_tracked))
        record["bn_stats_unchanged"] = torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) \
            and before[2] == after[2]
        calls.append(record)
        return out

    monkeypatch.setattr(npd, "fine_tune", spy)
    build_defense("npd", warmup_epochs=1, epochs=2, batch_size=8).repair(model, clean,
                                                                         DefenseContext(info, device="cpu"))
    warm, main = calls
    assert warm["stage"] == "npd_warmup" and main["stage"] == "npd"
    assert (main["lr"], main["schedule"], main["augment"]) == (0.01, "constant", False)
    assert main["bn_stats_unchanged"], "the polarizer's BN must stay in eval mode in the main phase"
    assert (warm["lr"], warm["schedule"], warm["augment"]) == (1e-4, "constant", False)
    assert (warm["momentum"], warm["weight_decay"]) == (0.0, 0.0)
    assert warm["warmup_loss_is_ce"] and not warm["bn_stats_unchanged"]  # BN in train mode in the warm-up


# -- nad ----------------------------------------------------------------------------------------------

def test_nad_schedule_and_preactresnet_stages_follow_backdoorbench(monkeypatch):
    """BackdoorBench defense/nad.py + config/defense/nad/*.yaml: teacher `te_epochs` 10 and student
    `te_epochs` 10 (its `epochs` 100 is never used), batch 256; the student's lr is reset to 0.01 every
    epoch and its scheduler is never stepped (constant); attention at the outputs of children[:-3],
    [:-2], [:-1] of PreActResNet18 = layer3 (beta1 500), layer4 (beta2 1000), the pooled 1x1 features
    (beta3 1000, whose normalised attention map is constant, so it contributes nothing)."""
    from bdcore.defenses import nad

    c = build_defense("nad").config
    assert (c.teacher_epochs, c.epochs, c.batch_size, c.lr, c.teacher_lr) == (10, 10, 256, 0.01, 0.01)
    assert (c.betas, c.p, c.schedule, c.teacher_schedule) == ([500.0, 1000.0, 1000.0], 2.0, "constant", "constant")
    calls = []

    def spy(model, data, ctx, epochs, lr, batch_size, seed, stage="finetune", schedule="cosine", step=None, **kw):
        calls.append(dict(stage=stage, epochs=epochs, lr=lr, batch_size=batch_size, schedule=schedule,
                          stages=getattr(step, "stages", None), betas=getattr(step, "betas", None)))
        return []  # no training: the test reads the plan, not its outcome

    monkeypatch.setattr(nad, "fine_tune", spy)
    model = build_model("preactresnet18", DIGITS_LIKE)
    clean = DefenderData(_images(4, DIGITS_LIKE), _empty(DIGITS_LIKE))
    outcome = build_defense("nad").repair(model, clean, DefenseContext(DIGITS_LIKE, device="cpu"))
    teacher, student = calls
    plan = [(c["stage"], c["epochs"], c["batch_size"], c["lr"], c["schedule"]) for c in (teacher, student)]
    assert plan == [("nad_teacher", 10, 256, 0.01, "constant"), ("nad_student", 10, 256, 0.01, "constant")]
    assert student["stages"] == ["layer3", "layer4"] and student["betas"] == [500.0, 1000.0]
    assert outcome.diagnostics["layers"] == ["layer3", "layer4"]


# -- spectral -----------------------------------------------------------------------------------------

def _spectral_on(monkeypatch, features, labels, clean_features, clean_labels, **params):
    from bdcore.defenses import spectral
    from bdcore.defenses._latent import LatentSets

    sets = LatentSets(np.asarray(features, float), np.asarray(labels), np.asarray(clean_features, float),
                      np.asarray(clean_labels))
    monkeypatch.setattr(spectral, "latent_sets", lambda *a, **k: sets)
    info = DatasetInfo("toy", 2, 1, 1, 1, (0.0,), (1.0,))
    return build_defense("spectral", **params).detect(None, None, None, DefenseContext(info, device="cpu"))


def test_spectral_default_is_backdoorbench_percentile_rule(monkeypatch):
    """BackdoorBench defense/spectral.py (percentile 85): per label, the top right singular vector v of
    the representations centred on the label's own mean; score |<R_i, v>| of the UNcentred
    representation; flagged: score > the label's 85th percentile (np.percentile)."""
    x = np.arange(1, 21, dtype=float)
    wiggle = np.where(np.arange(20) % 2 == 0, 0.01, -0.01)
    features = np.concatenate([np.stack([x, wiggle], 1), np.stack([x + 100, wiggle], 1)])
    labels = np.repeat([0, 1], 20)
    clean = np.array([[5.0, 0.0], [6.0, 0.0], [105.0, 0.0], [106.0, 0.0]])
    detection = _spectral_on(monkeypatch, features, labels, clean, [0, 0, 1, 1])
    # 85th percentile of 1..20 is 17.15: samples 18, 19, 20 of each label (15%, as 1.5 x eps 0.1)
    assert np.flatnonzero(detection.flagged).tolist() == [17, 18, 19, 37, 38, 39]
    assert np.allclose(detection.scores[:20], x, atol=0.02)  # |projection| of the raw representation
    c = build_defense("spectral").config
    assert (c.centre, c.score, c.flag_rule, c.percentile) == ("label", "raw", "percentile", 85.0)


def test_spectral_clean_quantile_rule_stays_a_named_option(monkeypatch):
    x = np.arange(1, 21, dtype=float)
    features = np.stack([x, np.where(np.arange(20) % 2 == 0, 0.01, -0.01)], 1)
    clean = np.array([[3.5, 0.0], [5.0, 0.0], [6.5, 0.0]])
    detection = _spectral_on(monkeypatch, features, np.zeros(20, int), clean, [0, 0, 0],
                             centre="clean", score="centred", flag_rule="clean_quantile")
    # centre 5, scores (x - 5)^2, threshold the 95% quantile of the references' scores (2.25)
    assert np.allclose(detection.scores, (x - 5) ** 2, atol=1e-3)
    assert np.flatnonzero(detection.flagged).tolist() == [i for i in range(20) if i not in (3, 4, 5)]


# -- strip --------------------------------------------------------------------------------------------

def test_strip_boundary_is_backdoorbench_order_statistic_at_10_percent_frr():
    """BackdoorBench detection_pretrain/strip.py: STRIP(..., N=100, defense_fpr=0.1); boundary = the
    sorted clean entropies at index int(0.1 * n), flagged: entropy strictly below it (the upper
    threshold is +inf: one-sided)."""
    info = DatasetInfo("toy", 2, 1, 2, 2, (0.5,), (0.5,))
    strip = build_defense("strip")
    assert (strip.config.frr, strip.config.n_superimpose) == (0.1, 100)
    reference = torch.arange(20, dtype=torch.float32).flip(0)
    inspected = torch.tensor([0.5, 1.5, 2.5, 10.0, 30.0])
    strip.entropies = lambda model, images, clean, ctx, salt=0: reference if salt == 1 else inspected
    clean = DefenderData(_images(20, info), _empty(info))
    detection = strip.detect(None, _images(5, info), clean, DefenseContext(info, device="cpu"))
    assert detection.diagnostics["entropy_boundary"] == 2.0  # sorted[int(0.1 * 20)] = sorted[2]
    assert detection.flagged.tolist() == [True, True, False, False, False]


# -- clp ----------------------------------------------------------------------------------------------

def test_clp_pairs_each_bn_with_the_conv_before_it_in_module_order():
    """BackdoorBench defense/clp.py CLP_prune: named_modules in order, each BatchNorm2d paired with the
    last Conv2d seen before it. On PreActResNet18: bn2 with its block's conv1, bn1 with the previous
    block's last conv (conv2, or its projection shortcut, registered after conv2), the first bn1 with
    the stem."""
    from bdcore.defenses.clp import module_order_pairs

    model = build_model("preactresnet18", DIGITS_LIKE)
    pairs = {bn: conv for bn, _norm, conv, _conv in module_order_pairs(model)}
    assert pairs["layer1.0.bn1"] == "conv1"
    assert pairs["layer1.0.bn2"] == "layer1.0.conv1"
    assert pairs["layer1.1.bn1"] == "layer1.0.conv2"
    assert pairs["layer2.0.bn1"] == "layer1.1.conv2"
    assert pairs["layer2.1.bn1"] == "layer2.0.shortcut.0"
    assert pairs["layer4.1.bn2"] == "layer4.1.conv1"
    assert all(name.startswith("layer") for name in pairs if name != "bn")


def test_clp_prunes_the_bn_paired_in_module_order_and_leaves_the_conv():
    """An outlying filter of layer1.0.conv2 makes channel 5 of layer1.1.bn1 (its module-order BN)
    outlying: that BN's scale and shift are zeroed (BackdoorBench zeroes the BN only); the conv keeps
    its weights."""
    torch.manual_seed(0)
    model = build_model("preactresnet18", DIGITS_LIKE).eval()
    with torch.no_grad():
        model.layer1[0].conv2.weight[5] *= 100
    conv_before = model.layer1[0].conv2.weight.detach().clone()
    clean = DefenderData(_images(4, DIGITS_LIKE), _empty(DIGITS_LIKE))
    outcome = build_defense("clp").repair(model, clean, DefenseContext(DIGITS_LIKE, device="cpu"))
    pruned = outcome.model
    bn = pruned.layer1[1].bn1
    assert float(bn.weight.detach()[5]) == 0.0 and float(bn.bias.detach()[5]) == 0.0
    assert torch.equal(pruned.layer1[0].conv2.weight.detach(), conv_before)
    assert outcome.diagnostics["pruned_per_layer"]["layer1.1.bn1"] >= 1


# -- i_bau --------------------------------------------------------------------------------------------

def test_i_bau_perturbation_lives_in_normalised_input_space(monkeypatch):
    """BackdoorBench defense/i-bau.py: the loader normalises the images and the universal perturbation
    is added to that normalised input, unclamped (the clamp to [0, 1] is commented out), stepped by SGD
    lr 10 (here 0.01, small enough that nothing could clamp); the outer optimizer is Adam with
    amsgrad (utils/aggregate_block/train_settings_generate.py). One inner step therefore moves the
    model's input by lr * dCE/dinput, in normalised units (pixel space: 1/std^2 = 16x larger here)."""
    info = DatasetInfo("toy", 3, 3, 4, 4, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    g = torch.Generator().manual_seed(1)
    image = torch.randint(100, 156, (1, 3, 4, 4), generator=g, dtype=torch.uint8)
    data = ImageSet(image.repeat(4, 1, 1, 1), torch.tensor([0, 1, 2, 0]))
    seen = []
    model.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    adam_kwargs = {}
    real_adam = torch.optim.Adam

    def adam(params, **kw):
        adam_kwargs.update(kw)
        return real_adam(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", adam)
    x = (image.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        own = model(x).argmax(1).repeat(2)
    d = torch.zeros(1, 3, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x.repeat(2, 1, 1, 1) + d), own), d)
    seen.clear()
    build_defense("i_bau", n_rounds=1, K=1, batch_size=2, inner_lr=0.01, augment=False).repair(
        model, DefenderData(data, _empty(info)), DefenseContext(info, device="cpu"))
    # inner loop, per batch of 2: a clean forward (own labels) then a perturbed one; batch 2 sees one
    # step (the accuracy pass before it runs all 4 images at once)
    inner = [x for x in seen if x.shape[0] == 2]
    clean_input, second_perturbed = inner[0][0], inner[3][0]
    step = second_perturbed - clean_input
    assert torch.allclose(step, 0.01 * grad[0], atol=1e-6), (step.abs().max(), (0.01 * grad).abs().max())
    assert adam_kwargs.get("amsgrad") is True and adam_kwargs.get("lr") == 1e-4
