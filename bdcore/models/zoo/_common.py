"""Helpers shared by the zoo's torchvision adaptations: swap a model's first conv (other channel
counts, small-image stems) or its linear head. Underscored so the registry does not import it."""
from __future__ import annotations

import math
from typing import Callable

from torch import nn

from bdcore.data.base import DatasetInfo

# BackdoorBench-style stems (3x3 stride 1, no max-pool) are used up to this side length.
SMALL_INPUT_MAX = 64

ConvInit = Callable[[nn.Conv2d], None]


def is_small_input(info: DatasetInfo, limit: int = SMALL_INPUT_MAX) -> bool:
    """Whether images are small enough (CIFAR, GTSRB, Tiny-ImageNet) for a stride-1 stem."""
    return max(info.height, info.width) <= limit


def kaiming_fan_out(conv: nn.Conv2d) -> None:
    """The conv initialisation of torchvision's ResNet, VGG, MobileNet and EfficientNet."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def trunc_normal(std: float = 0.02) -> ConvInit:
    """Truncated-normal initialisation with a fixed std (torchvision's ConvNeXt uses 0.02)."""

    def init(conv: nn.Conv2d) -> None:
        nn.init.trunc_normal_(conv.weight, std=std)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)

    return init


def trunc_normal_fan_in(conv: nn.Conv2d) -> None:
    """Truncated normal with std sqrt(1 / fan_in), as torchvision's ViT initialises conv_proj."""
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1.0 / fan_in))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if name not in parent._modules:
        raise AttributeError(f"{type(model).__name__} has no submodule {path!r}")
    return parent, name


def _get(model: nn.Module, path: str, kind: type[nn.Module]) -> nn.Module:
    parent, name = _parent_and_name(model, path)
    module = parent._modules[name]
    if not isinstance(module, kind):
        raise TypeError(f"{path!r} of {type(model).__name__} is a {type(module).__name__}, not a {kind.__name__}")
    return module


def replace_conv(
    model: nn.Module,
    path: str,
    *,
    in_channels: int | None = None,
    kernel_size: int | None = None,
    stride: int | None = None,
    padding: int | None = None,
    init: ConvInit = kaiming_fan_out,
) -> nn.Conv2d:
    """Replace the Conv2d at dotted `path` (e.g. "conv1", "features.0.0") by a fresh one with the
    given fields changed; a no-op when nothing changes. The new conv is initialised by `init`."""
    old = _get(model, path, nn.Conv2d)
    new_fields = {
        "in_channels": old.in_channels if in_channels is None else in_channels,
        "kernel_size": old.kernel_size if kernel_size is None else (kernel_size, kernel_size),
        "stride": old.stride if stride is None else (stride, stride),
        "padding": old.padding if padding is None else (padding, padding),
    }
    if all(getattr(old, k) == v for k, v in new_fields.items()):
        return old
    if old.groups != 1:
        raise ValueError(f"cannot rebuild grouped conv {path!r}")
    new = nn.Conv2d(
        out_channels=old.out_channels,
        dilation=old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
        **new_fields,
    )
    init(new)
    parent, name = _parent_and_name(model, path)
    setattr(parent, name, new)
    return new


def adapt_in_channels(model: nn.Module, path: str, channels: int, init: ConvInit = kaiming_fan_out) -> nn.Module:
    """Make the first conv at `path` take `channels` input channels (no-op for the usual 3)."""
    replace_conv(model, path, in_channels=channels, init=init)
    return model


def replace_linear_head(model: nn.Module, path: str, num_classes: int) -> nn.Linear:
    """Replace the nn.Linear at dotted `path` (e.g. "fc", "classifier.6", "heads.head") by a
    fresh nn.Linear with the same input width and `num_classes` outputs (no-op if it already fits)."""
    old = _get(model, path, nn.Linear)
    if old.out_features == num_classes:
        return old
    new = nn.Linear(
        old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    parent, name = _parent_and_name(model, path)
    setattr(parent, name, new)
    return new


def build_torchvision(
    builder: Callable[..., nn.Module],
    info: DatasetInfo,
    *,
    stem: str,
    head: str,
    stem_init: ConvInit = kaiming_fan_out,
    **kwargs,
) -> nn.Module:
    """A torchvision classifier built with random weights (weights=None: nothing is downloaded)
    and num_classes outputs, as BackdoorBench builds them; its first conv (`stem`) takes
    info.channels inputs. `head` names the final nn.Linear, checked to have num_classes outputs."""
    model = builder(weights=None, num_classes=info.num_classes, **kwargs)
    replace_linear_head(model, head, info.num_classes)  # no-op unless the builder ignored num_classes
    adapt_in_channels(model, stem, info.channels, stem_init)
    return model
