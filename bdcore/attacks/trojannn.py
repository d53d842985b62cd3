"""TrojanNN: a masked trigger optimised so that chosen internal neurons of a clean surrogate fire
strongly; poisoned images get the trigger ADDED inside the mask and carry the target label (dirty-label).

Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning Attack on Neural Networks", NDSS 2018. The
neurons are the inputs of a chosen layer with the strongest connections (largest sum of absolute
outgoing weights); the trigger is optimised inside a mask to drive their activation to a target value.

Defaults as BackdoorBench (attack/trojannn.py, config/attack/trojannn/<model>.yaml): the layer is the
classification head (the last Linear: `linear`, `classifier.6`, `classifier.2`, `heads.head`, ... in
every per-architecture config), 2 neurons, target value 100; the trigger starts as the mask image
(its `apple4.png`: an apple silhouette, ~7% of the image, in the lower right; mask="square" is its
`square.png`) and takes 1000 signed-gradient steps of 0.1 on sum((activation - 100)^2), the model
seeing the trigger alone on black (outside the mask zero), each step projected into an Linf ball of
0.3 around the mask image and into [0, 1], stopping early once the cost is below 1e-3; poisoned
images are clip(image + trigger, 0, 255), so only the masked pixels change.

Deviations from BackdoorBench, each on purpose:
- The masks are drawn here (the same shapes, positions and sizes, fitted to its 224 px PNGs, IoU 0.94
  for the apple) and shrunk to the image size with an antialiased bilinear resize, as its PIL resize does.
- Neurons are ranked by the TRAINED head's weights. BackdoorBench builds the model with 1000 classes
  and loads the clean weights only where shapes match, so the head it ranks is randomly initialised.
- The surrogate sees images as the victim does (normalised inside `PixelSpaceModel`); BackdoorBench
  feeds the raw [0, 1] trigger to a network trained on normalised inputs.
- image + trigger saturates at 255. BackdoorBench casts the sum to uint8 before clipping, so sums
  above 255 wrap around (300 -> 44; its own SimpleAdditiveTrigger warns against exactly that). The
  trigger is rounded to uint8 levels where its ToPILImage truncates (at most 1 level).
- Not a deviation: as BackdoorBench, a cell selects neurons in and crafts against a clean surrogate
  of the victim's own architecture (`surrogate_model` set by bdcore.cells; outside a cell, the
  dataset's default).
- The paper retrains the model on reverse-engineered data; here, as in BackdoorBench, the victim is
  trained on the poisoned training set instead.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bdcore.attacks._adversarial import (
    SurrogateConfig,
    capture_input,
    load_surrogate,
    record,
    surrogate_key,
)
from bdcore.attacks.base import Attack
from bdcore.attacks.registry import register_attack
from bdcore.attacks.resources import ResourceStore
from bdcore.data.base import ImageSet

MaskShape = Literal["apple", "square"]


class TrojanNNConfig(SurrogateConfig):
    # A cell fills surrogate_model with the victim's architecture (bdcore.cells), as BackdoorBench.
    surrogate_is_victim: ClassVar[bool] = True
    layer: str | None = None  # Conv2d/Linear whose INPUT neurons are selected; None = the last Linear (head)
    num_neurons: int = Field(2, ge=1)  # num_neuron
    target_value: float = 100.0  # neuron_target_values: activation the selected neurons are pushed toward
    mask: MaskShape = "apple"  # mask_path: apple4.png; "square" = square.png
    steps: int = Field(1000, ge=1)  # mask_update_iters
    step_size: float = Field(0.1, gt=0)  # per signed-gradient step, [0, 1] pixel units (alpha)
    epsilon: float = Field(0.3, gt=0, le=1)  # Linf distance the trigger may move from the mask image (eps)
    tolerance: float = Field(1e-3, ge=0)  # stop once the cost is below this


# The reference masks are 224 x 224 images; the shapes are given in that canvas's pixel coordinates
# (fitted to BackdoorBench's PNGs) and drawn at pixel centres.
CANVAS = 224


def _apple(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An apple silhouette: a squarish body (superellipse) with a bite on the right and dents at
    top and bottom, and a leaf above it tilted to the upper right; 7.1% of the canvas."""
    body = ((x - 161.5).abs() / 33.5) ** 3 + ((y - 171.0).abs() / 31.5) ** 3 <= 1
    for cy, cx, r in ((164.0, 205.5, 21.5), (137.0, 161.5, 7.5), (208.5, 163.0, 9.0)):
        body &= (y - cy) ** 2 + (x - cx) ** 2 > r * r
    angle = math.radians(-51.6)
    u = (x - 169.5) * math.cos(angle) + (y - 129.5) * math.sin(angle)
    v = -(x - 169.5) * math.sin(angle) + (y - 129.5) * math.cos(angle)
    return body | ((u / 10.5) ** 2 + (v / 4.8) ** 2 <= 1)


def _square(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 59 px square, 20 px from the bottom and right edges: 6.9% of the canvas."""
    return (y >= 145) & (y < 204) & (x >= 145) & (x < 204)


def mask_image(shape: MaskShape, height: int, width: int) -> torch.Tensor:
    """H x W mask image in [0, 1] (multiples of 1/255, as a uint8 image): 1 inside the shape, soft
    edges from the antialiased resize, 0 elsewhere. It is the trigger's starting point, and its
    nonzero pixels are the region the trigger lives in."""
    draw = {"apple": _apple, "square": _square}[shape]
    centres = torch.arange(CANVAS, dtype=torch.float64) + 0.5
    canvas = draw(*torch.meshgrid(centres, centres, indexing="ij")).float()[None, None]
    if (height, width) != (CANVAS, CANVAS):
        canvas = F.interpolate(canvas, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (canvas[0, 0].clamp(0, 1) * 255).round() / 255


def _fan_in(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels
    return None


def select_layer(model: nn.Module) -> str:
    """The last Linear layer, i.e. the classification head: the layer every BackdoorBench config
    selects (preactresnet18 `linear`, vgg19_bn `classifier.6`, convnext_tiny `classifier.2`,
    vit_b_16 `heads.head`, ...), so the neurons are the penultimate features."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("trojannn: the model has no Linear layer to select neurons from; set `layer`")
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


def optimise_trigger(model: nn.Module, layer_name: str, neurons: torch.Tensor, start: torch.Tensor,
                     target_value: float, steps: int, step_size: float, epsilon: float,
                     tolerance: float) -> torch.Tensor:
    """Signed-gradient descent of sum_k (activation_k - target_value)^2 over the selected neurons of
    `layer_name`, for the C x H x W trigger alone on a black image. The trigger starts at `start`
    (the mask image) and only its nonzero pixels move; each step is projected into the Linf ball of
    `epsilon` around `start` and into [0, 1]. Stops early once the cost is below `tolerance`."""
    keep = (start > 0).float()
    x = start.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        act = neuron_activations(model, layer_name, (x * keep).unsqueeze(0))[:, neurons]
        cost = ((act - target_value) ** 2).sum()
        (grad,) = torch.autograd.grad(cost, x)
        # Sign steps: the step does not depend on the cost's scale (activations near 100 give huge gradients).
        x = x.detach() - step_size * grad.sign()
        x = (start + (x - start).clamp(-epsilon, epsilon)).clamp(0, 1)
        if cost.item() < tolerance:
            break
    return x * keep


@register_attack("trojannn")
class TrojanNN(Attack):
    config_class = TrojanNNConfig
    config: TrojanNNConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        self.start = mask_image(config.mask, info.height, info.width)  # H x W, the trigger's starting image
        self.mask = (self.start > 0)[None]  # 1 x H x W: the pixels the trigger may change
        self.pattern: torch.Tensor | None = None  # C x H x W uint8 added to images, 0 outside the mask
        self.layer_name: str | None = None
        self.neurons: torch.Tensor | None = None
        self.resource_log: dict[str, dict] = {}

    def prepare(self, train: ImageSet, resources: ResourceStore) -> None:
        c = self.config
        # No seed: the optimisation starts from the mask image and is deterministic.
        spec = {"surrogate": surrogate_key(c, train, self.info), "size": [self.info.height, self.info.width],
                **c.model_dump(include={"layer", "num_neurons", "target_value", "mask", "steps", "step_size",
                                        "epsilon", "tolerance"})}

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
        start = self.start.expand(self.info.image_shape).to(device)
        trigger = optimise_trigger(model, name, neurons, start, c.target_value, c.steps, c.step_size, c.epsilon,
                                   c.tolerance)
        with torch.no_grad():
            final = neuron_activations(model, name, trigger.unsqueeze(0))[0, neurons]
        pattern = (trigger * 255).round().clamp(0, 255).to(torch.uint8).cpu()
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
        # Added, not pasted: the image shows through; saturating at 255 (the pattern is 0 outside the mask).
        summed = images.to(torch.int16) + self._pattern().to(images.device, torch.int16)
        return summed.clamp(0, 255).to(torch.uint8)
