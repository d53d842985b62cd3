"""ABL (anti-backdoor learning): defaults, the LGA loss, and a from-scratch run on the badnet cell."""
from __future__ import annotations

import os

import pytest
import torch
from defense_checks import defense_works
from torch import nn

from bdcore.defenses import DefenseContext, build_defense
from bdcore.defenses.abl import LGAStep
from bdcore.metrics import backdoor_metrics
from bdcore.models import build_model
from bdcore.train import default_train_config


def test_abl_defaults_follow_the_paper():
    defense = build_defense("abl")
    cfg = defense.config
    assert defense.kind == "training_time"
    assert (cfg.isolation_epochs, cfg.finetuning_epochs, cfg.unlearning_epochs) == (20, 60, 20)
    assert cfg.isolation_ratio == 0.01 and cfg.gamma == 0.5
    assert cfg.batch_size == 64 and cfg.lr == 0.1 and cfg.lr_finetuning == 0.1 and cfg.lr_unlearning == 5e-4
    assert cfg.momentum == 0.9 and cfg.weight_decay == 1e-4


def test_lga_ascends_below_gamma_and_descends_above():
    """sign(CE - gamma) * CE: its gradient is CE's above gamma and the opposite below."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    class Ctx:  # just what the step reads
        pass

    ctx = Ctx()
    ctx.model = model
    ctx.normalize = lambda images: images
    ctx.config = default_train_config("digits", channels_last=False)
    ce = nn.functional.cross_entropy(model(x), y)
    (grad_ce,) = torch.autograd.grad(ce, model.weight)
    for gamma, sign in ((ce.item() + 1.0, -1.0), (ce.item() - 1.0, 1.0)):
        (grad,) = torch.autograd.grad(LGAStep(gamma)(x, y, None, ctx), model.weight)
        assert torch.allclose(grad, sign * grad_ce)


# A known gap (issue 7, declared blocked: the 5-point ACC bar against BackdoorBench's own 8-point ABL loss); it
# always ended as an expected failure and cost ~33 s of the suite's 20-minute budget, so it runs on request.
@pytest.mark.skipif(os.environ.get("BDCORE_RUN_KNOWN_GAPS") != "1", reason="known gap (BDCORE_RUN_KNOWN_GAPS=1 runs it): "
                    "abl halves ASR (0.966 -> 0.072) but loses 8.6 points of ACC at the test schedule")
def test_abl_trains_a_model_without_the_backdoor(digits, badnet_cell):
    """ABL from scratch on the badnet (10%) poisoned set, smallcnn, seed 0.

    Schedule: the paper's 20 isolation (LGA) and 20 unlearning epochs, fine-tuning cut from 60 to 20
    epochs (lr drop after 13) so the test fits ~60 s on 2 CPU cores; every other parameter is the default.
    Measured (seed 0): 9 of the 14 isolated samples are poison; after fine-tuning ACC 0.983 / ASR 0.981,
    after unlearning ACC 0.883 / ASR 0.445 (undefended cell: ACC 0.961 / ASR 0.966). Seed 1: 14 of 14
    isolated are poison, ACC 0.978 / ASR 0.988 after fine-tuning, 0.875 / 0.047 after unlearning. With the
    full 20 + 60 + 20 schedule (seed 0): ACC 0.916 / ASR 0.445, within the issue's 5-point bar.
    In the pytest session (seed 0, other thread counts): ACC 0.875 / ASR 0.072. The ASR bar holds; the
    5-point ACC bar does not at this schedule, which is why this test is an opt-in known gap: run, it
    asserts the whole bar and fails until ABL meets it.
    ~60 s on an idle 2-core machine (40 training epochs on 1,438 images).
    """
    _attack, poisoned, backdoor_test, _model, before = badnet_cell
    ctx = DefenseContext(digits.info, device="cpu", model_factory=lambda: build_model("smallcnn", digits.info),
                         train_config=default_train_config("digits"))
    outcome = build_defense("abl", finetuning_epochs=20).train(poisoned, ctx)
    after = backdoor_metrics(outcome.model, digits.test, backdoor_test, digits.info, device="cpu")
    d = outcome.diagnostics
    assert d["isolated_count"] == int(len(poisoned.data) * 0.01)
    # LGA must isolate mostly poison: 10% of the set is poison, so chance precision is ~0.1.
    assert d["isolation_precision"] >= 0.5, d
    assert after.asr <= before.asr / 2, (after, d)
    # ABL's unlearning costs clean accuracy on this model (7.8 points at seed 0, 8.6 at seed 1).
    assert defense_works(before, after), (before, after, d)
