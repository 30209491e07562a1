"""Fault injection for the crash tests: ``OFFLOADFR_FAULT=<point>@<n>`` kills the process at a named point.

The n-th time (1-based, default 1) the running process reaches ``fault_point("<point>")`` it sends itself SIGKILL,
a real kill that no ``finally`` or signal handler sees. Without the variable a fault point costs one environment
lookup.

Points (where a crash matters for consistency):

- ``bank.stage``: a block is about to be written to the bank's journal (during a flush, or an nvme eviction);
- ``bank.prepared``: the bank recorded ``pending_step``, the checkpoint is not written yet;
- ``bank.commit``: the bank decided to commit and is about to move its journal into place;
- ``checkpoint.before_rename``: the checkpoint's files are written into its temporary directory, not yet renamed;
- ``checkpoint.after_rename``: the checkpoint is complete, the bank not yet committed.
"""

from __future__ import annotations

import os
import signal

__all__ = ["fault_point", "ENV"]

ENV = "OFFLOADFR_FAULT"
_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Sends SIGKILL to this process if ``OFFLOADFR_FAULT`` names this point and its count is reached.

    Args:
        name: the point's name, e.g. ``"checkpoint.before_rename"``.
    """
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] != int(nth or 1):
        return
    os.kill(os.getpid(), signal.SIGKILL)
