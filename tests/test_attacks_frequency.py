"""sig, ctrl and ftrojan: trigger formulas, the DCT / colour helpers, clean-label rules, restore, and
behaviour on digits + smallcnn (10 epochs).

The expected triggers are rebuilt here from the papers' formulas with numpy and textbook constants
(not with bdcore's helpers), so a wrong sign, axis, colour matrix or DCT scaling fails.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch
from attack_checks import assert_restores_identically
from pydantic import ValidationError

from bdcore.attacks import build_attack
from bdcore.attacks._frequency import (
    block_dct2,
    block_idct2,
    dct_matrix,
    from_color_space,
    scaled_positions,
    to_color_space,
)
from bdcore.attacks.preview import mean_abs_change
from bdcore.data.base import DatasetInfo

# Textbook inverses (RGB from luma + chroma), typed independently of bdcore's forward matrices:
# analog BT.601 YUV, and full-range (JPEG) YCbCr with the chroma centred on 128.
RGB_FROM_CHROMA = {
    "yuv": np.array([[0.0, 1.13983], [-0.39465, -0.58060], [2.03211, 0.0]]),  # columns U, V
    "ycbcr": np.array([[0.0, 1.402], [-0.344136, -0.714136], [1.772, 0.0]]),  # columns Cb, Cr
}


def _info(channels: int, size: int) -> DatasetInfo:
    return DatasetInfo(name=f"fake{channels}x{size}", num_classes=10, channels=channels, height=size, width=size,
                       mean=(0.5,) * channels, std=(0.25,) * channels)


def _mid_gray_noise(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random RGB images in 64..192: no trigger pixel is clipped."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(64, 193, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _expected_frequency_trigger(images: torch.Tensor, magnitude: float, positions, color_space: str,
                                window: int = 32) -> np.ndarray:
    """clean + the RGB change of `magnitude` at `positions` of both chroma channels' orthonormal DCT,
    written out as a sum of cosines per tile."""
    h, w = images.shape[-2:]
    i = np.arange(window)
    basis = np.zeros((window, window))
    for u, v in positions:
        au = math.sqrt((1 if u == 0 else 2) / window)
        av = math.sqrt((1 if v == 0 else 2) / window)
        basis += magnitude * np.outer(au * np.cos(np.pi * (2 * i + 1) * u / (2 * window)),
                                      av * np.cos(np.pi * (2 * i + 1) * v / (2 * window)))
    chroma = np.tile(basis, (h // window, w // window))  # the same change in both chroma channels
    rgb_change = RGB_FROM_CHROMA[color_space].sum(axis=1)[:, None, None] * chroma  # 3 x H x W
    return images.double().numpy() + rgb_change[None]


def _chroma_dct_change(clean: torch.Tensor, poisoned: torch.Tensor, space: str, window: int = 32) -> torch.Tensor:
    """Blockwise DCT of (converted poisoned - converted clean), all three converted channels."""
    diff = to_color_space(poisoned.double(), space) - to_color_space(clean.double(), space)
    return block_dct2(diff, (window, window))


def _assert_matches_rounded(actual: torch.Tensor, expected_float: np.ndarray) -> None:
    expected = np.clip(np.round(expected_float), 0, 255)
    diff = np.abs(actual.numpy().astype(np.float64) - expected)
    assert diff.max() <= 1  # float rounding may flip a .5 tie
    assert (diff == 0).mean() > 0.999


# -- helpers -------------------------------------------------------------------------------------
def test_dct_matches_scipy_and_inverts():
    d = dct_matrix(8, dtype=torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    x = torch.rand(2, 3, 64, 96, dtype=torch.float64) * 255
    coefficients = block_dct2(x, (32, 32))
    tile = x[1, 2, 32:64, 64:96].numpy()
    assert np.allclose(coefficients[1, 2, 32:64, 64:96].numpy(), scipy.fft.dctn(tile, norm="ortho"), atol=1e-9)
    assert torch.allclose(block_idct2(coefficients, (32, 32)), x, atol=1e-9)
    # Non-square tiles (an image shorter than the window along one axis).
    y = torch.rand(1, 1, 28, 64, dtype=torch.float64)
    reference = scipy.fft.dctn(y[0, 0, :, :32].numpy(), norm="ortho")
    assert np.allclose(block_dct2(y, (28, 32))[0, 0, :, :32].numpy(), reference)
    with pytest.raises(ValueError, match="does not split"):
        block_dct2(y, (32, 32))


def test_color_spaces_known_values_and_round_trip():
    def converted(rgb, space):
        return to_color_space(torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1), space).flatten().tolist()

    assert converted([255.0, 255, 255], "yuv") == pytest.approx([255, 0, 0], abs=1e-3)
    assert converted([255.0, 255, 255], "ycbcr") == pytest.approx([255, 128, 128], abs=1e-3)
    # JPEG: red is Y 76.245, Cb 84.972, Cr 255.5; analog YUV: U -37.52, V 156.825 (0..255 scale).
    assert converted([255.0, 0, 0], "ycbcr") == pytest.approx([76.245, 84.972, 255.5], abs=0.01)
    assert converted([255.0, 0, 0], "yuv") == pytest.approx([76.245, -37.52, 156.825], abs=0.01)
    x = torch.rand(2, 3, 5, 7) * 255
    for space in ("yuv", "ycbcr"):
        assert torch.allclose(from_color_space(to_color_space(x, space), space), x, atol=1e-3)


def test_positions_scale_to_small_images():
    assert scaled_positions([(15, 15), (31, 31)], 32, (32, 32)) == [(15, 15), (31, 31)]
    assert scaled_positions([(15, 15), (31, 31)], 32, (28, 28)) == [(13, 13), (27, 27)]


# -- sig -------------------------------------------------------------------------------------------
def test_sig_adds_the_sinusoid(digits):
    attack = build_attack("sig", digits.info, target=3)
    assert (attack.config.delta, attack.config.frequency) == (40, 6)  # BackdoorBench's defaults (the paper: 20)
    x = digits.test.images[:32]
    out = attack.apply_trigger(x, digits.test.labels[:32])
    j = np.arange(32)
    signal = 40 * np.sin(2 * np.pi * j * 6 / 32)  # varies over columns only
    ideal = x.double().numpy() + signal
    unclipped = (ideal >= 0) & (ideal <= 255)
    assert unclipped.mean() > 0.4
    added = out.double().numpy() - x.double().numpy()
    assert np.array_equal(added[unclipped], np.broadcast_to(np.round(signal), added.shape)[unclipped])
    assert np.array_equal(out.numpy(), np.clip(np.round(ideal), 0, 255))
    # Other parameters are honoured.
    other = build_attack("sig", digits.info, target=3, delta=7, frequency=2).apply_trigger(x, digits.test.labels[:32])
    _assert_matches_rounded(other, x.double().numpy() + 7 * np.sin(2 * np.pi * j * 2 / 32))


@pytest.mark.parametrize("name", ["sig", "ctrl"])
def test_clean_label_poisoning(digits, name):
    attack = build_attack(name, digits.info, ratio=0.1, target=3)
    p = attack.poison_train(digits.train)
    assert len(p.poison_indices) == round(0.1 * len(digits.train)) == 144
    assert (digits.train.labels[p.poison_indices] == 3).all()  # drawn from the target class only
    assert torch.equal(p.data.labels, digits.train.labels)  # labels kept
    untouched = torch.ones(len(digits.train), dtype=torch.bool)
    untouched[p.poison_indices] = False
    assert torch.equal(p.data.images[untouched], digits.train.images[untouched])
    assert not torch.equal(p.data.images[p.poison_indices], digits.train.images[p.poison_indices])
    with pytest.raises(ValueError, match="clean-label"):
        build_attack(name, digits.info, label_mode="all2all")
    with pytest.raises(ValueError, match="needs 150 poisoned samples but only 140"):
        build_attack(name, digits.info, ratio=0.104, target=0).poison_train(digits.train)


@pytest.mark.parametrize("name", ["sig", "ctrl", "ftrojan"])
def test_restores_identically(digits, name):
    assert_restores_identically(build_attack(name, digits.info, ratio=0.05, target=3), digits)


# -- ftrojan / ctrl: the frequency trigger -----------------------------------------------------
@pytest.mark.parametrize("name,magnitude,space", [("ftrojan", 30, "yuv"), ("ctrl", 100, "ycbcr")])
def test_frequency_trigger_formula(digits, name, magnitude, space):
    attack = build_attack(name, digits.info)
    c = attack.config  # the papers' defaults
    assert (c.magnitude, c.color_space, c.window_size) == (magnitude, space, 32)
    assert c.positions == ((15, 15), (31, 31)) and c.channels == (1, 2)
    x = _mid_gray_noise()
    out = attack.apply_trigger(x, torch.zeros(len(x), dtype=torch.long))
    _assert_matches_rounded(out, _expected_frequency_trigger(x, magnitude, c.positions, space))
    # Clipping at 0 and 255 on real (gray, black-background) images.
    x = digits.test.images[:16]
    out = attack.apply_trigger(x, digits.test.labels[:16])
    _assert_matches_rounded(out, _expected_frequency_trigger(x, magnitude, c.positions, space))


@pytest.mark.parametrize("name", ["ftrojan", "ctrl"])
def test_frequency_trigger_lives_at_the_chosen_chroma_frequencies(digits, name):
    attack = build_attack(name, digits.info)
    c = attack.config
    chosen = torch.zeros(3, 32, 32, dtype=torch.bool)
    for ch in c.channels:
        for row, col in c.positions:
            chosen[ch, row, col] = True
    # Unclipped images: each chosen coefficient moves by the magnitude (up to uint8 rounding),
    # nothing else moves by more than rounding noise.
    x = _mid_gray_noise()
    out = attack.apply_trigger(x, torch.zeros(len(x), dtype=torch.long))
    change = _chroma_dct_change(x, out, c.color_space)
    assert (change[:, chosen] - c.magnitude).abs().max() < 2
    assert change[:, ~chosen].abs().max() < 4
    assert (change[:, chosen] ** 2).sum() / (change**2).sum() > 0.95
    # digits (clipped at black): still mainly there (measured ~0.89 / 0.90 of the change's energy).
    x = digits.test.images
    out = attack.apply_trigger(x, digits.test.labels)
    change = _chroma_dct_change(x, out, c.color_space)
    assert (change[:, chosen] ** 2).sum() / (change**2).sum() > 0.8


def test_frequency_trigger_parameters_are_honoured(digits):
    x = _mid_gray_noise(4, 32)
    labels = torch.zeros(4, dtype=torch.long)
    # Luma only: R, G and B move together.
    luma = build_attack("ctrl", digits.info, channels=[0], magnitude=80).apply_trigger(x, labels)
    moved = (luma.int() - x.int())
    assert moved.abs().sum() > 0 and (moved[:, 0] - moved[:, 1]).abs().max() <= 1
    # Another window and position: the change is periodic with the window and peaks at its frequency.
    attack = build_attack("ftrojan", digits.info, window_size=16, positions=[(3, 5)], magnitude=60, channels=[2])
    out = attack.apply_trigger(x, labels)
    change = _chroma_dct_change(x, out, "yuv", window=16)
    tiles = change[:, 2].reshape(4, 2, 16, 2, 16)
    assert (tiles[:, :, 3, :, 5] - 60).abs().max() < 2
    tiles[:, :, 3, :, 5] = 0
    assert tiles.abs().max() < 4 and change[:, :2].abs().max() < 4
    with pytest.raises(ValidationError, match="outside a 16x16"):
        build_attack("ftrojan", digits.info, window_size=16)  # (31, 31) does not fit
    with pytest.raises(ValidationError, match="distinct"):
        build_attack("ctrl", digits.info, channels=[1, 1])


def test_frequency_trigger_other_image_sizes_and_gray_images():
    labels = torch.zeros(2, dtype=torch.long)
    # 40x40: one 32-tile; the strip beyond it is left unchanged.
    x = _mid_gray_noise(2, 40)
    out = build_attack("ftrojan", _info(3, 40)).apply_trigger(x, labels)
    assert torch.equal(out[..., 32:, :], x[..., 32:, :]) and torch.equal(out[..., :, 32:], x[..., :, 32:])
    expected = _expected_frequency_trigger(x[..., :32, :32], 30, [(15, 15), (31, 31)], "yuv")
    _assert_matches_rounded(out[..., :32, :32], expected)
    # 28x28 (smaller than the window): one 28-tile, positions rescaled to (13, 13) and (27, 27).
    x = _mid_gray_noise(2, 28)
    out = build_attack("ctrl", _info(3, 28)).apply_trigger(x, labels)
    _assert_matches_rounded(out, _expected_frequency_trigger(x, 100, [(13, 13), (27, 27)], "ycbcr", window=28))
    # 64x64: four tiles.
    x = _mid_gray_noise(2, 64)
    out = build_attack("ftrojan", _info(3, 64)).apply_trigger(x, labels)
    _assert_matches_rounded(out, _expected_frequency_trigger(x, 30, [(15, 15), (31, 31)], "yuv"))
    # Gray images have no chroma: a clear error, unless the trigger goes into the gray channel.
    for name in ("ftrojan", "ctrl"):
        with pytest.raises(ValueError, match=rf"{name} puts its trigger into the .* 1 channel \(no chroma\)"):
            build_attack(name, _info(1, 28))
    gray = _mid_gray_noise(2, 28)[:, :1]
    out = build_attack("ftrojan", _info(1, 28), channels=[0]).apply_trigger(gray, labels)
    assert out.shape == gray.shape and out.dtype == torch.uint8
    change = block_dct2(out.double() - gray.double(), (28, 28))
    assert (change[:, 0, 13, 13] - 30).abs().max() < 2 and (change[:, 0, 27, 27] - 30).abs().max() < 2


def test_ftrojan_is_dirty_label_all2one_and_all2all(digits):
    p = build_attack("ftrojan", digits.info, ratio=0.05, target=8).poison_train(digits.train)
    assert len(p.poison_indices) == 72
    assert len(set(digits.train.labels[p.poison_indices].tolist())) == 10  # from all classes
    assert (p.data.labels[p.poison_indices] == 8).all()
    a2a = build_attack("ftrojan", digits.info, ratio=0.05, label_mode="all2all")
    p = a2a.poison_train(digits.train)
    assert torch.equal(p.data.labels[p.poison_indices], (digits.train.labels[p.poison_indices] + 1) % 10)
    bd = a2a.backdoor_test(digits.test)
    assert len(bd) == len(digits.test) and torch.equal(bd.target_labels, (bd.true_labels + 1) % 10)


# Mean |change| per pixel and channel over all 359 digits test images, paper defaults (measured:
# ftrojan 1.30, ctrl 4.44; for scale, sig's visible sinusoid is 10.1). Bounds: measured + ~50%.
@pytest.mark.parametrize("name,bound", [("ftrojan", 2.0), ("ctrl", 6.5)])
def test_frequency_triggers_are_nearly_invisible(digits, name, bound):
    attack = build_attack(name, digits.info)
    change = mean_abs_change(digits.test.images, attack.apply_trigger(digits.test.images, digits.test.labels))
    assert 0 < change < bound, change
    sig_change = mean_abs_change(digits.test.images, build_attack("sig", digits.info).apply_trigger(
        digits.test.images, digits.test.labels))
    assert change < sig_change / 2


# -- behaviour: digits + smallcnn, 10 epochs (the default digits budget) -------------------------
# Clean-label ratio: 0.05 of the training set = 72 of the 152 class-3 samples (target 3, the
# largest class). At 0.1 (144 of 152, nearly the whole class) the model learns "3 = trigger": clean
# 3s are misclassified (class-3 accuracy 0.42-0.58) and ACC falls to 0.90-0.93, below clean - 0.03 -
# the same effect as SIG's C-Acc of 84.5 in BackdoorBench at 10% (REFERENCE.md).
# Magnitudes: with half of class 3 left clean, 10 epochs on easy digits learn the digit shapes and
# not a faint trigger. Measured ASR at ratio 0.05 (ACC >= 0.97 throughout): sig delta 20 / 40 / 60 /
# 80 / 100: 0.12 / 0.35 / 0.49 / 0.80 / 0.92; ctrl magnitude 100 / 200 / 400 / 1000: 0.11 / 0.17 /
# 0.31 / 0.93 (0.92 for both with poison seed 2). So these
# tests raise sig's delta to 100 (paper 20) and ctrl's magnitude to 1000 (paper 100): they check
# that the clean-label mechanism plants a backdoor, not the papers' stealth budget (checked above).
def test_sig_behaviour(train_attack, clean_digits_model):
    _, clean_acc = clean_digits_model
    _, poisoned, metrics, _ = train_attack("sig", ratio=0.05, target=3, delta=100)
    assert (poisoned.original_labels[poisoned.poison_indices] == 3).all()
    assert metrics.asr >= 0.85, metrics  # measured 0.918
    assert metrics.acc >= clean_acc - 0.03, (metrics, clean_acc)  # measured 0.972 (clean 0.980)


def test_ctrl_behaviour(train_attack, clean_digits_model):
    _, clean_acc = clean_digits_model
    _, poisoned, metrics, _ = train_attack("ctrl", ratio=0.05, target=3, magnitude=1000)
    assert (poisoned.original_labels[poisoned.poison_indices] == 3).all()
    assert metrics.asr >= 0.85, metrics  # measured 0.933
    assert metrics.acc >= clean_acc - 0.03, (metrics, clean_acc)  # measured 0.978


# ftrojan at the authors' poisoning rate 0.05 (72 samples, dirty-label). At the paper's magnitude 30
# the backdoor is learned in some runs and not in others: ASR 0.96 / 1.00 / 0.01 / 0.01 for poison
# seeds 0-3 (target 0), 0.03 for target 8, and 0.05 / 0.41 at ratio 0.1 - on black-background
# digits half of the +-2 intensity ripple is clipped away. Magnitude 60 is learned in every run tried
# (seeds 0, 2, 3 and target 8: ASR 0.97-1.00, ACC >= 0.967), so the test uses 60.
def test_ftrojan_behaviour(train_attack, clean_digits_model):
    _, clean_acc = clean_digits_model
    _, poisoned, metrics, _ = train_attack("ftrojan", ratio=0.05, magnitude=60)
    assert (poisoned.data.labels[poisoned.poison_indices] == 0).all()
    assert metrics.asr >= 0.85, metrics  # measured 0.969
    assert metrics.acc >= clean_acc - 0.03, (metrics, clean_acc)  # measured 0.975
