"""The benchmarks' command line (``python launch/bench.py COMMAND``). Each measurement is one JSON row (stdout, and
appended to ``--out``); results go to docs/benchmarks/.

    python launch/bench.py head --num-classes 10000 100000 1000000 --heads fc pfc_dense partial_fc:ram partial_fc:nvme

``head``: one head step (logits, margin, cross-entropy, backward, row update) at batch B and width D on synthetic
embeddings, for each head and each number of classes. Each configuration runs in its own subprocess so that peak
host memory (ru_maxrss) and peak device memory belong to that configuration alone. A configuration that runs out of
memory is reported as a row with ``"status": "oom"``, not as a crash.

    python launch/bench.py data --data-path data/synth_tiny --num-workers 2

``data``: decoded, augmented images/s of our training loader against a plain ``webdataset.WebDataset`` pipeline
doing the same decoding and flips with the same workers, alternating rounds in one run (offloadfr/bench/data.py).
With ``--cores``: CPU per image of our loader, per sampler and JPEG decoder, and the cores 4,500 img/s needs.
With ``--resume-at 0.9``: seconds to the first batch of a run resumed at 90 % of an epoch, the loader started at that
step against iterating the epoch from its start and discarding the batches before it.

    python launch/bench.py kernel --num-slots 65536 262144 1048576 --batch-size 256 --dim 512

``kernel``: one resident head step over K slots (logits, margin, cross-entropy, backward, row update) in plain PyTorch
and fused (Triton row normalisation, margin cross-entropy and row update), each with fp32, TF32 and bf16 logit GEMMs,
side by side (offloadfr/bench/kernel.py, docs/kernels.md). On the CPU the Triton variants are skipped unless
TRITON_INTERPRET=1. ``python launch/bench.py table kernel.jsonl`` prints the rows as a markdown table.

    python launch/bench.py quality --epochs 2

``quality``: every head and margin trained through launch/train.py on the same data for the same images seen; one row
per configuration and a table in docs/benchmarks/quality_<machine>.md (offloadfr/bench/quality.py).

    python launch/bench.py train --num-classes 1000000 --backbone iresnet50 --batch-size 256 --heads partial_fc:ram

``train``: the trainer's own step (real engine, head, bank and prefetcher) on synthetic images, with each head and
with no classifier (backbone only), for the ratio of their images/s (offloadfr/bench/train.py).

    python launch/bench.py host --num-classes 10000000 --tiers ram nvme --labels uniform block --device-ms 57

``host``: partial_fc's host path (plan, prefetcher, bank, container, write-back) with the device's compute replaced
by a wait of T ms: does the host keep up with a GPU's step? (offloadfr/bench/host.py).

    python launch/bench.py bank --num-blocks 256 --threads 1 2 4

``bank``: one bank call that misses many blocks (fresh ones from the initialiser, or stored ones from Zarr), timed
for each ``bank.io_threads``, alternating (offloadfr/bench/bank.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offloadfr.bench.head import run_head_bench
from offloadfr.bench.rows import emit_row, environment, markdown_table

__all__ = ["main"]


def _cmd_data(args: argparse.Namespace) -> int:
    from offloadfr.bench.data import measure_data_pipelines
    from offloadfr.config import DataCfg

    cfg = DataCfg(path=args.data_path, generate_if_missing=False, num_workers=args.num_workers,
                  sampler=args.sampler, block_rows=128, block_window=8)
    if args.cores:
        from offloadfr.bench.data import measure_loader_cores

        env = environment()
        for row in measure_loader_cores(cfg, samplers=args.samplers, decoders=args.decoders,
                                        image_size=args.image_size, batch_size=args.batch_size,
                                        num_batches=args.num_batches, rounds=args.rounds):
            emit_row({**row, "env": env}, args.out)
        return 0
    if args.resume_at is not None:
        from offloadfr.bench.data import measure_resume

        row = measure_resume(cfg, image_size=args.image_size, batch_size=args.batch_size, at=args.resume_at,
                             rounds=args.rounds)
        emit_row({**row, "env": environment()}, args.out)
        return 0
    row = measure_data_pipelines(cfg, image_size=args.image_size, batch_size=args.batch_size,
                                 num_batches=args.num_batches, rounds=args.rounds)
    emit_row({**row, "env": environment()}, args.out)
    return 0


def _cmd_kernel(args: argparse.Namespace) -> int:
    import torch

    from offloadfr.bench.kernel import measure_head_step

    env = environment()
    for k in args.num_slots:
        try:
            rows = measure_head_step(num_slots=k, batch_size=args.batch_size, dim=args.dim,
                                     variants=tuple(args.variants), steps=args.steps, warmup=args.warmup)
        except ValueError as err:  # an unknown variant
            print(f"bench.py kernel: error: {err}", file=sys.stderr)
            return 2
        for row in rows:
            emit_row({**row, "env": env}, args.out)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


def _cmd_bank(args: argparse.Namespace) -> int:
    from offloadfr.bench.bank import measure_block_loads

    env = environment()
    rows = measure_block_loads(num_blocks=args.num_blocks, block_rows=args.block_rows, dim=args.dim,
                               threads=args.threads, tiers=args.tiers, sources=args.sources, rounds=args.rounds,
                               bank_dir=args.bank_dir)
    for row in rows:
        emit_row({**row, "env": env}, args.out)
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    """Prints a markdown table of head rows (or of ``kernel`` rows) from a JSONL file."""
    rows = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    cols = ["head", "num_classes", "labels", "logit_columns", "status", "step_ms_p50", "step_ms_p90", "peak_device_GiB",
            "peak_host_rss_GiB", "bank/rows_read_per_step", "bank/bytes_read_per_step", "bank/bytes_written_per_step",
            "prefetch_stall_pct"]
    if rows and rows[0].get("bench") == "kernel":  # bench.py kernel rows: the variants and their phases
        cols = ["num_slots", "variant", "fused", "status", "step_ms_p50", "step_ms_p90", "logits_ms_p50",
                "loss_ms_p50", "backward_ms_p50", "update_ms_p50", "peak_device_GiB", "loss_rel_diff",
                "grad_emb_rel_diff", "update_rel_diff"]
    print("\n".join(markdown_table(cols, rows)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "backbone":  # plain engine vs DeepSpeed configs: offloadfr/bench/backbone.py
        from offloadfr.bench.backbone import main as backbone_main

        return backbone_main(argv[1:])
    if argv and argv[0] == "quality":  # every head and margin trained alike: offloadfr/bench/quality.py
        from offloadfr.bench.quality import main as quality_main

        return quality_main(argv[1:])
    if argv and argv[0] == "train":  # the trainer's step, each head vs backbone only: offloadfr/bench/train.py
        from offloadfr.bench.train import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "host":  # the bank's host path at a GPU's step time: offloadfr/bench/host.py
        from offloadfr.bench.host import main as host_main

        return host_main(argv[1:])
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("head", help="head step time and memory over num_classes")
    p.add_argument("--num-classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--heads", nargs="+", default=["fc", "pfc_dense", "partial_fc:ram", "partial_fc:nvme"],
                   help="head kinds; partial_fc takes a tier after a colon")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--sample-rate", type=float, default=0.1, help="pfc_dense: sampled fraction of the N classes")
    p.add_argument("--num-slots", type=int, default=65_536,
                   help="partial_fc: DCC slots K (all in the softmax); 0 = sample_rate x N, pfc_dense's logit width")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--big", type=int, default=500_000, help="from this many classes on, time steps/5 steps")
    p.add_argument("--labels", choices=["uniform", "window"], default="uniform",
                   help="label order: uniform over all ids, or from a sliding window of ids (block-aware order)")
    p.add_argument("--window", type=int, default=32768, help="--labels window: width of the id window")
    p.add_argument("--bank-dir", default="", help="where partial_fc banks are created (an NVMe path for nvme)")
    p.add_argument("--out", help="append the JSON rows to this file")
    p.set_defaults(func=run_head_bench)
    p = sub.add_parser("data", help="images/s of our data pipeline vs a plain webdataset pipeline, side by side")
    p.add_argument("--data-path", default="data/synth_tiny", help="dataset directory (offloadfr synth makes one)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--num-batches", type=int, default=150, help="batches timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sampler", default="instance", help="data.sampler of our pipeline")
    p.add_argument("--resume-at", type=float, default=None, metavar="FRACTION",
                   help="instead: seconds to the first batch of a run resumed at this fraction of an epoch, the "
                        "loader started there against iterating and discarding the batches before it")
    p.add_argument("--cores", action="store_true",
                   help="instead: CPU per image of our loader for each of --samplers and --decoders, and the cores "
                        "4,500 img/s needs (offloadfr/bench/data.py measure_loader_cores)")
    p.add_argument("--samplers", nargs="+", default=["instance", "identity", "block", "dual", "attention"],
                   help="--cores: the samplers measured")
    p.add_argument("--decoders", nargs="+", choices=["simplejpeg", "pil"], default=["simplejpeg", "pil"],
                   help="--cores: the JPEG decoders measured (data.decoder)")
    p.add_argument("--out", help="append the JSON row to this file")
    p.set_defaults(func=_cmd_data)
    p = sub.add_parser("kernel", help="head step: plain vs fused (normalise, margin CE, row SGD), fp32/TF32/bf16 GEMMs")
    p.add_argument("--num-slots", type=int, nargs="+", default=[65_536, 262_144, 1_048_576])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--variants", nargs="+", default=["torch:fp32", "torch:tf32", "torch:bf16", "triton:fp32",
                                                      "triton:tf32", "triton:bf16"],
                   help="kernel:gemm_precision pairs (default: all six)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", help="append the JSON rows to this file")
    p.set_defaults(func=_cmd_kernel)
    p = sub.add_parser("bank", help="one bank call missing many blocks, by bank.io_threads")
    p.add_argument("--num-blocks", type=int, default=256, help="blocks one read_rows call touches")
    p.add_argument("--block-rows", type=int, default=1024, help="ids per block (bank.chunk_rows)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8], help="bank.io_threads values")
    p.add_argument("--tiers", nargs="+", choices=["nvme", "ram"], default=["nvme", "ram"])
    p.add_argument("--sources", nargs="+", choices=["init", "zarr", "zarr_api"], default=["init", "zarr"],
                   help="init: fresh blocks; zarr: stored blocks as the bank reads them (chunk files); zarr_api: the "
                        "same through Zarr's array API")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bank-dir", default="", help="where the temporary banks are made")
    p.add_argument("--out", help="append the JSON rows to this file")
    p.set_defaults(func=_cmd_bank)
    p = sub.add_parser("table", help="markdown table of a results JSONL file")
    p.add_argument("file")
    p.set_defaults(func=_cmd_table)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
