"""``bench.py head``: one head step (logits, margin, cross-entropy, backward, row update) at batch B and width D on
synthetic embeddings, for each head and each number of classes.

Each configuration runs in its own subprocess (``python -m offloadfr.bench.head _one SPEC``) so that peak host memory
(ru_maxrss) and peak device memory belong to that configuration alone. A configuration that runs out of memory is
reported as a row with ``"status": "oom"``, not as a crash.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from offloadfr.bench.rows import emit_row, environment, run_in_own_process

__all__ = ["measure_head", "run_head_bench"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure_head(spec: dict[str, Any]) -> dict[str, Any]:
    """Times one head configuration in this process; returns its JSON row."""
    import torch

    from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg
    from offloadfr.heads import HeadDeps, build_head
    from offloadfr.losses import build_margin

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, tier = spec["head"].partition(":")
    n, b, d = spec["num_classes"], spec["batch_size"], spec["dim"]
    tmp = tempfile.mkdtemp(prefix="offloadfr-bench-", dir=spec.get("bank_dir") or None)
    # pfc_dense samples sample_rate × N classes per step (arcface_torch); partial_fc puts all K resident slots in
    # the softmax, so its logit width is K whatever N is.
    head_cfg = HeadCfg(kind=kind, sample_rate=spec["sample_rate"] if kind == "pfc_dense" else 1.0)
    num_slots = spec["num_slots"] or max(1, int(spec["sample_rate"] * n))  # 0: as many columns as pfc_dense
    cache_cfg = CacheCfg(num_slots=num_slots if kind == "partial_fc" else 0)
    deps = HeadDeps(margin=build_margin(LossCfg(kind="arcface")).to(device), num_classes=n, dim=d, device=device,
                    bank=BankCfg(tier=tier or "ram"), cache=cache_cfg, bank_path=Path(tmp) / "bank")
    gen = torch.Generator().manual_seed(0)
    total = spec["warmup"] + spec["steps"]
    num_batches = total + cache_cfg.lookahead + 1
    if spec["labels"] == "uniform":
        labels = [torch.randint(0, n, (b,), generator=gen) for _ in range(num_batches)]
    else:  # "window": ids from a window of consecutive ids that slides by 1/8 of its width per step, as the
        # block-aware sampler (issue 6) will draw them, so the nvme tier reads whole neighbouring blocks
        width = min(n, spec["window"])
        labels = [(t * (width // 8) + torch.randint(0, width, (b,), generator=gen)) % n for t in range(num_batches)]
    head = build_head(head_cfg, deps)
    emb = torch.randn(b, d, device=device)
    lookahead = cache_cfg.lookahead
    for i in range(min(lookahead, len(labels))):
        head.plan(labels[i])
    times, moved = [], {"bank/rows_read": 0.0, "bank/rows_written": 0.0, "bank/bytes_read": 0.0,
                        "bank/bytes_written": 0.0}
    stall = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(total):
        if step + lookahead < len(labels):
            head.plan(labels[step + lookahead])
        e = emb.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = head(e, labels[step].to(device))
        loss.backward()
        head.update(0.1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        m = head.metrics()
        if step >= spec["warmup"]:
            times.append(dt * 1e3)
            for k in moved:
                moved[k] += float(m.get(k, 0.0))
            if "prefetch/stall(%)" in m:
                stall.append(float(m["prefetch/stall(%)"]))
    head.close()
    steps = max(1, len(times))
    row: dict[str, Any] = {
        "bench": "head", "status": "ok", **spec,
        "step_ms_p50": _percentile(times, 0.5), "step_ms_p90": _percentile(times, 0.9),
        "peak_host_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        **{f"{k}_per_step": v / steps for k, v in moved.items()},
    }
    row["logit_columns"] = {"fc": n, "pfc_dense": max(1, int(spec["sample_rate"] * n))}.get(
        kind, min(n, num_slots))
    if stall:
        row["prefetch_stall_pct"] = sum(stall) / len(stall)
    if device.type == "cuda":
        row["peak_device_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_device_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    return row


def run_head_bench(args: argparse.Namespace) -> int:
    """``bench.py head``: one row per (number of classes, head), each measured in its own process."""
    from tqdm import tqdm

    bank_dir = str(Path(args.bank_dir).resolve()) if args.bank_dir else ""  # the child runs in the checkout
    if bank_dir:  # each row makes its bank in a fresh directory under it
        Path(bank_dir).mkdir(parents=True, exist_ok=True)
    env = environment()
    configs = [(n, head) for n in args.num_classes for head in args.heads]
    bar = tqdm(configs, desc="bench head", unit="config", disable=not sys.stderr.isatty())  # rows go to stdout
    for n, head in bar:
        bar.set_postfix_str(f"{head} N={n}")
        steps = args.steps if n < args.big else max(3, args.steps // 5)
        spec = {"head": head, "num_classes": n, "batch_size": args.batch_size, "dim": args.dim,
                "sample_rate": args.sample_rate, "num_slots": args.num_slots, "warmup": args.warmup,
                "steps": steps, "bank_dir": bank_dir, "labels": args.labels, "window": args.window}
        row = run_in_own_process("offloadfr.bench.head", spec, bench="head")
        row["env"] = env
        emit_row(row, args.out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_one":
        print(json.dumps(measure_head(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit("usage: python -m offloadfr.bench.head _one SPEC_JSON (launch/bench.py head runs it)")
