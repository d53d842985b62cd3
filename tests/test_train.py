import pytest
import torch

from bdcore.data import augment_batch, random_crop, random_hflip
from bdcore.models import build_model
from bdcore.train import TrainConfig, default_train_config, seed_everything, train_model


def small_run(digits, **overrides):
    seed_everything(0)
    model = build_model("smallcnn", digits.info)
    cfg = default_train_config("digits", **{"epochs": 4, **overrides})
    return model, cfg


def states_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_defaults_are_backdoorbench():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.schedule) == (0.01, 0.9, 5e-4, 128, "cosine")
    assert default_train_config("cifar10").epochs == 100
    assert default_train_config("gtsrb").epochs == 50
    assert default_train_config("tiny").schedule == "plateau"
    with pytest.raises(ValueError, match="epoks"):
        TrainConfig(epoks=3)


def test_training_is_deterministic(digits):
    subset = digits.train.subset(torch.arange(300))
    m1, cfg = small_run(digits, epochs=2)
    train_model(m1, subset, digits.info, cfg, seed=0)
    m2, _ = small_run(digits, epochs=2)
    train_model(m2, subset, digits.info, cfg, seed=0)
    assert states_equal(m1.state_dict(), m2.state_dict())


def test_resume_after_kill_continues_at_the_same_epoch(digits, tmp_path):
    subset = digits.train.subset(torch.arange(300))
    straight, cfg = small_run(digits)
    full = train_model(straight, subset, digits.info, cfg, seed=0)

    class Killed(Exception):
        pass

    def die_after_two(epoch, record):
        if epoch == 2:
            raise Killed

    interrupted, _ = small_run(digits)
    with pytest.raises(Killed):
        train_model(interrupted, subset, digits.info, cfg, seed=0, checkpoint_dir=tmp_path, on_epoch_end=die_after_two)
    epochs_seen = []
    resumed_model, _ = small_run(digits)
    resumed = train_model(resumed_model, subset, digits.info, cfg, seed=0, checkpoint_dir=tmp_path,
                          on_epoch_end=lambda e, r: epochs_seen.append(e))
    assert resumed.resumed_from_epoch == 2
    assert epochs_seen == [3, 4]
    assert len(resumed.history) == 4
    assert states_equal(straight.state_dict(), resumed_model.state_dict())
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history])


class ShiftStep:
    """A custom step that trains a part of its own (a learnable image shift, Adam, stepped lr):
    what trigger generators do; the loop must checkpoint and resume it with the model."""

    def __init__(self, info):
        self.shift = torch.nn.Parameter(torch.zeros(info.image_shape))
        self.optimizers = [torch.optim.Adam([self.shift], lr=0.01)]
        self.schedulers = [torch.optim.lr_scheduler.MultiStepLR(self.optimizers[0], milestones=[2], gamma=0.1)]

    def __call__(self, images, labels, indices, ctx):
        from bdcore.train.loop import to_model_input

        noise = torch.rand(images.shape[0], 1, 1, 1, generator=ctx.generator, device=images.device)
        return torch.nn.functional.cross_entropy(ctx.model(to_model_input(images + noise * self.shift, ctx)), labels)

    def state(self):
        return {"shift": self.shift.detach().clone()}

    def restore(self, tensors):
        with torch.no_grad():
            self.shift.copy_(tensors["shift"])


def test_a_steps_own_optimizers_are_stepped_checkpointed_and_resumed(digits, tmp_path):
    subset = digits.train.subset(torch.arange(300))

    def run(**kwargs):
        model, cfg = small_run(digits)
        step = ShiftStep(digits.info)
        result = train_model(model, subset, digits.info, cfg, seed=0, step=step, extra_state=step.state,
                             restore_extra_state=step.restore, **kwargs)
        return model, step, result

    class Killed(Exception):
        pass

    def die_after_three(epoch, record):
        if epoch == 3:
            raise Killed

    straight, straight_step, _ = run()
    assert straight_step.shift.abs().sum() > 0  # the step's own optimizer did update its part
    assert straight_step.schedulers[0].get_last_lr() == pytest.approx([0.001])
    with pytest.raises(Killed):
        run(checkpoint_dir=tmp_path, on_epoch_end=die_after_three)
    resumed, resumed_step, result = run(checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 3
    assert states_equal(straight.state_dict(), resumed.state_dict())
    assert torch.equal(straight_step.shift, resumed_step.shift)


def test_checkpoint_of_another_run_is_not_resumed(digits, tmp_path):
    subset = digits.train.subset(torch.arange(200))
    model, cfg = small_run(digits, epochs=1)
    train_model(model, subset, digits.info, cfg, seed=0, checkpoint_dir=tmp_path)
    other, cfg2 = small_run(digits, epochs=2, lr=0.02)
    assert train_model(other, subset, digits.info, cfg2, seed=0, checkpoint_dir=tmp_path).resumed_from_epoch == 0
    (tmp_path / "checkpoint.safetensors").write_bytes(b"garbage")
    again, _ = small_run(digits, epochs=2, lr=0.02)
    assert train_model(again, subset, digits.info, cfg2, seed=0, checkpoint_dir=tmp_path).resumed_from_epoch == 0


def test_random_crop_is_a_shift_with_zero_fill():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).remainder(250).add(1).to(torch.uint8).view(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = random_crop(images, 2, g)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        matches = [(r, c) for r in range(5) for c in range(5) if torch.equal(padded[i, :, r:r + 6, c:c + 6], out[i])]
        assert matches, "each crop is a window of the zero-padded image"
    offsets = set()
    for _ in range(20):
        o = random_crop(images[:1], 2, g)[0]
        offsets.add(tuple(o.flatten().tolist()))
    assert len(offsets) > 3  # it is random


def test_flip_only_where_dataset_flips(digits):
    g = torch.Generator().manual_seed(0)
    x = digits.test.images[:64]
    flipped = random_hflip(x, g)
    same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(flipped[i], x[i].flip(2)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    assert not digits.info.hflip  # digits never flips: a mirrored digit is another digit
    out = augment_batch(x, digits.info, g, crop_padding=0)
    assert torch.equal(out, x)
