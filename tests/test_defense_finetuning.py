"""Behaviour of the fine-tuning-family defenses nad, ft_sam and mcr on digits + smallcnn (badnet cell,
ACC 0.961 / ASR 0.966 undefended).

Shared deviation, stated: the defender holds 20% of the training set (230 images to fit, 57 held out;
run_defense's default) and batches are 64 (the digits training recipe) instead of 128/256, so an epoch
has 4 steps rather than 1. Per-test deviations and the measured numbers are in each test's docstring.
"""
import pytest
import torch
from defense_checks import defense_works, run_defense
from torch import nn

from bdcore.data import defender_subset
from bdcore.defenses import DefenseContext, DefenseSkipped, build_defense
from bdcore.defenses.ft_sam import SAMStep
from bdcore.defenses.mcr import BezierCurve, select_t
from bdcore.defenses.nad import attention_stages
from bdcore.models import build_model

NAD_TEST_PARAMS = dict(teacher_epochs=20, teacher_lr=0.05, epochs=10, lr=0.02, batch_size=64)
FT_SAM_TEST_PARAMS = dict(epochs=10, batch_size=64, lr=0.01)
MCR_TEST_PARAMS = dict(endpoint_epochs=20, endpoint_lr=0.05, curve_epochs=30, lr=0.1, batch_size=64)


# ---------------------------------------------------------------- defaults

def test_nad_defaults_follow_reference():
    c = build_defense("nad").config
    assert (c.teacher_epochs, c.epochs, c.lr, c.teacher_lr, c.batch_size) == (10, 10, 0.01, 0.01, 256)
    assert (c.betas, c.p, c.schedule, c.teacher_schedule) == ([500.0, 1000.0, 1000.0], 2.0, "constant", "constant")
    assert (c.stages, c.clean_fraction) == ("backdoorbench", 0.05)


def test_ft_sam_defaults_follow_reference():
    c = build_defense("ft_sam").config
    assert (c.epochs, c.batch_size, c.lr, c.schedule) == (100, 256, 0.01, "cosine")
    assert (c.rho, c.adaptive, c.label_smoothing, c.clean_fraction) == (2.0, True, 0.1, 0.05)


def test_mcr_defaults():
    c = build_defense("mcr").config
    assert (c.endpoint_epochs, c.endpoint_lr, c.curve_epochs, c.lr, c.batch_size) == (100, 0.01, 100, 0.01, 128)
    assert (c.num_points, c.acc_tolerance, c.t, c.clean_fraction) == (11, 0.02, None, 0.05)


# ---------------------------------------------------------------- units

def test_nad_stages_follow_the_paper_on_preactresnet(digits):
    model = build_model("preactresnet18", digits.info)
    assert attention_stages(model, torch.randn(1, 3, 32, 32)) == ["layer2", "layer3", "layer4"]
    small = build_model("smallcnn", digits.info)
    assert attention_stages(small, torch.randn(1, 3, 32, 32)) == ["features.0", "features.2", "features.4"]


def test_nad_skips_a_model_without_conv_stages(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    clean = defender_subset(digits.train, 0.05, seed=0)
    with pytest.raises(DefenseSkipped, match="nad"):
        build_defense("nad").repair(model, clean, DefenseContext(digits.info, device="cpu"))


def test_sam_step_gradient_is_taken_at_the_perturbed_point(digits):
    """The loss the loop backpropagates is L(w + e) with e = rho T^2 g / ||T g|| fixed, so its gradient
    with respect to w equals grad L evaluated at w + e (the SAM update); BN running stats move once."""
    from bdcore.data.augment import Normalizer
    from bdcore.train import TrainConfig
    from bdcore.train.loop import StepContext

    torch.manual_seed(0)
    model = build_model("smallcnn", digits.info).train()
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    ctx = StepContext(model, Normalizer(digits.info), digits.info, TrainConfig(channels_last=False), torch.device("cpu"),
                      0, torch.Generator())
    bn = model.features[0][1]
    stats_before = bn.running_mean.clone()
    loss = SAMStep(rho=2.0, adaptive=True, eta=0.0)(images, labels, None, ctx)
    loss.backward()
    assert not torch.equal(bn.running_mean, stats_before)
    after_one = bn.running_mean.clone()

    # Reference: perturb a copy explicitly, take the plain gradient there.
    import copy

    ref = copy.deepcopy(model)
    ref.load_state_dict(model.state_dict())
    x = ctx.normalize(images)
    params = list(ref.parameters())
    g = torch.autograd.grad(nn.functional.cross_entropy(ref(x), labels), params)
    norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(params, g)))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(2.0 * p.abs() ** 2 * gi / norm)
    ref.load_state_dict({**ref.state_dict(), **{k: v for k, v in model.state_dict().items() if "running" in k}})
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
    ref_loss = nn.functional.cross_entropy(ref(x), labels)
    ref_grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    for p, rg in zip(model.parameters(), ref_grads):
        assert torch.allclose(p.grad, rg, atol=1e-5, rtol=1e-4)
    assert torch.equal(bn.running_mean, after_one)


def test_mcr_curve_endpoints_and_t_rule(digits):
    a, b = build_model("smallcnn", digits.info), build_model("smallcnn", digits.info)
    curve = BezierCurve(a, b)
    for t, ref in ((0.0, a), (1.0, b)):
        point = curve.model_at(t)
        for (name, p), q in zip(point.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q), name
    ts = [i / 10 for i in range(11)]
    flat = [0.95] * 11
    assert select_t(ts, flat, 0.02) == 0.5
    dip = [0.95, 0.95, 0.95, 0.94, 0.90, 0.80, 0.90, 0.96, 0.95, 0.95, 0.95]
    assert select_t(ts, dip, 0.02) == 0.7  # 0.3 and 0.7 tie on distance; the larger t wins
    assert select_t(ts, [0.9] + [0.5] * 9 + [0.9], 0.02) == 0.5  # nothing qualifies: best interior


# ---------------------------------------------------------------- behaviour

def test_nad_removes_badnet(digits, badnet_cell):
    """Deviations: teacher 20 epochs at lr 0.05 (digits recipe) instead of 10 at 0.01; student lr 0.02
    instead of 0.01; batch 64 instead of 256. Defaults otherwise (BackdoorBench's): constant lr for both,
    student 10 epochs, attention at features.2 / features.4 (betas 500 / 1000). Measured on the
    fixture's model (ACC 0.964, ASR 0.963): ACC 0.947, ASR 0.065. Before (cosine schedules, stages
    features.0/2/4 at 500/1000/1000), at these params: seed 0 ACC 0.964 / ASR 0.069; seed 1 ACC 0.955 /
    ASR 0.065; with the paper's lr 0.01 (teacher 10, student 10 epochs) the teacher kept the backdoor and
    the student ended at ACC 0.967 / ASR 0.832; with teacher lr 0.05 for 10 epochs: ACC 0.969 / ASR 0.523."""
    run = run_defense("nad", badnet_cell, digits, **NAD_TEST_PARAMS)
    assert defense_works(run.before, run.after), (run.before, run.after, run.outcome.diagnostics)
    d = run.outcome.diagnostics
    assert d["layers"] == ["features.2", "features.4"]  # the last beta weighs the pooled map (BackdoorBench)
    assert d["betas"] == [500.0, 1000.0]
    assert 0.85 <= d["teacher_val_acc"] <= 1 and 0.85 <= d["student_val_acc"] <= 1
    assert d["final_at_loss"] is not None and 0 <= d["final_at_loss"] < 1


def test_ft_sam_removes_badnet(digits, badnet_cell):
    """Paper rho 2.0 (ASAM), label smoothing 0.1, lr 0.01 cosine; deviation: 10 epochs instead of 100.
    Measured: seed 0 ACC 0.950 / ASR 0.084; seed 1 ACC 0.950 / ASR 0.134."""
    run = run_defense("ft_sam", badnet_cell, digits, **FT_SAM_TEST_PARAMS)
    assert defense_works(run.before, run.after), (run.before, run.after, run.outcome.diagnostics)
    d = run.outcome.diagnostics
    assert (d["rho"], d["adaptive"], d["epochs"]) == (2.0, True, 10)
    assert d["val_acc_after"] >= d["val_acc_before"] - 0.05
    assert d["final_sam_loss"] >= d["final_clean_loss"] > 0  # the perturbed loss is the larger


def test_ft_sam_skips_nothing_and_runs_without_batchnorm(digits):
    """ft_sam is model-agnostic: a model without BN trains (one epoch) and keeps its outputs finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10))
    clean = defender_subset(digits.train, 0.05, seed=0)
    out = build_defense("ft_sam", epochs=1).repair(model, clean, DefenseContext(digits.info, device="cpu"))
    assert out.diagnostics["final_sam_loss"] > 0
    assert all(torch.isfinite(p).all() for p in out.model.parameters())


def test_mcr_on_badnet(digits, badnet_cell):
    """Deviations: endpoint = 20 epochs of fine-tuning at lr 0.05 (digits recipe), curve 30 epochs at
    lr 0.1, instead of 100 + 100 epochs at 0.01. The held-out rule picks t = 0.5 (accuracy is flat along the
    path). Measured at these params: seed 0 ACC 0.969 / ASR 0.318 (t=0: 0.975, t=1: 0.165 ASR); seed 1
    ACC 0.967 / ASR 0.296.
    Weaker settings, measured (seed 0, ASR at the chosen t = 0.5): endpoint 10 epochs at lr 0.01 and curve
    10 at 0.01: 0.956; endpoint 20 at 0.05, curve 10 at 0.05: 0.782; curve 40 at 0.05: 0.452; curve 20 at
    0.1: 0.461. The backdoor leaves the middle of the path only after enough curve training."""
    run = run_defense("mcr", badnet_cell, digits, **MCR_TEST_PARAMS)
    d = run.outcome.diagnostics
    assert len(d["t_grid"]) == len(d["val_acc_along_t"]) == 11 and 0 < d["chosen_t"] < 1
    assert d["selection"] == "held_out" and d["curve_epochs"] == 30
    assert defense_works(run.before, run.after), (run.before, run.after, run.outcome.diagnostics)
