"""Backbones, selected by ``model.backbone``: ``iresnet18``/``50``/``100``, ``mobilefacenet`` and ``tiny``.

Every backbone maps images (B, 3, S, S), float in [-1, 1], to embeddings (B, D) that are NOT L2-normalised (the heads
normalise), and is built by a factory ``(embedding_size, image_size) -> nn.Module`` registered under its name::

    @register_backbone("mynet")
    def mynet(embedding_size: int, image_size: int) -> nn.Module: ...

    model = build_backbone("iresnet50", embedding_size=512, image_size=112)

This package imports only torch, :mod:`offloadfr.registry` and :mod:`offloadfr.errors` (layer L2): a backbone runs in
a plain CPU unit test with no process group, device or storage.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from offloadfr.registry import Registry

__all__ = ["BACKBONES", "register_backbone", "build_backbone", "list_backbones"]

BACKBONES: Registry[Callable[[int, int], nn.Module]] = Registry("model.backbone")
"""Name → factory ``(embedding_size, image_size) -> nn.Module``."""

register_backbone = BACKBONES.register
"""Decorator: ``@register_backbone("name")`` registers a backbone factory (registering a name twice is a bug)."""


def build_backbone(name: str, *, embedding_size: int, image_size: int) -> nn.Module:
    """Builds the backbone registered as ``name``.

    Args:
        name: a registered name (``model.backbone``), see :func:`list_backbones`.
        embedding_size: D, the width of the embedding (``model.embedding_size``).
        image_size: S, the side of the square input images (``model.image_size``).

    Returns:
        A freshly initialised module mapping (B, 3, S, S) to (B, D), on the CPU, in training mode.

    Raises:
        ConfigError: ``name`` is not registered (the message lists the registered names), or the backbone cannot take
            ``image_size`` (the message says which sizes it can).
    """
    return BACKBONES.get(name)(embedding_size, image_size)


def list_backbones() -> list[str]:
    """The registered backbone names, sorted."""
    return BACKBONES.names()


# The submodules register their factories on import; they need ``register_backbone`` above, hence the late import.
from offloadfr.models import iresnet, mobilefacenet, tiny  # noqa: E402,F401
