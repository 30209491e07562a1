"""``python launch/bench.py backbone``: the backbone's training step under the plain engine and each DeepSpeed config.

One JSON row per (backbone, engine config), each measured in a fresh process (DeepSpeed keeps global state, and the
peak memories must belong to one config): step time (CUDA events on a GPU, ``time.perf_counter`` on the CPU), peak
device memory (``torch.cuda.max_memory_allocated``) and peak host RSS. The step is what the trainer's engine does for
the backbone alone: forward of random normalised images, a scalar loss on the embeddings (the head is left out, so
only the engine differs between rows), backward, gradient norm and clipping, optimizer step. docs/deepspeed.md says
what the rows are for (issue 5 item 6: DeepSpeed within 10 % of the plain step, 25 % with CPU offload).

Example (GPU)::

    python launch/bench.py backbone --backbones iresnet50 iresnet100 --batch-size 256 \\
        --out docs/benchmarks/backbone_<device>.jsonl

Example (CPU, the CI size)::

    python launch/bench.py backbone --backbones tiny --batch-size 8 --steps 3 --warmup 1 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from offloadfr.train.bench_rows import emit_row, run_in_own_process

__all__ = ["bench_one", "main", "ENGINES"]

ENGINES = {
    "plain": "",
    "zero0": "ds_configs/deepspeed/zero0.json",
    "zero2": "ds_configs/deepspeed/zero2.json",
    "zero2_offload_cpu": "ds_configs/deepspeed/zero2_offload_cpu.json",
}
"""Engine configs the bench compares: ``plain`` (PyTorch optimizer) and the DeepSpeed JSONs (no NVMe: needs libaio)."""


_ROOT = Path(__file__).resolve().parents[2]  # the checkout: ds_configs/ paths are relative to it


def bench_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Times ``spec["steps"]`` backbone training steps (after ``spec["warmup"]``) in this process; returns the row."""
    import torch

    from offloadfr.config import EngineCfg, TrainCfg
    from offloadfr.models import build_backbone
    from offloadfr.train.ds_engine import build_engine

    device = torch.device("cuda" if torch.cuda.is_available() and spec["device"] != "cpu" else "cpu")
    torch.manual_seed(0)
    model = build_backbone(spec["backbone"], embedding_size=spec["dim"], image_size=spec["image_size"]).to(device)
    engine_cfg = EngineCfg(kind="plain" if spec["engine"] == "plain" else "deepspeed",
                           deepspeed_config=ENGINES[spec["engine"]] or EngineCfg().deepspeed_config)
    train_cfg = TrainCfg(batch_size=spec["batch_size"], optimizer=spec["optimizer"], precision=spec["precision"],
                         grad_clip=5.0)
    engine = build_engine(engine_cfg, train_cfg, model, device)
    size = spec["image_size"]
    images = torch.rand(spec["batch_size"], 3, size, size, device=device).mul_(2).sub_(1)

    def one_step() -> None:
        emb_BD = engine.forward(images)
        loss = emb_BD.float().pow(2).mean()
        engine.backward(loss)
        engine.grad_norm()
        engine.step(0.01)

    for _ in range(spec["warmup"]):
        one_step()
    times_ms: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(spec["steps"]):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            one_step()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    else:
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            one_step()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    times_ms.sort()
    row: dict[str, Any] = {
        "bench": "backbone", "status": "ok", **spec, "device_name": _device_name(device),
        "step_ms_p50": times_ms[len(times_ms) // 2], "step_ms_min": times_ms[0], "step_ms_max": times_ms[-1],
        "peak_host_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if device.type == "cuda":
        row["peak_device_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_device_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    return row


def _device_name(device: Any) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def main(argv: list[str]) -> int:
    """``backbone`` subcommand of launch/bench.py: one subprocess per (backbone, engine); prints JSON rows."""
    if argv and argv[0] == "_one":
        print(json.dumps(bench_one(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(prog="bench.py backbone", description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["iresnet50", "iresnet100"])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", help="append the JSON rows to this file")
    args = p.parse_args(argv)
    failed = 0
    for backbone in args.backbones:
        for engine in args.engines:
            spec = {"backbone": backbone, "engine": engine, "batch_size": args.batch_size,
                    "image_size": args.image_size, "dim": args.dim, "optimizer": args.optimizer,
                    "precision": args.precision, "device": args.device, "warmup": args.warmup, "steps": args.steps}
            row = run_in_own_process("offloadfr.train.bench_backbone", spec, bench="backbone")
            failed += row["status"] != "ok"
            emit_row(row, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
