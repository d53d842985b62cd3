"""CLIP attacks (bdcore/clip/attacks): registry, poisoning of image-caption pairs, triggered test sets."""
from __future__ import annotations

import pytest
import torch

from bdcore.clip import captions_from_classes
from bdcore.clip.attacks import build_clip_attack, clip_attack_names


def test_registry_and_bad_parameters(digits):
    assert "badnet_clip" in clip_attack_names()
    with pytest.raises(KeyError, match="badnet_clap"):
        build_clip_attack("badnet_clap", digits.info)
    with pytest.raises(ValueError, match="bad parameters for CLIP attack 'badnet_clip'"):
        build_clip_attack("badnet_clip", digits.info, ratio=1.5)
    with pytest.raises(ValueError, match="does not fit 32 x 32"):
        build_clip_attack("badnet_clip", digits.info, patch_size=40)
    with pytest.raises(ValueError, match="target class 12 does not exist"):
        build_clip_attack("badnet_clip", digits.info, target=12)


@pytest.mark.parametrize("position", ["random", "bottom_right"])
def test_badnet_clip_poisons_pairs_and_test_images(digits, position):
    attack = build_clip_attack("badnet_clip", digits.info, ratio=0.05, patch_size=6, target=3, position=position)
    pairs = captions_from_classes(digits.train, digits.info.class_names)
    poisoned = attack.poison_pairs(pairs)
    chosen = poisoned.poison_indices
    assert len(chosen) == round(0.05 * len(pairs)) and len(set(chosen.tolist())) == len(chosen)
    others = torch.ones(len(pairs), dtype=torch.bool)
    others[chosen] = False
    # Poisoned pairs: trigger pasted (exactly one 6 x 6 block changed) and a caption naming the target.
    assert all(poisoned.data.captions[i] == "a photo of a 3." for i in chosen.tolist())
    assert torch.equal(poisoned.data.images[others], pairs.images[others])
    assert [poisoned.data.captions[i] for i in others.nonzero().flatten().tolist()] == \
        [pairs.captions[i] for i in others.nonzero().flatten().tolist()]
    for i in chosen[:20].tolist():
        diff = (poisoned.data.images[i] != pairs.images[i]).any(0)
        rows, cols = diff.nonzero(as_tuple=True)
        assert rows.max() - rows.min() < 6 and cols.max() - cols.min() < 6
        if rows.max() - rows.min() == 5 and cols.max() - cols.min() == 5:  # no patch pixel equals the image's
            r, c = int(rows.min()), int(cols.min())
            assert torch.equal(poisoned.data.images[i][:, r:r + 6, c:c + 6], attack.patch)
    assert pairs.captions[int(chosen[0])] != "a photo of a 3." or int(pairs.labels[chosen[0]]) == 3
    test = attack.backdoor_test(digits.test)
    assert torch.equal(test.images, attack.backdoor_test(digits.test).images)  # reproducible, call after call
    assert (test.true_labels != 3).all() and (test.target_labels == 3).all()
    assert len(test) == int((digits.test.labels != 3).sum())
    if position == "bottom_right":
        assert torch.equal(test.images[:, :, -6:, -6:], attack.patch.expand(len(test), -1, -1, -1))
