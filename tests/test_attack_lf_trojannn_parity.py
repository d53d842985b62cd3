"""lf and trojannn against BackdoorBench (HEAD f02e353): the applied trigger's range and sign, the
mask, the optimiser and the defaults. Unit tests on tiny random models (seconds, no surrogate
training); the reference figures in the comments were measured on BackdoorBench's own files.
"""
from __future__ import annotations

import pytest
import torch

from bdcore.attacks import build_attack
from bdcore.attacks.resources import PixelSpaceModel
from bdcore.data.base import DatasetInfo, ImageSet
from bdcore.models import build_model

INFO = DatasetInfo("parity", 10, 3, 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def random_set(n: int, seed: int, info: DatasetInfo = INFO) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *info.image_shape), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % info.num_classes)


def tiny_model(info: DatasetInfo = INFO) -> PixelSpaceModel:
    torch.manual_seed(0)
    return PixelSpaceModel(build_model("smallcnn", info), info).eval()


def bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


# -- lf ---------------------------------------------------------------------------------------
def test_lf_applied_trigger_is_nonnegative_and_spans_0_to_51():
    """BackdoorBench's shipped patterns (resource/lowFrequency/<dataset>_<model>_0_255.npy, e.g.
    cifar10_preactresnet18: uint8, min 0, max 51, mean 12.5) are min-max normalised to [0, 0.2] and
    added in pixel space with clipping (SimpleAdditiveTrigger): poisoned - clean is in [0, 51]."""
    attack = build_attack("lf", INFO, craft_samples=32, steps=4, batch_size=16)
    delta, _ = attack._craft(tiny_model(), random_set(64, 0), torch.device("cpu"))
    attack.load_state_tensors({"perturbation": delta})
    x = random_set(8, 1).images // 2  # 0..127: no clipping at 255
    change = attack.apply_trigger(x, torch.zeros(8, dtype=torch.long)).int() - x.int()
    assert change.min() == 0 and change.max() == 51, (change.min(), change.max())
    assert torch.equal(change[0], change[1])  # one universal pattern
    white = torch.full((1, *INFO.image_shape), 255, dtype=torch.uint8)
    assert torch.equal(attack.apply_trigger(white, torch.zeros(1, dtype=torch.long)), white)  # clipped, no wrap
    assert attack.config.value_range == 0.2  # the default that gives 51 = 0.2 * 255


# -- trojannn ---------------------------------------------------------------------------------
def test_trojannn_defaults_are_backdoorbench_config():
    """config/attack/trojannn/preactresnet18.yaml: num_neuron 2, neuron_target_values 100,
    mask_update_iters 1000, mask apple4.png; attack/trojannn.py pgd_with_mask_to_selected_neuron:
    alpha 0.1, eps 0.3, tolerance 1e-3."""
    c = build_attack("trojannn", INFO).config
    assert (c.num_neurons, c.target_value, c.mask, c.steps) == (2, 100.0, "apple", 1000)
    assert (c.step_size, c.epsilon, c.tolerance) == (0.1, 0.3, 1e-3)


def test_trojannn_mask_matches_the_reference_masks():
    """BackdoorBench's apple4.png resized to 32x32 (its PIL Resize) is nonzero on 117 pixels with
    bounding box rows 16-29, cols 17-28 (lower right, clear of the border); square.png gives 100
    pixels at rows/cols 20-29; at 64x64 the apple spans rows 33-58, cols 36-56 (375 pixels)."""
    mask = build_attack("trojannn", INFO).mask[0]
    assert bbox(mask) == (16, 29, 17, 28)
    assert 105 <= int(mask.sum()) <= 129, int(mask.sum())
    square = build_attack("trojannn", INFO, mask="square").mask[0]
    assert bbox(square) == (20, 29, 20, 29) and int(square.sum()) == 100
    big = DatasetInfo("parity64", 10, 3, 64, 64, (0.5,) * 3, (0.25,) * 3)
    top, bottom, left, right = bbox(build_attack("trojannn", big).mask[0])
    assert abs(top - 33) <= 1 and abs(bottom - 58) <= 1 and abs(left - 36) <= 1 and abs(right - 56) <= 1


def test_trojannn_trigger_is_added_inside_the_mask():
    """TrojanTrigger adds the trigger image (0 outside the mask) to the image; it does not paste it."""
    attack = build_attack("trojannn", INFO)
    mask = attack.mask
    pattern = torch.where(mask, torch.randint(1, 256, INFO.image_shape, generator=torch.Generator().manual_seed(0)),
                          0).to(torch.uint8)
    attack.load_state_tensors({"mask": mask, "pattern": pattern})
    x = random_set(4, 2).images
    out = attack.apply_trigger(x, torch.zeros(4, dtype=torch.long))
    assert torch.equal(out[:, :, ~mask[0]], x[:, :, ~mask[0]])  # only the masked pixels change
    expected = (x.int() + pattern.int()).clamp(max=255)
    assert torch.equal(out.int(), expected)


def test_trojannn_optimiser_takes_sign_steps_from_the_mask_image():
    """pgd_with_mask_to_selected_neuron: start at the mask image, x <- x - 0.1 sign(grad) of
    sum (act - 100)^2 with the model seeing x * (mask > 0), projected to |x - mask| <= 0.3 and [0, 1]."""
    from bdcore.attacks.trojannn import mask_image, neuron_activations

    model = tiny_model()
    one = build_attack("trojannn", INFO, steps=1)
    tensors, meta = one._craft(model, torch.device("cpu"))
    assert meta["layer"] == "classifier"
    start = mask_image("apple", 32, 32).expand(INFO.image_shape)
    keep = (start > 0).float()
    x = start.clone().requires_grad_(True)
    act = neuron_activations(model, "model.classifier", (x * keep)[None])[:, tensors["neurons"]]
    (grad,) = torch.autograd.grad(((act - 100.0) ** 2).sum(), x)
    expected = ((start - 0.1 * grad.sign()).clamp(0, 1) * keep * 255).round()
    assert torch.equal(tensors["pattern"].float(), expected)

    many, _ = build_attack("trojannn", INFO, steps=6)._craft(model, torch.device("cpu"))
    moved = many["pattern"].float() / 255 - start * keep
    assert moved.abs().max() <= 0.3 + 1 / 255 and moved.abs().max() >= 0.2  # the steps accumulate, within eps
    # Inside the shape the mask image is 1, and [0, 1] clipping only ever returns x to 1 there, so
    # x = 1 - k * 0.1 with k in 0..3 (eps 0.3): whole sign steps (up to uint8 rounding).
    inner = (start == 1).expand_as(moved)
    steps = -moved[inner] / 0.1
    assert (steps - steps.round()).abs().max() <= 0.05 and set(steps.round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert torch.equal(many["pattern"][keep == 0], torch.zeros_like(many["pattern"][keep == 0]))


@pytest.mark.parametrize("model, layer", [("preactresnet18", "linear"), ("mobilenet_v3_large", "classifier.3"),
                                          ("convnext_tiny", "classifier.2")])
def test_trojannn_selects_the_head_of_the_architecture(model, layer):
    """selected_layer_name in config/attack/trojannn/<model>.yaml: the classification head (also
    vgg19_bn classifier.6, vit_b_16 heads.head, efficientnet_b3 classifier.1)."""
    from bdcore.attacks.trojannn import select_layer

    assert select_layer(build_model(model, INFO)) == layer


def test_cells_craft_lf_and_trojannn_on_the_victims_architecture():
    """BackdoorBench crafts lf's pattern and trojannn's neurons on a clean model of the victim's own
    architecture; an explicit surrogate_model still wins, and other attacks are left alone."""
    from bdcore.cells import AttackCellSpec

    for attack in ("lf", "trojannn"):
        spec = AttackCellSpec(dataset="digits", model="preactresnet18", attack=attack, ratio=0.1)
        assert spec.attack_config().surrogate_model == "preactresnet18"
        pinned = spec.model_copy(update={"attack_params": {"surrogate_model": "smallcnn"}})
        assert pinned.attack_config().surrogate_model == "smallcnn"
        assert pinned.key() != spec.key()
    lc = AttackCellSpec(dataset="digits", model="preactresnet18", attack="lc", ratio=0.1)
    assert lc.attack_config().surrogate_model is None
