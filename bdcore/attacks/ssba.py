"""SSBA: a StegaStamp encoder hides a fixed secret bit string in each poisoned image; the residual
it adds is invisible and different for every image (a sample-specific trigger). Dirty-label.

Li, Li, Wu, Li, He & Lyu, "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021;
encoder/decoder after Tancik, Mildenhall & Ng, "StegaStamp: Invisible Hyperlinks in Physical
Photographs", CVPR 2020. The reference projects ship pre-encoded images; here the engine trains
the encoder/decoder pair on the attacked training set itself (a cached resource, kind
"ssba_stegastamp") and encodes the secret on the fly.

Architecture (`_nets.SecretEncoder` / `_nets.BitDecoder`): the secret goes through a dense
layer to a C x 16 x 16 map (smaller for smaller images), is upsampled to the image size and
concatenated with the image; a U-Net (widths `encoder_widths`) outputs the residual, bounded to
+-`residual_scale` intensity levels by a tanh. The decoder (stride-2 conv stages with GroupNorm,
pooled to 4 x 4, dense 128 -> bits) reads the secret back. Training, as StegaStamp: random secrets
per image, Adam, a secret-only phase (bit BCE), then the L2 image loss ramped in linearly; the
encoded image is clamped and rounded to uint8 (straight-through) plus Gaussian noise before the
decoder, so the code survives what the attack writes out.

Simplifications against the paper (all to train in seconds on a CPU, none changes the trigger's
nature): no LPIPS term (needs downloaded AlexNet weights; offline here), no critic/discriminator,
no spatial transformer and no print-and-photograph distortions (perspective, blur, JPEG) in the
decoder path; the decoder starts with a fixed high-pass filter (image minus its 3x3 local mean,
as steganalysis networks do) and the secret map is amplified (`secret_gain`) so that training
leaves StegaStamp's long initial plateau after tens of steps instead of tens of thousands; narrow
networks; a penalty keeps the residual's tanh out of its flat tails (else a residual saturated
during the secret-only phase never feels the image loss). Defaults (ours; the paper trains
StegaStamp's own settings for 140k steps): a seeded secret of 100 bits (StegaStamp / SSBA) for
images of 64 x 64 and more, scaled with the pixel count below (25 bits at 32 x 32, at least 8);
residual bound 24/255; L2 weight 0.5; at least 200 training steps and at least 2 passes over the
training set at batch 32, Adam lr 2e-3, the first third secret-only (digits: 200 steps, ~15 s on
2 CPU cores, bit accuracy 1.00, mean |change| 6.6/255). For CIFAR-scale data on a GPU raise
`steps` and the widths (e.g. steps=5000, encoder_widths=(32, 64, 128, 256)) and lower
`residual_scale` / raise `l2_weight` for a fainter residual at the same bit accuracy; too small a
bound (8/255 on digits) leaves the secret unlearnt (bit accuracy 0.5), which `stats` shows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.attacks._nets import (
    BitDecoder,
    DeviceCopies,
    SecretEncoder,
    bounded,
    deterministic_inference,
    fit,
    map_batches,
    quantize,
    seeded,
)
from bdcore.attacks.base import Attack, AttackConfig
from bdcore.attacks.registry import register_attack
from bdcore.attacks.resources import (
    ResourceStore,
    fingerprint,
    load_module_tensors,
    module_tensors,
)
from bdcore.data.base import ImageSet

RESOURCE_KIND = "ssba_stegastamp"
_VERSION = 2  # bump when the training procedure changes: old cached encoders are then not reused


class SSBAConfig(AttackConfig):
    bits: int | None = Field(None, ge=1)  # secret length; None: 100 at >= 64x64, scaled by pixel count below
    secret_seed: int = 0  # seed of the fixed secret bit string
    residual_scale: float = Field(24.0, gt=0, le=255)  # max |residual| in intensity levels (tanh bound)
    secret_gain: float = Field(10.0, gt=0)  # amplification of the secret map (fast start of training)
    steps: int | None = Field(None, ge=1)  # encoder/decoder training steps; None: max(200, 2 epochs)
    secret_only_steps: int | None = Field(None, ge=0)  # bit loss only at first; None: steps // 3
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    l2_weight: float = Field(0.5, ge=0)  # weight of mean squared residual (images in [0, 1])
    noise_std: float = Field(2.0, ge=0)  # Gaussian noise (intensity levels) before the decoder in training
    encoder_widths: tuple[int, ...] = (8, 16, 32)
    decoder_widths: tuple[int, ...] = (16, 32, 64)
    encoder_seed: int = 0  # seed of the encoder/decoder initialisation and training batches


def default_bits(height: int, width: int) -> int:
    return max(8, min(100, round(100 * height * width / (64 * 64))))


@register_attack("ssba")
class SSBA(Attack):
    config_class = SSBAConfig
    config: SSBAConfig

    def __init__(self, config, info):
        super().__init__(config, info)
        self.bits = config.bits or default_bits(info.height, info.width)
        generator = torch.Generator().manual_seed(config.secret_seed)
        self.secret = torch.randint(0, 2, (self.bits,), generator=generator).float()
        self.encoder: DeviceCopies | None = None
        self.decoder: DeviceCopies | None = None
        self.stats: dict = {}
        self.resource_log: dict[str, dict] = {}

    # -- networks ------------------------------------------------------------------------------
    def _build_encoder(self) -> SecretEncoder:
        c, h, w = self.info.image_shape
        return SecretEncoder(c, h, w, self.bits, self.config.encoder_widths, norm=False,
                             secret_gain=self.config.secret_gain)

    def _build_decoder(self) -> BitDecoder:
        return BitDecoder(self.info.channels, self.bits, self.config.decoder_widths, hidden=128)

    def training_steps(self, n_train: int) -> int:
        cfg = self.config
        return cfg.steps or max(200, math.ceil(2 * n_train / cfg.batch_size))

    def resource_spec(self, train: ImageSet) -> dict:
        cfg = self.config
        steps = self.training_steps(len(train))
        return {
            "version": _VERSION, "data": fingerprint(train), "shape": list(self.info.image_shape), "bits": self.bits,
            "residual_scale": cfg.residual_scale, "secret_gain": cfg.secret_gain, "steps": steps,
            "secret_only_steps": cfg.secret_only_steps if cfg.secret_only_steps is not None else steps // 3,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "l2_weight": cfg.l2_weight, "noise_std": cfg.noise_std,
            "encoder_widths": list(cfg.encoder_widths), "decoder_widths": list(cfg.decoder_widths),
            "seed": cfg.encoder_seed,
        }

    def prepare(self, train: ImageSet, resources: ResourceStore) -> None:
        spec = self.resource_spec(train)
        resource = resources.get_or_build(RESOURCE_KIND, spec, lambda: self._train(train, spec, resources.torch_device))
        self.load_state_tensors({**resource.tensors, "secret": self.secret})
        self.resource_log[RESOURCE_KIND] = {"path": None if resource.path is None else str(resource.path),
                                            "reused": resource.reused}
        self.stats = {"training": resource.metadata}
        sample = train.images[: min(len(train), 512)]
        self.stats["bit_accuracy"] = self.bit_accuracy(self.apply_trigger(sample, train.labels[: len(sample)]))
        self.stats["bit_accuracy_clean"] = self.bit_accuracy(sample)

    def _train(self, train: ImageSet, spec: dict, device: torch.device):
        cfg = self.config
        encoder = seeded(self._build_encoder, cfg.encoder_seed).to(device).train()
        decoder = seeded(self._build_decoder, cfg.encoder_seed + 1).to(device).train()
        generator = torch.Generator().manual_seed(cfg.encoder_seed)
        scale, noise = cfg.residual_scale / 255, cfg.noise_std / 255
        free, total = spec["secret_only_steps"], spec["steps"]
        ramp = max(1, (total - free) // 2)

        def loss_fn(x: torch.Tensor, step: int):
            secrets = torch.randint(0, 2, (x.shape[0], self.bits), generator=generator).float().to(device)
            residual, saturation = bounded(encoder(x, secrets), scale)
            encoded = quantize((x + residual).clamp(0, 1))
            noisy = encoded + noise * torch.randn(x.shape, generator=generator).to(device)
            logits = decoder(noisy)
            bce = F.binary_cross_entropy_with_logits(logits, secrets)
            l2 = (encoded - x).square().mean()
            weight = 0.0 if step < free else cfg.l2_weight * min(1.0, (step - free + 1) / ramp)
            with torch.no_grad():
                acc = ((logits > 0).float() == secrets).float().mean()
                change = (encoded - x).abs().mean() * 255
            return bce + weight * l2 + saturation, {"bce": bce.detach(), "bit_accuracy": acc, "mean_abs_change": change}

        result = fit(list(encoder.parameters()) + list(decoder.parameters()), loss_fn, train.images, total,
                     cfg.batch_size, cfg.lr, generator, device)
        tensors = {**module_tensors(encoder, "encoder."), **module_tensors(decoder, "decoder.")}
        return tensors, {**result, "device": str(device)}

    # -- state ---------------------------------------------------------------------------------
    def state_tensors(self):
        if self.encoder is None:
            raise RuntimeError("ssba: call prepare() (or load_state_tensors) before using the attack")
        return {**module_tensors(self.encoder.on(torch.device("cpu")), "encoder."),
                **module_tensors(self.decoder.on(torch.device("cpu")), "decoder."), "secret": self.secret}

    def load_state_tensors(self, tensors):
        encoder = load_module_tensors(self._build_encoder(), tensors, "encoder.")
        decoder = load_module_tensors(self._build_decoder(), tensors, "decoder.")
        self.encoder, self.decoder = DeviceCopies(encoder), DeviceCopies(decoder)
        self.secret = tensors["secret"].float().cpu()

    # -- trigger -------------------------------------------------------------------------------
    def residual_fn(self, device: torch.device):
        if self.encoder is None:
            raise RuntimeError("ssba: call prepare() (or load_state_tensors) before applying the trigger")
        encoder, scale = self.encoder.on(device), self.config.residual_scale / 255
        secret = self.secret.to(device).view(1, -1)

        def apply(x: torch.Tensor) -> torch.Tensor:
            return x + scale * torch.tanh(encoder(x, secret.expand(x.shape[0], -1)))

        return apply

    def apply_trigger(self, images, labels):
        return map_batches(self.residual_fn(images.device), images)

    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """The decoder's bit estimates (0/1 floats, N x bits) for uint8 images."""
        if self.decoder is None:
            raise RuntimeError("ssba: call prepare() (or load_state_tensors) before decoding")
        decoder = self.decoder.on(images.device)
        with deterministic_inference(images.device):
            return (decoder(images.float() / 255) > 0).float()

    def bit_accuracy(self, images: torch.Tensor) -> float:
        """Share of the fixed secret's bits the decoder reads from `images`."""
        return float((self.decode(images) == self.secret.to(images.device)).float().mean())
