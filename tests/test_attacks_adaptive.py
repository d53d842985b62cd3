"""Adap-Blend and Adap-Patch (Qi et al., ICLR 2023): trigger construction, cover samples, behaviour
on digits + smallcnn, and the point of the attacks: poison samples separate badly in latent space.

Documented test parameters (the paper's 0.3% poison rate is ~4 images on digits' 1,438):
poison ratio 0.1 as the other behaviour tests, cover rate scaled with the paper's poison:cover
proportion (adap_blend 1:1 -> 0.1, adap_patch 1:2 -> 0.2). Thresholds come from measurements
(see the test docstrings). The separation test compares with the shared badnet_cell (badnet 10%).
"""
from __future__ import annotations

import pytest
import torch
from attack_checks import assert_restores_identically

from bdcore.analysis import latent_features, poison_separation, separation_score
from bdcore.attacks import blend, build_attack
from bdcore.attacks.adap_blend import piece_map
from bdcore.attacks.preview import mean_abs_change

BLEND_PARAMS = {"ratio": 0.1, "cover_ratio": 0.1}
PATCH_PARAMS = {"ratio": 0.1, "cover_ratio": 0.2}


def kept_pieces(attack, clean: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """N x 16 bool: which pieces of each image carry the trigger at train_alpha; every piece must be
    either exactly triggered or exactly untouched."""
    full = blend(clean, attack.pattern, attack.config.train_alpha)
    pieces = piece_map(16, clean.shape[-2], clean.shape[-1])
    keep = torch.zeros(clean.shape[0], 16, dtype=torch.bool)
    for j in range(16):
        where = pieces == j
        on = (out[:, :, where] == full[:, :, where]).flatten(1).all(1)
        off = (out[:, :, where] == clean[:, :, where]).flatten(1).all(1)
        assert (on ^ off).all(), f"piece {j} is neither triggered nor clean in some image"
        keep[:, j] = on
    return keep


def patch_used(attack, clean: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Index of the one training patch (at its alpha) each image carries; fails if none fits."""
    used = torch.full((clean.shape[0],), -1)
    for j, alpha in enumerate(attack.config.alphas):
        fits = (out == blend(clean, attack.patterns[j], attack.masks[j].float() * alpha)).flatten(1).all(1)
        fits &= (out != clean).flatten(1).any(1)
        assert (used[fits] == -1).all(), "an image fits two patches"
        used[fits] = j
    assert (used >= 0).all(), "some image carries none of the patches exactly"
    return used


# -- trigger construction ----------------------------------------------------------------------
def test_adap_blend_train_trigger_masks_half_the_pieces(digits):
    attack = build_attack("adap_blend", digits.info, **BLEND_PARAMS)
    x, y = digits.test.images[:32], digits.test.labels[:32]
    keep = kept_pieces(attack, x, attack.apply_train_trigger(x, y))
    assert (keep.sum(1) == 8).all()  # exactly half of the 4x4 pieces masked
    assert len({tuple(row.tolist()) for row in keep}) > 16  # which ones varies per sample
    assert keep.float().mean(0).min() > 0  # every piece is used by some sample
    # Deterministic per seed, another seed draws other masks.
    assert torch.equal(attack.apply_train_trigger(x, y), attack.apply_train_trigger(x, y))
    other = build_attack("adap_blend", digits.info, **BLEND_PARAMS, seed=1)
    assert not torch.equal(kept_pieces(other, x, other.apply_train_trigger(x, y)), keep)
    # Test time: the full trigger at alpha 0.2.
    expected = (0.8 * x.float() + 0.2 * attack.pattern.float()).round().to(torch.uint8)
    assert torch.equal(attack.apply_trigger(x, y), expected)
    defaults = build_attack("adap_blend", digits.info).config
    assert (defaults.ratio, defaults.cover_ratio, defaults.train_alpha, defaults.test_alpha) == (0.003, 0.003, 0.15, 0.2)


def test_adap_patch_one_patch_in_training_two_at_test(digits):
    attack = build_attack("adap_patch", digits.info, **PATCH_PARAMS)
    assert attack.config.alphas == (0.5, 0.2, 0.5, 0.3)
    masks = attack.masks
    assert masks.shape == (4, 1, 32, 32) and not (masks.sum(0) > 1).any()  # 4 disjoint patches
    x, y = digits.test.images[:40], digits.test.labels[:40]
    used = patch_used(attack, x, attack.apply_train_trigger(x, y))
    assert torch.bincount(used, minlength=4).tolist() == [10, 10, 10, 10]  # each exactly one, balanced
    assert torch.equal(patch_used(attack, x, attack.apply_train_trigger(x, y)), used)  # seeded
    # Test time: patches 0 and 2 together at alpha 1, nothing else changed.
    out = attack.apply_trigger(x, y)
    both = masks[0] | masks[2]
    for j in (0, 2):
        assert torch.equal(torch.where(masks[j], out, 0), torch.where(masks[j], attack.patterns[j].expand_as(x), 0))
    assert torch.equal(torch.where(both, 0, out), torch.where(both, 0, x))
    defaults = build_attack("adap_patch", digits.info).config
    assert (defaults.ratio, defaults.cover_ratio, defaults.test_patches, defaults.test_alpha) == (0.003, 0.006, (0, 2), 1)


@pytest.mark.parametrize("name, params", [("adap_blend", BLEND_PARAMS), ("adap_patch", PATCH_PARAMS)])
def test_cover_samples_keep_labels_and_carry_the_trigger(digits, name, params):
    attack = build_attack(name, digits.info, target=3, **params)
    p = attack.poison_train(digits.train)
    n = len(digits.train)
    poison, cover = p.poison_indices, p.extra_indices["cover"]
    assert len(poison) == round(params["ratio"] * n) and len(cover) == round(params["cover_ratio"] * n)
    assert not set(poison.tolist()) & set(cover.tolist())
    assert len(set(digits.train.labels[poison].tolist())) == 10  # dirty-label: drawn from all classes
    assert (p.data.labels[poison] == 3).all()
    assert torch.equal(p.data.labels[cover], digits.train.labels[cover])
    assert torch.equal(p.original_labels, digits.train.labels)
    for rows in (poison, cover):  # both carry a training trigger
        clean, out = digits.train.images[rows], p.data.images[rows]
        if name == "adap_blend":
            assert (kept_pieces(attack, clean, out).sum(1) == 8).all()
        else:
            assert torch.bincount(patch_used(attack, clean, out), minlength=4).min() >= len(rows) // 4
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[poison], untouched[cover] = False, False
    assert torch.equal(p.data.images[untouched], digits.train.images[untouched])
    assert torch.equal(p.data.labels[untouched], digits.train.labels[untouched])
    # all2all relabels poison samples only, y -> y + 1.
    a2a = build_attack(name, digits.info, label_mode="all2all", **params).poison_train(digits.train)
    assert torch.equal(a2a.data.labels[a2a.poison_indices], (digits.train.labels[a2a.poison_indices] + 1) % 10)
    assert torch.equal(a2a.data.labels[a2a.extra_indices["cover"]], digits.train.labels[a2a.extra_indices["cover"]])
    with pytest.raises(ValueError, match="cover"):
        build_attack(name, digits.info, ratio=0.6, cover_ratio=0.6).poison_train(digits.train)


@pytest.mark.parametrize("name, params", [("adap_blend", BLEND_PARAMS), ("adap_patch", PATCH_PARAMS)])
def test_adaptive_attacks_restore_identically(digits, name, params):
    assert_restores_identically(build_attack(name, digits.info, **params), digits)


def test_adap_patch_image_files(digits, tmp_path):
    import numpy as np
    from PIL import Image

    files = []
    for j in range(4):
        img = np.zeros((32, 32, 3), dtype=np.uint8)
        img[j * 8 : j * 8 + 4, :4] = 50 + 50 * j
        Image.fromarray(img).save(tmp_path / f"t{j}.png")
        files.append(str(tmp_path / f"t{j}.png"))
    attack = build_attack("adap_patch", digits.info, patch_images=files)
    assert [int(m.sum()) for m in attack.masks] == [16] * 4  # black pixels are transparent
    out = attack.apply_trigger(digits.test.images[:2], digits.test.labels[:2])
    assert (out[:, :, 0:4, :4] == 50).all() and (out[:, :, 16:20, :4] == 150).all()
    with pytest.raises(ValueError, match="one file per trigger"):
        build_attack("adap_patch", digits.info, patch_images=files[:3])


def test_adap_blend_test_trigger_is_faint(digits):
    """Measured mean |change| of the test trigger on digits' test images: 20.1 / 255 (seeded noise
    at alpha 0.2); bound 30 (~+50%)."""
    attack = build_attack("adap_blend", digits.info)
    change = mean_abs_change(digits.test.images, attack.apply_trigger(digits.test.images, digits.test.labels))
    assert 0 < change < 30, change


# -- behaviour on digits + smallcnn -----------------------------------------------------------
@pytest.fixture(scope="module")
def blend_cell(train_attack):
    return train_attack("adap_blend", **BLEND_PARAMS)


@pytest.fixture(scope="module")
def patch_cell(train_attack):
    return train_attack("adap_patch", **PATCH_PARAMS)


@pytest.mark.parametrize("cell", ["blend_cell", "patch_cell"])
def test_adaptive_behaviour_reaches_high_asr(request, cell, clean_digits_model):
    """ASR with the TEST trigger >= 0.85, ACC within 3 points of the clean model. Measured (seed 0):
    clean ACC 0.981; adap_blend ACC 0.969 ASR 1.00 RA 0.00; adap_patch ACC 0.961 ASR 1.00 RA 0.00."""
    _, clean_acc = clean_digits_model
    *_, metrics, _ = request.getfixturevalue(cell)
    assert metrics.asr >= 0.85, metrics
    assert metrics.acc >= clean_acc - 0.03, (metrics, clean_acc)


def test_latent_features_are_the_penultimate_layer(badnet_cell, digits):
    *_, model, _ = badnet_cell
    feats = latent_features(model, digits.test.images[:10], digits.info, device="cpu")
    assert feats.shape == (10, model.classifier.in_features)
    logits = feats @ model.classifier.weight.T + model.classifier.bias
    from bdcore.metrics import predict

    assert torch.equal(logits.argmax(1), predict(model, digits.test.images[:10], digits.info, device="cpu"))
    named = latent_features(model, digits.test.images[:10], digits.info, layer="features", device="cpu")
    assert torch.allclose(named, feats)
    with pytest.raises(ValueError, match="2 poison"):
        separation_score(feats, torch.zeros(10, dtype=torch.bool))


@pytest.mark.parametrize("cell", ["blend_cell", "patch_cell"])
def test_adaptive_poison_separates_much_worse_than_badnet(request, cell, badnet_cell, digits):
    """Activation-Clustering-style score (bdcore.analysis.separation: penultimate features of the
    samples labelled target, PCA to 10 dims, 2-means, adjusted Rand index vs the poison set).
    Measured (attack seeds 0 / 1): badnet 0.93 / 0.91, adap_blend 0.15 / 0.09, adap_patch 0.21 / 0.28.
    Thresholds: badnet >= 0.8, adaptive <= half of badnet's."""
    attack, poisoned, _, model, _ = badnet_cell
    badnet = poison_separation(model, poisoned, digits.info, attack.config.target, device="cpu")
    attack, poisoned, _, model = request.getfixturevalue(cell)
    adaptive = poison_separation(model, poisoned, digits.info, attack.config.target, device="cpu")
    assert badnet.ari >= 0.8, badnet
    assert adaptive.ari <= 0.5 * badnet.ari, (adaptive, badnet)


@pytest.mark.parametrize("cell", ["blend_cell", "patch_cell"])
def test_activation_clustering_catches_badnet_not_adaptive_poison(request, cell, badnet_cell, digits):
    """The defense the adaptive attacks are built against: the `ac` detector (bdcore/defenses/ac.py)
    with the defender's 5% clean subset, detection measured against the poison indices. Measured:
    badnet TPR 0.965, FPR 0, AUROC 0.970; adap_blend flags nothing (AUROC 0.62), adap_patch flags
    nothing (AUROC 0.57). On the machines of December 2026 the seed-0 badnet model trains differently
    (float rounding): badnet TPR 0.868, AUROC 0.886 (0.896 / 0.910 and 0.951 / 0.956 for seeds 1 / 2),
    hence the 0.85 bars; the adaptive attacks' bars are unchanged."""
    from bdcore.data import defender_subset
    from bdcore.defenses import DefenseContext, build_defense, detection_quality

    ac = build_defense("ac")
    clean = defender_subset(digits.train, 0.05, seed=0)
    ctx = DefenseContext(digits.info, device="cpu")

    def quality(poisoned, model):
        return detection_quality(ac.detect(model, poisoned.data, clean, ctx), poisoned.poison_indices)

    _attack, poisoned, _bt, model, _m = badnet_cell
    badnet = quality(poisoned, model)
    _attack, poisoned, _bt, model = request.getfixturevalue(cell)
    adaptive = quality(poisoned, model)
    assert badnet["detection_tpr"] >= 0.85 and badnet["detection_auroc"] >= 0.85, badnet
    assert adaptive["detection_tpr"] <= 0.2 and adaptive["detection_auroc"] <= 0.75, adaptive
