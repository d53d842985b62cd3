"""wanet and bpp: trigger formulas (warping grid, quantisation, Floyd-Steinberg error diffusion), their
training steps (noise-mode / negative samples), poisoning, restore, and behaviour on digits + smallcnn.

The Floyd-Steinberg reference below is a plain per-pixel loop with the textbook weights, written
independently of bdcore's vectorised version; the warp is checked on a ramp image, where bilinear
sampling has a closed form.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_checks import assert_restores_identically

from bdcore.attacks import build_attack
from bdcore.attacks.bpp import quantize
from bdcore.attacks.wanet import identity_grid
from bdcore.metrics import backdoor_metrics
from bdcore.train import TrainConfig
from bdcore.train.loop import StepContext

LEVELS8 = torch.tensor([round(k * 255 / 7) for k in range(8)], dtype=torch.uint8)


def fs_reference(image: np.ndarray, levels: int) -> np.ndarray:
    """Textbook Floyd-Steinberg on one C x H x W image: 7/16 right, 3/16 down-left, 5/16 down,
    1/16 down-right; levels evenly spaced in 0..255; rounded to integers at the end."""
    img = image.astype(np.float64).copy()
    _, h, w = img.shape
    for y in range(h):
        for x in range(w):
            old = img[:, y, x].copy()
            new = np.round(old / 255.0 * (levels - 1)) / (levels - 1) * 255
            err = old - new
            img[:, y, x] = new
            if x + 1 < w:
                img[:, y, x + 1] += err * 7 / 16
            if y + 1 < h:
                if x > 0:
                    img[:, y + 1, x - 1] += err * 3 / 16
                img[:, y + 1, x] += err * 5 / 16
                if x + 1 < w:
                    img[:, y + 1, x + 1] += err * 1 / 16
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


class Capture(torch.nn.Module):
    """A stand-in model that records the batch it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(10))
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.w.expand(x.shape[0], -1)


def run_step(step, poisoned, info, batch: torch.Tensor, seed: int = 0):
    """Call a training step on the samples `batch` (no augmentation); returns the images it fed
    the model (identity normalisation) and the labels."""
    model = Capture()
    ctx = StepContext(model=model, normalize=lambda x: x, info=info, config=TrainConfig(channels_last=False),
                      device=torch.device("cpu"), epoch=0, generator=torch.Generator().manual_seed(seed))
    images = poisoned.data.images[batch].float() / 255
    labels = poisoned.data.labels[batch]
    step(images, labels, batch, ctx)
    return images, model.seen


# -- wanet -------------------------------------------------------------------------------------
def test_wanet_field_grid_and_warp(digits):
    attack = build_attack("wanet", digits.info)
    cfg = attack.config
    assert (cfg.k, cfg.s, cfg.grid_rescale, cfg.cross_ratio, cfg.ratio) == (4, 0.5, 1.0, 2.0, 0.1)
    # Control field: 2 x k x k, normalised to mean |offset| 1, drawn from the seed.
    assert attack.control.shape == (1, 2, 4, 4)
    assert abs(float(attack.control.abs().mean()) - 1) < 1e-6
    assert torch.equal(build_attack("wanet", digits.info).control, attack.control)
    assert not torch.equal(build_attack("wanet", digits.info, seed=1).control, attack.control)
    # Grid: identity + s / H x field (align_corners upsampling keeps the corners exact), clamped.
    h = digits.info.height
    ident = identity_grid(h, h)
    assert ident[0, 0, -1].tolist() == [1.0, -1.0] and ident[0, -1, 0].tolist() == [-1.0, 1.0]  # (x, y)
    for (r, c), (cr, cc) in {(0, 0): (0, 0), (0, -1): (0, -1), (-1, 0): (-1, 0), (-1, -1): (-1, -1)}.items():
        expected = (ident[0, r, c] + 0.5 / h * attack.control[0, :, cr, cc]).clamp(-1, 1)
        assert torch.allclose(attack.grid[0, r, c], expected, atol=1e-6)
    shift = (attack.grid - ident)[0, 8:24, 8:24]  # interior: no clamping
    assert 0.2 * 0.5 / h < float(shift.abs().mean()) < 2 * 0.5 / h
    # Bilinear warp of a horizontal ramp I(r, c) = 8c gives 8 x the sampled column, (gx + 1) / 2 x (W - 1).
    ramp = (torch.arange(h) * 8).to(torch.uint8).expand(1, 3, h, h).contiguous()
    out = attack.apply_trigger(ramp, torch.zeros(1, dtype=torch.long))
    expected = (8 * (attack.grid[0, :, :, 0] + 1) / 2 * (h - 1)).round()
    assert (out[0, 0].float() - expected).abs().max() <= 1
    # s = 0: the warp is the identity.
    x, y = digits.test.images[:16], digits.test.labels[:16]
    assert torch.equal(build_attack("wanet", digits.info, s=0).apply_trigger(x, y), x)
    assert not torch.equal(attack.apply_trigger(x, y), x)


def test_wanet_noise_mode_step(digits):
    attack = build_attack("wanet", digits.info, ratio=0.1)
    poisoned = attack.poison_train(digits.train)
    step = attack.training_step(poisoned)
    batch = torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(3))[:64]
    images, seen = run_step(step, poisoned, digits.info, batch)
    is_poison = torch.isin(batch, poisoned.poison_indices)
    changed = (seen != images).flatten(1).any(1)
    assert int(changed.sum()) == 2 * int(is_poison.sum()) > 0  # cross_ratio x the batch's poison samples
    assert not (changed & is_poison).any()  # among the non-poisoned samples only
    # Each is warped by the trigger grid plus small per-pixel noise: close to, not equal to, the trigger.
    warped = attack.apply_trigger(poisoned.data.images[batch[changed]], poisoned.data.labels[batch[changed]]).float() / 255
    gap = (seen[changed] - warped).abs()
    assert gap.max() > 1 / 255 and gap.mean() < (seen[changed] - images[changed]).abs().mean()
    # Fresh noise per call, reproducible from the generator.
    _, again = run_step(step, poisoned, digits.info, batch)
    _, other = run_step(step, poisoned, digits.info, batch, seed=1)
    assert torch.equal(again, seen) and not torch.equal(other, seen)


# -- bpp ---------------------------------------------------------------------------------------
def test_bpp_quantisation_and_dithering_by_hand():
    # Plain squeeze to 8 levels: the nearest level.
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    plain = quantize(x, 8, dithering=False)
    assert torch.isin(plain, LEVELS8).all()
    assert ((plain.float() - x.float()).abs() <= 255 / 14 + 0.5).all()
    # Two levels {0, 255}: 128 everywhere alternates (error 7/16 to the right).
    row = torch.full((1, 1, 1, 4), 128, dtype=torch.uint8)
    assert quantize(row, 2).flatten().tolist() == [255, 0, 255, 0]
    assert quantize(row, 2, dithering=False).flatten().tolist() == [255] * 4
    # 2 x 2 of 100: 0 (err 100 -> right 143.75, down 131.25, down-right 106.25); 143.75 -> 255
    # (err -111.25 -> down-left 110.39, down 71.48); 110.39 -> 0 (err -> right 119.78) -> 0.
    square = torch.full((1, 1, 2, 2), 100, dtype=torch.uint8)
    assert quantize(square, 2).flatten().tolist() == [0, 255, 0, 0]
    assert quantize(square, 2, dithering=False).flatten().tolist() == [0] * 4


def test_bpp_trigger_matches_reference_floyd_steinberg(digits):
    cfg = build_attack("bpp", digits.info).config  # BackdoorBench's default.yaml
    assert (cfg.squeeze_num, cfg.dithering, cfg.neg_ratio, cfg.ratio) == (8, False, 0.1, 0.1)
    attack = build_attack("bpp", digits.info, dithering=True)  # the paper's method
    x, y = digits.test.images[:3], digits.test.labels[:3]
    out = attack.apply_trigger(x, y)
    assert torch.isin(out, LEVELS8).all()
    for i in range(3):
        assert np.array_equal(out[i].numpy(), fs_reference(x[i].numpy(), 8))
    noise = torch.randint(0, 256, (2, 3, 12, 12), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for levels in (2, 5):
        q = quantize(noise, levels)
        for i in range(2):
            assert np.array_equal(q[i].numpy(), fs_reference(noise[i].numpy(), levels))
    # Dithering keeps the local mean that plain squeezing loses.
    smooth = torch.linspace(0, 60, 32).round().to(torch.uint8).expand(1, 1, 32, 32).contiguous()
    dithered, plain = quantize(smooth, 8), quantize(smooth, 8, dithering=False)
    mean = smooth.float().mean()
    assert abs(dithered.float().mean() - mean) < 1 < abs(plain.float().mean() - mean)


def test_bpp_negative_samples(digits):
    attack = build_attack("bpp", digits.info, ratio=0.1)
    poisoned = attack.poison_train(digits.train)
    step = attack.training_step(poisoned)
    batch = torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(3))[:64]
    images, seen = run_step(step, poisoned, digits.info, batch)
    is_poison = torch.isin(batch, poisoned.poison_indices)
    changed = (seen != images).flatten(1).any(1)
    assert attack.config.neg_ratio == 0.1  # BackdoorBench's default
    assert int(changed.sum()) == int(64 * 0.1) and not (changed & is_poison).any()
    # Each negative = clamp(x + bpp(x_j) - x_j) for a clean (non-poisoned) training image x_j.
    clean_idx = torch.ones(len(digits.train), dtype=torch.bool)
    clean_idx[poisoned.poison_indices] = False
    pool = digits.train.images[clean_idx]
    residuals = attack.apply_trigger(pool, digits.train.labels[clean_idx]).float() - pool.float()
    for img, neg in zip(images[changed], seen[changed]):
        candidates = (img * 255 + residuals).clamp(0, 255)
        assert ((candidates - neg * 255).abs().flatten(1).amax(1) < 1e-3).any()
    _, again = run_step(step, poisoned, digits.info, batch)
    assert torch.equal(again, seen)


# -- shared --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wanet", "bpp"])
def test_poisoning_restore_and_all2all(digits, name):
    attack = build_attack(name, digits.info, ratio=0.1, target=2)
    p = attack.poison_train(digits.train)
    n = len(digits.train)
    idx = p.poison_indices
    assert len(idx) == round(0.1 * n) and len(set(digits.train.labels[idx].tolist())) == 10
    assert (p.data.labels[idx] == 2).all()
    assert torch.equal(p.data.images[idx], attack.apply_trigger(digits.train.images[idx], digits.train.labels[idx]))
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(p.data.images[rest], digits.train.images[rest])
    assert torch.equal(p.data.labels[rest], digits.train.labels[rest])
    assert attack.has_poisoned_trainset
    a2a = build_attack(name, digits.info, label_mode="all2all")
    q = a2a.poison_train(digits.train)
    assert torch.equal(q.data.labels[q.poison_indices], (digits.train.labels[q.poison_indices] + 1) % 10)
    bt = a2a.backdoor_test(digits.test)
    assert len(bt) == len(digits.test) and torch.equal(bt.target_labels, (digits.test.labels + 1) % 10)
    assert_restores_identically(attack, digits)


# -- behaviour ---------------------------------------------------------------------------------
# The paper defaults do not reach ASR 0.85 within digits' 10-epoch budget (measured, see below); these
# are the least changes found that do. Both official codes train 1000 epochs (n_iters), BackdoorBench 100.
BEHAVIOUR = {"wanet": {"s": 4.0, "cross_ratio": 1.0}, "bpp": {"squeeze_num": 4}}


@pytest.mark.parametrize("name", ["wanet", "bpp"])
def test_backdoor_behaviour_on_digits(train_attack, clean_digits_model, digits, name):
    """digits + smallcnn, 10 epochs (cosine, lr 0.05), ratio 0.1 (the papers'); clean ACC 0.981.
    Measured final ACC / ASR (/ RA); per-epoch ASR swings widely before the cosine lr settles:
    wanet paper defaults (s 0.5, cross 2): 0.933 / 0.084 / 0.894; s 0.5 without noise mode: 0.947 / 0.044;
    s 2: 0.958 / 0.234; s 4: 0.961 / 0.421; s 6: 0.950 / 0.776; s 8: 0.933 / 0.894 (ACC too low);
    s 2 cross 1: 0.900 / 0.533; s 3 cross 1: 0.953 / 0.857; s 4 cross 1 (used): 0.955 / 0.931 / 0.062 (ASR >= 0.82 from epoch 3 on).
    bpp paper defaults (8 levels, dithering, negatives 0.2): 0.961 / 0.626 / 0.371; negatives 0.1:
    0.950 / 0.660; negatives 0.05: 0.955 / 0.966; no dithering: 0.947 / 0.498; no negatives:
    0.958 / 1.0; 4 levels (used): 0.953 / 1.0 / 0.0 with the tests' 2 threads (0.958 with 1; ASR >= 0.86
    from epoch 2 on). With BackdoorBench's defaults (no dithering, negatives 0.1; issue 24), measured on
    the machines of December 2026: 8 levels 0.942 / 0.607 / 0.389; 4 levels (used) 0.958 / 1.0 / 0.0.
    A no-op trigger fails: the clean model does not send triggered images to the target."""
    clean_model, clean_acc = clean_digits_model
    attack, _, metrics, _ = train_attack(name, ratio=0.1, **BEHAVIOUR[name])
    assert metrics.asr >= 0.85 and metrics.acc >= clean_acc - 0.03, (metrics, clean_acc)
    bt = attack.backdoor_test(digits.test)
    assert backdoor_metrics(clean_model, digits.test, bt, digits.info, device="cpu").asr < 0.2
