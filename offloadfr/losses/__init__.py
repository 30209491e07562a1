"""Margin losses on cosine logits (``loss.kind``): arcface, cosface, combined; see :mod:`offloadfr.losses.margins`."""

from __future__ import annotations

from offloadfr.losses.margins import (
    MARGINS,
    ArcFace,
    CombinedMargin,
    CosFace,
    Margin,
    build_margin,
    list_margins,
    margin_cross_entropy,
    register_margin,
)

__all__ = [
    "MARGINS",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "Margin",
    "build_margin",
    "list_margins",
    "margin_cross_entropy",
    "register_margin",
]
