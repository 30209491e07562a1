"""Learning-rate schedules: a learning rate for every step, with linear warmup (``train.scheduler``).

The trainer asks ``schedule(step)`` for the rate of a step before running it, and tells the schedule the step's loss
afterwards with ``schedule.observe(step, loss)``. Only ``mhlr`` uses the loss; every other schedule is a function
of the step alone. ``state_dict`` / ``load_state_dict`` carry what ``mhlr`` has learnt from the losses through a
checkpoint, so a resumed run continues with the same rate an uninterrupted one would have.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

from offloadfr.config import TrainCfg

__all__ = ["LRSchedule", "MHLRDetector"]


class MHLRDetector:
    """The plateau detector of MHLR (Moving Haar Learning Rate, arXiv 2404.11118; seeds-spec §2.9), double-EMA form.

    Fed one loss per step, it keeps two exponential moving averages of the per-step loss decrease::

        D_t = (1 − α)·D_{t−1} + α·(L_{t−1} − L_t)       (D_1 = α·(L_0 − L_1))
        E_t = β·D_t + (1 − β)·E_{t−1}                    (E_1 = D_1)

    A step with ``E_t < λ`` is a plateau step. After ``tolerance`` plateau steps the next plateau step is a decay
    (the learning rate is divided by δ) and the count restarts from 0; a step with ``E_t >= λ`` resets the count.
    This is the released code's detector with the fix of its later version (S-L2DN): the released copy has no reset
    branch, so once ``E_t >= λ`` right after a decay it kept dividing the rate on every step. Here a decay needs
    ``tolerance`` plateau steps since the previous one, so two decays are never on consecutive steps
    (``tolerance >= 1``), and decays stop after ``max_decays`` (S-L2DN stops after 8).

    Args:
        alpha: α, rate of the first EMA.
        beta: β, rate of the second EMA.
        threshold: λ.
        tolerance: plateau steps before a decay, >= 1.
        max_decays: most decays.

    Example::

        det = MHLRDetector(alpha=0.001, beta=0.001, threshold=5e-5, tolerance=500, max_decays=8)
        for loss in losses:
            det.observe(loss)
        det.num_decays
    """

    def __init__(self, *, alpha: float, beta: float, threshold: float, tolerance: int, max_decays: int) -> None:
        assert tolerance >= 1, "a tolerance of 0 would decay on consecutive steps"
        self.alpha, self.beta, self.threshold = alpha, beta, threshold
        self.tolerance, self.max_decays = tolerance, max_decays
        self.prev_loss: float | None = None
        self.d = 0.0  # D_t
        self.e = 0.0  # E_t
        self.count = 0  # plateau steps since the last decay (or since E last reached λ)
        self.num_decays = 0
        self.num_observed = 0  # finite losses fed in

    def observe(self, loss: float, *, count_plateau: bool = True) -> bool:
        """Feeds the loss of the next step; returns True when this step is a decay.

        A non-finite loss (a step skipped by the trainer's guard) is ignored: it would poison both averages.
        ``count_plateau=False`` updates the averages without counting plateau steps or decaying (warmup).
        """
        if not math.isfinite(loss):
            return False
        prev, self.prev_loss = self.prev_loss, loss
        self.num_observed += 1
        if prev is None:
            return False  # L_0: the first decrease comes with L_1
        drop = prev - loss
        if self.num_observed == 2:  # the first decrease initialises both averages
            self.d = self.alpha * drop
            self.e = self.d
        else:
            self.d = (1.0 - self.alpha) * self.d + self.alpha * drop
            self.e = self.beta * self.d + (1.0 - self.beta) * self.e
        if not count_plateau or self.num_decays >= self.max_decays:
            return False
        if self.e >= self.threshold:
            self.count = 0
            return False
        if self.count < self.tolerance:
            self.count += 1
            return False
        self.count = 0
        self.num_decays += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (safe for ``torch.load(weights_only=True)``)."""
        return {"prev_loss": self.prev_loss, "d": self.d, "e": self.e, "count": self.count,
                "num_decays": self.num_decays, "num_observed": self.num_observed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_loss = state["prev_loss"]
        self.d, self.e = float(state["d"]), float(state["e"])
        self.count, self.num_decays = int(state["count"]), int(state["num_decays"])
        self.num_observed = int(state["num_observed"])


class LRSchedule:
    """The learning rate of step ``t`` in ``[0, total_steps)``.

    Every schedule starts with ``warmup_steps`` of linear warmup from ``lr / warmup_steps`` to ``lr``. Then:

    * ``poly``: arcface_torch's PolynomialLRWarmup with power 1 (linear decay to 0 at ``total_steps``);
    * ``cosine``: a half cosine down to 0;
    * ``constant``: ``lr``;
    * ``multistep``: ``lr × gamma^k`` where k is the number of ``multistep_milestones`` at or before the step
      (torch's MultiStepLR, in steps);
    * ``mhlr``: ``lr / δ^k`` where k is the number of plateaus :class:`MHLRDetector` has found in the losses given to
      :meth:`observe` so far. The loss of step t decides the rate of step t + 1 (the released code's one-step lag).
      Losses seen during warmup update the averages but never count as plateau steps, so no decay happens in
      warmup (the released code has no warmup). ``tolerance = max(1, int(mhlr_tolerance × total_steps))``.

    Args:
        cfg: the ``[train]`` section (lr, scheduler, warmup_steps, and the ``multistep_*`` / ``mhlr_*`` keys).
        total_steps: the number of steps the run will take.

    Example::

        sched = LRSchedule(TrainCfg(lr=0.1, scheduler="mhlr"), total_steps=1000)
        for step in range(1000):
            lr = sched(step)
            loss = ...                      # train one step at lr
            sched.observe(step, loss)
    """

    def __init__(self, cfg: TrainCfg, total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(cfg.warmup_steps, self.total_steps - 1)
        self.milestones = sorted(cfg.multistep_milestones)
        self.detector: MHLRDetector | None = None
        if cfg.scheduler == "mhlr":
            self.detector = MHLRDetector(alpha=cfg.mhlr_alpha, beta=cfg.mhlr_beta, threshold=cfg.mhlr_threshold,
                                         tolerance=max(1, int(cfg.mhlr_tolerance * self.total_steps)),
                                         max_decays=cfg.mhlr_max_decays)

    def __call__(self, step: int) -> float:
        lr, warm = self.cfg.lr, self.warmup_steps
        if step < warm:
            return lr * (step + 1) / warm
        kind = self.cfg.scheduler
        if kind == "constant":
            return lr
        if kind == "multistep":
            return lr * self.cfg.multistep_gamma ** bisect.bisect_right(self.milestones, step)
        if kind == "mhlr":
            assert self.detector is not None
            return lr / self.cfg.mhlr_factor ** self.detector.num_decays
        progress = (step - warm) / max(1, self.total_steps - warm)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "poly":
            return lr * (1.0 - progress)
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def observe(self, step: int, loss: float) -> None:
        """Tells the schedule the training loss of ``step`` (after the step ran); only ``mhlr`` uses it.

        Non-finite losses are ignored.
        """
        if self.detector is not None:
            self.detector.observe(loss, count_plateau=step >= self.warmup_steps)

    @property
    def num_decays(self) -> int:
        """``mhlr``: decays so far (0 for every other schedule)."""
        return self.detector.num_decays if self.detector is not None else 0

    def state_dict(self) -> dict[str, Any]:
        """What the losses taught ``mhlr`` (empty for the others: the step alone decides their rate)."""
        return {"mhlr": self.detector.state_dict()} if self.detector is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; an empty state (a checkpoint of a stateless schedule) changes nothing."""
        if self.detector is not None and "mhlr" in state:
            self.detector.load_state_dict(state["mhlr"])
