"""When a run checkpoints: every ``train.checkpoint_every`` steps and every ``train.checkpoint_every_minutes`` of
wall time, so a SIGKILL, an out-of-memory kill or a pre-empted node loses at most that much training (plus the time
one checkpoint takes; docs/checkpoints.md).

The wall-time interval is counted from the end of the last checkpoint (or from the start of the loop), so a
checkpoint slower than the interval does not make the run checkpoint after every step. With several processes the
ranks must checkpoint at the same step (a checkpoint is collective), but their clocks differ: each step every rank
adds its "due" flag into one all-reduce and all of them checkpoint when any is due. The plain path runs no
collective.
"""

from __future__ import annotations

import time

import torch

from offloadfr.distributed import all_reduce_sum_

__all__ = ["CheckpointTimer"]


def _now_s() -> float:
    """The clock (seconds); a function of the module, so that a test can move time forward."""
    return time.monotonic()


class CheckpointTimer:
    """Decides after each step whether to write a checkpoint.

    Args:
        every_steps: ``train.checkpoint_every`` (0: no step interval).
        every_minutes: ``train.checkpoint_every_minutes`` (0: no wall-time interval).
        world_size: processes of the run; above 1 the wall-time decision is agreed over them.
        device: where this process's collectives run (a CUDA device for NCCL).

    Example::

        timer = CheckpointTimer(cfg.train.checkpoint_every, cfg.train.checkpoint_every_minutes,
                                world_size=env.world_size, device=env.device)
        ...
        if timer.due(step, total_steps):   # after the step, on every rank
            save()
            timer.saved()
    """

    def __init__(self, every_steps: int, every_minutes: float, *, world_size: int = 1,
                 device: torch.device | None = None) -> None:
        self.every_steps = every_steps
        self.every_s = 60.0 * every_minutes
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self._last = _now_s()

    def due(self, step: int, total_steps: int) -> bool:
        """True when the checkpoint of ``step`` (just trained) should be written; never at ``total_steps``, whose
        checkpoint the run writes anyway. Every rank must call it at every step (it may run a collective)."""
        if step >= total_steps:
            return False
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        if not self.every_s:
            return by_steps
        late = _now_s() - self._last >= self.every_s
        if self.world_size > 1:  # rank clocks differ: checkpoint when any rank is due, all at this step
            flag = torch.tensor([float(late)], device=self.device)
            late = bool(all_reduce_sum_(flag).item() > 0)
        return by_steps or late

    def saved(self) -> None:
        """Restarts the wall-time interval (call after each checkpoint is written)."""
        self._last = _now_s()
