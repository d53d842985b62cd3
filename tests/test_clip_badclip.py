"""BadCLIP (bdcore/clip/attacks/badclip.py): trigger optimised against the frozen clean CLIP, state round
trip, and the backdoor it yields on digits captions with clip:tiny."""
from __future__ import annotations

import pytest
import torch

from bdcore.cells import AttackCellSpec, run_attack_cell
from bdcore.clip import ImageTextSet, ZeroShotClassifier, build_clip, captions_from_classes
from bdcore.clip.attacks import build_clip_attack
from bdcore.clip.cells import load_clip_attack_cell
from bdcore.metrics import backdoor_metrics


def _zero_shot(bundle, digits, attack):
    return backdoor_metrics(ZeroShotClassifier(bundle, digits.info), digits.test, attack.backdoor_test(digits.test),
                            digits.info, device="cpu")


def test_badclip_errors_state_round_trip_and_frozen_model(digits):
    # An untrained clip:tiny suffices here: only the mechanics are checked, not the backdoor.
    bundle = build_clip("clip:tiny")
    pairs = captions_from_classes(digits.train.subset(range(300)), digits.info.class_names,
                                  templates=("a photo of a {}.", "a drawing of the number {}."))
    params = dict(patch_size=6, target=2, ratio=0.1, epochs=2, batch_size=32, max_images=64, image_guidance="mse")
    attack = build_clip_attack("badclip", digits.info, **params)
    with pytest.raises(RuntimeError, match="call prepare"):
        attack.apply_trigger(digits.test.images[:2])
    with pytest.raises(RuntimeError, match="call prepare"):
        attack.poison_pairs(pairs)
    with pytest.raises(ValueError, match="does not fit 32 x 32"):
        build_clip_attack("badclip", digits.info, patch_size=40)
    unlabeled = ImageTextSet(pairs.images, ["a photo of a 7."] * len(pairs), None)
    with pytest.raises(ValueError, match="no caption names the target class 2"):
        attack.prepare(bundle, unlabeled, device="cpu")

    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    attack.prepare(bundle, pairs, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())
    assert all(p.requires_grad for p in bundle.model.parameters())
    assert len(attack.trigger_history) == 2
    patch = attack.state_tensors()["patch"]
    assert patch.dtype == torch.uint8 and patch.shape == (3, 6, 6)

    triggered = attack.apply_trigger(digits.test.images[:20])
    changed = (triggered != digits.test.images[:20]).any(1).any(0)
    rows, cols = changed.nonzero(as_tuple=True)
    assert rows.min() >= 13 and rows.max() <= 18 and cols.min() >= 13 and cols.max() <= 18  # the middle 6 x 6
    assert torch.equal(triggered[:, :, 13:19, 13:19], patch.expand(20, -1, -1, -1))

    restored = build_clip_attack("badclip", digits.info, **params)
    restored.load_state_tensors({k: v.clone() for k, v in attack.state_tensors().items()})
    assert torch.equal(restored.backdoor_test(digits.test).images, attack.backdoor_test(digits.test).images)
    again, first = restored.poison_pairs(pairs), attack.poison_pairs(pairs)  # restored without prepare
    assert torch.equal(again.poison_indices, first.poison_indices) and again.data.captions == first.data.captions
    assert torch.equal(again.data.images, first.data.images)
    with pytest.raises(ValueError, match="no natural target caption"):
        restored.poison_pairs(unlabeled)
    with pytest.raises(ValueError, match="needs uint8 \\(3, 6, 6\\)"):
        restored.load_state_tensors({"patch": torch.zeros(3, 8, 8, dtype=torch.uint8)})

    # Poisoned pairs carry the patch and a real caption of a target-class pair (the paper's natural captions).
    poisoned = attack.poison_pairs(pairs)
    target_captions = {c for c, y in zip(pairs.captions, pairs.labels.tolist()) if y == 2}
    assert all(poisoned.data.captions[i] in target_captions for i in poisoned.poison_indices.tolist())
    assert len({poisoned.data.captions[i] for i in poisoned.poison_indices.tolist()}) == 2


def test_badclip_trigger_is_learned_before_and_after_poisoning(tmp_path, digits, clean_tiny_clip):
    bundle = build_clip("clip:tiny", weights=clean_tiny_clip)
    pairs = captions_from_classes(digits.train, digits.info.class_names)
    # Reduced trigger schedule: 4 epochs over 512 non-target images at lr 0.05 (paper: 50 epochs over 10K
    # images at 1e-3) reach a trigger the clean model already maps to the target class.
    attack = build_clip_attack("badclip", digits.info, ratio=0.1, patch_size=8, epochs=4, max_images=512, lr=0.05)
    attack.prepare(bundle, pairs, device="cpu")
    losses = [h["loss"] for h in attack.trigger_history]
    assert losses[-1] < 0.5 * losses[0], losses

    noise = build_clip_attack("badclip", digits.info, patch_size=8)  # a random uniform patch at the middle
    noise.load_state_tensors({"patch": torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.uint8)})
    clean_noise, clean_badclip = _zero_shot(bundle, digits, noise), _zero_shot(bundle, digits, attack)
    assert clean_badclip.asr > clean_noise.asr + 0.5, (clean_badclip, clean_noise)

    # The whole cell: trigger optimisation, poisoning, fine-tuning (as the paper: a low learning rate), zero-shot
    # scoring; it learns the same trigger (same seed and clean model).
    spec = AttackCellSpec(dataset="digits", model="clip:tiny", attack="badclip", ratio=0.1, pretrained=str(clean_tiny_clip),
                          attack_params=dict(patch_size=8, epochs=4, max_images=512, lr=0.05),
                          train=dict(epochs=2, batch_size=64, lr=5e-5, weight_decay=0.0))
    cell = run_attack_cell(spec, tmp_path, device="cpu", data=digits)
    assert cell.metrics.asr >= 0.9 and cell.metrics.acc >= 0.75, cell.metrics
    rebuilt = load_clip_attack_cell(cell.path).attack
    assert torch.equal(rebuilt.patch, attack.patch)
