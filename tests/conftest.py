"""Shared fixtures: the digits dataset and one badnet-backdoored smallcnn, trained once per session."""
from __future__ import annotations

import copy

import pytest
import torch

from bdcore.attacks import build_attack
from bdcore.data import load_dataset
from bdcore.metrics import backdoor_metrics
from bdcore.models import build_model
from bdcore.train import default_train_config, seed_everything, train_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def badnet_cell(digits):
    """(attack, poisoned train set, backdoor test set, trained model, metrics) for badnet at 10%."""
    attack = build_attack("badnet", digits.info, ratio=0.1)
    poisoned = attack.poison_train(digits.train)
    backdoor_test = attack.backdoor_test(digits.test)
    seed_everything(0)
    model = build_model("smallcnn", digits.info)
    train_model(model, poisoned.data, digits.info, default_train_config("digits"), seed=0)
    metrics = backdoor_metrics(model, digits.test, backdoor_test, digits.info)
    return attack, poisoned, backdoor_test, model, metrics


@pytest.fixture
def badnet_model_copy(badnet_cell):
    return copy.deepcopy(badnet_cell[3])
