"""Registries: one per kind of pluggable part, each checking the kind of what it is given and rejecting duplicates.

    Registry(kind, base)   classes, each a subclass of `base` (towers, connectors, video backends, ...)
    Registry(kind)         functions (LLM loaders, sampling policies, stage objectives); the registry's type
                           parameter, a Protocol, says how they are called: `Registry[SamplingPolicy]`
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

E = TypeVar("E")


class DuplicateNameError(KeyError, ValueError):
    """A name registered twice in one registry (catchable as KeyError or as ValueError)."""


class Registry(Generic[E]):
    """Maps a name to a class that must be a subclass of `base` (which gets `registry_name` set to the name), or,
    without `base`, to a function (any callable that is not a class)."""

    def __init__(self, kind: str, base: type | None = None):
        self.kind = kind
        self.base = base
        self._entries: dict[str, E] = {}

    def register(self, name: str) -> Callable[[E], E]:
        """Decorator: `@registry.register("name")` adds the decorated class or function under `name`."""

        def decorator(entry: E) -> E:
            if self.base is not None and not (isinstance(entry, type) and issubclass(entry, self.base)):
                raise TypeError(f"{self.kind} '{name}': {entry!r} is not a subclass of {self.base.__name__}")
            if self.base is None and (isinstance(entry, type) or not callable(entry)):
                raise TypeError(f"{self.kind} '{name}' must be a function, got {entry!r}")
            if name in self._entries:
                taken = self._entries[name]
                raise DuplicateNameError(
                    f"{self.kind} '{name}' is already registered by {getattr(taken, '__qualname__', repr(taken))}"
                )
            self._entries[name] = entry
            if self.base is not None:
                entry.registry_name = name  # type: ignore[attr-defined]
            return entry

        return decorator

    def unregister(self, name: str) -> E:
        """Remove and return the entry under `name` (for tests and for re-registering an edited entry)."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def get(self, name: str) -> E:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self._entries))}") from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """The class registered under `name`, instantiated with `kwargs`."""
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names, sorted."""
        return iter(self.names())
