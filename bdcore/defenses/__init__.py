"""Defenses, one module each, registered by name (see registry.py)."""
from bdcore.defenses.base import (
    DefenseConfig,
    DefenseContext,
    DefenseOutcome,
    DefenseSkipped,
    PostTrainingDefense,
    TrainingTimeDefense,
)
from bdcore.defenses.detection import Detection, InputFilter, PoisonDetector, auroc, detection_quality
from bdcore.defenses.registry import DEFENSES, build_defense, defense_config, defense_names, register_defense

__all__ = ["DEFENSES", "DefenseConfig", "DefenseContext", "DefenseOutcome", "DefenseSkipped", "Detection", "InputFilter",
           "PoisonDetector", "PostTrainingDefense", "TrainingTimeDefense", "auroc", "build_defense", "defense_config",
           "defense_names", "detection_quality", "register_defense"]
