"""Name -> factory registries, the way timm registers models: a new method is one new module.

Each registry lists its known names in every error, so a typo tells the user what exists.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name no registry entry has; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of entries (classes or factories) filled by a decorator."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        # The package whose modules register entries; imported lazily on first lookup so
        # that adding a method never requires editing an __init__ file.
        self._package = package
        self._discovered = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return decorator

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self._package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self._package}.{module.name}")

    def get(self, name: str) -> T:
        self._discover()
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}: {name!r}")
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def module_of(self, name: str) -> str:
        """The module that registered `name` (its code is the entry's code; sweep fingerprints it)."""
        entry = self.get(name)
        return getattr(entry, "__module__", None) or type(entry).__module__

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
