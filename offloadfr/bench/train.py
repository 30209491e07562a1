"""``python launch/bench.py train``: the trainer's own step at scale, on synthetic input, with and without the head.

Each row times ``trainer.train_step`` (normalise, engine forward, head loss, engine backward, the non-finite guard,
engine step, head update) fed through ``trainer.with_lookahead`` (``head.plan`` of the batches
``cache.lookahead`` steps ahead, so bank-backed heads prefetch exactly as in training), with the real engine
(``plain`` or a DeepSpeed config), the real head, bank and prefetcher. Only the data is synthetic: random uint8 image
batches made once on the device (no decode; a pool of two, used in turn) and labels drawn over N identities:

- ``uniform``: every label uniform over ``[0, N)`` (the instance sampler over a shuffled dataset).
- ``grouped``: the identity sampler's P×K layout: P = B / K identities, each on K consecutive rows. The identities
  are uniform over ``[0, N)``, as the identity sampler gives over identity-shuffled shards (it draws them without
  replacement over an epoch; over the few hundred steps of a benchmark at N >= 1M the two do not differ).
- ``block``: the block-aware sampler's order (``data.sampler = "block"``, recommended for the nvme tier): every id
  has K images, bank blocks (``chunk_rows`` ids) are put in a random order, and images are sorted by their block's
  place plus U(0, ``bank.cache_blocks``), exactly as ``data/samplers.py`` plans an epoch (the first steps of it).

The backbone-only row (``head = "backbone_only"``) runs the same step with a stand-in head whose loss needs no
classifier: the mean square of the embeddings (as ``bench.py backbone``), so only the head differs between it and
the other rows; each other row gets ``ratio_to_backbone_only`` = its images/s over that row's (same engine).

Measured over ``steps`` steps after ``warmup`` (a ``torch.cuda.synchronize`` at both ends of the window on a GPU):
``images_per_s``; ``head_share`` = time in the head / wall time of the window, where the time in the head is the sum
of the intervals ``plan``, ``forward`` (including the wait for prefetched rows), ``backward`` (from the loss to the
gradient of the embeddings: an identity autograd node on each side of the head) and ``update``, read from CUDA
events on a GPU (so head work the GPU overlaps with queued backbone work is not counted twice) and from
``time.perf_counter`` on the CPU; peak device memory over the whole process (``torch.cuda.max_memory_allocated``,
so it includes the model, optimizer state and head); peak host RSS; bank traffic per second: rows moved through the
prefetcher (``bank_read_Bps``, ``bank_written_Bps``) and whole blocks read from or staged to the Zarr store or made
by the initialiser (``bank_blocks_*_per_s``, ``storage_*_Bps``); ``prefetch_stall_pct``. The bank is fresh (made in a
temporary directory under ``--bank-dir`` and deleted afterwards), so a block read for the first time comes from the
deterministic initialiser, not from disk, as in the first epoch of a run.

Each configuration runs in its own process (peak memories belong to it); one that runs out of memory is a row with
``"status": "oom"``. ``--device-memory-GiB G`` caps what each configuration may allocate on the device
(``torch.cuda.set_per_process_memory_fraction``: a smaller GPU on a big one; the row records ``device_memory_GiB``).
``--backbone-only-rate R`` skips the backbone-only row and divides by ``R``, an earlier backbone-only row's
``images_per_s`` (launch/gpu_check.py runs that row once and passes it to every later command); every row with a
ratio records the rate it divided by in ``backbone_only_images_per_s``. docs/benchmarks/README.md has the commands
and what the rows are for.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from offloadfr.bench.rows import device_name, emit_row, environment, markdown_table, row_commands, run_in_own_process

__all__ = ["bench_one", "main", "make_labels", "table", "LABEL_ORDERS", "BACKBONE_ONLY", "TABLE_COLUMNS"]

LABEL_ORDERS = ("uniform", "grouped", "block")
"""Label orders of the synthetic batches (module docstring)."""
BACKBONE_ONLY = "backbone_only"
"""The head name of the row without a classifier."""

_ROOT = Path(__file__).resolve().parents[2]  # the checkout: ds_configs/ paths are relative to it


def make_labels(order: str, *, num_classes: int, batch_size: int, num_batches: int, images_per_identity: int,
                block_rows: int, block_window: int, seed: int) -> list[Any]:
    """``num_batches`` label batches (CPU int64, ``(batch_size,)``) in ``order`` (one of :data:`LABEL_ORDERS`).

    Raises:
        ConfigError: ``grouped`` with a batch that is not a whole number of identities.
    """
    import torch

    from offloadfr.errors import ConfigError

    gen = torch.Generator().manual_seed(seed)
    n, b, k = num_classes, batch_size, images_per_identity
    if order == "uniform":
        return [torch.randint(0, n, (b,), generator=gen) for _ in range(num_batches)]
    if order == "grouped":
        if b % k:
            raise ConfigError(f"--labels grouped with --batch-size {b} and --images-per-identity {k}: the batch must "
                              f"be a whole number of identities; use a batch size that is a multiple of {k}")
        return [torch.randint(0, n, (b // k,), generator=gen).repeat_interleave(k) for _ in range(num_batches)]
    if order != "block":
        raise ConfigError(f"--labels {order!r} is not one of {', '.join(LABEL_ORDERS)}")
    # The sampler's sliding-window order restricted to the blocks that can hold the first num_batches * b images:
    # items of blocks placed at m or later have keys >= m, and the m - window first blocks alone hold enough items
    # with keys < m, so the first items of this subset are the first items of the whole epoch's order.
    num_blocks = -(-n // block_rows)
    need = num_batches * b
    m = min(num_blocks, -(-need // (block_rows * k)) + block_window + 2)
    blocks = torch.randperm(num_blocks, generator=gen)[:m]
    ids = (blocks[:, None] * block_rows + torch.arange(block_rows)[None, :]).reshape(-1)
    place = torch.arange(m).repeat_interleave(block_rows)
    keep = ids < n
    ids, place = ids[keep].repeat_interleave(k), place[keep].repeat_interleave(k)
    key = place.double() + torch.rand(ids.numel(), generator=gen, dtype=torch.float64) * block_window
    ordered = ids[torch.argsort(key, stable=True)][:need]
    return list(ordered.reshape(num_batches, b))


class _Clock:
    """Marks on the device's timeline: CUDA events on a GPU, ``time.perf_counter`` on the CPU."""

    def __init__(self, device: Any) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        import torch

        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) if self.cuda else (end - start) * 1e3


def _timed_head(inner: Any, clock: _Clock) -> Any:
    """``inner`` behind a head that records the intervals it spends in ``plan``, forward, backward and update."""
    import torch

    from offloadfr.heads import Head

    class _Mark(torch.autograd.Function):
        """Identity whose backward calls ``note()``: put on the loss, it fires first in the backward pass; put on the
        embeddings before the head, it fires once the head's whole backward is done (every head node was created
        after it, and the autograd engine runs later-created nodes first)."""

        @staticmethod
        def forward(ctx: Any, x: Any, note: Any) -> Any:
            ctx.note = note
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            ctx.note()
            return grad, None

    class TimedHead(Head):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.intervals: list[tuple[Any, Any]] = []
            self._backward_start: Any = None

        def plan(self, labels_B: Any) -> None:
            t0 = clock.mark()
            self.inner.plan(labels_B)
            self.intervals.append((t0, clock.mark()))

        def set_key_images(self, keys_BK: Any) -> None:
            self.inner.set_key_images(keys_BK)

        def take_dual_batch(self, images: Any, labels: Any, **layout: int) -> Any:
            t0 = clock.mark()
            out = self.inner.take_dual_batch(images, labels, **layout)
            self.intervals.append((t0, clock.mark()))
            return out

        def forward(self, emb_BD: Any, labels_B: Any) -> Any:
            t0 = clock.mark()
            emb_BD = _Mark.apply(emb_BD, self._end_backward)
            loss = self.inner(emb_BD, labels_B)
            self.intervals.append((t0, clock.mark()))
            return _Mark.apply(loss, self._start_backward)

        def _start_backward(self) -> None:
            self._backward_start = clock.mark()

        def _end_backward(self) -> None:
            self.intervals.append((self._backward_start, clock.mark()))

        def update(self, lr: float) -> None:
            t0 = clock.mark()
            self.inner.update(lr)
            self.intervals.append((t0, clock.mark()))

        def skip(self) -> None:
            self.inner.skip()

        def metrics(self) -> dict[str, float]:
            return dict(self.inner.metrics())

        def close(self) -> None:
            self.inner.close()

    return TimedHead()


def _backbone_only_head() -> Any:
    """The stand-in head of the backbone-only row: the mean square of the embeddings, no classifier, no rows."""
    from offloadfr.heads import Head

    class NoClassifier(Head):
        def forward(self, emb_BD: Any, labels_B: Any) -> Any:
            return emb_BD.float().pow(2).mean()

        def update(self, lr: float) -> None:
            pass

        def skip(self) -> None:
            pass

    return NoClassifier()


def _resolve_config(spec: dict[str, Any]) -> Any:
    """The run config of one row: ``--config`` and ``--set``, then the bench's own settings on top."""
    from offloadfr.config import load_config

    cfg = load_config(spec["config_file"] or None, list(spec["overrides"]))
    kind, _, tier = spec["head"].partition(":")
    r = dataclasses.replace
    cfg = r(cfg, model=r(cfg.model, backbone=spec["backbone"], embedding_size=spec["dim"],
                         image_size=spec["image_size"]),
            train=r(cfg.train, batch_size=spec["batch_size"], optimizer=spec["optimizer"],
                    precision=spec["precision"]),
            run=r(cfg.run, device=spec["device"]))
    if spec["engine"] != "plain":
        from offloadfr.bench.backbone import ENGINES

        cfg = r(cfg, engine=r(cfg.engine, kind="deepspeed", deepspeed_config=ENGINES[spec["engine"]]))
    else:
        cfg = r(cfg, engine=r(cfg.engine, kind="plain"))
    if kind != BACKBONE_ONLY:
        cfg = r(cfg, head=r(cfg.head, kind=kind))
    if kind == "pfc_dense":
        cfg = r(cfg, head=r(cfg.head, sample_rate=spec["sample_rate"]))
    if kind == "partial_fc":
        cfg = r(cfg, bank=r(cfg.bank, tier=tier or "ram", dtype=spec.get("bank_dtype") or cfg.bank.dtype),
                cache=r(cfg.cache, num_slots=spec["num_slots"]))
    return cfg


def bench_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Times one configuration in this process; returns its JSON row."""
    import torch

    from offloadfr.bank.layout import auto_chunk_rows
    from offloadfr.distributed import DistEnv
    from offloadfr.heads import HeadDeps, build_head
    from offloadfr.losses import build_margin
    from offloadfr.models import build_backbone
    from offloadfr.train.ds_engine import build_engine
    from offloadfr.train.engine import resolve_precision

    cfg = _resolve_config(spec)
    env = DistEnv.from_env(cfg.run.device)
    device = env.device
    cap_GiB = spec.get("device_memory_GiB", 0.0)
    if cap_GiB and device.type == "cuda":  # a smaller GPU: the caching allocator refuses more than this
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_GiB * 2**30 / total), device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.cpu_threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.run.seed)
    kind = spec["head"].partition(":")[0]
    n = spec["num_classes"]
    model = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                           image_size=cfg.model.image_size).to(device)
    engine = build_engine(cfg.engine, cfg.train, model, device)
    bank_root = Path(tempfile.mkdtemp(prefix="offloadfr-bench-train-", dir=spec["bank_dir"] or None))
    try:
        if kind == BACKBONE_ONLY:
            inner = _backbone_only_head()
        else:
            margin = build_margin(cfg.loss).to(device)
            inner = build_head(cfg.head, HeadDeps(margin=margin, num_classes=n, dim=cfg.model.embedding_size,
                                                  device=device, bank=cfg.bank, cache=cfg.cache,
                                                  bank_path=bank_root / "bank", backbone=engine.model,
                                                  precision=resolve_precision(cfg.train.precision, device)))
        clock = _Clock(device)
        head = _timed_head(inner, clock)
        try:
            row = _measure(spec, cfg, engine, head, inner, clock, device, auto_chunk_rows(n, cfg.model.embedding_size))
        finally:
            head.close()
    finally:
        shutil.rmtree(bank_root, ignore_errors=True)
    unused = ("synth", "eval", "data") + (("head", "loss", "bank", "cache") if kind == BACKBONE_ONLY else ())
    row["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in unused}
    return row


def _measure(spec: dict[str, Any], cfg: Any, engine: Any, head: Any, inner: Any, clock: _Clock, device: Any,
             auto_rows: int) -> dict[str, Any]:
    """Runs the warmup and the timed steps through the trainer's step; returns the row without its config."""
    import torch

    from offloadfr.train.trainer import train_step, with_lookahead

    kind = spec["head"].partition(":")[0]
    n, b, size = spec["num_classes"], spec["batch_size"], spec["image_size"]
    warmup, steps = spec["warmup"], spec["steps"]
    block_rows = min(n, cfg.bank.chunk_rows) or auto_rows
    # lookahead batches more than are stepped, so that each timed step has one plan() in the window, as in training
    labels = make_labels("uniform" if kind == BACKBONE_ONLY else spec["labels"], num_classes=n, batch_size=b,
                         num_batches=warmup + steps + cfg.cache.lookahead,
                         images_per_identity=spec["images_per_identity"],
                         block_rows=block_rows, block_window=cfg.bank.cache_blocks, seed=cfg.run.seed)
    views = (1 + cfg.data.num_keys,) if kind == "attfc" else ()  # attention batches: a query and k keys
    dual = None
    if kind == "dcp":  # dual batches: the B instance labels, then P identities on K consecutive rows each
        k = cfg.data.images_per_identity
        p = cfg.data.dual_identities or b // k
        dual = (b, k)
        ids_gen = torch.Generator().manual_seed(cfg.run.seed + 1)
        labels = [torch.cat([y, torch.randint(0, n, (p,), generator=ids_gen).repeat_interleave(k)]) for y in labels]
    rows = labels[0].numel()
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed)
    pool = [torch.randint(0, 256, (rows, *views, 3, size, size), dtype=torch.uint8, device=device, generator=gen)
            for _ in range(2)]
    batches = with_lookahead(((0, (pool[i % 2], y)) for i, y in enumerate(labels)), cfg.cache.lookahead, head.plan)
    lr = cfg.train.lr
    bank = getattr(inner, "bank", None)
    bank = bank if hasattr(bank, "stats") and hasattr(bank, "chunk_rows") else None  # a ZarrBank

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    skipped, losses = 0, []
    for _ in range(warmup):
        _, (images_u8, labels_B) = next(batches)
        loss, _, updated = train_step(engine, head, images_u8, labels_B, lr, device, dual=dual)
        skipped += not updated
    sync()
    inner.metrics()  # the prefetcher's counters restart here
    bank_before = bank.stats() if bank is not None else {}
    head.intervals.clear()
    step_ms, stall = [], []
    traffic = {"bank/bytes_read": 0.0, "bank/bytes_written": 0.0}  # rows through the prefetcher, both ways
    t_start = t_prev = time.perf_counter()
    for _ in range(steps):
        _, (images_u8, labels_B) = next(batches)
        loss, _, updated = train_step(engine, head, images_u8, labels_B, lr, device, dual=dual)
        skipped += not updated
        losses.append(loss)
        m = inner.metrics()  # counters since the previous call: this step's
        if "prefetch/stall(%)" in m:
            stall.append(float(m["prefetch/stall(%)"]))
        for key in traffic:
            traffic[key] += float(m.get(key, 0.0))
        now = time.perf_counter()
        step_ms.append((now - t_prev) * 1e3)
        t_prev = now
    sync()
    wall = time.perf_counter() - t_start
    head_ms = sum(clock.ms(t0, t1) for t0, t1 in head.intervals if t0 is not None)
    step_ms.sort()
    row: dict[str, Any] = {
        "bench": "train", "status": "ok", **{k: v for k, v in spec.items() if k != "config_file"},
        "images_per_s": steps * b / wall,
        "step_ms_mean": 1e3 * wall / steps, "step_ms_p50": step_ms[len(step_ms) // 2], "step_ms_max": step_ms[-1],
        "head_ms_per_step": head_ms / steps, "head_share": head_ms / (1e3 * wall),
        "peak_host_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "skipped_steps": skipped, "final_loss": losses[-1],
    }
    if bank is not None:
        row["bank_read_Bps"] = traffic["bank/bytes_read"] / wall
        row["bank_written_Bps"] = traffic["bank/bytes_written"] / wall
        # one bank block of one array (the Zarr chunk): the unit of storage I/O
        block_bytes = bank.chunk_rows * bank.dim * bank.dtype.itemsize
        after = bank.stats()
        for key in ("blocks_loaded", "blocks_initialised", "blocks_staged"):
            row[f"bank_{key}_per_s"] = (after[f"bank/{key}"] - bank_before.get(f"bank/{key}", 0)) / wall
        row["storage_read_Bps"] = row["bank_blocks_loaded_per_s"] * block_bytes
        row["storage_written_Bps"] = row["bank_blocks_staged_per_s"] * block_bytes
        row["block_rows"] = bank.chunk_rows
        row["bank_dtype"] = bank.dtype_name
        row["prefetch_stall_pct"] = sum(stall) / max(1, len(stall))
    if device.type == "cuda":
        row["peak_device_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_device_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    row["device_name"] = device_name(device)
    return row


TABLE_COLUMNS = ("head", "num_classes", "labels", "bank_dtype", "engine", "status", "images_per_s",
                 "ratio_to_backbone_only", "head_share", "step_ms_p50", "peak_device_GiB", "peak_host_rss_GiB",
                 "bank_read_Bps", "bank_written_Bps", "storage_read_Bps", "storage_written_Bps",
                 "bank_blocks_initialised_per_s", "prefetch_stall_pct")
"""The columns of ``--table``."""


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of train rows (:data:`TABLE_COLUMNS`; floats to 3 significant digits)."""
    return "\n".join(markdown_table(TABLE_COLUMNS, rows))


def main(argv: list[str]) -> int:
    """``train`` subcommand of launch/bench.py: one subprocess per configuration; prints JSON rows."""
    done = row_commands(argv, bench="train", bench_one=bench_one, table=table)
    if done is not None:
        return done
    from offloadfr.bench.backbone import ENGINES

    p = argparse.ArgumentParser(prog="bench.py train", description=__doc__.splitlines()[0])
    p.add_argument("--num-classes", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--heads", nargs="*", default=["partial_fc:ram", "partial_fc:nvme", "fc", "pfc_dense"],
                   help="head kinds (partial_fc takes a tier after a colon); the backbone-only row always runs "
                   "(alone: --heads with no name)")
    p.add_argument("--labels", nargs="+", choices=LABEL_ORDERS, default=["uniform", "grouped"])
    p.add_argument("--images-per-identity", type=int, default=4, help="K of grouped; images per id of block")
    p.add_argument("--backbone", default="iresnet50")
    p.add_argument("--engines", nargs="+", choices=list(ENGINES), default=["plain"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--num-slots", type=int, default=65_536, help="partial_fc: DCC slots K (cache.num_slots)")
    p.add_argument("--bank-dtypes", nargs="+", choices=["float32", "bfloat16"], default=[],
                   help="partial_fc: one row per bank.dtype, side by side (default: the config's bank.dtype)")
    p.add_argument("--sample-rate", type=float, default=0.1, help="pfc_dense: sampled fraction of the N classes")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--bank-dir", default="", help="where banks are made (an NVMe path for the nvme tier)")
    p.add_argument("--config", default="", help="a run config TOML to start from (loss, bank, cache settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, as offloadfr train --set (e.g. bank.chunk_rows=1024)")
    p.add_argument("--backbone-only-rate", type=float, default=0.0, metavar="IMG_PER_S",
                   help="skip the backbone-only row and divide by this rate instead (the images_per_s of a "
                   "backbone-only row run earlier with the same backbone, batch and engine); 0: measure it first")
    p.add_argument("--device-memory-GiB", type=float, default=0.0, metavar="GIB",
                   help="cap each configuration's device memory (torch.cuda.set_per_process_memory_fraction) to "
                   "stand for a smaller GPU; 0: the whole device; no effect on the CPU")
    p.add_argument("--out", help="append the JSON rows to this file")
    args = p.parse_args(argv)
    if args.backbone_only_rate < 0 or args.device_memory_GiB < 0:
        p.error("--backbone-only-rate and --device-memory-GiB take a value >= 0")
    if args.backbone_only_rate and (not args.heads or len(args.engines) > 1):
        p.error("--backbone-only-rate stands for the backbone-only row of one engine: give --heads and one --engines")
    if args.bank_dir:  # each row makes its bank in a fresh directory under it
        Path(args.bank_dir).mkdir(parents=True, exist_ok=True)
    env = environment()
    failed = 0
    for engine in args.engines:
        base_rate = args.backbone_only_rate or None
        configs = [] if base_rate else [(args.num_classes[0], BACKBONE_ONLY, "none")]
        configs += [(n, head, labels) for n in args.num_classes for head in args.heads for labels in args.labels]
        dtypes = args.bank_dtypes or [""]  # "": the config's
        configs = [(n, head, labels, dtype) for n, head, labels in configs
                   for dtype in (dtypes if head.startswith("partial_fc") else [""])]
        for n, head, labels, bank_dtype in configs:
            spec = {"head": head, "num_classes": n, "labels": labels, "engine": engine, "backbone": args.backbone,
                    "batch_size": args.batch_size, "image_size": args.image_size, "dim": args.dim,
                    "num_slots": args.num_slots, "sample_rate": args.sample_rate, "optimizer": args.optimizer,
                    "precision": args.precision, "device": args.device, "warmup": args.warmup, "steps": args.steps,
                    "images_per_identity": args.images_per_identity, "bank_dir": args.bank_dir,
                    "config_file": args.config, "overrides": args.overrides,
                    "device_memory_GiB": args.device_memory_GiB, "bank_dtype": bank_dtype}
            row = run_in_own_process("offloadfr.bench.train", spec, bench="train")
            row.pop("config_file", None)
            failed += row["status"] == "error"  # running out of memory is a result (in-device heads at large N)
            if head == BACKBONE_ONLY and row["status"] == "ok":
                base_rate = row["images_per_s"]
            elif row["status"] == "ok" and base_rate:
                row["ratio_to_backbone_only"] = row["images_per_s"] / base_rate
                row["backbone_only_images_per_s"] = base_rate
            row["env"] = env
            emit_row(row, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
