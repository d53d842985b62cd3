"""What every training-controlled attack (it owns its training step) shares: a killed training
resumes to exactly the result of an uninterrupted one (CPU, fixed seed), its artifact alone
rebuilds the trigger, and training-time defenses skip attacks without a poisoned training set."""
from __future__ import annotations

import pytest
import torch

from bdcore.artifacts import read_metadata
from bdcore.cells import AttackCellSpec, load_attack_cell, run_attack_cell
from bdcore.metrics import backdoor_metrics

TRAINING_ATTACKS = ["wanet", "inputaware", "bpp", "blind", "lira"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("name", TRAINING_ATTACKS)
def test_killed_training_resumes_to_the_same_result(name, digits, tmp_path):
    # Resume is what is tested, so inputaware's mask pre-training (its own resumable stage) is kept short.
    params = {"mask_epochs": 2} if name == "inputaware" else {}
    spec = AttackCellSpec(dataset="digits", model="smallcnn", attack=name, ratio=0.1, train={"epochs": 3},
                          attack_params=params)

    def die_after_two(epoch, record):
        if epoch == 2:
            raise Killed

    straight = run_attack_cell(spec, tmp_path / "straight", data=digits)
    with pytest.raises(Killed):
        run_attack_cell(spec, tmp_path / "killed", data=digits, on_epoch_end=die_after_two)
    epochs = []
    resumed = run_attack_cell(spec, tmp_path / "killed", data=digits, on_epoch_end=lambda e, r: epochs.append(e))
    assert epochs == [3] and read_metadata(resumed.path)["resumed_from_epoch"] == 2
    assert resumed.metrics == straight.metrics
    a, b = load_attack_cell(straight.path), load_attack_cell(resumed.path)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    # The artifact alone rebuilds the trigger (generators included), identically, and the cell's
    # metrics are those of the trained trigger (not of the generators before training).
    backdoor_test = a.attack.backdoor_test(digits.test)
    assert torch.equal(backdoor_test.images, b.attack.backdoor_test(digits.test).images)
    assert backdoor_metrics(a.model, digits.test, backdoor_test, digits.info, device="cpu") == straight.metrics
    meta = read_metadata(straight.path)
    assert meta["has_poisoned_trainset"] == a.attack.has_poisoned_trainset
