"""Attacks crafted against a clean surrogate (lf, lc, trojannn): their triggers, their cached
resources, and their behaviour on digits + smallcnn.

The surrogate is the session's shared clean smallcnn (resource_store, trained once). Documented
test parameters: ratio 0.1 for all three (BackdoorBench's default; digits carries no paper ratio);
lc uses target 3 (class 0 has 140 training images, fewer than the 144 a 0.1 ratio needs) and
ratio LC_RATIO = 0.08 (see test_behaviour_reaches_high_asr). Thresholds come from measurements
(docstrings).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attack_checks import assert_restores_identically

from bdcore.attacks import build_attack
from bdcore.attacks._adversarial import load_surrogate, spectral_energy_within, surrogate_key
from bdcore.attacks.preview import mean_abs_change
from bdcore.attacks.trojannn import neuron_activations, strongest_neurons

LC_RATIO = 0.08  # see test_behaviour_reaches_high_asr
LC_AMPLITUDE = 64 / 255  # one of the paper's reduced training amplitudes (16, 32, 64 of 255)
PARAMS = {"lf": {"ratio": 0.1}, "lc": {"ratio": LC_RATIO, "target": 3}, "trojannn": {"ratio": 0.1}}
BEHAVIOUR = {**PARAMS, "lc": {**PARAMS["lc"], "train_amplitude": LC_AMPLITUDE}}


@pytest.fixture(scope="module")
def prepared(prepare_attack):
    """prepared(name, **overrides) -> the attack, with this file's parameters, after prepare()."""
    return lambda name, **overrides: prepare_attack(name, **{**PARAMS[name], **overrides})


@pytest.fixture(scope="module")
def surrogate(digits, resource_store):
    """The shared clean surrogate in pixel space (the one the attacks crafted against)."""
    config = build_attack("trojannn", digits.info).config
    return load_surrogate(config, digits.train, digits.info, resource_store)


def surrogate_dirs(store) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith("surrogate-"))


# -- lf ---------------------------------------------------------------------------------------
def ac(pattern: torch.Tensor) -> torch.Tensor:
    """The pattern without its per-channel mean: the non-negative trigger's DC would dominate any
    spectral share."""
    return pattern - pattern.mean(dim=(-2, -1), keepdim=True)


def test_lf_trigger_is_low_frequency_and_in_range(digits, prepared):
    attack = prepared("lf")
    top = attack.config.value_range
    delta = attack.perturbation
    assert delta.shape == digits.info.image_shape
    # Min-max normalised onto [0, value_range], as BackdoorBench's generator: non-negative, full range.
    assert delta.min().abs() <= 1e-6 and abs(delta.max() - top) <= 1e-6
    # Gaussian low pass (std 6 px) on 32 px: practically all DFT energy within integer frequency 3;
    # white noise of that shape has ~5% there, so the check can fail.
    assert spectral_energy_within(ac(delta), 3) > 0.99
    assert spectral_energy_within(torch.randn(delta.shape, generator=torch.Generator().manual_seed(0)), 3) < 0.2
    x = digits.test.images
    change = attack.apply_trigger(x, digits.test.labels).float() - x.float()
    assert change.min() >= 0 and change.max() == round(top * 255)  # 0..51 of 255
    # The ideal filter keeps only the square DFT window it is given.
    ideal = prepared("lf", low_pass="ideal", window=2)
    assert spectral_energy_within(ac(ideal.perturbation), 2) > 0.999
    assert ideal.perturbation.min() >= -1e-6 and ideal.perturbation.max() <= top + 1e-6


def test_lf_poisons_dirty_label(digits, prepared):
    attack = prepared("lf")
    p = attack.poison_train(digits.train)
    assert len(p.poison_indices) == round(0.1 * len(digits.train))
    assert (p.data.labels[p.poison_indices] == 0).all()
    assert len(set(digits.train.labels[p.poison_indices].tolist())) == 10


# -- lc ---------------------------------------------------------------------------------------
def test_lc_poisons_target_class_with_pgd_images(digits, prepared, surrogate):
    attack = prepared("lc")
    train = digits.train
    p = attack.poison_train(train)
    idx = p.poison_indices
    assert len(idx) == round(LC_RATIO * len(train))
    assert (train.labels[idx] == 3).all()  # clean-label: only target-class samples
    assert torch.equal(p.data.labels, train.labels)  # no label changes anywhere
    untouched = torch.ones(len(train), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(p.data.images[untouched], train.images[untouched])
    # The PGD images stay within epsilon (8/255 -> 8 intensity levels) and do change the images.
    adv, clean = attack.poison_images, train.images[idx]
    diff = adv.float() - clean.float()
    assert diff.abs().max() <= 8 and diff.abs().mean() > 2
    # ...and are hard for the surrogate: its loss on their true label rises well above the clean one.
    with torch.no_grad():
        loss_clean = F.cross_entropy(surrogate(clean.float() / 255), train.labels[idx])
        loss_adv = F.cross_entropy(surrogate(adv.float() / 255), train.labels[idx])
    assert loss_adv > loss_clean + 1.0, (loss_clean, loss_adv)
    # Poisoned training images = PGD image + the faint (32/255) trigger; the test trigger is full.
    assert torch.equal(p.data.images[idx], attack.stamp(adv, 32 / 255))
    faint = p.data.images[idx].float() - adv.float()
    assert faint.abs().max() <= 32 and faint.abs().max() >= 31
    x = digits.test.images[:16]
    out = attack.apply_trigger(x, digits.test.labels[:16])
    corners = attack.signs[0] != 0
    assert corners.sum() == 4 * 9
    assert set(out[:, :, corners].unique().tolist()) <= {0, 255}
    assert torch.equal(out[:, :, ~corners], x[:, :, ~corners])
    with pytest.raises(ValueError, match="all2one"):
        build_attack("lc", digits.info, label_mode="all2all")


def test_lc_needs_its_crafted_images(digits):
    attack = build_attack("lc", digits.info, **PARAMS["lc"])
    with pytest.raises(RuntimeError, match="prepare"):
        attack.poison_train(digits.train)


# -- trojannn ---------------------------------------------------------------------------------
def test_trojannn_trigger_excites_the_selected_neurons(digits, prepared, surrogate):
    """The neurons are the inputs of smallcnn's head (`classifier`, its last Linear: the pooled
    channels of the last conv block) with the largest outgoing |weights|. Measured on 200 test
    images, mean activation of the two: clean 0.62, uniform noise added inside the mask 0.62, the
    un-optimised mask image (the trigger's start) added 0.67, the optimised trigger added 0.90
    (1.35x the best control; the 0.3 budget around the white mask image limits the gain); bound 1.2x."""
    attack = prepared("trojannn")
    assert attack.layer_name == "classifier"
    expected = strongest_neurons(surrogate.model.classifier, 2)
    assert torch.equal(attack.neurons, expected)
    x = digits.test.images[:200]
    stamped = attack.apply_trigger(x, digits.test.labels[:200])
    assert torch.equal(stamped[:, :, ~attack.mask[0]], x[:, :, ~attack.mask[0]])
    noise = torch.randint(0, 256, digits.info.image_shape, generator=torch.Generator().manual_seed(1))
    random_patch = (x.int() + torch.where(attack.mask, noise, 0)).clamp(max=255).to(torch.uint8)
    start = (attack.start * 255).round().int()
    plain = (x.int() + start).clamp(max=255).to(torch.uint8)
    with torch.no_grad():
        def act(images):
            return neuron_activations(surrogate, "model.classifier", images.float() / 255)[:, attack.neurons].mean()

        trojan, random, unoptimised, clean = act(stamped), act(random_patch), act(plain), act(x)
    assert trojan > 1.2 * max(random, unoptimised, clean), (trojan, random, unoptimised, clean)


def test_trojannn_all2all_relabels(digits, prepared):
    attack = prepared("trojannn", label_mode="all2all")
    p = attack.poison_train(digits.train)
    assert torch.equal(p.data.labels[p.poison_indices], (digits.train.labels[p.poison_indices] + 1) % 10)


# -- restore and resources --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lf", "lc", "trojannn"])
def test_restores_identically(name, digits, prepared):
    assert_restores_identically(prepared(name), digits)


RESOURCE = {"lf": "lf_trigger", "lc": "lc_pgd", "trojannn": "trojannn_trigger"}
OTHER_PARAMS = {"lf": {"value_range": 0.1}, "lc": {"epsilon": 4 / 255}, "trojannn": {"steps": 100}}
IRRELEVANT = {"lf": {"ratio": 0.05}, "lc": {"ratio": 0.03, "seed": 7}, "trojannn": {"ratio": 0.05, "seed": 7}}


@pytest.mark.parametrize("name", ["lf", "lc", "trojannn"])
def test_resources_are_cached_and_shared(name, digits, resource_store, prepared):
    kind = RESOURCE[name]
    first = prepared(name)
    surrogates = surrogate_dirs(resource_store)
    assert surrogates  # the clean surrogate lives in the store too
    again = prepared(name)
    assert again.resource_log[kind]["reused"] and again.resource_log[kind]["path"] == first.resource_log[kind]["path"]
    for key, value in first.state_tensors().items():
        assert torch.equal(again.state_tensors()[key], value)
    # A parameter the trigger does not depend on shares the resource (e.g. every lc ratio reuses
    # one set of PGD images); one it depends on builds another, against the same surrogate.
    shared = prepared(name, **IRRELEVANT[name])
    assert shared.resource_log[kind] == {"path": first.resource_log[kind]["path"], "reused": True}
    other = prepared(name, **OTHER_PARAMS[name])
    assert other.resource_log[kind]["path"] != first.resource_log[kind]["path"]
    assert surrogate_dirs(resource_store) == surrogates  # no surrogate trained again


def test_surrogate_key_follows_its_settings(digits):
    config = build_attack("lc", digits.info, target=3).config
    base = surrogate_key(config, digits.train, digits.info)
    assert base["model"] == "smallcnn" and base["train"]["epochs"] == 10
    other = surrogate_key(config.model_copy(update={"surrogate_epochs": 3}), digits.train, digits.info)
    assert other != base and other["train"]["epochs"] == 3
    assert surrogate_key(config, digits.train.subset(torch.arange(100)), digits.info) != base
    # lf, lc and trojannn with default surrogate settings craft against the same model.
    for name in ("lf", "trojannn"):
        assert surrogate_key(build_attack(name, digits.info).config, digits.train, digits.info) == base


# -- behaviour on digits + smallcnn -----------------------------------------------------------
@pytest.fixture(scope="module")
def cells(train_attack):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = train_attack(name, **BEHAVIOUR[name])
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["lf", "lc", "trojannn"])
def test_behaviour_reaches_high_asr(name, cells, clean_digits_model):
    """ASR >= 0.85 and ACC within 3 points of the clean model (0.981). Measured ACC / ASR / RA:
    lf 0.972 / 1.00 / 0.00, trojannn 0.958 / 1.00 / 0.00, lc (ratio 0.08, training amplitude
    64/255) 0.969 / 1.00 / 0.00.

    lc cannot meet both at ratio 0.1 on digits: that is 144 of class 3's 152 training images, so
    almost no clean 3 is left: ACC 0.947 (ASR 1.00) with the default 32/255 amplitude (the same
    cost BackdoorBench's leaderboard shows for clean-label attacks at 10%, e.g. SIG's 84.5% C-Acc).
    At ratio 0.08 (115 images, 76% of the class) the default amplitude 32/255 is too faint for
    1,400 training images (ACC 0.972, ASR 0.73; eps 16/255: 0.80), so the test uses the paper's
    next amplitude, 64/255."""
    _, clean_acc = clean_digits_model
    _, _, metrics, _ = cells(name)
    assert metrics.asr >= 0.85, metrics
    assert metrics.acc >= clean_acc - 0.03, (metrics, clean_acc)


def test_lf_trigger_is_invisible(digits, prepared):
    """Measured mean |change| over digits' test images: 24.5 / 255 (smooth, max 51 / 255; the
    non-negative pattern averages 24.7 / 255 and the black background clips none of it;
    BackdoorBench's shipped uint8 patterns average 10.7-19.0 / 255); bound 37 (~+50%)."""
    attack = prepared("lf")
    change = mean_abs_change(digits.test.images, attack.apply_trigger(digits.test.images, digits.test.labels))
    assert 0 < change < 37, change
