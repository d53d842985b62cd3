"""Attacks whose trigger comes from a network the engine trains itself (ssba: StegaStamp encoder;
poison_ink: edge-ink injection network): the networks do their job, the triggers are sample
specific, invisible and restorable, the trained networks are cached, and the backdoor works on
digits + smallcnn.

The networks are trained once per session (resource_store) with the attacks' default settings;
every test below uses those defaults (no test-only parameter). Ratio 0.1 (the papers' and
BackdoorBench's), target 0. Thresholds come from measurements (docstrings).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attack_checks import assert_restores_identically

from bdcore.attacks import build_attack
from bdcore.attacks.poison_ink import RESOURCE_KIND as INK_KIND
from bdcore.attacks.poison_ink import edge_map
from bdcore.attacks.preview import mean_abs_change
from bdcore.attacks.resources import ResourceStore
from bdcore.attacks.ssba import RESOURCE_KIND as SSBA_KIND
from bdcore.data.base import DatasetInfo, ImageSet

NAMES = ["ssba", "poison_ink"]
KIND = {"ssba": SSBA_KIND, "poison_ink": INK_KIND}
PARAMS = {"ssba": {"ratio": 0.1}, "poison_ink": {"ratio": 0.1}}


@pytest.fixture(scope="module")
def prepared(prepare_attack):
    """prepared(name, **overrides) -> the attack, with this file's parameters, after prepare()."""
    return lambda name, **overrides: prepare_attack(name, **{**PARAMS[name], **overrides})


def residuals(attack, images: torch.Tensor) -> torch.Tensor:
    return attack.apply_trigger(images, torch.zeros(len(images), dtype=torch.long)).float() - images.float()


# -- ssba ---------------------------------------------------------------------------------------
def test_ssba_decoder_recovers_the_secret_only_from_encoded_images(digits, prepared):
    """Measured on digits' test images: bit accuracy 1.00 on encoded images (every image >= 0.8),
    0.50 on clean ones (25-bit secret); another secret through the same encoder: 1.00, and the
    first secret is read from it at 0.40."""
    attack = prepared("ssba")
    assert attack.secret.shape == (25,)  # 100 bits at 64x64, scaled by pixel count: 25 at 32x32
    images = digits.test.images
    encoded = attack.apply_trigger(images, digits.test.labels)
    assert encoded.dtype == torch.uint8 and encoded.shape == images.shape
    assert attack.bit_accuracy(encoded) >= 0.9
    per_image = (attack.decode(encoded) == attack.secret).float().mean(1)
    assert (per_image >= 0.8).float().mean() >= 0.9  # nearly every image carries the secret
    assert 0.25 <= attack.bit_accuracy(images) <= 0.75  # chance: the secret is not read from clean images
    assert attack.stats["bit_accuracy"] >= 0.9 and attack.stats["training"]["final"]["bit_accuracy"] >= 0.9
    # Another secret, same encoder: it is read back too, and the old one is not.
    other = prepared("ssba", secret_seed=5)
    assert not torch.equal(other.secret, attack.secret)
    other_encoded = other.apply_trigger(images[:64], digits.test.labels[:64])
    assert other.bit_accuracy(other_encoded) >= 0.9
    assert attack.bit_accuracy(other_encoded) <= 0.8


def test_ssba_trigger_is_sample_specific(digits, prepared):
    """The residual changes with the image. Compared where neither image clips it (clean value at
    least residual_scale away from 0 and 255), where a fixed additive pattern (blended-style)
    would give exactly the same change for both images: measured mean |r_i - r_j| there is
    0.2-0.4 of the residuals' size for every pair of the first 8 test images."""
    attack = prepared("ssba")
    images = digits.test.images[:8]
    r = residuals(attack, images)
    bound = attack.config.residual_scale
    unclipped = (images.float() >= bound) & (images.float() <= 255 - bound)
    for i in range(8):
        for j in range(i + 1, 8):
            both = unclipped[i] & unclipped[j]
            assert both.sum() > 100
            size = (r[i].abs()[both].mean() + r[j].abs()[both].mean()) / 2
            assert size > 1
            assert (r[i] - r[j]).abs()[both].mean() > 0.1 * size, (i, j)


def test_ssba_all2all_relabels(digits, prepared):
    attack = prepared("ssba", label_mode="all2all")
    p = attack.poison_train(digits.train)
    assert torch.equal(p.data.labels[p.poison_indices], (digits.train.labels[p.poison_indices] + 1) % 10)
    assert len(p.poison_indices) == round(0.1 * len(digits.train))
    assert len(set(digits.train.labels[p.poison_indices].tolist())) == 10  # dirty-label: all classes


def test_ssba_trigger_is_invisible(digits, prepared):
    """Measured mean |change| over digits' test images: 6.6 / 255 (max 23, bounded to 24 / 255 per
    pixel by the tanh); bound 10 (~+50%)."""
    attack = prepared("ssba")
    poisoned = attack.apply_trigger(digits.test.images, digits.test.labels)
    change = mean_abs_change(digits.test.images, poisoned)
    assert 0 < change < 10, change
    assert (poisoned.float() - digits.test.images.float()).abs().max() <= attack.config.residual_scale + 0.5


# -- poison_ink ---------------------------------------------------------------------------------
def test_edge_map_finds_a_squares_outline():
    image = torch.zeros(1, 3, 24, 24)
    image[:, :, 6:18, 6:18] = 1.0
    edges = edge_map(image)[0, 0].bool()
    outline = torch.zeros(24, 24, dtype=torch.bool)
    outline[4:20, 4:20] = True
    outline[8:16, 8:16] = False  # a band of +-2 px around the square's border
    assert edges.any() and not (edges & ~outline).any()
    for side in (edges[4:20, 4:8], edges[4:20, 16:20], edges[4:8, 4:20], edges[16:20, 4:20]):
        assert side.any(dim=0).sum() + side.any(dim=1).sum() >= 8  # every side of the square is traced
    assert not edge_map(torch.full((2, 3, 16, 16), 0.5)).any()  # a flat image has no edges


def test_poison_ink_trigger_follows_each_images_edges(digits, prepared):
    """The change sits on the image's own edges. Measured on 200 test images: mean |change| 14.1
    on edge pixels, 1.6 away from them (edges dilated by 1 px); on the next image's edges 5.5
    (own > foreign for all 200); signed change on edges per channel +17 / -13 / +12."""
    attack = prepared("poison_ink")
    images = digits.test.images[:200]
    change = residuals(attack, images).abs().mean(1, keepdim=True)
    edges = attack.edges(images).bool()
    near = F.max_pool2d(edges.float(), 3, stride=1, padding=1).bool()
    on_edges, off_edges = change[edges].mean(), change[~near].mean()
    assert on_edges > 4 * off_edges, (on_edges, off_edges)
    # Own edges vs the next image's edges (a fixed pattern would not care whose edges they are).
    other = edges.roll(1, dims=0)
    own = (change * edges).flatten(1).sum(1) / edges.flatten(1).sum(1).clamp_min(1)
    foreign = (change * other).flatten(1).sum(1) / other.flatten(1).sum(1).clamp_min(1)
    assert (own > foreign).float().mean() >= 0.9
    # The ink's colour: on edges the change differs between channels (the images are grey).
    signed = residuals(attack, images)
    per_channel = torch.stack([signed[:, c : c + 1][edges].mean() for c in range(3)])
    assert (per_channel.max() - per_channel.min()) > 5, per_channel


def test_poison_ink_extractor_tells_poisoned_from_clean(digits, prepared):
    """The guidance extractor recovers more of the coloured edge map from poisoned images than
    from clean ones. Measured: MSE 0.033 on poisoned train images vs 0.039 for the blank answer;
    mean output on edge pixels 0.38 poisoned vs 0.18 clean (test images). At this small training
    budget the extractor is weak, but it has learnt the difference."""
    attack = prepared("poison_ink")
    stats = attack.stats
    assert stats["extract_mse_poisoned"] < stats["extract_mse_blank_answer"]
    images = digits.test.images[:100]
    edges = attack.edges(images).bool().expand(-1, 3, -1, -1)
    poisoned_out = attack.extract(attack.apply_trigger(images, digits.test.labels[:100]))
    clean_out = attack.extract(images)
    assert poisoned_out[edges].mean() > clean_out[edges].mean() + 0.1


def test_poison_ink_trigger_is_invisible(digits, prepared):
    """Measured mean |change| over digits' test images: 3.5 / 255 (concentrated on the ~10% edge
    pixels); bound 5.3 (~+50%)."""
    attack = prepared("poison_ink")
    change = mean_abs_change(digits.test.images, attack.apply_trigger(digits.test.images, digits.test.labels))
    assert 0 < change < 5.3, change


# -- both: restore, caching, shapes ---------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_restores_identically(name, digits, prepared):
    assert_restores_identically(prepared(name), digits)


@pytest.mark.parametrize("name", NAMES)
def test_trained_network_is_cached_and_shared(name, digits, resource_store, prepared, monkeypatch):
    kind = KIND[name]
    first = prepared(name)
    # A second prepare reads the network back: no training (which would now fail).
    monkeypatch.setattr(type(first), "_train", lambda *args, **kwargs: pytest.fail("network trained again"))
    again = prepared(name)
    assert again.resource_log[kind] == {"path": first.resource_log[kind]["path"], "reused": True}
    for key, value in first.state_tensors().items():
        assert torch.equal(again.state_tensors()[key], value)
    # Settings the network does not depend on share it; ones it depends on key another resource.
    shared = prepared(name, ratio=0.05, target=3, seed=4, label_mode="all2all")
    assert shared.resource_log[kind]["path"] == first.resource_log[kind]["path"]
    base = first.resource_spec(digits.train)
    assert base["data"] and base["shape"] == [3, 32, 32] and "seed" in base
    for change in ({"residual_scale": 8.0}, {"steps": 50}, {"encoder_seed" if name == "ssba" else "injector_seed": 1}):
        assert build_attack(name, digits.info, **change).resource_spec(digits.train) != base
    other_data = ImageSet(digits.train.images[:-1], digits.train.labels[:-1])
    assert first.resource_spec(other_data)["data"] != base["data"]


@pytest.mark.parametrize("name", NAMES)
def test_any_image_size_and_channel_count(name):
    """Odd sizes and one channel: a 2-step training run in memory gives uint8 triggers of the
    same shape, deterministic across calls."""
    info = DatasetInfo("tiny_grey", 4, 1, 19, 27, (0.5,), (0.5,))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 19, 27), generator=generator, dtype=torch.uint8)
    train = ImageSet(images, torch.arange(12) % 4)
    attack = build_attack(name, info, steps=2, batch_size=4)
    attack.prepare(train, ResourceStore(None, device="cpu"))
    out = attack.apply_trigger(images, train.labels)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, attack.apply_trigger(images, train.labels))
    with pytest.raises(RuntimeError, match="prepare"):
        build_attack(name, info).apply_trigger(images, train.labels)


# -- behaviour on digits + smallcnn -----------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_behaviour_reaches_high_asr(name, train_attack, clean_digits_model):
    """ASR >= 0.85 and ACC within 3 points of the clean model (0.981), default settings, ratio
    0.1. Measured ACC / ASR / RA: ssba 0.958 / 1.00 / 0.00, poison_ink 0.958 / 1.00 / 0.00
    (other network seeds: ssba 0.964 and 0.961, poison_ink 0.964 and 0.961, ASR 1.00). A trigger
    the victim does not learn costs ACC too (its relabelled samples become label noise): an
    encoder with bound 8/255 (no secret learnt) gave ACC 0.925 / ASR 0.12."""
    _, clean_acc = clean_digits_model
    _, poisoned, metrics, _ = train_attack(name, **PARAMS[name])
    assert len(poisoned.poison_indices) == round(0.1 * len(poisoned.data))
    assert metrics.asr >= 0.85, metrics
    assert metrics.acc >= clean_acc - 0.03, (metrics, clean_acc)
