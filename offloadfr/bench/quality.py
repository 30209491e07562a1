"""``python launch/bench.py quality``: every head and margin trained on the same data for the same images seen.

Each configuration is a real training run: ``launch/train.py`` in its own subprocess, on the run config
``--config`` (default ``ds_configs/runs/synth_tiny.toml``, README's main command), with only ``--set`` overrides
changed. A configuration is a head with the config's margin, or the ``fc`` head with another margin. A head also gets
its own defaults (its sampler and the settings it learns with, :mod:`offloadfr.config.head_defaults`) and the
benchmark's :data:`BENCH_OVERRIDES`. After each run, one JSON row is appended to ``--out``:
verification accuracy ± fold std and TAR@FAR=1e-2 (from the run's ``eval.json``), mean step time, peak memory, images
seen, wall time, the overrides, the versions and the bench command. ``--table`` (re)writes the markdown table from
the JSONL; a run also rewrites it after each row.

**Images seen** are the training images that went through the trained backbone with a gradient: ``train.batch_size``
per step (the queries of ``attention`` batches, the instance part of ``dual`` batches, the P×K images of ``identity``
batches), so every row trains ``steps = images // batch_size`` steps (``train.max_steps``; ``train.epochs`` is set
so that it never binds, and the schedule spans exactly these steps). Images that only a no-gradient encoder reads (the
key images of ``attfc``, the identity part of ``dual`` batches) are not counted; the row gives them in
``images_decoded``. (F2C's symmetric two-pass form also passes the identity part through the trained network; its
row still counts ``train.batch_size`` per step, the sampler's own batch size, so that every row has the same steps.)
``--epochs E`` asks for E × (images in the training set) images seen.

Each row's ``peak_host_rss_GiB`` is the largest resident set of the trainer process or one of its data workers
(``os.wait4``'s ``ru_maxrss``); ``peak_device_reserved_GiB`` is the trainer's own ``memory/max_reserved(GiB)`` metric
(CUDA only). ``step_ms_mean`` comes from the trainer's logged throughput, leaving out the first logging window (worker
start-up).

Example (the committed CPU table, then the dcp rows added later without rerunning the others)::

    python launch/bench.py quality --epochs 1 --machine cpu-2core_202611
    python launch/bench.py quality --epochs 1 --machine cpu-2core_202611 --resume

Example (the CI size, on a tiny dataset)::

    python launch/bench.py quality --epochs 1 --heads fc --margins cosface --runs-dir /tmp/q --out /tmp/q.jsonl \\
        --md /tmp/q.md --set data.path=/tmp/tiny --set synth.num_identities=24 --set train.batch_size=16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

from offloadfr.bench.rows import environment, markdown_table
from offloadfr.config import Config, HeadCfg, LossCfg, load_config
from offloadfr.errors import OffloadFRError

__all__ = ["BENCH_OVERRIDES", "DEFAULT_MARGINS", "head_kinds", "margin_kinds", "plan_configs", "read_rows",
           "render_table", "row_overrides", "main"]

_ROOT = Path(__file__).resolve().parents[2]  # the checkout: launch/train.py and ds_configs/ are relative to it

BENCH_OVERRIDES: dict[str, tuple[str, ...]] = {
    "partial_fc": ("cache.num_slots=1024",),  # as ds_configs/runs/synth_tiny_pfc_ram.toml: K < N, so it offloads
}
"""What the benchmark sets besides ``head.kind`` and the head's own defaults (its sampler, gradient form, EMA rates,
...: :mod:`offloadfr.config.head_defaults`). ``--head-kind-only`` leaves these out, so that each row is exactly
``offloadfr train --set head.kind=H``."""

DEFAULT_MARGINS = ("arcface", "cosface", "adasin")
"""The margins compared on the ``fc`` head by default."""

_NOT_BY_DEFAULT = ("pfc_dense",)
"""Head kinds left out of the default ``--heads``: ``pfc_dense`` is arcface_torch's baseline of ``partial_fc`` and
equals ``fc`` at its default sample rate of 1."""


def head_kinds() -> list[str]:
    """Every ``head.kind`` the config accepts (its Literal), in declaration order."""
    return list(typing.get_args(typing.get_type_hints(HeadCfg)["kind"]))


def margin_kinds() -> list[str]:
    """Every ``loss.kind`` the config accepts."""
    return list(typing.get_args(typing.get_type_hints(LossCfg)["kind"]))


def plan_configs(heads: list[str], margins: list[str], base_margin: str, *,
                 bench_overrides: bool = True) -> list[dict[str, Any]]:
    """The configurations: each head with the config's margin, then ``fc`` with each margin; duplicates once.

    Args:
        heads: head kinds, each with ``base_margin``.
        margins: margins, each on ``fc``.
        base_margin: the run config's ``loss.kind``.
        bench_overrides: add :data:`BENCH_OVERRIDES` (false: ``head.kind`` and ``loss.kind`` alone).

    Returns:
        ``{"name", "head", "margin", "overrides"}`` dicts, ``name`` = ``"<head>+<margin>"``.
    """
    pairs = [(h, base_margin) for h in heads] + [("fc", m) for m in margins]
    out, seen = [], set()
    for head, margin in pairs:
        if (head, margin) in seen:
            continue
        seen.add((head, margin))
        extra = BENCH_OVERRIDES.get(head, ()) if bench_overrides else ()
        overrides = [f"head.kind={head}", *extra, f"loss.kind={margin}"]
        out.append({"name": f"{head}+{margin}", "head": head, "margin": margin, "overrides": overrides})
    return out


def _images_per_step(cfg: Config) -> tuple[int, int]:
    """(images the trainer counts per step in its throughput = labels per batch, images decoded per step)."""
    b, sampler = cfg.train.batch_size, cfg.data.sampler
    if sampler == "dual":
        p = cfg.data.dual_identities or max(1, b // cfg.data.images_per_identity)
        return b + p * cfg.data.images_per_identity, b + p * cfg.data.images_per_identity
    if sampler == "attention":
        return b, b * (1 + cfg.data.num_keys)
    return b, b


def default_machine() -> str:
    """A short machine name for file names: ``cpu-<cores>core`` or the GPU's name, e.g. ``nvidia-h200``."""
    import torch

    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of a JSONL file ([] when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two rows the same measurement, for ``--resume``."""
    return (row["name"], row.get("seed"), row["config"], row["steps"], row["batch_size"],
            tuple(row["extra_overrides"]))


def _step_ms_mean(metrics: list[dict[str, Any]], labels_per_step: int) -> float | None:
    """Mean step time from the logged throughput windows, without the first one (worker start-up)."""
    total_s, total_steps, prev = 0.0, 0, 0
    for i, m in enumerate(metrics):
        steps = m["step"] - prev
        prev = m["step"]
        thr = m.get("throughput(img/s)", 0.0)
        if i == 0 or steps <= 0 or not thr:
            continue
        total_s += steps * labels_per_step / thr
        total_steps += steps
    if total_steps == 0:  # a run of one logging window: use it
        if not metrics or not metrics[0].get("throughput(img/s)"):
            return None
        return 1e3 * labels_per_step / metrics[0]["throughput(img/s)"]
    return 1e3 * total_s / total_steps


def row_overrides(spec: dict[str, Any], extra: list[str], *, seed: int | None, steps: int, runs_dir: str,
                  run_name: str) -> list[str]:
    """The ``--set`` list of one row, later entries winning: the bench's defaults (:data:`BENCH_OVERRIDES`), the
    command's ``--set`` (``extra``), the seed, the row's ``head.kind`` and ``loss.kind``, then the budget and the run
    directory."""
    kinds = [o for o in spec["overrides"] if o.startswith(("head.kind=", "loss.kind="))]
    defaults = [o for o in spec["overrides"] if o not in kinds]
    seed_sets = [] if seed is None else [f"run.seed={seed}"]
    return [*defaults, *extra, *seed_sets, *kinds, f"train.max_steps={steps}", f"train.epochs={steps}",
            f"run.output_dir={runs_dir}", f"run.name={run_name}", "eval.at_end=true"]


def run_one(spec: dict[str, Any], *, config: str, extra: list[str], steps: int, runs_dir: str,
            num_samples: int, seed: int | None = None) -> dict[str, Any]:
    """Trains one configuration through ``launch/train.py`` in a subprocess; returns its row (status ok or error).

    ``seed``: ``run.seed`` of the run (its run directory is then ``<name>_seed<seed>``); None: the config's."""
    run_name = spec["name"] if seed is None else f"{spec['name']}_seed{seed}"
    run_dir = Path(runs_dir) / run_name
    sets = row_overrides(spec, extra, seed=seed, steps=steps, runs_dir=runs_dir, run_name=run_name)
    try:
        cfg = load_config(config, sets)  # a bad combination is refused here, with the trainer's own message
    except OffloadFRError as exc:
        return {"bench": "quality", "name": spec["name"], "seed": seed, "head": spec["head"],
                "margin": spec["margin"], "sampler": "", "config": config, "extra_overrides": list(extra),
                "overrides": list(spec["overrides"]),
                "steps": steps, "batch_size": None, "images_seen": None, "images_decoded": None, "status": "error",
                "error": str(exc)}
    labels_per_step, decoded_per_step = _images_per_step(cfg)
    cmd = [sys.executable, str(_ROOT / "launch/train.py"), "--config", config]
    for s in sets:
        cmd += ["--set", s]
    for stale in ("eval.json", "metrics.jsonl"):  # a previous run of this name must not be read as this one's
        (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "bench_stdout.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (and its waited-for data workers')
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {
        "bench": "quality", "name": spec["name"], "seed": cfg.run.seed, "head": spec["head"],
        "margin": spec["margin"], "sampler": cfg.data.sampler, "config": config, "extra_overrides": list(extra),
        "overrides": list(spec["overrides"]), "steps": steps, "batch_size": cfg.train.batch_size,
        "images_seen": steps * cfg.train.batch_size, "images_decoded": steps * decoded_per_step,
        "epochs_seen": steps * cfg.train.batch_size / num_samples, "wall_s": wall,
        "peak_host_rss_GiB": usage.ru_maxrss / 2**20, "run_dir": str(run_dir),
        "loss_cfg": {k: getattr(cfg.loss, k) for k in ("s", "arcface_m", "cosface_m", "adasin_m", "arcface_grad")},
    }
    eval_path = run_dir / "eval.json"
    if proc.returncode != 0 or not eval_path.exists():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return {**row, "status": "error", "returncode": proc.returncode, "error": lines[-1] if lines else ""}
    ev = json.loads(eval_path.read_text())
    ev = ev["packs"][0] if "packs" in ev else ev
    metrics = read_rows(run_dir / "metrics.jsonl")
    device_peaks = [m["memory/max_reserved(GiB)"] for m in metrics if "memory/max_reserved(GiB)" in m]
    row.update({
        "status": "ok", "steps_trained": ev.get("step"), "accuracy": ev["accuracy"],
        "accuracy_std": ev["accuracy_std"], "tar_at_far_1e-2": ev["tar_at_far"].get("1e-2"),
        "tar_at_far": ev["tar_at_far"], "final_loss": metrics[-1]["loss"] if metrics else None,
        "step_ms_mean": _step_ms_mean(metrics, labels_per_step),
    })
    if device_peaks:
        row["peak_device_reserved_GiB"] = max(device_peaks)
    return row


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _seed_summary(newest: dict[tuple[str, Any], dict[str, Any]]) -> list[str]:
    """One line per configuration over its seeds: each seed's accuracy, the mean, and the mean minus the reference's
    (``fc`` with the margin of the first ``fc`` row), in points."""
    by_name: dict[str, dict[Any, dict[str, Any]]] = {}
    for (name, seed), r in newest.items():
        if r.get("status") == "ok":
            by_name.setdefault(name, {})[seed] = r
    seeds = sorted({seed for runs in by_name.values() for seed in runs}, key=lambda x: (x is None, x))
    if len(seeds) < 2:
        return []
    means = {name: sum(r["accuracy"] for r in runs.values()) / len(runs) for name, runs in by_name.items()}
    ref = next((r["name"] for r in newest.values() if r["head"] == "fc" and r["name"] in means), None)
    cols = ["config", "sampler", *[f"seed {seed}" for seed in seeds], "mean", f"vs {ref} (points)" if ref else "vs",
            "lowest seed", "TAR@FAR=1e-2 (mean)", "images decoded / seen", "wall s (mean)"]
    cells_of_rows = []
    for name, runs in by_name.items():
        first = next(iter(runs.values()))
        accs = [r["accuracy"] for r in runs.values()]
        tars = [r["tar_at_far_1e-2"] for r in runs.values() if r.get("tar_at_far_1e-2") is not None]
        cells = [name, first["sampler"],
                 *[f"{runs[seed]['accuracy']:.3f} ± {runs[seed]['accuracy_std']:.3f}" if seed in runs else ""
                   for seed in seeds],
                 f"{means[name]:.3f}", f"{100 * (means[name] - means[ref]):+.1f}" if ref else "", f"{min(accs):.3f}",
                 f"{sum(tars) / len(tars):.3f}" if tars else "",
                 _fmt(first["images_decoded"] / first["images_seen"] if first["images_seen"] else None, ".0f"),
                 _fmt(sum(r["wall_s"] for r in runs.values()) / len(runs), ".0f")]
        cells_of_rows.append(dict(zip(cols, cells, strict=True)))
    return ["Over seeds (`run.seed`: model init and data order; the dataset and the held-out pairs are the same):", "",
            *markdown_table(cols, cells_of_rows), "", "Every run:", ""]


def render_table(rows: list[dict[str, Any]], machine: str) -> str:
    """The markdown page of a quality JSONL: the machine, the versions, the commands, the configurations over their
    seeds (when rows have several), one line per run (the newest row of each configuration and seed), and each
    configuration's overrides."""
    newest: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in rows:
        newest[(r["name"], r.get("seed"))] = r
    lines = [f"# Quality benchmark: heads and margins on the same data ({machine})", "",
             "Written by `python launch/bench.py quality --table` from the JSONL next to this file; every row is one "
             "training run through `launch/train.py` (offloadfr/bench/quality.py says what each column is). "
             "Images seen = images through the trained backbone with a gradient (`train.batch_size` per step); "
             "`images decoded` adds the images only a no-gradient encoder reads (attfc's keys, dual's identity part). "
             "Accuracy is 10-fold verification on the held-out pairs with the flip test, ± the std over folds. "
             "Step and wall times compare rows only when the machine ran nothing else meanwhile.", ""]
    envs = {json.dumps(r.get("env", {}), sort_keys=True) for r in newest.values()}
    lines.append("Machine and versions:")
    lines.append("")
    for env in sorted(envs):
        lines.append("- " + ", ".join(f"{k} {v}" for k, v in json.loads(env).items()))
    lines += ["", "Commands:", "", "```bash"]
    lines += sorted({r.get("command", "") for r in newest.values()})
    lines += ["```", ""]
    lines += _seed_summary(newest)
    cols = ["config", "seed", "head", "margin", "sampler", "accuracy ± std", "TAR@FAR=1e-2", "step ms (mean)",
            "peak host RSS GiB", "peak device GiB", "images seen", "images decoded", "steps", "wall s", "status"]
    cells_of_rows = []
    for r in newest.values():
        acc = f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}" if r.get("status") == "ok" else ""
        cells = [r["name"], _fmt(r.get("seed"), "d"), r["head"], r["margin"], r["sampler"], acc,
                 _fmt(r.get("tar_at_far_1e-2")), _fmt(r.get("step_ms_mean"), ".0f"),
                 _fmt(r.get("peak_host_rss_GiB"), ".2f"), _fmt(r.get("peak_device_reserved_GiB"), ".2f"),
                 _fmt(r["images_seen"], "d"), _fmt(r["images_decoded"], "d"), _fmt(r["steps"], "d"),
                 _fmt(r.get("wall_s"), ".0f"), r["status"] + (f": {r['error']}" if "error" in r else "")]
        cells_of_rows.append(dict(zip(cols, cells, strict=True)))
    lines += markdown_table(cols, cells_of_rows)  # every cell is already text
    lines += ["", "Overrides of each configuration (`--set`, on top of the config and of the commands' `--set`):", ""]
    overrides = {r["name"]: r for r in newest.values()}
    for r in overrides.values():
        loss = ", ".join(f"{k} {v}" for k, v in r.get("loss_cfg", {}).items())
        lines.append(f"- `{r['name']}`: " + " ".join(f"`{o}`" for o in r["overrides"]) + (f" (loss: {loss})"
                                                                                          if loss else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``quality`` subcommand of launch/bench.py."""
    kinds, margins = head_kinds(), margin_kinds()
    p = argparse.ArgumentParser(prog="bench.py quality", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="ds_configs/runs/synth_tiny.toml", help="the run config every row starts from")
    p.add_argument("--heads", nargs="+", choices=kinds, default=[k for k in kinds if k not in _NOT_BY_DEFAULT],
                   help="heads, each with the config's margin (default: every head.kind but pfc_dense)")
    p.add_argument("--margins", nargs="*", choices=margins, default=list(DEFAULT_MARGINS),
                   help="margins, each on the fc head (--margins alone: none)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--epochs", type=float, default=None,
                      help="images seen per row = this many times the training set (default 2)")
    size.add_argument("--images", type=int, default=None, help="images seen per row (rounded down to whole steps)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="an override for every row (e.g. a smaller dataset); it wins over the bench's own "
                        "BENCH_OVERRIDES, not over a row's head.kind and loss.kind")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="train every configuration once per run.seed (the table adds their mean; default: the "
                        "config's seed, once)")
    p.add_argument("--machine", default=None, help="machine name in the file names (default: cpu-<N>core or GPU)")
    p.add_argument("--out", default=None, help="JSONL to append to (default docs/benchmarks/quality_<machine>.jsonl)")
    p.add_argument("--md", default=None, help="table to (re)write (default: --out with .md)")
    p.add_argument("--runs-dir", default="runs/quality", help="parent of the rows' run directories")
    p.add_argument("--resume", action="store_true", help="skip configurations with an ok row in --out")
    p.add_argument("--head-kind-only", action="store_true",
                   help="rows set only head.kind (and loss.kind): what a user gets, without BENCH_OVERRIDES")
    p.add_argument("--table", action="store_true", help="only (re)write --md from --out; train nothing")
    args = p.parse_args(argv)
    machine = args.machine or default_machine()
    out = Path(args.out or f"docs/benchmarks/quality_{machine}.jsonl")
    md = Path(args.md) if args.md else out.with_suffix(".md")
    if args.table:
        md.write_text(render_table(read_rows(out), machine))
        print(f"wrote {md}", file=sys.stderr)
        return 0

    base = load_config(args.config, args.set)
    from offloadfr.train.trainer import ensure_dataset

    num_samples = ensure_dataset(base).num_samples  # generated here (once) when missing, as the trainer would
    images = args.images if args.images is not None else int((args.epochs or 2.0) * num_samples)
    steps = images // base.train.batch_size
    if steps < 1:
        print(f"bench.py quality: {images} images is less than one batch of {base.train.batch_size}; raise --epochs "
              "or --images", file=sys.stderr)
        return 2
    command = "python launch/bench.py quality " + " ".join(argv)
    env = environment()
    done = {_row_key(r) for r in read_rows(out) if r.get("status") == "ok"} if args.resume else set()
    failed = 0
    specs = plan_configs(args.heads, args.margins, base.loss.kind, bench_overrides=not args.head_kind_only)
    for seed, spec in [(seed, spec) for seed in (args.seeds or [None]) for spec in specs]:
        label = spec["name"] if seed is None else f"{spec['name']} seed {seed}"
        key = (spec["name"], base.run.seed if seed is None else seed, args.config, steps, base.train.batch_size,
               tuple(args.set))
        if key in done:
            print(f"bench.py quality: {label}: already in {out}, skipped (--resume)", file=sys.stderr)
            continue
        print(f"bench.py quality: {label}: training {steps} steps ...", file=sys.stderr, flush=True)
        row = run_one(spec, config=args.config, extra=args.set, steps=steps, runs_dir=args.runs_dir,
                      num_samples=num_samples, seed=seed)
        row.update({"machine": machine, "command": command, "env": env})
        failed += row["status"] != "ok"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        md.write_text(render_table(read_rows(out), machine))
    return 1 if failed else 0
