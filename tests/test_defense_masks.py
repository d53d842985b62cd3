"""Behaviour of the neuron-mask defenses anp, rnp and the neural polarizer npd on digits + smallcnn.

The defender holds 20% of digits' training set (run_defense's default: 230 images to fit, 57 held
out). Deviations from the paper defaults, to fit CPU time, are stated per test with the measured
before/after ACC/ASR.
"""

import pytest
import torch
from defense_checks import defense_works, reaches_reference, run_defense
from torch import nn

from bdcore.data import defender_subset
from bdcore.defenses import DefenseContext, DefenseSkipped, build_defense
from bdcore.defenses.npd import PolarizedLayer, choose_layer
from bdcore.models import build_model

ANP_TEST_PARAMS = dict(iterations=100, batch_size=64)
RNP_TEST_PARAMS = dict()
NPD_TEST_PARAMS = dict(warmup_epochs=1, budget=2.0, lr=0.005)


def test_anp_defaults_follow_reference():
    cfg = build_defense("anp").config
    assert (cfg.iterations, cfg.eps, cfg.alpha, cfg.anp_steps, cfg.clip_noise) == (2000, 0.4, 0.2, 1, False)
    assert (cfg.mask_lr, cfg.mask_momentum, cfg.batch_size) == (0.01, 0.9, 256)  # BackdoorBench yaml lr, batch_size
    assert (cfg.pruning_max, cfg.pruning_step, cfg.threshold, cfg.clean_fraction) == (0.90, 0.05, None, 0.05)
    assert cfg.acc_ratio == 0.1 and not hasattr(cfg, "max_val_acc_drop")


def test_rnp_defaults_follow_reference():
    cfg = build_defense("rnp").config
    assert cfg.clean_fraction == 0.01
    assert (cfg.unlearning_lr, cfg.unlearning_epochs, cfg.clean_threshold) == (0.01, 20, 0.20)
    assert (cfg.unlearning_milestones, cfg.unlearning_gamma, cfg.unlearning_weight_decay) == ([10, 20], 0.1, 5e-4)
    assert (cfg.alpha, cfg.recovering_lr, cfg.recovering_epochs, cfg.batch_size) == (0.2, 0.2, 20, 256)
    assert (cfg.pruning_max, cfg.pruning_step, cfg.threshold, cfg.acc_ratio) == (0.90, 0.05, None, 0.1)
    assert not hasattr(cfg, "max_grad_norm") and not hasattr(cfg, "max_val_acc_drop")


def test_npd_defaults_follow_reference():
    cfg = build_defense("npd").config
    assert cfg.layer is None and cfg.clean_fraction == 0.05
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.epochs, cfg.lr, cfg.batch_size) == (5, 1e-4, 50, 0.01, 128)
    assert (cfg.norm, cfg.attack_budget(), cfg.attack_steps(), cfg.adv_lr, cfg.hit_rate_stop) == ("l2", 3.0, 2, 0.1, 0.6)
    assert (cfg.lambda_clean, cfg.lambda_adv, cfg.lambda_top, cfg.lambda_target) == (1.0, 0.4, 0.4, 0.4)
    assert cfg.augment is False
    linf = build_defense("npd", norm="linf").config
    assert (linf.attack_budget(), linf.attack_steps()) == (0.2, 10)


# ANP and RNP against BackdoorBench's own anp.py / rnp.py on the same cell (digits, smallcnn, badnet 10%,
# defender 20%; the reference run in docs/methods.md: undefended ACC 0.972 / ASR 0.972):
#   BackdoorBench anp at ANP_TEST_PARAMS (100 iterations, batch 64; level of lowest TEST ASR within
#       acc_ratio 0.1): ACC 0.903, ASR 0.028 (threshold 0.80, 16 neurons, all in the last BN); at 400
#       iterations, batch 256: ACC 0.939, ASR 0.162 (threshold 0.70). Ours (ANP_TEST_PARAMS; largest
#       held-out threshold within acc_ratio 0.1): ACC 0.891, ASR 0.012 (threshold 0.75, 9 of 224
#       neurons; held-out 0.948 -> 0.862).
#   BackdoorBench rnp (returns its fixed threshold 0.70): ACC 0.262, ASR 0.000. Ours (held-out
#       selection): ACC 0.914, ASR 0.090 (threshold 0.30, 8 neurons; held-out 0.948 -> 0.879).
# Both therefore run against the reference's outcome (reaches_reference: ASR within 15 points of the
# reference's, ACC within the 10-point budget both selections use), not the 5-point bar, which the
# reference's anp meets and its rnp does not.
ANP_REFERENCE_ASR = 0.028
RNP_REFERENCE_ASR = 0.000


def test_anp_prunes_badnet_neurons(digits, badnet_cell):
    """ANP_TEST_PARAMS: 100 iterations at batch 64 instead of 2000 at 256 (CPU time)."""
    run = run_defense("anp", badnet_cell, digits, **ANP_TEST_PARAMS)
    d = run.outcome.diagnostics
    assert not reaches_reference(run.before, run.before, ANP_REFERENCE_ASR)  # the no-op control
    assert 0 <= d["pruned_count"] <= d["total_neurons"] and (d["threshold"] is None or 0 <= d["threshold"] <= 0.9)
    assert len(d["val_acc_by_threshold"]) == 19 and d["iterations"] == 100
    assert d["val_acc_after"] > d["val_acc_before"] * (1 - d["acc_ratio"]) - 1e-6  # the held-out selection rule
    assert reaches_reference(run.before, run.after, ANP_REFERENCE_ASR), (run.before, run.after, d)


def test_rnp_prunes_badnet_neurons(digits, badnet_cell):
    """BackdoorBench defaults except clean_fraction 0.2 (run_defense's default)."""
    run = run_defense("rnp", badnet_cell, digits, **RNP_TEST_PARAMS)
    d = run.outcome.diagnostics
    assert not reaches_reference(run.before, run.before, RNP_REFERENCE_ASR)  # the no-op control
    assert 1 <= d["unlearning_epochs"] <= 20 and 0 <= d["unlearning_acc_reached"] <= 1
    assert 0 <= d["pruned_fraction"] <= 1
    assert reaches_reference(run.before, run.after, RNP_REFERENCE_ASR), (run.before, run.after, d)


@pytest.fixture(scope="module")
def convnext(digits):
    return build_model("convnext_tiny", digits.info)


@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_bn_mask_defenses_skip_models_without_batchnorm(digits, convnext, name):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    clean = defender_subset(digits.train, 0.05, seed=0)
    with pytest.raises(DefenseSkipped, match=f"{name}.*BatchNorm2d"):
        build_defense(name).repair(model, clean, DefenseContext(digits.info, device="cpu"))
    with pytest.raises(DefenseSkipped, match="BatchNorm2d"):
        build_defense(name).repair(convnext, clean,
                                   DefenseContext(digits.info, device="cpu"))


@pytest.mark.timeout(1800)  # 50 polarizer epochs, a 2-step attack per batch: over 10 minutes on a busy CPU
def test_npd_purifies_badnet(digits, badnet_cell):
    """NPD_TEST_PARAMS, deviations: 1 warm-up epoch instead of 5; L2 budget 2.0 instead of 3.0 (digits
    are mostly black: budget 3.0 made the targeted attack hit 89% of the batch and the polarizer then
    cost 15 points of accuracy); lr 0.005 instead of 0.01: with the polarizer's BN in eval mode in the
    main phase (BackdoorBench's), lr 0.01 and 0.02 diverge here within the first epochs (measured
    after 6 epochs: ACC 0.14 / 0.09), lr 0.005 for 30 epochs stops at ASR 0.49.
    Measured on the fixture's model (ACC 0.964, ASR 0.963), 50 epochs at lr 0.005: ACC 0.947, ASR 0.146
    (25 epochs at batch 64: ACC 0.933, ASR 0.271).
    (The former train-mode BN with a cosine lr 0.02 for 30 epochs: ACC 0.961 -> 0.916, ASR 0.966 -> 0.078.)"""
    run = run_defense("npd", badnet_cell, digits, **NPD_TEST_PARAMS)
    d = run.outcome.diagnostics
    assert defense_works(run.before, run.after), (run.before, run.after, d)
    assert d["inserted_layer"] == "features.4.0" and d["polarizer_channels"] == 64
    assert 0 <= d["mean_adv_hit_rate"] <= 1 and d["final_loss_clean"] >= 0
    assert any(k.startswith("features.4.0.polarizer.") for k in run.outcome.model.state_dict())


def test_npd_layer_choice(digits):
    x = torch.zeros(1, 3, 32, 32)
    assert choose_layer(build_model("smallcnn", digits.info), x, None) == ("features.4.0", 64)
    assert choose_layer(build_model("preactresnet18", digits.info), x, None) == ("layer4.1.conv1", 512)
    assert choose_layer(build_model("smallcnn", digits.info), x, "features.2.0") == ("features.2.0", 32)
    with pytest.raises(ValueError, match="features.4.0"):
        choose_layer(build_model("smallcnn", digits.info), x, "features.4.O")
    with pytest.raises(ValueError, match="N x C x H x W"):
        choose_layer(build_model("smallcnn", digits.info), x, "classifier")
    model = build_model("smallcnn", digits.info)
    from bdcore.defenses.npd import insert_polarizer

    insert_polarizer(model, "features.4.0", 64)
    assert isinstance(model.features[4][0], PolarizedLayer)
    model.eval()
    with torch.no_grad():  # identity conv + fresh BN (eval): the polarized model computes the same
        fresh = build_model("smallcnn", digits.info)
        fresh.load_state_dict({k.replace(".layer.", "."): v for k, v in model.state_dict().items()
                               if ".polarizer." not in k})
        fresh.eval()
        y = torch.rand(2, 3, 32, 32)
        assert torch.allclose(model(y), fresh(y), atol=1e-3)
