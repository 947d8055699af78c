"""A registry of named factories with aliases: the one mechanism behind ``make_policy`` and
``make_token_strategy``. Names are looked up in lower case; an unknown name is a ValueError that lists
every valid name and alias."""

from __future__ import annotations

from typing import Callable


class Registry:
    """Factories (classes or functions) by name. ``kind`` names an entry in error messages ("policy")."""

    def __init__(self, kind: str, plural: str):
        self.kind, self.plural = kind, plural
        self.factories: dict[str, Callable] = {}
        self.aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable:
        """Decorator: register ``factory`` under ``name`` (and ``aliases``); a class gets ``name`` set."""

        def deco(factory):
            if isinstance(factory, type):
                factory.name = name
            self.factories[name] = factory
            for a in aliases:
                self.aliases[a] = name
            return factory

        return deco

    def names(self, include_aliases: bool = False) -> list[str]:
        names = sorted(self.factories)
        return sorted(names + list(self.aliases)) if include_aliases else names

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases; ValueError listing the valid names."""
        key = str(name).lower()
        key = self.aliases.get(key, key)
        if key not in self.factories:
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.plural}: "
                             f"{', '.join(self.names(include_aliases=True))}")
        return key

    def make(self, name: str, **kwargs):
        """Build the entry registered as ``name`` (or an alias) with ``kwargs``."""
        return self.factories[self.canonical(name)](**kwargs)
