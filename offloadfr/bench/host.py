"""``python launch/bench.py host``: the host side of a bank-backed head's step at GPU rates, with the device's
compute replaced by a wait of T ms.

On a GPU a step of iresnet50 at B = 256 takes about 57 ms; everything the host does per step must fit beside it or
the GPU waits. On a CPU the compute of a step takes seconds, so ``bench.py train`` cannot tell. This bench runs the
real host path of ``partial_fc`` (``head.kind = "partial_fc"``) without the compute:

    plan(labels of step t + L)   # the head's plan: positives + rotating negatives, Prefetcher.submit (real)
    ready(t)                     # the prefetcher: wait for step t's rows (the stall), evict, admit (real)
    wait T ms                    # the device step (logits, loss, backward, row update, backbone) in its place
    skip()                       # the head's step counter moves on; the evicted rows were queued for write-back

exactly as the trainer calls them (``trainer.with_lookahead`` plans L = ``cache.lookahead`` batches ahead); with
``--heads dcp attfc``, the same for the bank mode of those heads (``head.bank_negatives = n``, ``--bank-negatives``):
their ``CenterBank`` (heads/center_bank.py) plans the batch's identities plus the next n ids of its rotation
pointer, every id marked seen (the steady state after the first epoch), and its ``skip`` ends the step. The
prefetcher's worker reads the bank and writes evicted rows back while the main thread waits, as it would while the
GPU computes. What a GPU does that this bench does not: the row update changes values, not bytes moved (evicted rows
are written back whether they changed or not). What it does that a GPU would not: the container is on the CPU, so
the gathers of evicted rows and the copies of admitted rows (on a GPU, device kernels and DMA) run on the main
thread; the bench times them (``container_ms``: the container's ``admit`` and ``evict``, and the rounding of evicted
rows to a bfloat16 bank) and counts them inside the
T ms of the device step (the wait is shortened by them), so ``boundary_ms`` is the host's own work. They still take
memory bandwidth and a core from the worker, so the stall is if anything overstated. And buffers: a GPU run reuses
its pinned and device buffers through PyTorch's caching allocators; here glibc is told to keep freed memory
(:func:`_keep_freed_memory`) so that the CPU's stand-ins are not page-faulted anew every step.

Labels come from ``bench.train.make_labels`` (``uniform``, ``grouped``, ``block``: the samplers' orders). The bank is
``fresh`` (created empty in a temporary directory under ``--bank-dir``: a block touched for the first time comes from
the initialiser, as in a run's first epoch) or ``warm`` (the state after the first epoch: on the ``ram`` tier every
block is made resident before the timed steps; on the ``nvme`` tier every block is stored, in a bank made once under
``--warm-bank-dir`` by :func:`prepare_warm_bank` and reused by later rows; opening it discards the journal a
previous row left, so each row starts from the same stored state).

A row, over ``steps`` timed steps after ``warmup``: ``steps_per_s`` against the ideal ``1000 / T``;
``device_idle_pct`` (the share of the wall time the GPU would not be computing: ``100 * (1 - steps * T / wall)``);
``prefetch_stall_pct`` (the head's ``prefetch/stall(%)``: time ``ready`` waited for rows); ``boundary_ms`` (the
main thread's time per step outside the wait and the stall: ``plan`` and ``ready``'s evict and admit); the worker
thread's busy time (``fetch_busy_pct``, ``write_busy_pct``, and ``worker_ms_per_step``: what one step's reads and
write-backs took it; below T, one free core keeps up); bytes per second through the prefetcher
(``bank_read_Bps``, ``bank_written_Bps``) and to and from the store (``storage_read_Bps``, ``storage_written_Bps``:
whole blocks), blocks made by the initialiser per second; ``cpu_cores_used`` (CPU time of all the process's threads
over the wall time) and ``main_thread_cores``; peak host RSS. Each configuration runs in its own process.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from offloadfr.bench.rows import emit_row, environment, markdown_table, row_commands, run_in_own_process

__all__ = ["bench_one", "main", "prepare_warm_bank", "table", "HOST_COLUMNS", "BANK_STATES"]

BANK_STATES = ("fresh", "warm")
"""How the bank starts a row (module docstring)."""

_ARRAYS = ("centers", "momentum")  # partial_fc's rows


def bank_arrays(head_kind: str) -> tuple[str, ...]:
    """The arrays of a head's bank: centers and momentum for ``partial_fc``, centers for a center bank."""
    return _ARRAYS if head_kind == "partial_fc" else ("centers",)


def warm_bank_path(root: str | Path, *, num_classes: int, dim: int, dtype: str, chunk_rows: int,
                   head_kind: str = "partial_fc") -> Path:
    """Where :func:`prepare_warm_bank` keeps the warm bank of these sizes under ``root``."""
    return Path(root) / f"{head_kind}-n{num_classes}-d{dim}-{dtype}-r{chunk_rows}"


def prepare_warm_bank(path: Path, *, num_classes: int, dim: int, dtype: str, chunk_rows: int, seed: int,
                      init_std: float, head_kind: str = "partial_fc", progress: bool = True) -> float:
    """Makes a bank of ``head_kind`` at ``path`` whose every block is stored (its initial rows, written once and
    committed at step 0), unless one is there already; returns the seconds it took (0 when it existed).

    The blocks go through the bank's own write path (whole blocks staged in the journal, then committed by moving the
    journal's files), ``chunk_rows`` ids at a time.
    """
    import torch
    from tqdm import tqdm

    from offloadfr.bank.zarr_bank import ZarrBank

    if (path / "zarr.json").exists():
        return 0.0
    started = time.perf_counter()
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    arrays = bank_arrays(head_kind)
    bank = ZarrBank.create(tmp, num_classes=num_classes, dim=dim, arrays=arrays, head_kind=head_kind,
                           chunk_rows=chunk_rows, seed=seed, init_std=init_std, tier="nvme", cache_blocks=8,
                           dtype=dtype)
    try:
        blocks = range(0, num_classes, bank.chunk_rows)
        for lo in tqdm(blocks, desc=f"warm bank {path.name}", unit="block", disable=not progress, mininterval=2):
            ids = torch.arange(lo, min(lo + bank.chunk_rows, num_classes))
            for name in arrays:
                bank.write_rows(ids, bank.read_rows(ids, name), name)
        bank.flush(0)
    finally:
        bank.close()
    tmp.rename(path)
    return time.perf_counter() - started


def _resolve_config(spec: dict[str, Any]) -> Any:
    """The run config of one row: ``--config`` and ``--set``, then the bench's own settings on top."""
    from offloadfr.config import load_config

    cfg = load_config(spec["config_file"] or None, list(spec["overrides"]))
    r = dataclasses.replace
    kind = spec.get("head", "partial_fc")
    negatives = spec.get("bank_negatives", 0) if kind != "partial_fc" else 0
    return r(cfg, model=r(cfg.model, embedding_size=spec["dim"]),
             train=r(cfg.train, batch_size=spec["batch_size"]), run=r(cfg.run, device="cpu"),
             head=r(cfg.head, kind=kind, bank_negatives=negatives),
             bank=r(cfg.bank, tier=spec["tier"], dtype=spec["bank_dtype"] or cfg.bank.dtype),
             cache=r(cfg.cache, num_slots=spec["num_slots"]))


def _build_bank_path(cfg: Any, num_classes: int, bank_path: Path) -> Any:
    """What the bench drives: the ``partial_fc`` head, or the ``CenterBank`` of ``dcp`` / ``attfc`` in bank mode
    (the part of those heads that reads and writes the bank; the rest of them is device compute) with every id seen
    (the steady state after the first epoch). Both have ``bank``, ``dcc``, ``prefetcher``, ``num_steps``, ``plan``,
    ``skip`` and ``metrics``."""
    import numpy as np
    import torch

    from offloadfr.heads import HeadDeps, build_head
    from offloadfr.heads.center_bank import CenterBank
    from offloadfr.losses import build_margin

    deps = HeadDeps(margin=build_margin(cfg.loss), num_classes=num_classes, dim=cfg.model.embedding_size,
                    device=torch.device("cpu"), bank=cfg.bank, cache=cfg.cache, bank_path=bank_path,
                    precision=torch.float32)
    if cfg.head.kind == "partial_fc":
        return build_head(cfg.head, deps)
    center_bank = CenterBank(deps, head_kind=cfg.head.kind, num_negatives=cfg.head.bank_negatives)
    center_bank.mark_seen(np.arange(num_classes))
    return center_bank


def _make_resident(bank: Any, num_classes: int) -> None:
    """Touches every block of a ram-tier bank (the state after an epoch: every block made or loaded)."""
    import torch

    step = max(bank.chunk_rows, 1 << 20)
    for lo in range(0, num_classes, step):
        ids = torch.arange(lo, min(lo + step, num_classes))
        for name in bank.arrays:
            bank.read_rows(ids, name)


def _keep_freed_memory() -> bool:
    """Makes glibc's malloc serve every allocation from its heap and keep what is freed (``M_MMAP_MAX = 0``,
    ``M_TRIM_THRESHOLD`` 64 GiB), so a buffer of the same size allocated again next step is not page-faulted anew.

    It stands for the caching allocators of a GPU run: there the fetched rows are pinned buffers (PyTorch's caching
    host allocator) and the container's gathers and copies are device tensors (the CUDA caching allocator), both
    reused from step to step; on the CPU each 40 MB buffer would otherwise be a fresh mmap and 10 k page faults
    (a 20 k-row ``index_select`` of 512 floats: 55 ms into a fresh tensor, 17 ms into a reused one, on the CPU VM).
    Returns whether it took effect (False off glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 36))


def bench_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one configuration in this process; returns its JSON row."""
    malloc_kept = _keep_freed_memory()
    cfg = _resolve_config(spec)
    n = spec["num_classes"]
    fresh_root = None
    if spec["bank_state"] == "warm" and cfg.bank.tier == "nvme":
        bank_path = Path(spec["warm_bank_path"])
    else:
        fresh_root = Path(tempfile.mkdtemp(prefix="offloadfr-bench-host-", dir=spec["bank_dir"] or None))
        bank_path = fresh_root / "bank"
    try:
        head = _build_bank_path(cfg, n, bank_path)
        try:
            if spec["bank_state"] == "warm" and cfg.bank.tier == "ram":
                _make_resident(head.bank, n)
            row = _measure(spec, cfg, head)
        finally:
            head.close()
    finally:
        if fresh_root is not None:
            shutil.rmtree(fresh_root, ignore_errors=True)
    row["malloc_keeps_freed"] = malloc_kept
    row["config"] = {k: dataclasses.asdict(cfg)[k] for k in ("head", "bank", "cache")}
    return row


def _measure(spec: dict[str, Any], cfg: Any, head: Any) -> dict[str, Any]:
    """The warmup and the timed steps (module docstring); returns the row without its config."""
    from offloadfr.bench.train import make_labels
    from offloadfr.train.trainer import with_lookahead

    warmup, steps, wait_s = spec["warmup"], spec["steps"], spec["device_ms"] / 1e3
    lookahead = cfg.cache.lookahead
    prefetcher, bank = head.prefetcher, head.bank
    labels = make_labels(spec["labels"], num_classes=spec["num_classes"], batch_size=spec["batch_size"],
                         num_batches=warmup + steps + lookahead, images_per_identity=spec["images_per_identity"],
                         block_rows=bank.chunk_rows, block_window=cfg.bank.cache_blocks, seed=cfg.run.seed)
    plan_s = [0.0]
    container_s = _time_container(head.dcc, prefetcher)

    def timed_plan(labels_B: Any) -> None:
        t0 = time.perf_counter()
        head.plan(labels_B)
        plan_s[0] += time.perf_counter() - t0

    batches = with_lookahead(((0, (None, y)) for y in labels), lookahead, timed_plan)

    def one_step() -> float:
        """One step; returns the seconds ``ready`` took (its wait included, its container work not)."""
        next(batches)  # plans step t + L (the trainer's lookahead), hands over step t's batch
        moved = container_s[0]
        t0 = time.perf_counter()
        prefetcher.ready(head.num_steps)
        t1 = time.perf_counter()
        moved = container_s[0] - moved  # device work on a GPU: part of the device step
        time.sleep(max(0.0, wait_s - moved - (time.perf_counter() - t1)))  # the device step
        head.skip()
        return t1 - t0 - moved

    for _ in range(warmup):
        one_step()
    head.metrics()  # the counters restart here
    before = bank.stats()
    plan_s[0] = container_s[0] = 0.0
    ready_s, step_ms = 0.0, []
    cpu0, thread0 = time.process_time(), time.thread_time()
    t_start = t_prev = time.perf_counter()
    for _ in range(steps):
        ready_s += one_step()
        now = time.perf_counter()
        step_ms.append((now - t_prev) * 1e3)
        t_prev = now
    wall = time.perf_counter() - t_start
    cpu, main_cpu = time.process_time() - cpu0, time.thread_time() - thread0
    m = head.metrics()
    after = bank.stats()
    stall_s = m["prefetch/stall(%)"] / 100.0 * wall
    block_bytes = bank.chunk_rows * bank.dim * bank.dtype.itemsize  # one block of one array: the unit of storage I/O
    step_ms.sort()
    row: dict[str, Any] = {
        "bench": "host", "status": "ok",
        **{k: v for k, v in spec.items() if k not in ("config_file", "warm_bank_path")},
        "steps_per_s": steps / wall, "ideal_steps_per_s": 1e3 / spec["device_ms"],
        "device_idle_pct": max(0.0, 100.0 * (1.0 - steps * wait_s / wall)),
        "prefetch_stall_pct": m["prefetch/stall(%)"],
        "boundary_ms": 1e3 * (plan_s[0] + ready_s - stall_s) / steps,
        "plan_ms": 1e3 * plan_s[0] / steps, "container_ms": 1e3 * container_s[0] / steps,
        "step_ms_p50": step_ms[len(step_ms) // 2], "step_ms_max": step_ms[-1],
        "fetch_busy_pct": m["prefetch/fetch_busy(%)"], "write_busy_pct": m["prefetch/write_busy(%)"],
        "worker_ms_per_step": (m["prefetch/fetch_busy(%)"] + m["prefetch/write_busy(%)"]) * 10.0 * wall / steps,
        "bank_read_Bps": m["bank/bytes_read"] / wall, "bank_written_Bps": m["bank/bytes_written"] / wall,
        "rows_read_per_step": m["bank/rows_read"] / steps,
        "cache_hit_pct": m["cache/hit_rate(%)"],
        "storage_read_Bps": (after["bank/blocks_loaded"] - before["bank/blocks_loaded"]) * block_bytes / wall,
        "storage_written_Bps": (after["bank/blocks_staged"] - before["bank/blocks_staged"]) * block_bytes / wall,
        "bank_blocks_initialised_per_s": (after["bank/blocks_initialised"] - before["bank/blocks_initialised"]) / wall,
        "cpu_cores_used": cpu / wall, "main_thread_cores": main_cpu / wall,
        "peak_host_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "block_rows": bank.chunk_rows, "bank_dtype": bank.dtype_name, "lookahead": lookahead,
        "io_threads": getattr(bank, "io_threads", None),
    }
    return row


def _time_container(dcc: Any, prefetcher: Any) -> list[float]:
    """Wraps the device work of ``ready`` with a timer: the container's ``admit`` and ``evict`` (its row copies and
    gathers, and the upcast of admitted rows) and the prefetcher's rounding of evicted rows to a narrower bank dtype
    (``_round``, a device op on a GPU); returns the one-element list their seconds add up in."""
    total = [0.0]

    def timed(method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - t0
        return call

    dcc.admit, dcc.evict = timed(dcc.admit), timed(dcc.evict)
    prefetcher._round = timed(prefetcher._round)  # noqa: SLF001 - device work on a GPU, counted as such
    return total


HOST_COLUMNS = ("head", "num_classes", "tier", "bank_state", "labels", "num_slots", "bank_dtype", "device_ms", "status",
                "steps_per_s", "device_idle_pct", "prefetch_stall_pct", "boundary_ms", "container_ms",
                "worker_ms_per_step", "bank_read_Bps", "storage_read_Bps", "storage_written_Bps",
                "bank_blocks_initialised_per_s", "cpu_cores_used", "peak_host_rss_GiB")
"""The columns of ``--table``."""


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of host rows (:data:`HOST_COLUMNS`; floats to 3 significant digits)."""
    return "\n".join(markdown_table(HOST_COLUMNS, rows))


def main(argv: list[str]) -> int:
    """``host`` subcommand of launch/bench.py: one subprocess per configuration; prints JSON rows."""
    done = row_commands(argv, bench="host", bench_one=bench_one, table=table)
    if done is not None:
        return done
    from offloadfr.bench.train import LABEL_ORDERS

    p = argparse.ArgumentParser(prog="bench.py host", description=__doc__.splitlines()[0])
    p.add_argument("--num-classes", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--heads", nargs="+", choices=["partial_fc", "dcp", "attfc"], default=["partial_fc"],
                   help="partial_fc, or the bank mode of dcp / attfc (their CenterBank, every id seen)")
    p.add_argument("--bank-negatives", type=int, default=16_384,
                   help="dcp / attfc: head.bank_negatives, the bank rows read per step")
    p.add_argument("--tiers", nargs="+", choices=["ram", "nvme"], default=["ram", "nvme"])
    p.add_argument("--labels", nargs="+", choices=LABEL_ORDERS, default=["uniform", "grouped", "block"])
    p.add_argument("--num-slots", type=int, nargs="+", default=[65_536], help="DCC slots K (cache.num_slots)")
    p.add_argument("--device-ms", type=float, nargs="+", default=[57.0],
                   help="T: the device step the wait stands for (57: iresnet50 at B = 256 on an H100)")
    p.add_argument("--bank-states", nargs="+", choices=BANK_STATES, default=["fresh"])
    p.add_argument("--bank-dtypes", nargs="+", choices=["float32", "bfloat16"], default=[""],
                   help="bank.dtype of the rows (default: the config's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--images-per-identity", type=int, default=4, help="K of grouped; images per id of block")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--bank-dir", default="", help="where fresh banks are made (an NVMe path for the nvme tier)")
    p.add_argument("--warm-bank-dir", default="",
                   help="where the warm nvme banks are made once and kept (needed by --bank-states warm with nvme)")
    p.add_argument("--config", default="", help="a run config TOML to start from (bank, cache settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, as offloadfr train --set (e.g. bank.io_threads=2)")
    p.add_argument("--out", help="append the JSON rows to this file")
    args = p.parse_args(argv)
    if min(args.device_ms) <= 0 or args.steps < 1 or args.warmup < 0:
        p.error("--device-ms takes values > 0, --steps >= 1 and --warmup >= 0")
    if "warm" in args.bank_states and "nvme" in args.tiers and not args.warm_bank_dir:
        p.error("--bank-states warm on the nvme tier needs --warm-bank-dir DIR (the stored bank is made there once "
                "and kept)")
    for d in filter(None, (args.bank_dir, args.warm_bank_dir)):
        Path(d).mkdir(parents=True, exist_ok=True)
    env = environment()
    failed = 0
    for n, head in ((n, head) for n in args.num_classes for head in args.heads):
        for tier in args.tiers:
            for state in args.bank_states:
                for dtype in args.bank_dtypes:
                    spec_base = {"head": head, "num_classes": n, "tier": tier, "bank_state": state,
                                 "bank_dtype": dtype, "bank_negatives": args.bank_negatives if head != "partial_fc"
                                 else 0,
                                 "batch_size": args.batch_size, "dim": args.dim, "warmup": args.warmup,
                                 "steps": args.steps, "images_per_identity": args.images_per_identity,
                                 "bank_dir": args.bank_dir, "config_file": args.config, "overrides": args.overrides}
                    prepared = 0.0
                    if state == "warm" and tier == "nvme":
                        spec_base["warm_bank_path"], prepared = _warm_bank(args, n, dtype, head)
                    for labels in args.labels:
                        for k in args.num_slots:
                            for t in args.device_ms:
                                spec = {**spec_base, "labels": labels, "num_slots": k, "device_ms": t}
                                row = run_in_own_process("offloadfr.bench.host", spec, bench="host")
                                row.pop("config_file", None)
                                row.pop("warm_bank_path", None)
                                if prepared:
                                    row["warm_bank_prepare_s"], prepared = prepared, 0.0
                                failed += row["status"] == "error"
                                row["env"] = env
                                emit_row(row, args.out)
    return 1 if failed else 0


def _warm_bank(args: argparse.Namespace, num_classes: int, dtype: str, head_kind: str) -> tuple[str, float]:
    """The path of the warm nvme bank of a row (made now when it is not there) and the seconds making it took."""
    from offloadfr.bank.layout import auto_chunk_rows
    from offloadfr.config import load_config

    cfg = load_config(args.config or None, list(args.overrides))
    chunk_rows = cfg.bank.chunk_rows or auto_chunk_rows(num_classes, args.dim)
    dtype = dtype or cfg.bank.dtype
    path = warm_bank_path(args.warm_bank_dir, num_classes=num_classes, dim=args.dim, dtype=dtype,
                          chunk_rows=chunk_rows, head_kind=head_kind)
    seconds = prepare_warm_bank(path, num_classes=num_classes, dim=args.dim, dtype=dtype, chunk_rows=chunk_rows,
                                seed=cfg.bank.seed, init_std=cfg.bank.init_std, head_kind=head_kind,
                                progress=sys.stderr.isatty())
    return str(path), seconds


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
