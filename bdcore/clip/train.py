"""Contrastive image-text training of a CLIP model (Radford et al. ICML 2021): a batch's matching
image-caption pairs are positives, every other pairing a negative, cross-entropy in both directions over
the scaled cosine similarities. Resumable per epoch; mixed precision on CUDA."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from bdcore.clip.data import ImageTextSet
from bdcore.clip.models import ClipBundle
from bdcore.clip.zeroshot import clip_input
from bdcore.data.augment import random_crop, random_hflip
from bdcore.device import pick_device
from bdcore.train.loop import Checkpointer, seed_everything


class ClipTrainConfig(BaseModel):
    """AdamW with cosine decay, as CLIP pre-training and CleanCLIP's fine-tuning use."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    augment: bool = True  # random crop (pad 1/8 of the size) and flip
    hflip: bool = False
    amp: bool = True
    device: str = "auto"


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: torch.Tensor) -> torch.Tensor:
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.exp().float() * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def clip_batch_images(images: torch.Tensor, bundle: ClipBundle, augment: bool, hflip: bool,
                      generator: torch.Generator) -> torch.Tensor:
    """uint8 batch -> augmented, resized, CLIP-normalised float batch."""
    if augment:
        images = random_crop(images, max(1, images.shape[-1] // 8), generator)
        if hflip:
            images = random_hflip(images, generator)
    return clip_input(images.float().div_(255.0), bundle)


def train_clip(bundle: ClipBundle, data: ImageTextSet, config: ClipTrainConfig, seed: int = 0,
               checkpoint_dir: str | Path | None = None, checkpoint_tag: str = "",
               on_epoch_end: Callable[[int, dict], None] | None = None,
               loss_fn: Callable | None = None) -> list[dict]:
    """Train `bundle.model` in place on image-caption pairs; returns the per-epoch history.

    `loss_fn(model, images, tokens, indices) -> loss` replaces the plain CLIP loss (defenses that add
    terms, attacks that own training); when it has a `start_epoch(epoch)` method, that is called at the
    start of every epoch (0-based), resumed ones included."""
    device = pick_device(config.device)
    use_amp = config.amp and device.type == "cuda"
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    model = bundle.model.to(device)
    tokens = bundle.tokenize(data.captions)
    images = data.images.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    checkpointer, start, history = None, 0, []
    if checkpoint_dir is not None:
        captions_hash = hashlib.sha256("\n".join(data.captions).encode()).hexdigest()[:16]
        fingerprint = hashlib.sha256(json.dumps({"config": config.model_dump(), "seed": seed, "n": len(data),
                                                 "captions": captions_hash, "model": bundle.name,
                                                 "tag": checkpoint_tag}, sort_keys=True).encode()).hexdigest()[:16]
        checkpointer = Checkpointer(checkpoint_dir, fingerprint)
        start, history = checkpointer.load(model, [optimizer], [scheduler], generator)
    n = len(data)
    for epoch in range(start, config.epochs):
        model.train()
        if hasattr(loss_fn, "start_epoch"):  # losses whose behaviour changes by epoch (RoCLIP's matching)
            loss_fn.start_epoch(epoch)
        order = torch.randperm(n, generator=generator)
        total, batches = 0.0, 0
        for begin in range(0, n - 1, config.batch_size):
            idx = order[begin:begin + config.batch_size]
            if len(idx) < 2:
                continue  # a contrastive batch needs a negative
            x = clip_batch_images(images[idx.to(device)], bundle, config.augment, config.hflip, generator)
            t = tokens[idx].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                if loss_fn is not None:
                    loss = loss_fn(model, x, t, idx)
                else:
                    loss = clip_contrastive_loss(model.encode_image(x), model.encode_text(t), model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():  # CLIP clamps its learned temperature at 100
                model.logit_scale.clamp_(0, 4.6052)
            total, batches = total + float(loss.detach()), batches + 1
        scheduler.step()
        record = {"epoch": epoch + 1, "train_loss": total / max(batches, 1), "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        if checkpointer is not None:
            checkpointer.save(epoch + 1, model, [optimizer], [scheduler], generator, history)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    model.eval().to("cpu")
    return history
