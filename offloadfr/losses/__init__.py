"""Margin losses on cosine logits (``loss.kind``): arcface, cosface, combined (:mod:`offloadfr.losses.margins`) and
adasin (:mod:`offloadfr.losses.adasin`)."""

from __future__ import annotations

from offloadfr.losses.adasin import AdaSin
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
    "AdaSin",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "Margin",
    "build_margin",
    "list_margins",
    "margin_cross_entropy",
    "register_margin",
]
