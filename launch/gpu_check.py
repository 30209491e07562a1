"""The GPU checks of issue 16 as one command, for the one device call a session with a GPU makes.

On the GPU box (docs/benchmarks/gpu-runbook.md has the exact ``run`` call)::

    python3 launch/gpu_check.py                      # rows and logs into $OUT, done by 520 s

On the CPU, the same steps at tiny sizes (tests/test_gpu_check.py runs it, so the script cannot rot)::

    python launch/gpu_check.py --dry-run --out /tmp/gpu_check     # or GPU_CHECK_DRY_RUN=1
    python launch/gpu_check.py --list                                # the steps, their estimates and commands

It installs the wheels carried in ``.whl/`` (launch/gpu_wheels.sh makes them), checks the imports, then runs the
steps of :func:`make_steps` in order of importance. Each step starts only when the time left before the deadline
(``--budget``, 520 s from the start by default) covers its estimate (an ``optional`` one: its estimate plus those of
the required steps after it); otherwise it is recorded as ``skipped`` with ``no time: ...``. A step that runs past
its limit (about twice its estimate, never past the deadline) is killed with its whole process group and recorded as
``timeout``; the rows it finished stay, because every benchmark appends each row to its JSONL as soon as it has it.

What comes back in ``$OUT`` (the device tool returns at most 8 files):

- ``steps.jsonl``: one line per step (status, reason, estimate, limit, start and wall seconds, rows written, the
  commands), a ``meta`` line first (mode, budget, machine, commit) and an ``end`` line last;
- ``log.txt``: every step's stdout and stderr, each under a header with the elapsed seconds and the command;
- ``gpu_tests.txt``: the pytest output of the ``gpu``-marked tests;
- ``kernel.jsonl``, ``train.jsonl``, ``backbone.jsonl``, ``in_gpu.jsonl``: the benchmark rows.

Only the standard library is imported here: the steps import torch and offloadfr in their own processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Sizes", "Step", "Context", "GPU", "DRY", "make_steps", "gate", "plan_largest_in_gpu", "run_steps",
           "main", "BUDGET_S", "OUT_FILES"]

ROOT = Path(__file__).resolve().parent.parent
BENCH = str(ROOT / "launch" / "bench.py")
BUDGET_S = 520.0
"""Seconds from the start by which the whole command has ended (the run call's timeout_s is about 560)."""
DRY_BUDGET_S = 1800.0
"""The dry run's budget: the CPU estimates are loose on a shared machine, and the dry run must run every step."""
SITE = "/tmp/site"
"""Where the carried wheels are installed on the box (``pip install --target``), first on every step's path."""
OUT_FILES = ("steps.jsonl", "log.txt", "gpu_tests.txt", "kernel.jsonl", "train.jsonl", "backbone.jsonl",
             "in_gpu.jsonl")
"""Every file the script writes into ``$OUT`` (the device tool returns at most 8)."""
IMPORT_CHECK = """
import sys, importlib.metadata as md
import torch
import deepspeed, zarr, numcodecs, webdataset, tomli_w, pydantic, hjson  # noqa: F401 - the carried wheels
import offloadfr, offloadfr.bench.cli  # noqa: F401
want_cuda = sys.argv[1] == "cuda"
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "cpu"
mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {name} ({mem:.1f} GiB); "
      + ", ".join(f"{p} {md.version(p)}" for p in ("deepspeed", "zarr", "numcodecs", "webdataset", "triton")
                  if p != "triton" or cuda))
if want_cuda and not cuda:
    sys.exit("no CUDA device visible to torch: the GPU steps would all fail")
"""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    """The sizes of one mode: the GPU's (the issue's) or the dry run's (tiny, on the CPU)."""

    device: str
    """``cuda`` on the box (the benches' ``auto``), ``cpu`` in the dry run."""
    million: int
    """How many ids stand for one million: N = 10M is ``10 * million`` ids."""
    backbone: str
    batch_size: int
    image_size: int
    dim: int
    steps: int
    """Timed steps of a ``bench.py train`` row."""
    warmup: int
    kernel_slots: tuple[int, ...]
    kernel_steps: int
    kernel_warmup: int
    backbone_steps: int
    backbone_warmup: int
    extra_train: tuple[str, ...] = ()
    """More ``bench.py train`` arguments (the dry run's device, slots and threads)."""
    extra_backbone: tuple[str, ...] = ()
    device_cap_GiB: float = 12.0
    """The device-memory cap of the consumer-GPU row (no effect on the CPU)."""


GPU = Sizes(device="cuda", million=1_000_000, backbone="iresnet50", batch_size=256, image_size=112, dim=512,
            steps=25, warmup=5, kernel_slots=(65_536, 262_144, 1_048_576), kernel_steps=20, kernel_warmup=3,
            backbone_steps=10, backbone_warmup=3)
DRY = Sizes(device="cpu", million=1_000, backbone="tiny", batch_size=8, image_size=32, dim=16, steps=2, warmup=1,
            kernel_slots=(1_024, 2_048, 4_096), kernel_steps=2, kernel_warmup=1, backbone_steps=2, backbone_warmup=1,
            extra_train=("--device", "cpu", "--num-slots", "256", "--set", "train.cpu_threads=1"),
            extra_backbone=("--device", "cpu"))

LARGEST_LADDER_M = (2, 3, 4, 6, 8, 10, 12, 16, 20)
"""The N (in millions) the last step chooses from for ``fc`` and ``pfc_dense``: the largest that fits the time."""


@dataclasses.dataclass
class Context:
    """What the steps share while the script runs."""

    sizes: Sizes
    out: Path
    banks: Path
    python: str = sys.executable
    backbone_rate: float = 0.0
    """images/s of the backbone-only row (step ``train_backbone_only``); later train commands divide by it."""
    walls: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall seconds of each step that ended ``ok``."""


Commands = list[list[str]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Step:
    """One step: commands run one after the other under one limit, writing rows to ``out``."""

    name: str
    what: str
    """What its rows answer."""
    est_s: float
    """Estimated wall seconds on the box (H100/H200; the sources are in docs/benchmarks/gpu-runbook.md)."""
    dry_s: float
    """Estimated wall seconds of the dry run's version on the 2-core CPU VM."""
    commands: Callable[[Context], Commands]
    out: str = ""
    """The file in ``$OUT`` its rows go to (commands write it themselves)."""
    log: str = "log.txt"
    """The file in ``$OUT`` that gets the commands' stdout and stderr."""
    optional: bool = False
    """Starts only if the time left also covers every later required step."""
    abort: bool = False
    """A failure stops the script (the setup: without the wheels every later step fails)."""
    plan: Callable[[Context, float], tuple[float, Commands, str]] | None = None
    """Sizes the step at run time from the time left: (estimate, commands, note); raises :class:`NoTime`."""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """More environment for its commands."""

    def estimate(self, sizes: Sizes) -> float:
        return self.est_s if sizes.device == "cuda" else self.dry_s


class NoTime(Exception):
    """A step's plan found no size that fits the time left."""


def _bench_train(ctx: Context, *, n_m: float, heads: Sequence[str], labels: Sequence[str] = ("block",),
                 out: str = "train.jsonl", extra: Sequence[str] = ()) -> list[str]:
    s = ctx.sizes
    argv = [ctx.python, BENCH, "train", "--backbone", s.backbone, "--batch-size", str(s.batch_size),
            "--image-size", str(s.image_size), "--dim", str(s.dim), "--steps", str(s.steps), "--warmup",
            str(s.warmup), "--bank-dir", str(ctx.banks), "--out", str(ctx.out / out),
            "--num-classes", str(int(n_m * s.million)), "--heads", *heads, "--labels", *labels, *s.extra_train,
            *extra]
    if heads and ctx.backbone_rate > 0:
        argv += ["--backbone-only-rate", f"{ctx.backbone_rate:.6g}"]
    return argv


def _setup(ctx: Context) -> Commands:
    info = "uname -a; nproc; free -g; df -h /tmp; nvidia-smi -L; " \
           "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; true"
    cmds = [["sh", "-c", info]]
    if ctx.sizes.device == "cuda":
        wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
        if not wheels:
            cmds.append(["sh", "-c", "echo 'no wheels in .whl/: run launch/gpu_wheels.sh on the CPU VM first' >&2;"
                                     " exit 3"])
        cmds.append([ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                     "--no-cache-dir", "--upgrade", "--target", SITE, *wheels])
    cmds.append([ctx.python, "-c", IMPORT_CHECK, ctx.sizes.device])
    return cmds


def plan_largest_in_gpu(ctx: Context, remaining: float, *, margin_s: float = 10.0) -> tuple[float, Commands, str]:
    """``fc`` and ``pfc_dense`` at the largest N of :data:`LARGEST_LADDER_M` that the time left covers.

    Cost model, from this run's own walls: a command with two rows costs about twice the backbone-only command
    (process start, CUDA context, model, warmup: ``fixed``) plus what the 1M command spent beyond that (the N-row
    weights made by the initialiser, the N-column steps), which grows linearly in N; times 1.2 for safety.

    Raises:
        NoTime: no 1M row to scale from, or even the smallest N does not fit.
    """
    w1 = ctx.walls.get("in_gpu_1m")
    if w1 is None:
        raise NoTime("no time model: step in_gpu_1m did not end ok")
    w0 = ctx.walls.get("train_backbone_only", w1 / 2)
    fixed = min(2 * w0, w1)
    per_m = max(w1 - fixed, 1.0)
    for n_m in sorted(LARGEST_LADDER_M, reverse=True):
        est = fixed + 1.2 * per_m * n_m
        if est + margin_s <= remaining:
            note = f"N = {n_m}M: fixed {fixed:.0f} s + {per_m:.1f} s per million (1M step {w1:.0f} s)"
            return est, [_bench_train(ctx, n_m=n_m, heads=["fc", "pfc_dense"], labels=["uniform"],
                                      out="in_gpu.jsonl")], note
    smallest = min(LARGEST_LADDER_M)
    raise NoTime(f"no time: {smallest}M needs about {fixed + 1.2 * per_m * smallest + margin_s:.0f} s, "
                 f"{remaining:.0f} s left")


def make_steps() -> list[Step]:
    """The steps, in order of importance (issue 16). Estimates: docs/benchmarks/gpu-runbook.md, "Step estimates"."""

    def train(name: str, what: str, est: float, dry: float, n_m: float, heads: Sequence[str], *,
              labels: Sequence[str] = ("block",), extra: Sequence[str] = (), optional: bool = False) -> Step:
        return Step(name=name, what=what, est_s=est, dry_s=dry, out="train.jsonl", optional=optional,
                    commands=lambda c: [_bench_train(c, n_m=n_m, heads=heads, labels=labels, extra=extra)])

    def cap(c: Context) -> list[str]:
        return ["--device-memory-GiB", f"{c.sizes.device_cap_GiB:g}"]

    return [
        Step(name="setup", what="the carried wheels install and import; the machine, torch, CUDA, versions",
             est_s=15, dry_s=10, commands=_setup, abort=True),
        Step(name="gpu_tests", what="the gpu-marked tests: compiled Triton kernels against the plain path at real "
             "widths, the prefetcher's side-stream copies on CUDA", est_s=45, dry_s=12, log="gpu_tests.txt",
             env={"OFFLOADFR_TEST_DEVICE": "cuda"},
             commands=lambda c: [[c.python, "-m", "pytest", "-q", "-ra", "-m", "gpu", "-p", "no:cacheprovider",
                                  "tests/test_kernels.py", "tests/test_prefetcher.py"]]),
        Step(name="kernel", what="one resident head step at K = 65,536 / 262,144 / 1,048,576, B = 256, D = 512: "
             "plain vs fused (Triton), fp32/TF32/bf16 GEMMs (issue 9's 3 ms at K = 262,144)", est_s=60, dry_s=6,
             out="kernel.jsonl",
             commands=lambda c: [[c.python, BENCH, "kernel", "--num-slots", *map(str, c.sizes.kernel_slots),
                                  "--batch-size", str(c.sizes.batch_size), "--dim", str(c.sizes.dim), "--steps",
                                  str(c.sizes.kernel_steps), "--warmup", str(c.sizes.kernel_warmup), "--out",
                                  str(c.out / "kernel.jsonl")]]),
        Step(name="train_backbone_only", what="the trainer's step without a classifier: the base of every ratio",
             est_s=25, dry_s=6, out="train.jsonl",
             commands=lambda c: [_bench_train(c, n_m=10, heads=[], labels=["block"])]),
        train("train_10m_ram", "partial_fc at 10M ids, ram tier (40 GB of pinned host rows), block labels",
              90, 6, 10, ["partial_fc:ram"]),
        train("train_10m_nvme", "partial_fc at 10M ids, nvme tier, block labels: issue 9's 90 % of backbone only "
              "and backbone + 4 GiB", 35, 6, 10, ["partial_fc:nvme"]),
        train("train_100m_nvme", "partial_fc at 100M ids, nvme tier, block labels: device memory as at 10M",
              40, 7, 100, ["partial_fc:nvme"]),
        Step(name="train_10m_nvme_12gib", what="the 10M nvme row with the device capped at 12 GiB (a consumer GPU)",
             est_s=35, dry_s=6, out="train.jsonl",
             commands=lambda c: [_bench_train(c, n_m=10, heads=["partial_fc:nvme"], extra=cap(c))]),
        train("train_1m_ram", "partial_fc at 1M ids, ram tier, block labels (if time is left)", 30, 6, 1,
              ["partial_fc:ram"], optional=True),
        Step(name="backbone", what="the backbone step, iresnet50 B = 256: plain vs ZeRO-2 vs ZeRO-2 + CPU offload "
             "(issue 5: within 10 %, 25 % with offload)", est_s=75, dry_s=20, out="backbone.jsonl",
             commands=lambda c: [[c.python, BENCH, "backbone", "--backbones", c.sizes.backbone, "--engines", "plain",
                                  "zero2", "zero2_offload_cpu", "--batch-size", str(c.sizes.batch_size),
                                  "--image-size", str(c.sizes.image_size), "--dim", str(c.sizes.dim), "--warmup",
                                  str(c.sizes.backbone_warmup), "--steps", str(c.sizes.backbone_steps), "--out",
                                  str(c.out / "backbone.jsonl"), *c.sizes.extra_backbone]]),
        Step(name="in_gpu_1m", what="the in-GPU baselines fc and pfc_dense at 1M ids", est_s=55, dry_s=7,
             out="in_gpu.jsonl",
             commands=lambda c: [_bench_train(c, n_m=1, heads=["fc", "pfc_dense"], labels=["uniform"],
                                              out="in_gpu.jsonl")]),
        Step(name="in_gpu_largest", what="fc and pfc_dense at the largest N that fits the time left (an oom row "
             "is an answer too)", est_s=0, dry_s=0, out="in_gpu.jsonl", optional=True,
             commands=lambda c: [], plan=plan_largest_in_gpu),
    ]


def gate(est: float, remaining: float, reserve: float = 0.0) -> str | None:
    """``None`` when a step of estimate ``est`` may start with ``remaining`` seconds left and ``reserve`` seconds
    kept for the required steps after it; else why it is skipped."""
    if est + reserve <= remaining:
        return None
    kept = f" + {reserve:.0f} s kept for the required steps after it" if reserve else ""
    return f"no time: needs {est:.0f} s{kept}, {remaining:.0f} s left"


def _limit(est: float, sizes: Sizes) -> float:
    """A step's own limit: generous, since the estimates are guesses until the first GPU run calibrates them."""
    return 2 * est + 30 if sizes.device == "cuda" else max(4 * est, est + 120)


def _run_commands(cmds: Commands, *, limit_s: float, log: TextIO, env: dict[str, str], t0: float) -> tuple[str, int]:
    """Runs ``cmds`` in turn, each in its own process group, within ``limit_s`` for all; returns (status, rc)."""
    deadline = time.monotonic() + limit_s
    for argv in cmds:
        log.write(f"--- [{time.monotonic() - t0:7.1f} s] $ {' '.join(_short(a) for a in argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            log.write(f"--- killed at the step's limit ({limit_s:.0f} s)\n")
            return "timeout", -9
        if rc != 0:
            return "failed", rc
    return "ok", 0


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:  # the group may hold children that ignored it
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _short(arg: str) -> str:
    """An argument as a log line shows it: a script (``-c``) as its first line, anything with spaces quoted."""
    if "\n" in arg or len(arg) > 200:
        first = next((line for line in arg.splitlines() if line.strip()), "")
        return f"'{first[:60]} ...'"
    return arg if arg and not any(ch in arg for ch in " '\"") else "'" + arg + "'"


_SUMMARY = ("head", "engine", "num_classes", "num_slots", "variant", "labels", "status", "images_per_s",
            "ratio_to_backbone_only", "head_share", "step_ms_p50", "peak_device_GiB", "prefetch_stall_pct",
            "device_memory_GiB", "error", "reason")


def _summary(row: dict[str, Any]) -> str:
    cells = []
    for key in _SUMMARY:
        value = row.get(key)
        if value in (None, "") or (key == "device_memory_GiB" and not value):
            continue
        cells.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={str(value)[:160]}")
    return " ".join(cells)


def _new_rows(path: Path, offset: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as fh:
        fh.seek(offset)
        rows = []
        for line in fh.read().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


def _env(sizes: Sizes, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it on the CPU: interpreted kernels, minutes per step
    path = ([SITE] if sizes.device == "cuda" else []) + [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    if sizes.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        env.pop("OFFLOADFR_TEST_DEVICE", None)
    else:
        if env.get("DS_ACCELERATOR") == "cpu":  # left over from a CPU shell: DeepSpeed would ignore the GPU
            env.pop("DS_ACCELERATOR")
        env.update(extra)
    return env


def run_steps(steps: Sequence[Step], ctx: Context, *, budget_s: float, t0: float | None = None,
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Runs ``steps`` in order within ``budget_s`` seconds from ``t0``; appends one record per step to
    ``steps.jsonl`` as it goes and returns the records."""
    t0 = time.monotonic() if t0 is None else t0
    records: list[dict[str, Any]] = []
    aborted = ""
    for i, step in enumerate(steps):
        elapsed = time.monotonic() - t0
        remaining = budget_s - elapsed
        rec: dict[str, Any] = {"what": "step", "step": step.name, "question": step.what, "started_s": round(elapsed, 1),
                               "optional": step.optional}
        est = step.estimate(ctx.sizes)
        cmds: Commands = []
        reason: str | None = aborted or None
        if not reason and step.plan is not None:
            try:
                est, cmds, rec["plan"] = step.plan(ctx, remaining)
            except NoTime as err:
                reason = str(err)
        elif not reason:
            cmds = step.commands(ctx)
        reserve = sum(s.estimate(ctx.sizes) for s in steps[i + 1:] if not s.optional) if step.optional else 0.0
        rec["est_s"] = round(est, 1)
        if not reason:
            reason = gate(est, remaining, reserve)
        echo(f"[{elapsed:6.1f} s] {step.name}: " + (f"skipped ({reason})" if reason else
                                                     f"start (estimate {est:.0f} s, {remaining:.0f} s left)"))
        if reason:
            rec.update(status="skipped", reason=reason, wall_s=0.0, rows=0)
            _append(ctx.out / "steps.jsonl", rec)
            records.append(rec)
            continue
        limit = min(_limit(est, ctx.sizes), remaining)
        out = ctx.out / step.out if step.out else None
        offset = out.stat().st_size if out and out.exists() else 0
        start = time.monotonic()
        with (ctx.out / step.log).open("a") as log:
            log.write(f"=== [{elapsed:7.1f} s] step {step.name} (estimate {est:.0f} s, limit {limit:.0f} s): "
                      f"{step.what}\n")
            if step.log != "log.txt":
                _append_text(ctx.out / "log.txt", f"=== [{elapsed:7.1f} s] step {step.name}: output in {step.log}\n")
            status, rc = _run_commands(cmds, limit_s=limit, log=log, env=_env(ctx.sizes, step.env), t0=t0)
        wall = time.monotonic() - start
        shutil.rmtree(ctx.banks, ignore_errors=True)  # a killed row leaves its bank behind
        ctx.banks.mkdir(parents=True, exist_ok=True)
        rows = _new_rows(out, offset) if out else []
        by_status: dict[str, int] = {}
        for row in rows:
            by_status[str(row.get("status"))] = by_status.get(str(row.get("status")), 0) + 1
        rec.update(status=status, rc=rc, limit_s=round(limit, 1), wall_s=round(wall, 1), rows=len(rows),
                   rows_by_status=by_status, commands=[" ".join(_short(a) for a in argv) for argv in cmds])
        if status == "ok":
            ctx.walls[step.name] = wall
        if step.name == "train_backbone_only":
            rates = [r["images_per_s"] for r in rows if r.get("head") == "backbone_only" and r.get("status") == "ok"]
            ctx.backbone_rate = rates[-1] if rates else 0.0
        if step.log != "log.txt":
            rec["tail"] = _tail(ctx.out / step.log)
        _append(ctx.out / "steps.jsonl", rec)
        records.append(rec)
        echo(f"[{time.monotonic() - t0:6.1f} s] {step.name}: {status} in {wall:.1f} s (rc {rc}), {len(rows)} rows"
             + (f"; {rec['tail']}" if rec.get("tail") else ""))
        for row in rows:
            echo("    " + _summary(row))
        if status != "ok" and step.abort:
            aborted = f"not run: step {step.name} {status}"
            echo(f"    {step.name} {status}: the later steps cannot run; the end of {step.log}:")
            for line in _tail(ctx.out / step.log, lines=15).splitlines():
                echo("      " + line)
    return records


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _append(path: Path, record: dict[str, Any]) -> None:
    _append_text(path, json.dumps(record) + "\n")


def _append_text(path: Path, text: str) -> None:
    with path.open("a") as fh:
        fh.write(text)


def _source() -> str:
    """The commit the checkout came from: ``.whl/SOURCE.txt`` (written by launch/gpu_wheels.sh; the box has no
    .git), else ``git describe``."""
    try:
        return (ROOT / ".whl" / "SOURCE.txt").read_text().strip()
    except OSError:
        pass
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    return git.stdout.strip() if git.returncode == 0 else "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                   help="every step at tiny sizes on the CPU (also GPU_CHECK_DRY_RUN=1)")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="where rows and logs go (default: $OUT)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds from the start by which every step has ended (default {BUDGET_S:.0f}; "
                   f"{DRY_BUDGET_S:.0f} with --dry-run)")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (in the usual order)")
    p.add_argument("--list", action="store_true", help="print the steps, their estimates and commands, run nothing")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    sizes = DRY if args.dry_run else GPU
    steps = make_steps()
    names = [s.name for s in steps]
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            p.error(f"--only {' '.join(unknown)}: no such step; the steps are {', '.join(names)}")
        steps = [s for s in steps if s.name in args.only]
    budget = args.budget if args.budget is not None else (DRY_BUDGET_S if args.dry_run else BUDGET_S)
    if args.list:
        ctx = Context(sizes=sizes, out=Path("$OUT"), banks=Path("/tmp/offloadfr-gpu-check-banks"), python="python3")
        total = 0.0
        for s in steps:
            est = s.estimate(sizes)
            total += est
            print(f"{s.name:22s} {est:5.0f} s{' optional' if s.optional else ''}  {s.what}")
            for cmd in ([] if s.plan else s.commands(ctx)):
                print("    " + " ".join(_short(a) for a in cmd))
        print(f"total of the estimates: {total:.0f} s; budget {budget:.0f} s")
        return 0
    if not args.out:
        if not args.dry_run:
            p.error("set OUT or pass --out: where the rows go")
        args.out = tempfile.mkdtemp(prefix="gpu-check-dry-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    banks = Path(tempfile.mkdtemp(prefix="offloadfr-gpu-check-banks-"))
    ctx = Context(sizes=sizes, out=out, banks=banks)
    mode = "dry-run (cpu, tiny sizes)" if args.dry_run else "gpu"
    print(f"gpu_check: {mode}, budget {budget:.0f} s, out {out}, source {_source()}", flush=True)
    _append(out / "steps.jsonl", {"what": "meta", "mode": "dry-run" if args.dry_run else "gpu", "budget_s": budget,
                                  "host": platform.node(), "python": platform.python_version(),
                                  "source": _source(), "steps": [s.name for s in steps]})
    try:
        records = run_steps(steps, ctx, budget_s=budget, t0=t0, echo=lambda line: print(line, flush=True))
    finally:
        shutil.rmtree(banks, ignore_errors=True)
    end = {"what": "end", "elapsed_s": round(time.monotonic() - t0, 1),
           "statuses": {r["step"]: r["status"] for r in records}}
    _append(out / "steps.jsonl", end)
    print(f"[{end['elapsed_s']:6.1f} s] done: " + ", ".join(f"{k} {v}" for k, v in end["statuses"].items()),
          flush=True)
    if any(r["status"] in ("failed", "timeout") and r["step"] == "setup" for r in records):
        return 3
    return 1 if any(r["status"] in ("failed", "timeout") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
