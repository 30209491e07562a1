"""A tiny name → factory registry used for backbones, margins and heads (STYLE R6).

Example::

    BACKBONES = Registry("model.backbone")

    @BACKBONES.register("tiny")
    def tiny(embedding_size: int = 128) -> nn.Module: ...

    model = BACKBONES.get("tiny")(embedding_size=64)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from offloadfr.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T", bound=Callable[..., object])


class Registry(Generic[T]):
    """Maps names to factories; a miss raises :class:`ConfigError` listing the known names.

    Args:
        key: the dotted config key whose value selects an entry (used in error messages), e.g. ``"model.backbone"``.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``fn`` under ``name``; registering a name twice is a bug."""

        def _add(fn: T) -> T:
            assert name not in self._entries, f"{self.key}: {name!r} registered twice"
            self._entries[name] = fn
            return fn

        return _add

    def get(self, name: str) -> T:
        """Returns the factory registered as ``name``.

        Raises:
            ConfigError: ``name`` is not registered; the message lists the registered names.
        """
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise ConfigError(f"{self.key} = {name!r} is not known; choose one of: {known}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
