"""Learning-rate schedules: a learning rate for every step, with linear warmup (``train.scheduler``)."""

from __future__ import annotations

import math
from typing import Any

from offloadfr.config import TrainCfg

__all__ = ["LRSchedule"]


class LRSchedule:
    """The learning rate of step ``t`` in ``[0, total_steps)``.

    ``poly`` is arcface_torch's PolynomialLRWarmup with power 1 (linear warmup, then linear decay to 0);
    ``cosine`` decays to 0 along a half cosine after warmup; ``constant`` holds ``lr`` after warmup.

    Args:
        cfg: the ``[train]`` section (lr, scheduler, warmup_steps).
        total_steps: the number of steps the run will take.

    Example::

        sched = LRSchedule(TrainCfg(lr=0.1), total_steps=1000)
        sched(0), sched(999)
    """

    def __init__(self, cfg: TrainCfg, total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(cfg.warmup_steps, self.total_steps - 1)

    def __call__(self, step: int) -> float:
        lr, warm = self.cfg.lr, self.warmup_steps
        if step < warm:
            return lr * (step + 1) / warm
        if self.cfg.scheduler == "constant":
            return lr
        progress = (step - warm) / max(1, self.total_steps - warm)
        progress = min(max(progress, 0.0), 1.0)
        if self.cfg.scheduler == "poly":
            return lr * (1.0 - progress)
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        """Stateless: the step alone decides the rate (kept for the checkpoint format of stateful schedules)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
