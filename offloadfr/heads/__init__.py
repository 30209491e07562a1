"""Classifier heads behind one protocol; ``head.kind`` selects one."""

from offloadfr.heads import attfc as _attfc  # noqa: F401  (registers "attfc")
from offloadfr.heads import dcp as _dcp  # noqa: F401  (registers "dcp")
from offloadfr.heads import fc as _fc  # noqa: F401  (registers "fc")
from offloadfr.heads import partial_fc as _partial_fc  # noqa: F401  (registers "partial_fc")
from offloadfr.heads import pfc_dense as _pfc_dense  # noqa: F401  (registers "pfc_dense")
from offloadfr.heads import vfc as _vfc  # noqa: F401  (registers "vfc")
from offloadfr.heads.base import HEADS, Head, HeadDeps, build_head, register_head

__all__ = ["HEADS", "Head", "HeadDeps", "build_head", "register_head"]
