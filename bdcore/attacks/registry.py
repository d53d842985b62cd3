"""Attack registry: `build_attack(name, info, **params)`."""
from __future__ import annotations

from bdcore.attacks.base import Attack, AttackConfig
from bdcore.data.base import DatasetInfo
from bdcore.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack", package="bdcore.attacks")


def register_attack(name: str):
    def decorator(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        return ATTACKS.register(name)(cls)

    return decorator


def attack_config(name: str, **params) -> AttackConfig:
    """Validate `params` against the attack's typed config (unknown keys are errors)."""
    return ATTACKS.get(name).config_class(**params)


def build_attack(name: str, info: DatasetInfo, **params) -> Attack:
    cls = ATTACKS.get(name)
    return cls(cls.config_class(**params), info)


def attack_names() -> list[str]:
    return ATTACKS.names()
