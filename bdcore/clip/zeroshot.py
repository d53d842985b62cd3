"""Zero-shot classification with a CLIP model: class-name prompts embedded by the text tower, images
assigned to the nearest class embedding (Radford et al. ICML 2021). Wrapped as an nn.Module that takes the
engine's normalised images, so accuracy, ASR and RA are measured by the same code as for any classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdcore.clip.data import DEFAULT_TEMPLATES
from bdcore.clip.models import ClipBundle
from bdcore.data.base import DatasetInfo


@torch.no_grad()
def class_embeddings(bundle: ClipBundle, class_names, templates=DEFAULT_TEMPLATES) -> torch.Tensor:
    """K x D unit vectors: each class's prompt embeddings averaged over the templates, renormalised."""
    model = bundle.model
    device = next(model.parameters()).device
    out = []
    for name in class_names:
        tokens = bundle.tokenize([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=-1))
    return torch.stack(out)


def clip_input(images01: torch.Tensor, bundle: ClipBundle) -> torch.Tensor:
    """Float images in [0, 1] -> the CLIP model's input size and normalisation."""
    if images01.shape[-1] != bundle.image_size or images01.shape[-2] != bundle.image_size:
        images01 = F.interpolate(images01, size=(bundle.image_size, bundle.image_size), mode="bilinear",
                                 align_corners=False, antialias=images01.shape[-1] > bundle.image_size)
    mean = torch.tensor(bundle.mean, device=images01.device).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std, device=images01.device).view(1, -1, 1, 1)
    return (images01 - mean) / std


class ZeroShotClassifier(nn.Module):
    """logits = exp(logit_scale) * cos(image embedding, class embedding), for the engine's normalised
    inputs of dataset `info` (undone here, then CLIP's own resize and normalisation applied)."""

    def __init__(self, bundle: ClipBundle, info: DatasetInfo, class_names=None, templates=DEFAULT_TEMPLATES):
        super().__init__()
        self.bundle = bundle
        self.clip = bundle.model
        self.class_names = list(class_names or info.class_names)
        if len(self.class_names) != info.num_classes:
            raise ValueError(f"zero-shot classification needs {info.num_classes} class names, got {len(self.class_names)}")
        self.templates = tuple(templates)
        self.normalized_inputs = info.normalize
        self.register_buffer("input_mean", torch.tensor(info.mean).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(info.std).view(1, -1, 1, 1))
        self.register_buffer("classes", class_embeddings(bundle, self.class_names, self.templates))

    @torch.no_grad()
    def refresh(self) -> ZeroShotClassifier:
        """Re-embed the class prompts (after the text tower changed, e.g. by fine-tuning)."""
        self.classes = class_embeddings(self.bundle, self.class_names, self.templates).to(self.classes.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images01 = x * self.input_std + self.input_mean if self.normalized_inputs else x
        features = F.normalize(self.clip.encode_image(clip_input(images01.clamp(0, 1), self.bundle)).float(), dim=-1)
        return self.clip.logit_scale.exp().float() * features @ self.classes.T
