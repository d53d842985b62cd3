"""Checks every attack's tests share."""
from __future__ import annotations

import torch

from bdcore.attacks import Attack, build_attack
from bdcore.data.base import DatasetSplits


def assert_restores_identically(attack: Attack, data: DatasetSplits) -> None:
    """An attack rebuilt from its config and state_tensors() alone (no prepare: what defense cells
    do) applies the same triggers and poisons the same samples the same way."""
    restored = build_attack(attack.name, data.info, **attack.config.model_dump())
    restored.load_state_tensors({k: v.clone() for k, v in attack.state_tensors().items()})
    images, labels = data.test.images[:16], data.test.labels[:16]
    assert torch.equal(restored.apply_trigger(images, labels), attack.apply_trigger(images, labels))
    assert torch.equal(restored.apply_train_trigger(images, labels), attack.apply_train_trigger(images, labels))
    a, b = attack.poison_train(data.train), restored.poison_train(data.train)
    assert torch.equal(a.poison_indices, b.poison_indices)
    assert torch.equal(a.data.images, b.data.images) and torch.equal(a.data.labels, b.data.labels)
    assert a.extra_indices.keys() == b.extra_indices.keys()
    for key in a.extra_indices:
        assert torch.equal(a.extra_indices[key], b.extra_indices[key])
