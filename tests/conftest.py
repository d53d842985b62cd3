"""Shared fixtures: the digits dataset and one badnet-backdoored smallcnn, trained once per session."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from bdcore.attacks import build_attack
from bdcore.data import load_dataset
from bdcore.metrics import backdoor_metrics
from bdcore.models import build_model
from bdcore.train import default_train_config, seed_everything, train_model

torch.set_num_threads(2)
# Ray >= 2.59 turns on token auth for new local clusters; tests (and their subprocesses) run
# on loopback only, without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole test session; returns its address so that
    subprocess drivers can join it instead of starting their own."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


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
