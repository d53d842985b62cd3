"""Attacks, one module each, registered by name (see registry.py)."""
from bdcore.attacks.base import Attack, AttackConfig, PoisonedTrainSet, blend
from bdcore.attacks.registry import ATTACKS, attack_config, attack_names, build_attack, register_attack

__all__ = ["ATTACKS", "Attack", "AttackConfig", "PoisonedTrainSet", "attack_config", "attack_names", "blend",
           "build_attack", "register_attack"]
