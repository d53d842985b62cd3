import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from bdcore.attacks import attack_names, build_attack
from bdcore.registry import UnknownNameError


def test_registry_lists_known_attacks():
    assert {"badnet", "blended"} <= set(attack_names())
    with pytest.raises(UnknownNameError, match="known attacks: .*badnet"):
        build_attack("badnot", None)


def test_unknown_parameter_is_rejected(digits):
    with pytest.raises(ValidationError, match="patch_sise"):
        build_attack("badnet", digits.info, patch_sise=4)
    with pytest.raises(ValidationError, match="ratio"):
        build_attack("badnet", digits.info, ratio=1.5)


def test_badnet_patch_and_poisoning(digits):
    attack = build_attack("badnet", digits.info, ratio=0.1, target=3, seed=1)
    p = attack.poison_train(digits.train)
    n = len(digits.train)
    assert len(p.poison_indices) == round(0.1 * n)
    # Dirty-label: drawn from all classes, the target class included.
    assert len(set(digits.train.labels[p.poison_indices].tolist())) == 10
    assert (p.data.labels[p.poison_indices] == 3).all()
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[p.poison_indices] = False
    assert torch.equal(p.data.images[untouched], digits.train.images[untouched])
    assert torch.equal(p.data.labels[untouched], digits.train.labels[untouched])
    poisoned = p.data.images[p.poison_indices]
    assert (poisoned[:, :, -3:, -3:] == 255).all()  # 3x3 white, bottom-right
    assert torch.equal(poisoned[:, :, :-3, :], digits.train.images[p.poison_indices][:, :, :-3, :])
    assert torch.equal(poisoned[:, :, :, :-3], digits.train.images[p.poison_indices][:, :, :, :-3])
    # Seeded: the same seed draws the same samples, another seed others.
    assert torch.equal(attack.poison_train(digits.train).poison_indices, p.poison_indices)
    other = build_attack("badnet", digits.info, ratio=0.1, target=3, seed=2).poison_train(digits.train)
    assert not torch.equal(other.poison_indices, p.poison_indices)


def test_backdoor_test_set_all2one_and_all2all(digits):
    a2o = build_attack("badnet", digits.info, ratio=0.1, target=0).backdoor_test(digits.test)
    assert len(a2o) == int((digits.test.labels != 0).sum())
    assert (a2o.true_labels != 0).all() and (a2o.target_labels == 0).all()
    a2a = build_attack("badnet", digits.info, ratio=0.1, label_mode="all2all").backdoor_test(digits.test)
    assert len(a2a) == len(digits.test)
    assert torch.equal(a2a.target_labels, (a2a.true_labels + 1) % 10)
    p = build_attack("badnet", digits.info, ratio=0.1, label_mode="all2all").poison_train(digits.train)
    assert torch.equal(p.data.labels[p.poison_indices], (digits.train.labels[p.poison_indices] + 1) % 10)


def test_badnet_patch_image_and_position(digits, tmp_path):
    patch = np.zeros((4, 4, 3), dtype=np.uint8)
    patch[..., 0] = 200
    Image.fromarray(patch).save(tmp_path / "p.png")
    attack = build_attack("badnet", digits.info, patch_image=str(tmp_path / "p.png"), patch_size=4,
                          position=(2, 5))
    out = attack.apply_trigger(digits.test.images[:2], digits.test.labels[:2])
    assert (out[:, 0, 2:6, 5:9] == 200).all() and (out[:, 1:, 2:6, 5:9] == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        build_attack("badnet", digits.info, patch_size=4, position=(30, 30))


def test_blended_formula_and_pattern_file(digits, tmp_path):
    attack = build_attack("blended", digits.info, alpha=0.2)
    x = digits.test.images[:4]
    expected = (0.8 * x.float() + 0.2 * attack.pattern.float()).round().to(torch.uint8)
    assert torch.equal(attack.apply_trigger(x, digits.test.labels[:4]), expected)
    # Fixed and seeded default pattern.
    assert torch.equal(build_attack("blended", digits.info).pattern, attack.pattern)
    Image.fromarray(np.full((8, 8, 3), 77, dtype=np.uint8)).save(tmp_path / "k.png")
    from_file = build_attack("blended", digits.info, pattern_image=str(tmp_path / "k.png"))
    assert from_file.pattern.shape == (3, 32, 32) and (from_file.pattern == 77).all()


def test_badnet_behaviour_reaches_high_asr(badnet_cell):
    """Behaviour: badnet at 10% on digits + smallcnn (10 epochs) gives ASR >= 0.95, ACC >= 0.90."""
    *_, metrics = badnet_cell
    assert metrics.acc >= 0.90, metrics
    assert metrics.asr >= 0.95, metrics


def test_blended_behaviour_reaches_high_asr(digits):
    from bdcore.metrics import backdoor_metrics
    from bdcore.models import build_model
    from bdcore.train import default_train_config, seed_everything, train_model

    attack = build_attack("blended", digits.info, ratio=0.1)
    poisoned = attack.poison_train(digits.train)
    seed_everything(0)
    model = build_model("smallcnn", digits.info)
    train_model(model, poisoned.data, digits.info, default_train_config("digits"), seed=0)
    metrics = backdoor_metrics(model, digits.test, attack.backdoor_test(digits.test), digits.info)
    assert metrics.asr >= 0.90, metrics
    assert metrics.acc >= 0.85, metrics
