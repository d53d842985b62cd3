"""Attacks that poison per batch (inputaware, blind, lira) keep the poisoned share equal to the ratio
at any batch size (issue 24): int(ratio x B) per batch, and below one sample per batch one sample
with probability ratio x B (BackdoorBench's generalize_to_lower_pratio). Before, inputaware
poisoned int(0.005 x 128) = 0 samples (a clean model reported as an attack) and blind / lira at
least one per batch (1.6x the ratio at 0.005, 7.8x at 0.001)."""
from __future__ import annotations

import math

import pytest
import torch

from bdcore.attacks import build_attack
from bdcore.models import build_model
from bdcore.train import default_train_config
from bdcore.train.loop import Normalizer, StepContext

BATCH, BATCHES = 128, 400


def _inputaware(digits, ratio):
    attack = build_attack("inputaware", digits.info, ratio=ratio)

    def count(images, labels, generator):
        return attack.poison_batch(images, labels, generator).n_poison

    return count


def _blind(digits, ratio):
    attack = build_attack("blind", digits.info, ratio=ratio)

    def count(images, labels, generator):
        bd_images, _ = attack.backdoor_batch(images, labels, generator)
        return int((bd_images != images[: len(bd_images)]).flatten(1).any(1).sum())

    return count


def _lira(digits, ratio):
    """The samples stage II's step poisons (the generator's output is recorded, not trained)."""
    attack = build_attack("lira", digits.info, ratio=ratio)
    config = default_train_config("digits", device="cpu", epochs=2)
    model = build_model("smallcnn", digits.info)
    step = attack.training_step(None)
    seen: list[int] = []
    poison = attack.poison_float
    attack.poison_float = lambda source: (seen.append(source.shape[0]), poison(source))[1]

    def count(images, labels, generator):
        seen.clear()
        ctx = StepContext(model, Normalizer(digits.info, torch.device("cpu")), digits.info, config,
                          torch.device("cpu"), config.epochs - 1, generator)  # the last epoch: stage II
        with torch.no_grad():
            step(images, labels, torch.arange(len(labels)), ctx)
        return seen[0] if seen else 0

    return count


ATTACKS = {"inputaware": _inputaware, "blind": _blind, "lira": _lira}


def _poisoned(digits, name: str, ratio: float, batches: int) -> list[int]:
    count = ATTACKS[name](digits, ratio)
    generator = torch.Generator().manual_seed(0)
    images = digits.train.images[:BATCH].float() / 255
    labels = digits.train.labels[:BATCH]
    return [count(images, labels, generator) for _ in range(batches)]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_low_ratio_poisons_its_share_per_batch_not_zero_or_one_each(digits, name):
    ratio = 0.005  # ratio x B = 0.64: the CIFAR-10 grid's 0.005 at batch 128
    counts = _poisoned(digits, name, ratio, BATCHES)
    expected = ratio * BATCH * BATCHES  # 256
    spread = math.sqrt(BATCHES * ratio * BATCH * (1 - ratio * BATCH))  # binomial sd, 9.6
    assert set(counts) <= {0, 1}
    assert abs(sum(counts) - expected) <= 5 * spread, (sum(counts), expected)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_ratio_above_one_sample_per_batch_poisons_int_ratio_times_b(digits, name):
    # 12 each: int(ratio x B), as the per-batch loops of BackdoorBench (wanet, bpp, inputaware)
    assert _poisoned(digits, name, 0.1, 5) == [int(0.1 * BATCH)] * 5
