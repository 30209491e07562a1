"""Learning-rate schedules: warmup, decay endpoints and monotonicity."""

from __future__ import annotations

import math

import pytest

from offloadfr.config import TrainCfg
from offloadfr.train.schedulers import LRSchedule


def test_poly_is_linear_warmup_then_linear_decay() -> None:
    """Catches an off-by-one warmup or a decay that does not reach 0 at the last step."""
    s = LRSchedule(TrainCfg(lr=0.1, scheduler="poly", warmup_steps=10), total_steps=110)
    assert s(0) == pytest.approx(0.01)
    assert s(9) == pytest.approx(0.1)
    assert s(10) == pytest.approx(0.1)
    assert s(60) == pytest.approx(0.05)
    assert s(110) == pytest.approx(0.0)
    values = [s(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_cosine_and_constant() -> None:
    """Catches a cosine that is not half way at the midpoint, or a constant that decays."""
    c = LRSchedule(TrainCfg(lr=0.2, scheduler="cosine"), total_steps=100)
    assert c(0) == pytest.approx(0.2) and c(50) == pytest.approx(0.1) and math.isclose(c(100), 0.0, abs_tol=1e-12)
    k = LRSchedule(TrainCfg(lr=0.2, scheduler="constant", warmup_steps=4), total_steps=100)
    assert k(1) == pytest.approx(0.1) and k(99) == pytest.approx(0.2)


def test_warmup_longer_than_run_is_capped() -> None:
    """Catches a division by zero or an lr that never reaches its peak when warmup exceeds the run."""
    s = LRSchedule(TrainCfg(lr=0.1, warmup_steps=1000), total_steps=10)
    assert s(8) == pytest.approx(0.1)
