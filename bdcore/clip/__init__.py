"""CLIP (open_clip) models as first-class citizens of the engine: local-only weights, image-text data
(caption tables, or captions generated from a classification dataset with prompt templates), contrastive
training, and a zero-shot classifier that the engine scores with the same ACC / ASR as any classifier.
"""
from bdcore.clip.data import (
    DEFAULT_TEMPLATES,
    ImageTextSet,
    captions_from_classes,
    check_caption_table,
    load_caption_table,
)
from bdcore.clip.models import CLIP_PREFIX, ClipBundle, build_clip, clip_arch_names, is_clip_model
from bdcore.clip.train import ClipTrainConfig, clip_contrastive_loss, train_clip
from bdcore.clip.zeroshot import ZeroShotClassifier

__all__ = [
    "CLIP_PREFIX", "ClipBundle", "ClipTrainConfig", "DEFAULT_TEMPLATES", "ImageTextSet", "ZeroShotClassifier",
    "build_clip", "captions_from_classes", "check_caption_table", "clip_arch_names", "clip_contrastive_loss", "is_clip_model",
    "load_caption_table", "train_clip",
]
