"""ANP and RNP against BackdoorBench's defense/anp.py, defense/rnp.py and their configs: what the
masks act on, how pruning edits the model, the losses, and the held-out selection with the
reference's relative tolerance acc_ratio. Tiny models and scripted masks: seconds."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdcore.defenses.anp as anp_module
import bdcore.defenses.rnp as rnp_module
from bdcore.data import defender_subset
from bdcore.defenses import DefenseContext, build_defense
from bdcore.defenses._batches import Batches
from bdcore.defenses._neurons import SoftMasks, batchnorm_units

# Scripted masks of the tiny model's two BN layers: channels of the first at 0, 0.25, 0.5, 1.
MASKS = [torch.tensor([0.0, 0.25, 0.5, 1.0]), torch.ones(4)]


def tiny_model(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
    with torch.no_grad():  # non-trivial BN scale/shift, so "untouched" is checked against real values
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def clean(digits):
    return defender_subset(digits.train, 0.05, seed=0)


def script_masks(monkeypatch, name: str) -> None:
    """Replace the mask learning of `name` by the fixed MASKS (selection and pruning stay real)."""
    masks = [m.clone() for m in MASKS]
    if name == "anp":
        monkeypatch.setattr(anp_module, "_learn_anp_masks", lambda *a, **k: (masks, 0.0, 0.0, 0.0))
    else:
        monkeypatch.setattr(rnp_module, "_unlearn", lambda *a, **k: (1, 0.1, [0.1]))
        monkeypatch.setattr(rnp_module, "_recover", lambda *a, **k: (masks, 0.0))


def script_held_out(monkeypatch, acc_by_pruned: dict[int, float]) -> None:
    """Held-out accuracy as a function of how many BN scales are 0 (the selection's only input)."""
    def fake(model, *_a, **_k):
        pruned = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        return acc_by_pruned[pruned]
    monkeypatch.setattr(anp_module, "held_out_accuracy", fake)


@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_pruning_zeroes_only_bn_scale(monkeypatch, digits, clean, name):
    """BackdoorBench `pruning`: state_dict['<bn>.weight'][idx] = 0 and nothing else."""
    script_masks(monkeypatch, name)
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    outcome = build_defense(name, threshold=0.25).repair(model, clean, DefenseContext(digits.info, device="cpu"))
    after = outcome.model.state_dict()
    assert after.keys() == before.keys()  # a plain state dict of the victim architecture
    assert after["1.weight"][0] == 0
    for key in before:
        if key != "1.weight":
            assert torch.equal(after[key], before[key]), key  # BN shift, conv filters, statistics
    assert outcome.diagnostics["pruned_count"] == 2  # masks <= 0.25 (the reference's <=): channels 0 and 1
    assert torch.equal(after["1.weight"][:2], torch.zeros(2))
    assert torch.equal(after["1.weight"][2:], before["1.weight"][2:])


@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_selection_uses_relative_acc_ratio(monkeypatch, digits, clean, name):
    """A level costing 3 points absolute / 5% relative (0.60 -> 0.57) is within acc_ratio 0.1 and
    is chosen (the former 2-point absolute rule rejected it); 0.60 -> 0.40 (33%) is not."""
    script_masks(monkeypatch, name)
    script_held_out(monkeypatch, {0: 0.60, 1: 0.60, 2: 0.57, 3: 0.40})
    model = tiny_model()
    outcome = build_defense(name).repair(model, clean, DefenseContext(digits.info, device="cpu"))
    d = outcome.diagnostics
    assert d["threshold"] == pytest.approx(0.45) and d["pruned_count"] == 2
    assert d["thresholds"][:3] == [0.0, 0.05, 0.1] and d["thresholds"][-1] == 0.9 and len(d["thresholds"]) == 19
    assert d["pruned_by_threshold"][0] == 1  # threshold 0 prunes the mask that reached 0 (mask <= t)
    assert d["acc_ratio"] == 0.1 and d["val_rel_drop_by_threshold"][6] == pytest.approx(0.05)
    assert outcome.model[1].weight[1] == 0 and outcome.model[1].weight[2] != 0


def test_select_threshold_is_strict_and_relative():
    select = anp_module.select_threshold
    assert select([0.1, 0.2], [0.57, 0.55], 0.60, 0.1) == 0.2  # 5% and 8.3% relative drops
    assert select([0.1, 0.2], [0.57, 0.54], 0.60, 0.1) == 0.1  # 0.54 is exactly 10%: rejected (strict <)
    assert select([0.1], [0.20], 0.60, 0.1) is None
    assert select([0.1], [0.70], 0.60, 0.1) == 0.1  # a rise is no drop


def test_rnp_recovery_loss_is_alpha_times_ce():
    assert build_defense("rnp").config.alpha == 0.2
    torch.manual_seed(0)
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert torch.allclose(rnp_module.recovery_loss(logits, y, 0.2), 0.2 * F.cross_entropy(logits, y))


def _masked_bn_reference(model: nn.Sequential, masks: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The reference's MaskBatchNorm2d in training mode: F.batch_norm with weight * mask, bias as is."""
    out, k = x, 0
    for layer in model:
        if isinstance(layer, nn.BatchNorm2d):
            out = F.batch_norm(out, None, None, layer.weight * masks[k], layer.bias, training=True, eps=layer.eps)
            k += 1
        else:
            out = layer(out)
    return out


def test_rnp_recovery_masks_bn_scale_with_alpha(digits, clean):
    """One recovering step equals one SGD step on alpha * CE of the reference's masked BN model."""
    cfg = rnp_module.RNPConfig(recovering_epochs=1, batch_size=len(clean.train), augment=False)
    model = tiny_model()
    batches = Batches(clean.train, digits.info, torch.device("cpu"), cfg.batch_size, augment=False, seed=0)
    x01, y = next(batches.epoch())
    x = batches.model_input(x01)
    masks = [torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)]
    ref = copy.deepcopy(model).train()
    loss = cfg.alpha * F.cross_entropy(_masked_bn_reference(ref, masks, x), y)
    grads = torch.autograd.grad(loss, masks)
    expected = [(1 - cfg.recovering_lr * g).clamp(0, 1) for g in grads]
    assert max(float(g.abs().max()) for g in grads) > 1e-3  # the step is not vacuous

    batches = Batches(clean.train, digits.info, torch.device("cpu"), cfg.batch_size, augment=False, seed=0)
    learnt, _ = rnp_module._recover(model, batchnorm_units(model, x[:1]), batches, cfg)
    for got, want in zip(learnt, expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_rnp_unlearning_schedule_and_no_clip(digits, clean):
    """Reference unlearning: SGD ascent, lr x 0.1 at the milestones, no (binding) gradient clip.
    Replayed by hand on a model whose gradients are far above the old max-norm 20."""
    cfg = rnp_module.RNPConfig(unlearning_epochs=2, unlearning_milestones=[1], clean_threshold=0.0,
                               batch_size=len(clean.train) // 2 + 1, augment=False)
    model = tiny_model()
    with torch.no_grad():
        model[-1].weight.mul_(300)
    replay = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(replay.parameters(), lr=cfg.unlearning_lr, momentum=0.9, weight_decay=5e-4)
    batches = Batches(clean.train, digits.info, torch.device("cpu"), cfg.batch_size, augment=False, seed=0)
    norms = []
    for epoch in range(2):
        for group in optimizer.param_groups:
            group["lr"] = cfg.unlearning_lr * (0.1 if epoch >= 1 else 1.0)
        for x01, y in batches.epoch():
            optimizer.zero_grad()
            (-F.cross_entropy(replay(batches.model_input(x01)), y)).backward()
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in replay.parameters()]))
                         if hasattr(torch.nn.utils, "get_total_norm")
                         else float(torch.norm(torch.stack([p.grad.norm() for p in replay.parameters()]))))
            optimizer.step()
    assert max(norms) > 20  # a clip at 20 would have changed the trajectory
    batches = Batches(clean.train, digits.info, torch.device("cpu"), cfg.batch_size, augment=False, seed=0)
    epochs, _, _ = rnp_module._unlearn(model, batches, cfg)
    assert epochs == 2
    for got, want in zip(model.parameters(), replay.parameters()):
        assert torch.allclose(got, want, atol=1e-5)


def test_anp_perturbation_on_bn_scale_and_shift(digits):
    """NoisyBatchNorm2d: F.batch_norm with weight * (mask + delta) and bias * (1 + xi)."""
    model = tiny_model().train()
    x = torch.randn(8, 3, 8, 8)
    units = batchnorm_units(model, x)
    masks = SoftMasks(units)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in masks.masks:
            m.uniform_(0, 1)
    perturbation = anp_module._NeuronPerturbation(units, masks)
    try:
        with torch.no_grad():
            for n in perturbation.noise():
                n.uniform_(-0.4, 0.4)
        perturbation.perturb = True
        got = model(x)
    finally:
        perturbation.remove()
    out, k = x, 0
    for layer in model:
        if isinstance(layer, nn.BatchNorm2d):
            d, xi = perturbation.delta[k], perturbation.xi[k]
            out = F.batch_norm(out, None, None, layer.weight * (masks.masks[k] + d), layer.bias * (1 + xi),
                               training=True, eps=layer.eps)
            k += 1
        else:
            out = layer(out)
    assert torch.allclose(got, out, atol=1e-5)


@pytest.mark.parametrize("clip", [False, True])
def test_anp_noise_step_is_not_clipped(clip):
    """Uniform start in [-eps, eps] plus one signed step of eps: the reference leaves it unclipped."""
    cfg = anp_module.ANPConfig(clip_noise=clip)
    model = tiny_model().train()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    units = batchnorm_units(model, x)
    perturbation = anp_module._NeuronPerturbation(units, SoftMasks(units))
    try:
        anp_module._adversarial_noise(model, x, y, perturbation, cfg, torch.Generator().manual_seed(0))
    finally:
        perturbation.remove()
    largest = max(float(n.detach().abs().max()) for n in perturbation.noise())
    if clip:
        assert largest <= cfg.eps + 1e-6
    else:
        assert cfg.eps < largest <= 2 * cfg.eps + 1e-6
