"""CLIP backdoor defenses: post-training (clean fine-tuning) and training-time (robust pre-training);
one module per method, registered by name."""
from bdcore.clip.defenses.base import (
    CLIP_DEFENSES,
    ClipDefense,
    ClipDefenseConfig,
    ClipDefenseContext,
    ClipDefenseOutcome,
    ClipFinetuneConfig,
    ClipPostTrainingDefense,
    ClipTrainingTimeDefense,
    build_clip_defense,
    clip_defense_config,
    clip_defense_names,
    register_clip_defense,
)

__all__ = ["CLIP_DEFENSES", "ClipDefense", "ClipDefenseConfig", "ClipDefenseContext", "ClipDefenseOutcome",
           "ClipFinetuneConfig", "ClipPostTrainingDefense", "ClipTrainingTimeDefense", "build_clip_defense",
           "clip_defense_config", "clip_defense_names", "register_clip_defense"]
