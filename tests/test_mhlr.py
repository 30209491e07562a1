"""MHLR (``train.scheduler = "mhlr"``): the double-EMA plateau detector on synthetic plateau losses, pinned against a
naive loop written from seeds-spec §2.9, its place in LRSchedule (warmup, one-step lag), and its state through a
real checkpoint and resume."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from offloadfr.config import TrainCfg, load_config
from offloadfr.train.schedulers import LRSchedule, MHLRDetector

REPO = Path(__file__).resolve().parent.parent


def _plateau_losses(seed: int = 0, noise: float = 0.0) -> list[float]:
    """Descend 0.01/step for 200 steps, flat 400, descend 200, flat 400 (optionally with uniform noise)."""
    rng = random.Random(seed)
    out, level = [], 10.0
    for length, slope in ((200, 0.01), (400, 0.0), (200, 0.01), (400, 0.0)):
        for _ in range(length):
            level -= slope
            out.append(level + noise * (rng.random() - 0.5))
    return out


def _reference_decays(losses: list[float], a: float, b: float, lam: float, toler: int, max_decays: int) -> list[int]:
    """Indices of the losses whose observation decays, straight from the spec's pseudo-code (S-L2DN logic)."""
    decays: list[int] = []
    d = e = 0.0
    count = 0
    for i in range(1, len(losses)):
        drop = losses[i - 1] - losses[i]
        if i == 1:
            d = a * drop
            e = d
        else:
            d = (1 - a) * d + a * drop
            e = b * d + (1 - b) * e
        if len(decays) >= max_decays:
            continue
        if e < lam:
            if count < toler:
                count += 1
            else:
                count = 0
                decays.append(i)
        else:
            count = 0
    return decays


def _run(losses: list[float], **kw: float) -> list[int]:
    det = MHLRDetector(**kw)  # type: ignore[arg-type]
    return [i for i, loss in enumerate(losses) if det.observe(loss)]


PARAMS = {"alpha": 0.05, "beta": 0.05, "threshold": 1e-3, "tolerance": 100, "max_decays": 8}


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_decays_once_per_tolerance_on_plateaus_and_never_on_descents(noise: float) -> None:
    """Catches a decay on a descending loss, no decay on a plateau, two decays closer than ``tolerance`` plateau
    steps (in particular on consecutive steps), or a detector that differs from the spec's loop."""
    losses = _plateau_losses(noise=noise)
    got = _run(losses, **PARAMS)
    assert got == _reference_decays(losses, 0.05, 0.05, 1e-3, 100, 8)
    plateaus = [(200, 600), (800, 1200)]
    assert all(any(lo <= i < hi for lo, hi in plateaus) for i in got)  # only on plateaus
    for lo, hi in plateaus:  # a 400-step plateau holds at least one and at most 400 // 101 decays
        assert 1 <= sum(lo <= i < hi for i in got) <= 400 // 101
    assert all(b - a >= 101 for a, b in zip(got, got[1:], strict=False))


def test_never_decays_on_consecutive_steps_with_the_smallest_tolerance() -> None:
    """Catches the released copy's bug: no reset branch, so after a decay the rate kept halving every step. Here a
    loss that is flat forever decays every second step at tolerance 1, never twice in a row."""
    got = _run([1.0] * 40, alpha=0.5, beta=0.5, threshold=1e-3, tolerance=1, max_decays=100)
    assert got and all(b - a == 2 for a, b in zip(got, got[1:], strict=False))


def test_a_drop_right_after_a_decay_resets_the_count() -> None:
    """Catches a count that survives a non-plateau step: after a decay, a sharp drop (E >= lambda) must restart the
    tolerance, so the next decay comes ``tolerance`` plateau steps after the averages fall again."""
    losses = [1.0] * 30 + [0.0] + [0.0] * 60
    det = MHLRDetector(alpha=0.5, beta=0.5, threshold=1e-3, tolerance=5, max_decays=100)
    flags = [det.observe(x) for x in losses]
    got = [i for i, f in enumerate(flags) if f]
    assert got == _reference_decays(losses, 0.5, 0.5, 1e-3, 5, 100)
    after = [i for i in got if i > 30]
    assert after and after[0] >= 31 + 6  # E stays above lambda for a while, then 5 plateau steps, then a decay


def test_max_decays_and_nonfinite_losses() -> None:
    """Catches decays past ``max_decays`` and a NaN loss (a skipped step) poisoning the averages."""
    assert len(_run([1.0] * 200, alpha=0.5, beta=0.5, threshold=1e-3, tolerance=1, max_decays=3)) == 3
    det = MHLRDetector(alpha=0.5, beta=0.5, threshold=1e-3, tolerance=1, max_decays=3)
    for x in (3.0, 2.0, float("nan"), 1.0, float("inf")):
        det.observe(x)
    assert math.isfinite(det.d) and math.isfinite(det.e) and det.num_observed == 3 and det.prev_loss == 1.0


def _cfg(**kw: object) -> TrainCfg:
    base = {"lr": 0.1, "scheduler": "mhlr", "mhlr_alpha": 0.5, "mhlr_beta": 0.5, "mhlr_threshold": 1e-3,
            "mhlr_tolerance": 0.1}
    return TrainCfg(**{**base, **kw})  # type: ignore[arg-type]


def test_schedule_halves_with_a_one_step_lag_and_not_during_warmup() -> None:
    """Catches a rate that ignores the detector, applies a decay to the step whose loss found it (no lag), divides
    by the wrong factor, or decays during warmup."""
    sched = LRSchedule(_cfg(warmup_steps=10, mhlr_factor=4.0), total_steps=50)  # tolerance = 5
    rates, decay_steps = [], []
    for step in range(50):
        rates.append(sched(step))
        before = sched.num_decays
        sched.observe(step, 1.0)  # flat from the start
        if sched.num_decays > before:
            decay_steps.append(step)
    assert rates[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])
    assert decay_steps and decay_steps[0] >= 10 + 5
    for s in decay_steps:
        assert rates[s + 1] == pytest.approx(rates[s] / 4.0) if s + 1 < 50 else True
        assert rates[s] == pytest.approx(0.1 / 4.0 ** decay_steps.index(s))
    assert LRSchedule(_cfg(), total_steps=5).detector.tolerance == 1  # int(0.1 * 5) = 0 -> at least 1


def test_state_dict_round_trip_continues_identically() -> None:
    """Catches a schedule state that loses the averages, the count or the decays (a resumed run's rate diverges)."""
    losses = _plateau_losses(noise=0.02)[:700]
    cfg = TrainCfg(lr=0.1, scheduler="mhlr", mhlr_alpha=0.05, mhlr_beta=0.05, mhlr_threshold=1e-3,
                   mhlr_tolerance=0.05)
    full = LRSchedule(cfg, total_steps=700)
    ref = []
    for step, x in enumerate(losses):
        ref.append(full(step))
        full.observe(step, x)
    first = LRSchedule(cfg, total_steps=700)
    for step, x in enumerate(losses[:450]):
        first(step)
        first.observe(step, x)
    second = LRSchedule(cfg, total_steps=700)
    second.load_state_dict(first.state_dict())
    rest = []
    for step in range(450, 700):
        rest.append(second(step))
        second.observe(step, losses[step])
    assert full.num_decays >= 2 and rest == ref[450:]
    assert LRSchedule(TrainCfg(scheduler="poly"), 10).state_dict() == {}


def _train_cfg(root: Path, name: str, head: str):  # type: ignore[no-untyped-def]
    return load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", f"run.name={name}",
        "synth.num_identities=16", "synth.num_holdout=6", "synth.num_pairs=20", "synth.min_images=3",
        "synth.max_images=8", "synth.mean_images=5.0", "synth.samples_per_shard=30", "data.num_workers=0",
        "train.batch_size=8", "train.epochs=2", "train.checkpoint_every=4", "train.keep_checkpoints=10",
        "train.warmup_steps=0", "eval.at_end=false", f"head.kind={head}", "head.num_anchors=6",
        "loss.kind=adasin", "train.scheduler=mhlr", "train.mhlr_threshold=1e9", "train.mhlr_tolerance=0.1"])


@pytest.mark.slow
@pytest.mark.parametrize("head", ["fc", "vfc"])
def test_resume_restores_mhlr_adasin_and_vfc_state(tmp_path: Path, head: str) -> None:
    """A real run: catches a checkpoint without the schedule's state (the resumed run restarts at the peak rate),
    without AdaSin's t, or without the vfc anchors and their momentum: the resumed run must end with exactly the
    weights, t and schedule state of the uninterrupted run. The threshold makes every step a plateau step, so the
    rate halves every few steps and the state matters."""
    from offloadfr.train.checkpoint import list_checkpoints, load_checkpoint
    from offloadfr.train.trainer import train

    full = train(_train_cfg(tmp_path, "full", head))
    end, _ = load_checkpoint(full.checkpoint)
    assert end["schedule"]["mhlr"]["num_decays"] >= 2
    cut = tmp_path / "runs" / "cut"
    shutil.copytree(full.run_dir, cut)
    for ckpt in list_checkpoints(cut)[2:]:  # keep steps 4 and 8, as if the run had died after step 8
        shutil.rmtree(ckpt)
    assert list_checkpoints(cut)[-1].name == "step_00000008"
    resumed = train(_train_cfg(tmp_path, "cut", head), resume="auto")
    assert resumed.steps == full.steps > 8
    back, _ = load_checkpoint(resumed.checkpoint)
    assert back["schedule"] == end["schedule"]
    for k, v in end["engine"]["model"].items():
        assert torch.equal(v, back["engine"]["model"][k]), k
    for k, v in end["head"].items():
        assert torch.equal(v, back["head"][k]), k
    assert end["head"]["margin.t"].item() != 0.0
