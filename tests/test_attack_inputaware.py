"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): the pre-trained mask generator is
sparse and input dependent, the diversity loss is the paper's ratio and is part of the training
loss, cross-trigger samples keep their labels, every image gets its own trigger, the trained
generators restore from the artifact tensors alone, and the backdoor works on digits + smallcnn.

Every test uses the attack's defaults on digits (ratio 0.1 = p_attack, cross_ratio 0.1, target 0;
digits' CPU budget: generator widths (8, 16), mask pre-training 5 epochs at batch 32, milestones
(2, 4)) and the engine's default digits training (smallcnn, 10 epochs, SGD 0.05 cosine), except
that the behaviour test doubles the mask density target (0.064 instead of the paper's 0.032).

Why (measured on CPU, seed 0): with density 0.032 the mask mean on test images is 0.045 (untrained
generator: 0.19), 99% of mask pixels are below 0.05 or above 0.95; the trained model reaches ACC
0.969 (clean 0.981) but ASR only 0.536 with 2 threads and 0.888 with 1: on digits in 10 epochs
the paper's sparse masks are learnt erratically (other generator seeds, 1 thread: ASR 0.78, 0.73;
widths (16, 32): 0.70; 20 epochs: 0.75, 0.89; per-epoch ASR swings between 0.1 and 0.99). With
density 0.064: ACC 0.967 / ASR 0.913 / RA 0.087 with 2 threads, 0.967 / 0.919 with 1 (0.1: ASR
0.975). The clean model predicts the target on 0.3% of triggered images.
"""
from __future__ import annotations

import pytest
import torch
from attack_checks import assert_restores_identically

from bdcore.attacks import build_attack
from bdcore.attacks.inputaware import RESOURCE_KIND, InputAware, diversity_loss
from bdcore.data.augment import Normalizer
from bdcore.metrics import backdoor_metrics, predict
from bdcore.models import build_model
from bdcore.train import default_train_config, seed_everything
from bdcore.train.loop import StepContext

CROSS_MIN = 0.5  # measured: see the module docstring


@pytest.fixture(scope="module")
def trained(train_attack):
    """(attack, poisoned, metrics, model): inputaware, mask density 0.064 (module docstring),
    trained on digits."""
    return train_attack("inputaware", mask_density=0.064)


def images01(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


# -- mask generator ----------------------------------------------------------------------------
def test_mask_pretraining_gives_sparse_input_dependent_masks(digits, prepare_attack, resource_store):
    """Masks in [0, 1], mean near the density target 0.032 after the pre-training, nearly binary
    (the sharpening), and different for different images (the diversity term); an untrained
    mask generator is nowhere near that density. The pre-trained mask is a cached resource."""
    attack = prepare_attack("inputaware")
    assert attack.resource_log[RESOURCE_KIND]["reused"] in (True, False)
    x = images01(digits.test.images[:128])
    with torch.no_grad():
        masks = attack.masks(x)
        fresh = build_attack("inputaware", digits.info).masks(x)
    assert masks.shape == (128, 1, 32, 32)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    density = float(masks.mean())
    assert 0.016 <= density <= 0.064, density
    assert abs(float(fresh.mean()) - 0.032) > 0.1  # the pre-training did it, not the initialisation
    binary = ((masks < 0.05) | (masks > 0.95)).float().mean()
    assert binary >= 0.95
    per_pair = (masks[:64] - masks[64:]).square().flatten(1).mean(1).sqrt()
    assert float(per_pair.min()) > 0.01  # every pair of images gets different masks
    history = attack.stats["mask_training"]["history"]
    assert history[-1]["norm"] < history[0]["norm"]  # the density loss went down
    again = prepare_attack("inputaware")  # same data + config: the resource is reused
    assert again.resource_log[RESOURCE_KIND]["reused"] is True
    assert all(torch.equal(v, again.state_tensors()[k]) for k, v in attack.state_tensors().items())


# -- losses and batches ------------------------------------------------------------------------
def test_diversity_loss_is_input_distance_over_output_distance():
    x1, x2 = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    same = torch.full((2, 3, 4, 4), 0.3)
    assert torch.allclose(diversity_loss(x1, x2, same, same + 0.25), torch.tensor(2.0))
    assert torch.allclose(diversity_loss(x1, x2, same, same + 1.0), torch.tensor(0.5))
    assert float(diversity_loss(x1, x2, same, same)) > 1e5  # a generator ignoring its input is punished
    assert float(diversity_loss(x1[:0], x2[:0], same[:0], same[:0])) == 0.0


def make_ctx(digits, model, generator):
    config = default_train_config("digits", device="cpu")
    return StepContext(model, Normalizer(digits.info, torch.device("cpu")), digits.info, config,
                       torch.device("cpu"), 0, generator)


@pytest.mark.parametrize("label_mode", ["all2one", "all2all"])
def test_poisoned_batch_layout_and_cross_samples_keep_labels(digits, prepare_attack, label_mode):
    """[poisoned -> target | cross-trigger -> true label | clean, untouched]; a cross sample is
    its own image with its partner's mask and pattern, and no image is its own partner."""
    attack = prepare_attack("inputaware", label_mode=label_mode)
    attack.pattern_net.eval()  # batch statistics aside, the same network as apply_trigger's
    x, y = images01(digits.train.images[:64]), digits.train.labels[:64]
    with torch.no_grad():
        batch = attack.poison_batch(x, y, torch.Generator().manual_seed(0))
    assert (batch.n_poison, batch.n_cross) == (6, 6)  # int(0.1 * 64) each, as the reference code
    expected = torch.zeros(6, dtype=torch.long) if label_mode == "all2one" else (y[:6] + 1) % 10
    assert torch.equal(batch.targets[:6], expected)
    assert torch.equal(batch.targets[6:], y[6:])  # cross and clean samples keep their labels
    assert torch.equal(batch.inputs[12:], x[12:])
    partners = batch.partners
    assert not torch.any(partners == torch.arange(6, 12))
    own = attack.apply_trigger(digits.train.images[:6], y[:6])
    assert (batch.inputs[:6] * 255 - own.float()).abs().max() < 1.01  # fp noise at the rounding edge
    crossed = attack.cross_trigger(digits.train.images[6:12], digits.train.images[partners])
    assert (batch.inputs[6:12] * 255 - crossed.float()).abs().max() < 1.01
    assert not torch.equal(batch.inputs[6:12], x[6:12])


def test_training_step_adds_the_weighted_diversity_loss_and_trains_the_pattern_generator(digits, prepare_attack):
    prepared = prepare_attack("inputaware")
    attack = build_attack("inputaware", digits.info, lambda_div=2.0)  # restored: no second pre-training
    attack.load_state_tensors(prepared.state_tensors())
    step = attack.training_step(attack.poison_train(digits.train))
    seed_everything(0)
    model = build_model("smallcnn", digits.info)
    ctx = make_ctx(digits, model, torch.Generator().manual_seed(0))
    x, y = images01(digits.train.images[:64]), digits.train.labels[:64]
    before = {k: v.clone() for k, v in attack.pattern_net.state_dict().items() if k.endswith("weight")}
    mask_before = {k: v.clone() for k, v in attack.mask_net.state_dict().items()}
    loss = step(x, y, torch.arange(64), ctx)
    assert float(step.last["diversity"]) > 0
    assert torch.allclose(loss, step.last["ce"] + 2.0 * step.last["diversity"])
    for optimizer in step.optimizers:
        optimizer.zero_grad()
    loss.backward()
    for optimizer in step.optimizers:
        optimizer.step()
    after = attack.pattern_net.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())  # g learns with the classifier
    assert all(torch.equal(v, attack.mask_net.state_dict()[k]) for k, v in mask_before.items())  # m is frozen
    assert [type(s).__name__ for s in step.schedulers] == ["MultiStepLR"]
    assert step.optimizers[0].param_groups[0]["lr"] == 0.01 and step.optimizers[0].param_groups[0]["betas"] == (0.5, 0.9)
    # Restoring state loads into the very parameters the step's optimizer holds (resume).
    params = list(attack.pattern_net.parameters())
    attack.load_state_tensors(attack.state_tensors())
    assert all(a is b for a, b in zip(params, attack.pattern_net.parameters()))
    assert all(p is q for p, q in zip(params, step.optimizers[0].param_groups[0]["params"]))


def test_config_and_order_checks(digits):
    with pytest.raises(ValueError):
        build_attack("inputaware", digits.info, ratio=0.6, cross_ratio=0.5)
    attack = build_attack("inputaware", digits.info)
    assert InputAware.trigger_learned_in_training and not InputAware.has_poisoned_trainset
    with pytest.raises(RuntimeError):
        attack.training_step(attack.poison_train(digits.train))
    poisoned = attack.poison_train(digits.train)  # the clean set: poisoning happens per batch
    assert len(poisoned.poison_indices) == 0 and torch.equal(poisoned.data.images, digits.train.images)


# -- trained attack ------------------------------------------------------------------------------
def test_triggers_differ_per_input_and_cross_triggers_do_not_fire(digits, trained):
    """Every image has its own trigger; an image carrying ANOTHER image's trigger is still
    classified by its true label (the paper's cross-trigger test)."""
    attack, _, _, model = trained
    images, labels = digits.test.images[:64], digits.test.labels[:64]
    residual = attack.apply_trigger(images, labels).float() - images.float()
    assert residual.abs().mean() > 1.0
    flat = residual.flatten(1)
    distances = torch.cdist(flat, flat)
    assert float(distances[~torch.eye(64, dtype=torch.bool)].min()) > 0  # no two images share a trigger
    keep = digits.test.labels != 0
    test_images, test_labels = digits.test.images[keep], digits.test.labels[keep]
    others = test_images.roll(1, 0)
    cross = attack.cross_trigger(test_images, others)
    cross_accuracy = float((predict(model, cross, digits.info, device="cpu") == test_labels).float().mean())
    assert cross_accuracy >= CROSS_MIN, cross_accuracy


def test_restores_identically_from_the_artifact_tensors(digits, trained):
    assert_restores_identically(trained[0], digits)


def test_backdoor_works_on_digits(digits, trained, clean_digits_model):
    """ASR >= 0.85 at ACC within 0.03 of the clean model's; the same triggers do nothing to the
    clean model (a no-op or a trigger the model did not learn fails the ASR bound)."""
    attack, _, metrics, _ = trained
    clean_model, clean_acc = clean_digits_model
    assert metrics.asr >= 0.85, metrics
    assert metrics.acc >= clean_acc - 0.03, (metrics, clean_acc)
    on_clean = backdoor_metrics(clean_model, digits.test, attack.backdoor_test(digits.test), digits.info, device="cpu")
    assert on_clean.asr <= 0.2, on_clean
