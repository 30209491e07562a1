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


def test_multistep_multiplies_by_gamma_at_each_milestone() -> None:
    """Catches a milestone applied one step late or early, a gamma applied once instead of per milestone, or
    milestones that ignore warmup."""
    s = LRSchedule(TrainCfg(lr=0.1, scheduler="multistep", multistep_milestones=(30, 60), multistep_gamma=0.5,
                            warmup_steps=10), total_steps=100)
    assert s(0) == pytest.approx(0.01) and s(9) == pytest.approx(0.1)
    assert s(29) == pytest.approx(0.1) and s(30) == pytest.approx(0.05)
    assert s(59) == pytest.approx(0.05) and s(60) == pytest.approx(0.025) and s(99) == pytest.approx(0.025)
    s.observe(5, 1.0)  # the loss does not matter to multistep
    assert s(99) == pytest.approx(0.025) and s.state_dict() == {}


@pytest.mark.parametrize(("sets", "match"), [
    (["train.scheduler=multistep"], "needs at least one milestone"),
    (["train.multistep_milestones=[50, 20]"], "strictly increasing"),
    (["train.multistep_milestones=[0, 20]"], "strictly increasing"),
    (["train.multistep_milestones=[20, 20]"], "strictly increasing"),
    (["train.multistep_gamma=0"], "train.multistep_gamma"),
    (["train.mhlr_factor=1.0"], "train.mhlr_factor"),
    (["train.scheduler=plateau"], "train.scheduler"),
])
def test_bad_schedule_settings_are_one_line_config_errors(sets: list[str], match: str) -> None:
    """Catches milestones that would silently never fire (unsorted, zero, repeated, or none for multistep), and
    meaningless factors, accepted instead of a ConfigError naming the key."""
    from offloadfr.config import load_config
    from offloadfr.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)
