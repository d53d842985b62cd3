"""TrojanNN: a patch trigger optimised so that chosen internal neurons of a clean surrogate fire
strongly; poisoned images carry the patch and the target label (dirty-label).

Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning Attack on Neural Networks", NDSS 2018. The
neurons are those with the strongest connections to the next layer (largest sum of absolute
outgoing weights); the trigger is found by gradient descent on (target value - activation)^2 over
the pixels inside a mask, starting from a blank image. Defaults as BackdoorBench: 2 neurons, target
value 100; a square mask at the bottom-right covering ~7% of the image (the paper's middle trigger
size: 8x8 on 32x32). The paper retrains the model on reverse-engineered data; here, as in
BackdoorBench, the victim is trained on the poisoned training set instead.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from bdcore.attacks._adversarial import (
    SurrogateConfig,
    capture_input,
    load_surrogate,
    record,
    surrogate_key,
)
from bdcore.attacks.badnet import Corner, patch_origin
from bdcore.attacks.base import Attack
from bdcore.attacks.registry import register_attack
from bdcore.attacks.resources import ResourceStore
from bdcore.data.base import DatasetInfo, ImageSet


class TrojanNNConfig(SurrogateConfig):
    layer: str | None = None  # Conv2d/Linear whose INPUT neurons are selected; None = see select_layer
    num_neurons: int = Field(2, ge=1)
    target_value: float = 100.0  # activation the selected neurons are pushed toward
    patch_size: int | None = Field(None, ge=1)  # None = the square covering ~7% of the image
    position: Corner | tuple[int, int] = "bottom_right"
    steps: int = Field(200, ge=1)
    lr: float = Field(0.05, gt=0)  # Adam step on the patch pixels ([0, 1] units)


def default_patch_size(info: DatasetInfo) -> int:
    return max(1, round(math.sqrt(0.07 * info.height * info.width)))


def _fan_in(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels
    return None


def select_layer(model: nn.Module) -> str:
    """The weighted layer right after the last convolution (the first Conv2d/Linear after it that
    consumes its channels), so that the neurons are the channels of the last convolutional block
    (spatially averaged); for a model without convolutions, the last Linear. For smallcnn that
    is `classifier`: its inputs are the pooled channels of the last block of `features`."""
    modules = list(model.named_modules())
    last_conv = max((i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)), default=None)
    if last_conv is not None:
        channels = modules[last_conv][1].out_channels
        for name, module in modules[last_conv + 1 :]:
            if _fan_in(module) == channels:
                return name
    linears = [name for name, m in modules if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("trojannn: the model has no Conv2d/Linear layer to select neurons from")
    return linears[-1]


def strongest_neurons(layer: nn.Module, count: int) -> torch.Tensor:
    """Indices of the inputs of `layer` with the largest sum of absolute outgoing weights."""
    if _fan_in(layer) is None:
        raise ValueError(f"trojannn: neurons are selected at a Linear or (ungrouped) Conv2d layer, "
                         f"not {type(layer).__name__}")
    weight = layer.weight.detach().abs()
    strength = weight.sum(dim=[d for d in range(weight.dim()) if d != 1])
    return strength.argsort(descending=True)[:count].sort().values


def neuron_activations(model: nn.Module, layer_name: str, images: torch.Tensor) -> torch.Tensor:
    """N x K activations of the inputs of `layer_name` for float [0, 1] images (model takes them),
    averaged over space (Conv2d) or tokens (Linear on sequences)."""
    layer = dict(model.named_modules())[layer_name]
    get, remove = capture_input(layer)
    try:
        model(images)
        x = get()
    finally:
        remove()
    if isinstance(layer, nn.Conv2d):
        return x.mean(dim=(2, 3))
    return x.flatten(1, -2).mean(1) if x.dim() > 2 else x


@register_attack("trojannn")
class TrojanNN(Attack):
    config_class = TrojanNNConfig
    config: TrojanNNConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        size = config.patch_size or default_patch_size(info)
        row, col = patch_origin(config.position, size, info.height, info.width)
        self.mask = torch.zeros(1, info.height, info.width, dtype=torch.bool)
        self.mask[:, row : row + size, col : col + size] = True
        self.box = (row, col, size)
        self.pattern: torch.Tensor | None = None  # C x H x W uint8, meaningful inside the mask
        self.layer_name: str | None = None
        self.neurons: torch.Tensor | None = None
        self.resource_log: dict[str, dict] = {}

    def prepare(self, train: ImageSet, resources: ResourceStore) -> None:
        c = self.config
        spec = {"surrogate": surrogate_key(c, train, self.info), "patch": list(self.box),
                "seed": c.seed, **c.model_dump(include={"layer", "num_neurons", "target_value", "steps", "lr"})}

        def build():
            model = load_surrogate(c, train, self.info, resources)
            return self._craft(model, resources.torch_device)

        resource = record(self.resource_log, "trojannn_trigger", resources.get_or_build("trojannn_trigger", spec, build))
        self.pattern = resource.tensors["pattern"].to(torch.uint8)
        self.neurons = resource.tensors["neurons"].long()
        self.layer_name = resource.metadata["layer"]

    def _craft(self, model: nn.Module, device) -> tuple[dict[str, torch.Tensor], dict]:
        c = self.config
        layer_name = c.layer or select_layer(model.model)
        modules = dict(model.model.named_modules())
        if layer_name not in modules:
            raise ValueError(f"trojannn: the surrogate has no layer {layer_name!r}")
        neurons = strongest_neurons(modules[layer_name], c.num_neurons).to(device)
        # PixelSpaceModel wraps the classifier as `model`: its layer names gain that prefix.
        name = f"model.{layer_name}"
        mask = self.mask.to(device).float()
        generator = torch.Generator().manual_seed(c.seed)
        patch = torch.rand(self.info.image_shape, generator=generator).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([patch], lr=c.lr)
        goal = torch.full((1, len(neurons)), c.target_value, device=device)
        for _ in range(c.steps):
            canvas = (patch * mask).unsqueeze(0)  # the trigger alone on a blank image
            act = neuron_activations(model, name, canvas)[:, neurons]
            loss = ((act - goal) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
        with torch.no_grad():
            final = neuron_activations(model, name, (patch * mask).unsqueeze(0))[0, neurons]
        pattern = (patch.detach() * mask * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        return ({"pattern": pattern, "neurons": neurons.cpu()},
                {"layer": layer_name, "activations": final.cpu().tolist()})

    def state_tensors(self):
        return {"mask": self.mask, "pattern": self._pattern()}

    def load_state_tensors(self, tensors):
        self.mask, self.pattern = tensors["mask"].bool(), tensors["pattern"].to(torch.uint8)

    def _pattern(self) -> torch.Tensor:
        if self.pattern is None:
            raise RuntimeError("trojannn: the trigger is optimised in prepare(); call prepare() or "
                               "load_state_tensors() first")
        return self.pattern

    def apply_trigger(self, images, labels):
        return torch.where(self.mask.to(images.device), self._pattern().to(images.device), images)
