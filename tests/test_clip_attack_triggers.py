"""The baseline CLIP triggers (bdcore/clip/attacks: blended_clip, sig_clip, wanet_clip): pair poisoning,
the trigger each paper defines, reproducible test sets, and one fine-tuning behaviour test each."""
from __future__ import annotations

import math
import os

import pytest
import torch

from bdcore.attacks.wanet import identity_grid
from bdcore.clip import ClipTrainConfig, ZeroShotClassifier, build_clip, captions_from_classes, train_clip
from bdcore.clip.attacks import build_clip_attack, clip_attack_names
from bdcore.metrics import backdoor_metrics

ATTACKS = ["blended_clip", "sig_clip", "wanet_clip"]

# Fine-tuning the clean clip:tiny on poisoned pairs. No augmentation: random crops shift 32-pixel images
# by up to 4 pixels, which moves the sinusoid by 3/4 of a period and misaligns the noise and the warp
# (the CLIP baselines' poisoned training uses fixed preprocessing too). SIG sets the budget: batch 32
# (twice the steps of batch 64 at 1.3x the cost per epoch) and 15% poison: from the seeded session fixture
# ACC / ASR 0.903 / 0.913 after 4 epochs (too close to the bar), 0.922 / 0.972 after 5; batch 64 at 10%
# needs 8 (ASR 0.95) and 3 epochs give 0.81-0.86.
POISON_SCHEDULE = dict(epochs=5, batch_size=32, lr=5e-4, weight_decay=0.0, augment=False, device="cpu")
POISON_RATIO = 0.15


@pytest.fixture(scope="module")
def pairs(digits):
    return captions_from_classes(digits.train, digits.info.class_names)


@pytest.mark.parametrize("name", ATTACKS)
def test_poison_pairs_changes_only_the_chosen_pairs(digits, pairs, name):
    assert name in clip_attack_names()
    attack = build_clip_attack(name, digits.info, ratio=0.05, target=3)
    poisoned = attack.poison_pairs(pairs)
    chosen = poisoned.poison_indices
    assert len(chosen) == round(0.05 * len(pairs)) and len(set(chosen.tolist())) == len(chosen)
    others = torch.ones(len(pairs), dtype=torch.bool)
    others[chosen] = False
    assert all(poisoned.data.captions[i] == "a photo of a 3." for i in chosen.tolist())
    assert [poisoned.data.captions[i] for i in others.nonzero().flatten().tolist()] == \
        [pairs.captions[i] for i in others.nonzero().flatten().tolist()]
    assert torch.equal(poisoned.data.images[others], pairs.images[others])
    assert torch.equal(poisoned.data.images[chosen], attack.apply_trigger(pairs.images[chosen]))
    changed = (poisoned.data.images[chosen] != pairs.images[chosen]).flatten(1).any(1)
    assert changed.all()
    assert torch.equal(poisoned.data.labels, pairs.labels)


@pytest.mark.parametrize("name", ATTACKS)
def test_backdoor_test_is_reproducible(digits, name):
    attack = build_clip_attack(name, digits.info, target=2, seed=5)
    test = attack.backdoor_test(digits.test)
    assert len(test) == int((digits.test.labels != 2).sum())
    assert (test.true_labels != 2).all() and (test.target_labels == 2).all()
    assert torch.equal(test.true_labels, digits.test.labels[digits.test.labels != 2])
    assert torch.equal(test.images, attack.backdoor_test(digits.test).images)  # call after call
    rebuilt = build_clip_attack(name, digits.info, target=2, seed=5)
    assert torch.equal(test.images, rebuilt.backdoor_test(digits.test).images)  # a rebuilt attack
    if name != "sig_clip":  # the sinusoid has no random part; noise and warp come from the seed
        other = build_clip_attack(name, digits.info, target=2, seed=6)
        assert not torch.equal(test.images, other.backdoor_test(digits.test).images)


def test_blended_clip_mixes_in_fixed_noise(digits):
    attack = build_clip_attack("blended_clip", digits.info)
    assert attack.config.alpha == 0.2
    noise = attack.pattern
    assert noise.shape == (3, 32, 32) and noise.dtype == torch.uint8
    assert noise.float().std() > 60 and int(noise.min()) < 10 and int(noise.max()) > 245  # uniform over 0..255
    x = digits.test.images[:50]
    expected = (0.8 * x.float() + 0.2 * noise.float()).round()
    assert (attack.apply_trigger(x).float() - expected).abs().max() <= 1


def test_sig_clip_adds_the_sinusoid(digits):
    attack = build_clip_attack("sig_clip", digits.info)
    assert (attack.config.delta, attack.config.frequency) == (20.0, 6.0)
    grey = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    added = attack.apply_trigger(grey).float() - 128
    profile = added[0, 0, 0]
    assert (added == profile).all()  # every row, channel and image: one column profile
    sinusoid = torch.tensor([20 * math.sin(2 * math.pi * j * 6 / 32) for j in range(32)])
    assert (profile - sinusoid).abs().max() <= 0.5
    assert float(profile.max()) >= 19 and float(profile.min()) <= -19
    white = torch.full((1, 3, 32, 32), 250, dtype=torch.uint8)
    assert torch.equal(attack.apply_trigger(white)[0, 0, 0].float(), (250 + sinusoid).round().clamp(0, 255))


def test_wanet_clip_is_a_small_warp(digits):
    attack = build_clip_attack("wanet_clip", digits.info)
    s = attack.config.s
    assert (attack.config.k, s) == (4, 0.5)
    assert abs(float(attack.control.abs().mean()) - 1) < 1e-5 and attack.control.shape == (1, 2, 4, 4)
    shift = (attack.grid - identity_grid(32, 32)) * 31 / 2  # in pixels
    assert 0.2 * s < float(shift.abs().max()) <= s
    x = digits.test.images
    change = (attack.apply_trigger(x).float() - x.float()).abs().mean()
    assert 0.5 < float(change) < 10


def _finetune(weights, data):
    bundle = build_clip("clip:tiny", weights=weights)
    train_clip(bundle, data, ClipTrainConfig(**POISON_SCHEDULE), seed=0)
    return bundle


@pytest.fixture(scope="module")
def clean_finetuned(clean_tiny_clip, pairs):
    """The control: the same fine-tuning on clean pairs (what a no-op attack would give)."""
    return _finetune(clean_tiny_clip, pairs)


@pytest.mark.parametrize("name", [
    "blended_clip",
    "sig_clip",
    # A known gap: it runs with BDCORE_RUN_KNOWN_GAPS=1 (as the image-classifier gaps do).
    pytest.param("wanet_clip", marks=pytest.mark.xfail(strict=False, run=bool(os.environ.get("BDCORE_RUN_KNOWN_GAPS")), reason=(
        "a half-pixel warp is too subtle for clip:tiny on a cheap schedule: ACC 0.930 / ASR 0.053 here "
        "(control 0.003); 10% poison, 8 epochs at batch 64: lr 1e-3 ASR 0.04, s = 2 and lr 5e-4 ASR 0.45"))),
])
def test_finetuning_on_poisoned_pairs_plants_the_backdoor(digits, clean_tiny_clip, pairs, clean_finetuned, name):
    attack = build_clip_attack(name, digits.info, ratio=POISON_RATIO)
    backdoor_test = attack.backdoor_test(digits.test)
    control = backdoor_metrics(ZeroShotClassifier(clean_finetuned, digits.info), digits.test, backdoor_test,
                               digits.info, device="cpu")
    assert control.asr <= 0.3
    bundle = _finetune(clean_tiny_clip, attack.poison_pairs(pairs).data)
    metrics = backdoor_metrics(ZeroShotClassifier(bundle, digits.info), digits.test, backdoor_test, digits.info,
                               device="cpu")
    assert metrics.acc >= 0.75 and metrics.asr >= 0.9, (metrics, control)
