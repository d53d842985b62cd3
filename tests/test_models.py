"""Model zoo: every registered model maps images to logits; pretrained weights load only from
local files, partially when the head differs, and never from a file of another architecture or a
pickle holding anything but tensors."""
from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from bdcore.data.base import DatasetInfo
from bdcore.models import WeightsError, build_model, load_pretrained, model_names
from bdcore.registry import UnknownNameError

torch.set_num_threads(2)


def make_info(num_classes: int = 10, channels: int = 3, size: int = 32) -> DatasetInfo:
    return DatasetInfo(
        name="synthetic",
        num_classes=num_classes,
        channels=channels,
        height=size,
        width=size,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


EXPECTED_MODELS = {
    "smallcnn",
    "preactresnet18",
    "resnet18",
    "vgg19_bn",
    "convnext_tiny",
    "vit_b_16",
    "mobilenet_v3_large",
    "efficientnet_b3",
}

# Architectures that keep torchvision's module names, so torchvision state dicts load as is.
TORCHVISION_BUILDERS = {
    "resnet18": torchvision.models.resnet18,
    "vgg19_bn": torchvision.models.vgg19_bn,
    "convnext_tiny": torchvision.models.convnext_tiny,
    "vit_b_16": torchvision.models.vit_b_16,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "efficientnet_b3": torchvision.models.efficientnet_b3,
}


def test_expected_models_are_registered():
    assert EXPECTED_MODELS <= set(model_names())


@pytest.mark.parametrize("name", model_names())
def test_forward_gives_logits_channels_last(name):
    torch.manual_seed(0)
    model = build_model(name, make_info()).to(memory_format=torch.channels_last).train()
    batch = 1 if name == "vit_b_16" else 2  # one 224x224 ViT pass keeps the file fast on 2 cores
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (batch, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", model_names())
def test_other_channel_counts_and_sizes_shapes(name):
    # Shape-only pass on the meta device: every model takes 1-channel 64x64 inputs.
    with torch.device("meta"):
        model = build_model(name, make_info(num_classes=7, channels=1, size=64))
        logits = model(torch.empty(2, 1, 64, 64).contiguous(memory_format=torch.channels_last))
    assert logits.shape == (2, 7)


@pytest.mark.parametrize("name", ["preactresnet18", "resnet18"])
@pytest.mark.parametrize("channels,size", [(3, 64), (1, 32)])
def test_resnets_on_64px_and_one_channel(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, make_info(channels=channels, size=size))
    assert model.conv1.in_channels == channels
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_preactresnet18_trains_in_channels_last():
    torch.manual_seed(0)
    model = build_model("preactresnet18", make_info()).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet18_stem_adapts_to_input_size():
    small = build_model("resnet18", make_info(size=64))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.padding == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert small.fc.out_features == 10
    with torch.device("meta"):
        large = build_model("resnet18", make_info(size=224))
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)


def test_preactresnet18_layout():
    model = build_model("preactresnet18", make_info())
    modules = dict(model.named_modules())
    conv = modules["layer4.1.conv1"]
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == conv.out_channels == 512
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for block in ("0", "1"):
            for part in ("conv1", "bn1", "conv2", "bn2"):
                assert f"{layer}.{block}.{part}" in modules
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert [getattr(model, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [64, 128, 256, 512]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert isinstance(model.linear, nn.Linear) and model.linear.out_features == 10
    assert list(dict(model.named_children()))[-2:] == ["avgpool", "linear"]  # no BN-ReLU before the pool


def _backdoorbench_preactresnet18_state(num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """BackdoorBench's PreActResNet-18 state dict (keys and shapes), written from its stated
    architecture (../shared/REFERENCE.md): conv1 3x3 64; layer1..4 of two PreActBlocks (bn1, conv1,
    bn2, conv2, a 1x1 `shortcut.0` in the first block of layers 2-4); pool; linear. No final BN."""
    state = {"conv1.weight": (64, 3, 3, 3)}
    in_planes = 64
    for layer, width in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            prefix = f"layer{layer}.{block}."
            for bn, channels in (("bn1", in_planes), ("bn2", width)):
                for stat in ("weight", "bias", "running_mean", "running_var"):
                    state[prefix + f"{bn}.{stat}"] = (channels,)
                state[prefix + f"{bn}.num_batches_tracked"] = ()
            state[prefix + "conv1.weight"] = (width, in_planes, 3, 3)
            state[prefix + "conv2.weight"] = (width, width, 3, 3)
            if block == 0 and layer > 1:
                state[prefix + "shortcut.0.weight"] = (width, in_planes, 1, 1)
            in_planes = width
    state["linear.weight"] = (num_classes, 512)
    state["linear.bias"] = (num_classes,)
    return state


def test_preactresnet18_starts_from_pytorchs_default_initialisation():
    """BackdoorBench's PreActResNet has no init pass: convs keep kaiming_uniform(a=sqrt(5)), whose
    values lie within 1/sqrt(fan_in); a Kaiming-normal fan-out pass exceeds that bound."""
    torch.manual_seed(0)
    model = build_model("preactresnet18", make_info())
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            assert module.weight.abs().max() <= 1 / fan_in ** 0.5 + 1e-7, name


def test_preactresnet18_state_dict_is_backdoorbench_s():
    """A BackdoorBench checkpoint loads strictly: same keys, same shapes, nothing extra."""
    model = build_model("preactresnet18", make_info())
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert mine == _backdoorbench_preactresnet18_state()


@pytest.mark.parametrize("name", sorted(TORCHVISION_BUILDERS))
def test_state_dict_keys_match_torchvision(name):
    # A state dict saved from torchvision's own model (ImageNet size, 1000 classes) fits exactly.
    with torch.device("meta"):
        ours = build_model(name, make_info(num_classes=1000, size=224)).state_dict()
        theirs = TORCHVISION_BUILDERS[name](weights=None).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_torchvision_imagenet_resnet18_loads_into_small_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet18_imagenet.pt"
    source = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(source, path)
    model = build_model("resnet18", make_info(), pretrained=path)
    report = load_pretrained(model, path, "resnet18")
    # The 7x7 stem and the 1000-class head do not fit the small model; everything else loads.
    assert report["skipped"] == ["conv1.weight", "fc.bias", "fc.weight"]
    state = model.state_dict()
    assert torch.equal(state["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])
    assert state["fc.weight"].shape == (10, 512)


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownNameError) as excinfo:
        build_model("nope", make_info())
    message = str(excinfo.value)
    assert "nope" in message
    for name in EXPECTED_MODELS:
        assert name in message


def _assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def test_pretrained_safetensors_roundtrip(tmp_path):
    torch.manual_seed(1)
    source = build_model("smallcnn", make_info()).state_dict()
    path = tmp_path / "smallcnn.safetensors"
    save_file(source, str(path))
    torch.manual_seed(2)
    fresh = build_model("smallcnn", make_info())
    assert not torch.equal(fresh.state_dict()["classifier.weight"], source["classifier.weight"])
    torch.manual_seed(2)
    loaded = build_model("smallcnn", make_info(), pretrained=path)
    _assert_same_state(loaded, source)


def test_pretrained_torch_state_dict_roundtrip(tmp_path):
    torch.manual_seed(1)
    source = build_model("preactresnet18", make_info()).state_dict()
    path = tmp_path / "preactresnet18.pt"
    torch.save(source, path)
    torch.manual_seed(2)
    loaded = build_model("preactresnet18", make_info(), pretrained=path)
    _assert_same_state(loaded, source)


def test_pretrained_with_other_class_count_skips_only_the_head(tmp_path):
    torch.manual_seed(1)
    source = build_model("smallcnn", make_info(num_classes=10)).state_dict()
    path = tmp_path / "smallcnn10.safetensors"
    save_file(source, str(path))
    info43 = make_info(num_classes=43)
    model = build_model("smallcnn", info43, pretrained=path)
    state = model.state_dict()
    assert state["classifier.weight"].shape == (43, 128)
    for key, value in source.items():
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value), key
    report = load_pretrained(build_model("smallcnn", info43), path, "smallcnn")
    assert report["skipped"] == ["classifier.bias", "classifier.weight"]
    assert len(report["loaded"]) == len(source) - 2


def test_pretrained_from_another_architecture_is_refused(tmp_path):
    path = tmp_path / "smallcnn.safetensors"
    save_file(build_model("smallcnn", make_info()).state_dict(), str(path))
    with pytest.raises(WeightsError, match="does not fit model 'preactresnet18'"):
        build_model("preactresnet18", make_info(), pretrained=path)


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "absent" / "weights.safetensors"
    with pytest.raises(WeightsError) as excinfo:
        build_model("smallcnn", make_info(), pretrained=path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_garbage_weights_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"\x00\xffnot a weights file at all\x13\x37" * 7)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        build_model("smallcnn", make_info(), pretrained=path)


UNPICKLED: list[str] = []


def _record_unpickling() -> "_Payload":
    UNPICKLED.append("code ran")
    return _Payload()


class _Payload:
    """A custom object; unpickling it would run `_record_unpickling`."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickle_with_non_tensor_objects_is_refused(tmp_path):
    path = tmp_path / "smallcnn.pt"
    state = dict(build_model("smallcnn", make_info()).state_dict())
    state["payload"] = _Payload()
    torch.save(state, path)
    UNPICKLED.clear()
    with pytest.raises(WeightsError, match="cannot read weights file"):
        build_model("smallcnn", make_info(), pretrained=path)
    assert UNPICKLED == []  # weights_only=True: the custom object was never reconstructed
