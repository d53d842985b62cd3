"""CLIP backdoor attacks: each poisons image-caption pairs (triggered image + a caption naming the target
class); one module per method, registered by name."""
from bdcore.clip.attacks.base import (
    CLIP_ATTACKS,
    ClipAttack,
    ClipAttackConfig,
    PoisonedPairs,
    build_clip_attack,
    clip_attack_config,
    clip_attack_names,
    register_clip_attack,
)

__all__ = ["CLIP_ATTACKS", "ClipAttack", "ClipAttackConfig", "PoisonedPairs", "build_clip_attack", "clip_attack_config",
           "clip_attack_names", "register_clip_attack"]
