"""Registries: one per kind of pluggable part, each checking the kind of what it is given and rejecting duplicates.

Two flavours share one mechanism (`BaseRegistry`):
  Registry(kind, base)              classes, each a subclass of `base` (towers, connectors, video backends, ...)
  FunctionRegistry(kind, protocol)  functions callable as the `protocol` class's `__call__` declares
                                    (LLM loaders, sampling policies, stage objectives)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

E = TypeVar("E")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class DuplicateNameError(KeyError, ValueError):
    """A name registered twice in one registry (catchable as KeyError or as ValueError)."""


class BaseRegistry(Generic[E]):
    """Maps a name to an entry of one kind; `register` checks the entry and refuses a name already taken."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, E] = {}

    def check(self, name: str, entry: Any) -> None:
        """Raise TypeError when `entry` is not of this registry's kind."""
        raise NotImplementedError

    def register(self, name: str) -> Callable[[E], E]:
        """Decorator: `@registry.register("name")` adds the decorated class or function under `name`."""

        def decorator(entry: E) -> E:
            self.check(name, entry)
            if name in self._entries:
                taken = self._entries[name]
                raise DuplicateNameError(
                    f"{self.kind} '{name}' is already registered by {getattr(taken, '__qualname__', repr(taken))}"
                )
            self._entries[name] = entry
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

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names, sorted."""
        return iter(self.names())


class Registry(BaseRegistry[type[T]]):
    """Maps a name to a class that must be a subclass of `base`; the class gets `registry_name` set to the name."""

    def __init__(self, kind: str, base: type[T]):
        super().__init__(kind)
        self.base = base

    def check(self, name: str, entry: Any) -> None:
        if not (isinstance(entry, type) and issubclass(entry, self.base)):
            raise TypeError(f"{self.kind} '{name}': {entry!r} is not a subclass of {self.base.__name__}")

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: `@registry.register("name")`."""
        add = super().register(name)

        def decorator(cls: type[T]) -> type[T]:
            add(cls)
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def build(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)


class FunctionRegistry(BaseRegistry[F]):
    """Maps a name to a function that can be called the way `protocol.__call__` declares (its parameters after
    `self`): positional parameters are passed positionally, keyword-only ones by keyword, and a `**kwargs` in the
    protocol means callers pass only keywords, so the function's required parameters must accept keywords."""

    def __init__(self, kind: str, protocol: type):
        super().__init__(kind)
        self.protocol = protocol
        params = list(inspect.signature(protocol.__call__).parameters.values())[1:]  # without self
        self.signature = inspect.Signature(params)

    def check(self, name: str, entry: Any) -> None:
        where = f"{self.kind} '{name}'"
        if isinstance(entry, type) or not callable(entry):
            raise TypeError(f"{where} must be a function, got {entry!r}")
        try:
            have = inspect.signature(entry)
        except (TypeError, ValueError):  # a callable without an inspectable signature (some builtins)
            return
        P = inspect.Parameter
        want = list(self.signature.parameters.values())
        args = [None for p in want if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        kwargs = {p.name: None for p in want if p.kind is P.KEYWORD_ONLY}
        if any(p.kind is P.VAR_KEYWORD for p in want):
            positional = [p for p in have.parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
            taken = {p.name for p in positional[: len(args)]}
            kwargs.update({p.name: None for p in have.parameters.values()
                           if p.default is P.empty and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
                           and p.name not in taken})
        try:
            have.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{where}: {entry!r} cannot be called as {self.protocol.__name__}{self.signature} ({e})") from None
