"""What every post-training defense's behaviour test shares: run a defense on a session cell
(badnet_cell / blended_cell fixtures) and judge it by the issue's bar."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from bdcore.data import defender_subset
from bdcore.defenses import DefenseContext, DefenseOutcome, build_defense
from bdcore.metrics import BackdoorMetrics, backdoor_metrics

# Digits is small: 5% of it is 72 images (58 to fit, 14 held out), too few to select anything on.
# Behaviour tests give the defender 20% (287 images: 230 to fit, 57 held out) unless they say otherwise.
TEST_CLEAN_FRACTION = 0.2


def defense_works(before: BackdoorMetrics, after: BackdoorMetrics, max_acc_loss: float = 0.05) -> bool:
    """The issue's bar: ASR at least halved, clean accuracy down by at most 5 points."""
    return after.asr <= before.asr / 2 and after.acc >= before.acc - max_acc_loss


def reaches_reference(before: BackdoorMetrics, after: BackdoorMetrics, reference_asr: float,
                      asr_slack: float = 0.15, acc_budget: float = 0.10) -> bool:
    """The bar of a defense judged by what BackdoorBench's own implementation reaches on the same
    test cell (digits, smallcnn, badnet 10%, defender 20%; figures in docs/methods.md): ASR at most
    `asr_slack` above the reference's, clean accuracy down by at most `acc_budget` (the 10% budget
    BackdoorBench's pruning defenses select within)."""
    return after.asr <= reference_asr + asr_slack and after.acc >= before.acc - acc_budget


@dataclass
class DefenseRun:
    before: BackdoorMetrics
    after: BackdoorMetrics
    outcome: DefenseOutcome


def run_defense(name: str, cell, digits, **params) -> DefenseRun:
    """Apply defense `name` (with `params`) to a copy of the cell's backdoored model and score it.
    Also asserts that the undefended model (what a no-op defense returns) fails the bar, so a
    passing test means the defense did something."""
    _attack, poisoned, backdoor_test, model, before = cell
    assert not defense_works(before, before), "the undefended model must fail the bar"
    params.setdefault("clean_fraction", TEST_CLEAN_FRACTION)
    defense = build_defense(name, **params)
    clean = defender_subset(digits.train, defense.config.clean_fraction, defense.holdout_fraction, seed=0)
    ctx = DefenseContext(digits.info, device="cpu", poisoned_train=lambda: poisoned)
    outcome = defense.repair(copy.deepcopy(model), clean, ctx)
    after = backdoor_metrics(outcome.model, digits.test, backdoor_test, digits.info, device="cpu")
    return DefenseRun(before, after, outcome)
