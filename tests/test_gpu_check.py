"""``launch/gpu_check.py``: the one prepared command of a session's GPU call (docs/benchmarks/gpu-runbook.md), run
here at tiny sizes on the CPU (its dry run), and its time budget: steps skipped when the time left does not cover
them, steps killed at their limit."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "gpu_check.py"

_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
assert _spec is not None and _spec.loader is not None
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up by name
_spec.loader.exec_module(gc)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_its_rows(tmp_path: Path) -> None:
    """The whole script at tiny sizes on the CPU: catches a step whose command no longer parses or runs (a renamed
    bench flag, a moved import), a step that writes no rows, rows outside the files the device tool returns, the
    backbone-only rate not handed on, and the device-memory cap not reaching the row."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    recs = _records(out)
    assert recs[0]["what"] == "meta" and recs[0]["mode"] == "dry-run" and recs[-1]["what"] == "end"
    steps = {r["step"]: r for r in recs if r["what"] == "step"}
    assert list(steps) == [s.name for s in gc.make_steps()]
    assert {name: r["status"] for name, r in steps.items()} == dict.fromkeys(steps, "ok")
    assert sorted(p.name for p in out.iterdir()) == sorted(gc.OUT_FILES) and len(gc.OUT_FILES) <= 8
    for name in steps:  # the elapsed time printed before each step, and each step's output in the log
        assert f"] {name}: start" in proc.stdout
        assert f"step {name}" in (out / "log.txt").read_text()
    assert "skipped" in (out / "gpu_tests.txt").read_text()  # the gpu tests, collected and skipped on the CPU

    kernel = _rows(out / "kernel.jsonl")
    assert sorted({r["num_slots"] for r in kernel}) == list(gc.DRY.kernel_slots) and len(kernel) == 18
    assert all(r["status"] == "ok" for r in kernel if r["kernel"] == "torch")

    train = _rows(out / "train.jsonl")
    m = gc.DRY.million
    assert [(r["head"], r["num_classes"], r["status"]) for r in train] == [
        ("backbone_only", 10 * m, "ok"), ("partial_fc:ram", 10 * m, "ok"), ("partial_fc:nvme", 10 * m, "ok"),
        ("partial_fc:nvme", 100 * m, "ok"), ("partial_fc:nvme", 10 * m, "ok"), ("partial_fc:ram", m, "ok")]
    base = train[0]["images_per_s"]
    for r in train[1:]:  # one backbone-only row, its rate passed to every later command
        assert r["labels"] == "block" and r["backbone_only_images_per_s"] == pytest.approx(base, rel=1e-5)
        assert r["ratio_to_backbone_only"] == pytest.approx(r["images_per_s"] / base, rel=1e-5)
    assert [r["device_memory_GiB"] for r in train] == [0, 0, 0, 0, gc.DRY.device_cap_GiB, 0]

    backbone = _rows(out / "backbone.jsonl")
    assert [(r["engine"], r["status"]) for r in backbone] == [("plain", "ok"), ("zero2", "ok"),
                                                               ("zero2_offload_cpu", "ok")]
    in_gpu = _rows(out / "in_gpu.jsonl")
    assert [(r["head"], r["status"]) for r in in_gpu] == [("fc", "ok"), ("pfc_dense", "ok")] * 2
    assert in_gpu[0]["num_classes"] == m and in_gpu[2]["num_classes"] == in_gpu[3]["num_classes"] > m
    assert "plan" in steps["in_gpu_largest"]


def test_too_little_time_skips_every_step(tmp_path: Path) -> None:
    """Catches a step started without the time for it: with a 1 s budget nothing runs, and each step's record says
    so (``skipped``, ``no time: ...``) with no rows written."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--budget", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    steps = [r for r in _records(tmp_path) if r["what"] == "step"]
    assert len(steps) == len(gc.make_steps())
    for r in steps:
        assert r["status"] == "skipped" and r["reason"].startswith("no time"), r
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.jsonl"]


def test_setup_failure_stops_the_later_steps(tmp_path: Path) -> None:
    """The GPU mode on a machine without a GPU: the setup fails (no usable wheels, or no CUDA device) and every
    later step is recorded as not run, instead of each one failing at import and spending the device's minutes."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "setup", "gpu_tests",
                           "kernel"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    status = {r["step"]: (r["status"], r.get("reason", "")) for r in _records(tmp_path) if r["what"] == "step"}
    assert status["setup"][0] == "failed"
    assert status["gpu_tests"] == status["kernel"] == ("skipped", "not run: step setup failed")


def _step(name: str, est: float, code: str, **kw: Any) -> Any:
    return gc.Step(name=name, what=name, est_s=est, dry_s=est,
                   commands=lambda c: [[sys.executable, "-c", code]], **kw)


def test_budget_gate_keeps_time_for_required_steps(tmp_path: Path) -> None:
    """Catches an optional step that eats the time of a required one after it, and a required step started when
    its estimate is over the time left; a step that fits runs."""
    assert gc.gate(10, 10) is None and gc.gate(10, 9.9).startswith("no time: needs 10 s")
    assert "kept for the required steps" in gc.gate(5, 12, reserve=8)
    ctx = gc.Context(sizes=gc.DRY, out=tmp_path, banks=tmp_path / "banks")
    steps = [_step("a", 1, "pass"), _step("b_optional", 5, "pass", optional=True), _step("c", 15, "pass"),
             _step("d", 100, "pass"), _step("e_optional", 1, "pass", optional=True)]
    recs = gc.run_steps(steps, ctx, budget_s=20, echo=lambda line: None)
    assert [(r["step"], r["status"]) for r in recs] == [("a", "ok"), ("b_optional", "skipped"), ("c", "ok"),
                                                        ("d", "skipped"), ("e_optional", "ok")]
    assert "kept for the required steps" in recs[1]["reason"] and recs[3]["reason"].startswith("no time")


def test_step_past_its_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    """A hung step (here a command whose child sleeps) is killed at the deadline with its whole process group, so
    the call ends in time and later steps are still recorded."""
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    ctx = gc.Context(sizes=gc.DRY, out=tmp_path, banks=tmp_path / "banks")
    t0 = time.monotonic()
    recs = gc.run_steps([_step("hang", 0.5, code), _step("after", 0.5, "pass")], ctx, budget_s=4, t0=t0,
                        echo=lambda line: None)
    assert time.monotonic() - t0 < 20
    assert [(r["step"], r["status"]) for r in recs] == [("hang", "timeout"), ("after", "skipped")]
    child = int(pid_file.read_text())
    time.sleep(0.5)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"  # gone, or a reaped-soon zombie


def test_largest_n_is_sized_from_the_1m_step() -> None:
    """Catches the last step choosing an N whose estimated cost is over the time left, or running without the 1M
    measurement it scales from."""
    ctx = gc.Context(sizes=gc.GPU, out=Path("/nonexistent"), banks=Path("/tmp"))
    with pytest.raises(gc.NoTime, match="in_gpu_1m"):
        gc.plan_largest_in_gpu(ctx, 500)
    ctx.walls.update(train_backbone_only=20.0, in_gpu_1m=55.0)  # fixed 40 s, 15 s per million
    est, cmds, note = gc.plan_largest_in_gpu(ctx, 200)
    assert est + 10 <= 200 and "N = 8M" in note and "8000000" in cmds[0]
    with pytest.raises(gc.NoTime, match="no time"):
        gc.plan_largest_in_gpu(ctx, 60)


def test_gpu_plan_fits_its_budget() -> None:
    """Catches a required step added to the GPU plan that the budget can never reach, and a command longer than
    the device tool takes."""
    steps = gc.make_steps()
    required = sum(s.est_s for s in steps if not s.optional)
    assert required <= gc.BUDGET_S
    assert gc.BUDGET_S + 30 <= 600  # the run call's timeout_s (about 560) must cover it, under the 600 s maximum
    proc = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 0 and all(s.name in proc.stdout for s in steps), proc.stderr


def test_train_bench_flags_of_the_gpu_check_refuse_bad_values() -> None:
    """``bench.py train --backbone-only-rate`` with no head to divide (or several engines), or a negative cap: a
    clear usage error, not rows without a base."""
    from offloadfr.bench.train import main

    for argv in (["--heads", "--backbone-only-rate", "100"],
                 ["--engines", "plain", "zero2", "--backbone-only-rate", "100"], ["--device-memory-GiB", "-1"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
