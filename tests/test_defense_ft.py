"""Behaviour of the ft defense on digits + smallcnn.

Settings, stated: the defender holds 20% of the training set (287 images, 230 for fitting and 57
held out), and fine-tunes 30 epochs with the digits training recipe (batch 64, lr 0.05, cosine).
With the paper's 5% / 100 epochs / lr 0.01, the 58 fitting images of digits lower badnet's ASR
only to ~0.75 (measured), so the test uses the larger share the issue allows us to choose.
"""
import pytest

from bdcore.data import defender_subset
from bdcore.defenses import DefenseContext, build_defense, defense_names
from bdcore.metrics import backdoor_metrics
from bdcore.registry import UnknownNameError

FT_TEST_PARAMS = dict(clean_fraction=0.2, epochs=30, batch_size=64, lr=0.05)


def ft_works(before, after) -> bool:
    return after.asr <= before.asr / 2 and after.acc >= before.acc - 0.05


def test_ft_defaults_follow_reference():
    d = build_defense("ft")
    assert (d.config.epochs, d.config.batch_size, d.config.lr, d.config.clean_fraction) == (100, 256, 0.01, 0.05)
    assert "ft" in defense_names()
    with pytest.raises(UnknownNameError, match="known defenses"):
        build_defense("nope")


def test_ft_lowers_badnet_asr_and_keeps_accuracy(digits, badnet_cell, badnet_model_copy):
    attack, poisoned, backdoor_test, _, before = badnet_cell
    # The check itself must be able to fail: the undefended model (a no-op defense) fails it.
    assert not ft_works(before, before)
    defense = build_defense("ft", **FT_TEST_PARAMS)
    clean = defender_subset(digits.train, defense.config.clean_fraction, seed=0)
    outcome = defense.repair(badnet_model_copy, clean, DefenseContext(digits.info, device="cpu"))
    after = backdoor_metrics(outcome.model, digits.test, backdoor_test, digits.info)
    assert ft_works(before, after), (before, after)
    assert outcome.diagnostics["clean_train_size"] == len(clean.train)


def test_defender_subset_is_seeded_and_disjoint(digits):
    a = defender_subset(digits.train, 0.05, seed=0)
    b = defender_subset(digits.train, 0.05, seed=0)
    assert a.indices_train.tolist() == b.indices_train.tolist()
    assert not set(a.indices_train.tolist()) & set(a.indices_val.tolist())
    assert len(a.train) + len(a.val) == round(0.05 * len(digits.train))
    assert defender_subset(digits.train, 0.05, seed=1).indices_train.tolist() != a.indices_train.tolist()
