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


def _backdoored_cell(digits, attack_name: str):
    """(attack, poisoned train set, backdoor test set, trained model, metrics) for `attack_name` at 10%."""
    attack = build_attack(attack_name, digits.info, ratio=0.1)
    poisoned = attack.poison_train(digits.train)
    backdoor_test = attack.backdoor_test(digits.test)
    seed_everything(0)
    model = build_model("smallcnn", digits.info)
    train_model(model, poisoned.data, digits.info, default_train_config("digits"), seed=0)
    metrics = backdoor_metrics(model, digits.test, backdoor_test, digits.info)
    return attack, poisoned, backdoor_test, model, metrics


@pytest.fixture(scope="session")
def badnet_cell(digits):
    return _backdoored_cell(digits, "badnet")


@pytest.fixture
def badnet_model_copy(badnet_cell):
    return copy.deepcopy(badnet_cell[3])


@pytest.fixture(scope="session")
def blended_cell(digits):
    return _backdoored_cell(digits, "blended")


@pytest.fixture(scope="session")
def resource_store(tmp_path_factory):
    """One on-disk cache of generated attack resources for the session: the clean surrogate that
    lf, lc and trojannn craft against is trained once and shared, as in a sweep."""
    from bdcore.attacks.resources import ResourceStore

    return ResourceStore(tmp_path_factory.mktemp("resources"), device="cpu")


@pytest.fixture(scope="session")
def prepare_attack(digits, resource_store):
    """prepare_attack(name, **params) -> the attack after prepare() with the session's store."""

    def make(name: str, **params):
        attack = build_attack(name, digits.info, **params)
        attack.prepare(digits.train, resource_store)
        return attack

    return make


@pytest.fixture(scope="session")
def clean_digits_model(digits):
    """smallcnn trained on clean digits with the default budget (10 epochs): the reference ACC
    attack behaviour tests compare against."""
    seed_everything(0)
    model = build_model("smallcnn", digits.info)
    train_model(model, digits.train, digits.info, default_train_config("digits"), seed=0)
    from bdcore.metrics import accuracy

    return model, accuracy(model, digits.test, digits.info, device="cpu")


@pytest.fixture(scope="session")
def train_attack(digits, resource_store):
    """train_attack(name, model="smallcnn", train=None, **params) -> (attack, poisoned, metrics, model):
    prepare the attack (resources cached for the session), poison digits, train the victim with
    the attack's own training step if any, and score it on the backdoor test set."""

    def run(name: str, model: str = "smallcnn", train: dict | None = None, **params):
        attack = build_attack(name, digits.info, **params)
        attack.prepare(digits.train, resource_store)
        poisoned = attack.poison_train(digits.train)
        seed_everything(0)
        net = build_model(model, digits.info)
        train_model(net, poisoned.data, digits.info, default_train_config("digits", device="cpu", **(train or {})),
                    seed=0, step=attack.training_step(poisoned))
        metrics = backdoor_metrics(net, digits.test, attack.backdoor_test(digits.test), digits.info, device="cpu")
        return attack, poisoned, metrics, net

    return run


# The schedule on which clip:tiny learns digits captions on a CPU (zero-shot ACC 0.889 measured).
TINY_CLIP_SCHEDULE = dict(epochs=15, batch_size=64, lr=5e-4, weight_decay=0.0, device="cpu")


@pytest.fixture(scope="session")
def clean_tiny_clip(digits, tmp_path_factory):
    """A clean clip:tiny trained once per session on digits captions ("a photo of a {digit}."): the
    weights file (safetensors) that CLIP attack and defense tests start from, as the papers start
    from a pre-trained CLIP."""
    from safetensors.torch import save_file

    from bdcore.clip import ClipTrainConfig, build_clip, captions_from_classes, train_clip

    torch.manual_seed(0)  # the initialisation, so the fixture does not depend on which tests ran before
    bundle = build_clip("clip:tiny")
    train_clip(bundle, captions_from_classes(digits.train, digits.info.class_names),
               ClipTrainConfig(**TINY_CLIP_SCHEDULE), seed=0)
    path = tmp_path_factory.mktemp("clip") / "clip-tiny-digits.safetensors"
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(path))
    return path
