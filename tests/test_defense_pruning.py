"""Behaviour of the pruning defenses fp, clp, bnp and ep on digits + smallcnn.

The defender holds 20% of digits' training set (run_defense's default: 230 images to fit, 57 held
out). Deviations from the paper defaults, to fit CPU time, are stated per test with the measured
before/after ACC/ASR.
"""
import os

import pytest
import torch
from defense_checks import defense_works, reaches_reference, run_defense
from torch import nn

from bdcore.data import defender_subset
from bdcore.defenses import DefenseContext, DefenseSkipped, build_defense

# FP's fine-tuning with the digits training recipe (batch 64, lr 0.05) for 10 epochs instead of the
# paper's 100 epochs at batch 256, lr 0.01 (measured with the paper's settings when fp still pruned the
# last conv: ACC 0.961 -> 0.961, ASR 0.966 -> 0.411, a pass with little margin at ~5x the compute).
FP_TEST_PARAMS = dict(epochs=10, batch_size=64, lr=0.05)


class _NoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


class _ConvNoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)  # 16: one outlier can exceed mean + 3 std
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _repair(name, model, digits, poisoned=None, **params):
    defense = build_defense(name, **params)
    clean = defender_subset(digits.train, 0.05, seed=0)
    ctx = DefenseContext(digits.info, device="cpu", poisoned_train=(lambda: poisoned) if poisoned else None)
    return defense.repair(model, clean, ctx)


# -- defaults -----------------------------------------------------------------------------------------

def test_fp_defaults_follow_reference():
    cfg = build_defense("fp").config
    assert (cfg.prune_step, cfg.max_acc_drop, cfg.clean_fraction) == (0.01, 0.10, 0.05)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule) == (100, 256, 0.01, "cosine")
    assert (cfg.momentum, cfg.weight_decay) == (0.9, 5e-4)


def test_clp_defaults_follow_reference():
    cfg = build_defense("clp").config
    assert (cfg.u, cfg.pairing, cfg.clean_fraction) == (3.0, "module_order", 0.05)


def test_bnp_defaults_follow_reference():
    cfg = build_defense("bnp").config
    assert (cfg.u, cfg.batch_size, cfg.clean_fraction) == (3.0, 256, 0.05)


def test_ep_defaults_follow_reference():
    cfg = build_defense("ep").config
    assert (cfg.u, cfg.batch_size, cfg.bin_width, cfg.clean_fraction) == (3.0, 256, 0.1, 0.05)


# -- skips --------------------------------------------------------------------------------------------

def test_clp_skips_models_without_conv(digits):
    with pytest.raises(DefenseSkipped, match="clp .*Conv2d"):
        _repair("clp", _NoConv(), digits)


class _PoolLast(nn.Module):
    """A head that ends in a pooling module: no Linear takes the features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(1)


def test_fp_skips_models_without_a_linear_classifier(digits):
    with pytest.raises(DefenseSkipped, match="fp prunes the classifier's input features"):
        _repair("fp", _PoolLast(), digits)


@pytest.mark.parametrize("model_name, layer", [("preactresnet18", "linear"), ("resnet18", "fc")])
def test_fp_prunes_features_at_the_classifier_input(digits, monkeypatch, model_name, layer):
    """BackdoorBench's unit: the pooled features entering the Linear (after the last residual add),
    not a conv channel a shortcut keeps alive. A pruned feature stays exactly zero at the classifier
    input through fine-tuning: its weight column is zero, so changing it changes no logit. The
    held-out accuracy is replaced by 1 - (share of zero columns), so the 10% relative budget admits
    exactly 8 steps of 6 features (48 < 51.2 <= 54) whatever an untrained model predicts."""
    import bdcore.defenses.fp as fp_module
    from bdcore.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, digits.info).eval()
    head = dict(model.named_modules())[layer]
    monkeypatch.setattr(fp_module, "held_out_accuracy",
                        lambda *_a: 1.0 - float((head.weight == 0).all(0).sum()) / head.in_features)
    clean = defender_subset(digits.train, 0.02, seed=0)
    outcome = build_defense("fp", epochs=1, batch_size=32).repair(model, clean, DefenseContext(digits.info, device="cpu"))
    d = outcome.diagnostics
    assert d["layer"] == layer and d["layer_features"] == head.in_features == 512
    zero = (head.weight == 0).all(0)
    assert d["pruned_features"] == 48 == int(zero.sum()), d
    x = _normalised(digits.train.images[:8], digits.info)
    noise = torch.zeros(512)
    noise[zero] = 100.0
    with torch.no_grad():
        plain = outcome.model(x)
        handle = head.register_forward_pre_hook(lambda _m, inp: (inp[0] + noise,))
        shifted = outcome.model(x)
        handle.remove()
        kept = torch.zeros(512)
        kept[(~zero).nonzero()[0]] = 100.0
        handle = head.register_forward_pre_hook(lambda _m, inp: (inp[0] + kept,))
        control = outcome.model(x)
        handle.remove()
    assert torch.equal(plain, shifted)
    assert not torch.allclose(plain, control)  # the control: an unpruned feature does reach the logits


def _normalised(images, info):
    from bdcore.data import Normalizer

    return Normalizer(info, torch.device("cpu"))(images.float() / 255.0)


@pytest.mark.parametrize("name", ["bnp", "ep"])
def test_bn_pruning_skips_models_without_batchnorm(name, digits, badnet_cell):
    with pytest.raises(DefenseSkipped, match=f"{name} .*BatchNorm2d"):
        _repair(name, _ConvNoBN(), digits, poisoned=badnet_cell[1])


def test_ep_skips_without_poisoned_training_set(digits, badnet_model_copy):
    with pytest.raises(DefenseSkipped, match="ep needs the attack's poisoned training set"):
        _repair("ep", badnet_model_copy, digits)


def test_clp_works_on_convs_without_batchnorm(digits):
    """BackdoorBench's module-order pairing prunes BN channels only, so it skips a model without BN;
    the traced pairing prunes such convs on their weights alone."""
    torch.manual_seed(0)
    model = _ConvNoBN()
    with torch.no_grad():
        model.conv.weight[3] *= 50  # one channel with an outlying Lipschitz bound
    with pytest.raises(DefenseSkipped, match="clp .*BatchNorm2d"):
        _repair("clp", model, digits)
    outcome = _repair("clp", model, digits, pairing="traced")
    d = outcome.diagnostics
    assert d["clean_data_used"] == 0 and d["pruned_per_layer"] == {"conv": 1}
    assert float(outcome.model.conv.weight[3].detach().abs().sum()) == 0.0


# -- behaviour ----------------------------------------------------------------------------------------

def test_fp_lowers_badnet_asr_and_keeps_accuracy(digits, badnet_cell):
    """FP_TEST_PARAMS (10 fine-tuning epochs, batch 64, lr 0.05), seed 0: ACC 0.964 -> 0.961,
    ASR 0.963 -> 0.100; 48 of the 128 features entering the classifier pruned (held-out 0.948 ->
    0.879 -> 0.948)."""
    run = run_defense("fp", badnet_cell, digits, **FP_TEST_PARAMS)
    assert defense_works(run.before, run.after), (run.before, run.after, run.outcome.diagnostics)
    d = run.outcome.diagnostics
    assert d["layer"] == "classifier" and d["layer_features"] == 128
    assert 0 < d["pruned_features"] < 128 and d["pruned_fraction"] == d["pruned_features"] / 128
    # The kept level is within the 10% relative budget on the held-out data, the next one is not.
    assert d["val_acc_pruned"] >= 0.9 * d["val_acc_unpruned"]
    assert d["val_acc_curve"][-1][1] < 0.9 * d["val_acc_unpruned"]
    assert d["finetune_epochs"] == 10 and d["val_acc_after"] >= d["val_acc_pruned"]
    pruned = (run.outcome.model.classifier.weight == 0).all(0)
    assert int(pruned.sum()) == d["pruned_features"]  # still pruned after fine-tuning


# CLP, BNP and EP prune without fine-tuning. Measured on an earlier machine, no threshold u met the bar
# on digits' smallcnn (32/64/128 channels; badnet and blended, u in 0..4, and a width-64 smallcnn): the
# neurons they flag carry clean accuracy too. The tests run the paper default u = 3 on badnet and check
# the mechanics and what each reaches here: bnp meets the bar, ep reaches what BackdoorBench's own ep
# reaches on this cell, clp only prunes (BackdoorBench's clp: ACC 0.900, ASR 0.947 on this cell). The
# whole bar for clp and ep is an opt-in known gap (BDCORE_RUN_KNOWN_GAPS=1): a test that fails until met.

def test_clp_prunes_outlying_channels_data_free(digits, badnet_cell):
    """u = 3 (default), seed 0, BackdoorBench's pairing (each BN with the conv before it): ACC 0.964 ->
    0.961, ASR 0.963 -> 0.963 (2 of 224 channels, both in features.4.1); BackdoorBench's own clp on
    this cell: ACC 0.900, ASR 0.947 (2 channels). Earlier, traced pairing: u = 2 gave ASR 0.000 at
    ACC 0.526; blended at u = 3: ACC 0.964, ASR 1.000."""
    run = run_defense("clp", badnet_cell, digits)
    d = run.outcome.diagnostics
    assert d["clean_data_used"] == 0 and d["u"] == 3.0 and d["total_channels"] == 224
    assert set(d["pruned_per_layer"]) == {"features.0.1", "features.2.1", "features.4.1"}  # BNs, paired in order
    assert d["paired_conv"] == {"features.0.1": "features.0.0", "features.2.1": "features.2.0",
                                "features.4.1": "features.4.0"} and d["unpaired_bn"] == []
    assert 0 < d["pruned_channels"] == sum(d["pruned_per_layer"].values()) < 0.1 * 224
    assert run.after.acc >= run.before.acc - 0.15, (run.before, run.after)  # 2 channels: no collapse


def test_bnp_prunes_divergent_neurons(digits, badnet_cell):
    """u = 3, batch 256 (BackdoorBench's defaults) on the whole 20% subset, seed 0: ACC 0.964 -> 0.936,
    ASR 0.963 -> 0.212 (6 of 224 neurons pruned). BackdoorBench's own bnp prunes nothing on this cell
    (0.972 / 0.972; its statistics come from a poisoned batch, docs/methods.md). Batch 500 on 230
    images, an earlier machine: ACC 0.961 -> 0.825, ASR 0.966 -> 0.741 (5 neurons).
    u = 3.5: ACC 0.944, ASR 0.885; u <= 2.5: ACC 0.27. Blended at u = 3: ACC 0.708, ASR 1.000."""
    run = run_defense("bnp", badnet_cell, digits)
    d = run.outcome.diagnostics
    assert d["u"] == 3.0 and d["clean_batch_size"] == 256 and d["total_channels"] == 224
    assert set(d["kl_per_layer"]) == {"features.0.1", "features.2.1", "features.4.1"}
    assert all(s["min"] >= 0 for s in d["kl_per_layer"].values())  # KL divergences
    assert 0 < d["pruned_channels"] == sum(d["pruned_per_layer"].values()) < 0.1 * 224
    assert defense_works(run.before, run.after), (run.before, run.after)  # met on the machines of December 2026


# What BackdoorBench's own ep.py reaches on this cell (u 3, batch 256; docs/methods.md): ACC 0.903,
# ASR 0.632 (7 neurons pruned).
EP_REFERENCE_ASR = 0.632


def test_ep_prunes_low_entropy_neurons(digits, badnet_cell):
    """u = 3, batch 256 (BackdoorBench's defaults), seed 0: ACC 0.964 -> 0.944, ASR 0.963 -> 0.732 (6 of
    224 neurons pruned, 4 in the last BN), BackdoorBench's own ep on the same cell: 0.903 / 0.632.
    With the authors' batch of 500: ACC 0.961 -> 0.900, ASR 0.966 -> 0.184 (7 neurons). Blended at
    u = 3, batch 500: ACC 0.950, ASR 1.000."""
    run = run_defense("ep", badnet_cell, digits)
    d = run.outcome.diagnostics
    assert d["u"] == 3.0 and d["clean_data_used_for_pruning"] == 0 and d["poisoned_batch_size"] == 256
    assert set(d["entropy_per_layer"]) == {"features.0.1", "features.2.1", "features.4.1"}
    assert 0 < d["pruned_channels"] == sum(d["pruned_per_layer"].values()) < 0.1 * 224
    assert d["pruned_per_layer"]["features.4.1"] >= 3
    assert not reaches_reference(run.before, run.before, EP_REFERENCE_ASR)  # the no-op control
    assert reaches_reference(run.before, run.after, EP_REFERENCE_ASR), (run.before, run.after)


@pytest.mark.skipif(os.environ.get("BDCORE_RUN_KNOWN_GAPS") != "1", reason="known gap (BDCORE_RUN_KNOWN_GAPS=1 runs "
                    "it): at u = 3 on digits' smallcnn clp leaves ASR as it is and ep lowers it only to 0.73, as BackdoorBench's own "
                    "(0.95 and 0.63)")
@pytest.mark.parametrize("name", ["clp", "ep"])
def test_data_free_pruning_meets_the_bar(digits, badnet_cell, name):
    run = run_defense(name, badnet_cell, digits)
    assert defense_works(run.before, run.after), (run.before, run.after, run.outcome.diagnostics)
