"""Defense registry: `build_defense(name, **params)`."""
from __future__ import annotations

from bdcore.defenses.base import DefenseConfig, PostTrainingDefense, TrainingTimeDefense
from bdcore.registry import Registry

DEFENSES: Registry[type] = Registry("defense", package="bdcore.defenses")


def register_defense(name: str):
    def decorator(cls):
        cls.name = name
        return DEFENSES.register(name)(cls)

    return decorator


def defense_config(name: str, **params) -> DefenseConfig:
    return DEFENSES.get(name).config_class(**params)


def build_defense(name: str, **params) -> PostTrainingDefense | TrainingTimeDefense:
    cls = DEFENSES.get(name)
    return cls(cls.config_class(**params))


def defense_names() -> list[str]:
    return DEFENSES.names()
