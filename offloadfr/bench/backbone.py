"""``python launch/bench.py backbone``: the backbone's training step under the plain engine and each DeepSpeed config.

One JSON row per (backbone, engine config), each measured in a fresh process (DeepSpeed keeps global state, and the
peak memories must belong to one config): step time (CUDA events on a GPU, ``time.perf_counter`` on the CPU), peak
device memory (``torch.cuda.max_memory_allocated``) and peak host RSS. The step is what the trainer's engine does for
the backbone alone: forward of random normalised images, a scalar loss on the embeddings (the head is left out, so
only the engine differs between rows), backward, gradient norm and clipping, optimizer step. docs/deepspeed.md says
what the rows are for (issue 5 item 6: DeepSpeed within 10 % of the plain step, 25 % with CPU offload).

The knobs that test the hypotheses of docs/deepspeed.md ("The backbone benchmark"):

* ``--engines``: the plain engine, the JSON files of :data:`ENGINES`, and the named :data:`VARIANTS` (a JSON plus
  a few DeepSpeed keys changed, or the engine's module called under our own autocast);
* ``--ds-set KEY=VALUE``: more DeepSpeed keys for every DeepSpeed row (dotted path, JSON value, ``null`` removes);
* ``--channels-last``: channels_last images, and channels_last parameters for the plain engine only
  (``deepspeed.initialize`` refuses them: it views each parameter as bytes);
* ``--profile N``: N more steps under ``torch.profiler`` after the timed ones; one summary line per row in
  ``<out>.profile.jsonl`` (the ops that cost the most, the copies and casts, the bytes copied, by step phase).

``python launch/bench.py backbone table rows.jsonl`` prints the rows (and their profiles) as a markdown table.

Example (GPU)::

    python launch/bench.py backbone --backbones iresnet50 iresnet100 --batch-size 256 \\
        --out docs/benchmarks/backbone_<device>.jsonl

Example (CPU, the CI size)::

    python launch/bench.py backbone --backbones tiny --batch-size 8 --steps 3 --warmup 1 --image-size 32
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from offloadfr.bench.rows import device_name, emit_row, markdown_table, run_in_own_process

__all__ = ["bench_one", "main", "table", "ENGINES", "VARIANTS", "Variant", "ds_config_for", "profile_path",
           "summarise_profile"]

ENGINES = {
    "plain": "",
    "zero0": "ds_configs/deepspeed/zero0.json",
    "zero2": "ds_configs/deepspeed/zero2.json",
    "zero2_offload_cpu": "ds_configs/deepspeed/zero2_offload_cpu.json",
}
"""Engine configs the bench compares: ``plain`` (PyTorch optimizer) and the DeepSpeed JSONs (no NVMe: needs libaio)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """A DeepSpeed row that differs from one of :data:`ENGINES` in one thing (one hypothesis, docs/deepspeed.md)."""

    base: str
    """The :data:`ENGINES` entry it starts from."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dotted DeepSpeed keys set on top of the base JSON; ``None`` removes the key."""
    forward: str = "engine"
    """``engine``: ``DeepSpeedEngine.forward`` (DeepSpeed's forward); ``module``: the engine's module called directly
    under our own ``torch.autocast``, the engine itself configured in fp32 (hypothesis 1)."""
    hypothesis: int = 0
    """The docs/deepspeed.md hypothesis it tests."""


_BUCKET = "zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size"
VARIANTS: dict[str, Variant] = {
    # 1. DeepSpeed's forward switches an outer autocast off: the module under our own autocast instead.
    "zero0_module": Variant("zero0", forward="module", hypothesis=1),
    "zero2_module": Variant("zero2", forward="module", hypothesis=1),
    "zero2_offload_cpu_module": Variant("zero2_offload_cpu", forward="module", hypothesis=1),
    # 2. DeepSpeed's native bf16 (bf16 weights and BatchNorm, fp32 master copy) instead of its torch_autocast mode.
    "zero0_bf16": Variant("zero0", {"bf16.enabled": True}, hypothesis=2),
    "zero2_bf16": Variant("zero2", {"bf16.enabled": True}, hypothesis=2),
    "zero2_offload_cpu_bf16": Variant("zero2_offload_cpu", {"bf16.enabled": True}, hypothesis=2),
    # 3. Gradient bucketing on one process.
    "zero0_nosection": Variant("zero0", {"zero_optimization": None}, hypothesis=3),
    "zero2_no_overlap": Variant("zero2", {"zero_optimization.overlap_comm": False}, hypothesis=3),
    "zero2_no_contiguous": Variant("zero2", {"zero_optimization.contiguous_gradients": False}, hypothesis=3),
    # The JSON's 2e8-element buckets hold a whole iresnet50/100 (44 M / 65 M parameters): 1e7 makes 5-7 buckets.
    "zero2_bucket1e7": Variant("zero2", dict.fromkeys(_BUCKET, 10_000_000), hypothesis=3),
    # 5. CPU offload: unpinned host buffers (pinned is the JSON's setting).
    "zero2_offload_cpu_nopin": Variant("zero2_offload_cpu", {"zero_optimization.offload_optimizer.pin_memory": False},
                                       hypothesis=5),
}
"""Named DeepSpeed variants ``--engines`` accepts besides :data:`ENGINES` (docs/deepspeed.md, the hypotheses)."""

_ROOT = Path(__file__).resolve().parents[2]  # the checkout: ds_configs/ paths are relative to it
_COPY_OPS = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat",
             "aten::flatten_dense_tensors", "aten::unflatten_dense_tensors", "aten::zero_", "aten::fill_",
             "aten::mul_", "aten::div_", "aten::add_", "aten::narrow", "aten::view", "aten::empty", "aten::item",
             "aten::_local_scalar_dense")
"""Ops counted per step in a profile: the copies and casts an engine adds, the bookkeeping around them, and the
reads of a scalar (``aten::_local_scalar_dense``: on a GPU each one waits for the device)."""
_PHASES = ("bench/forward", "bench/backward", "bench/grad_norm", "bench/step")
"""``record_function`` ranges around the four parts of a step; a profile splits its op calls and CPU time by them."""
_DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
                "signed char": 1, "unsigned char": 1, "bool": 1, "short int": 2}


def _set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


def ds_config_for(engine: str, ds_set: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON of ``engine`` (an :data:`ENGINES` file or a :data:`VARIANTS` name) with ``ds_set`` applied.

    The values the run config fills (batch size, optimizer, precision) are left to the engine.
    """
    from offloadfr.train.ds_config import load_ds_config

    variant = VARIANTS.get(engine, Variant(engine))
    cfg = copy.deepcopy(load_ds_config(_ROOT / ENGINES[variant.base]))
    for key, value in {**variant.overrides, **(ds_set or {})}.items():
        _set_dotted(cfg, key, value)
    return cfg


def profile_path(out: str) -> Path:
    """Where ``--profile`` writes its summaries: ``rows.jsonl`` → ``rows.profile.jsonl`` beside it."""
    p = Path(out)
    return p.with_name(p.name.removesuffix(".jsonl") + ".profile.jsonl")


def _copied_bytes(event: Any) -> int:
    """Bytes read by an ``aten::copy_`` (its source: input 1), from the recorded shapes and dtypes."""
    shapes, dtypes = event.input_shapes, getattr(event, "input_dtypes", None) or []
    if len(shapes) < 2 or not shapes[1] or len(dtypes) < 2:
        return 0
    numel = 1
    for s in shapes[1]:
        numel *= int(s)
    return numel * _DTYPE_BYTES.get(str(dtypes[1]), 4)


def summarise_profile(prof: Any, steps: int, *, on_device: bool, top: int = 25) -> dict[str, Any]:
    """Per-step summary of a ``torch.profiler.profile`` over ``steps`` steps.

    Returns:
        ``top``: the ``top`` ops by self device time (``on_device``) or self CPU time, each with calls, self CPU and
        self device milliseconds per step; ``copy_ops``: calls per step of the copy/cast/bookkeeping ops of
        :data:`_COPY_OPS`; ``copy_bytes``: bytes read by ``aten::copy_`` per step; ``op_calls``: all recorded op
        calls per step; ``phases``: forward, backward, grad_norm and step apart (:func:`_by_phase`); ``syncs``:
        CUDA synchronize calls per step; on a GPU, ``copy_kernels`` (the 15 device kernels named memcpy, memset or
        copy with the most time: calls and ms per step) and ``copy_kernel_ms`` (all of them, ms per step).
    """
    from torch.autograd import DeviceType

    per = 1.0 / max(1, steps)
    averages = prof.key_averages()
    key = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    ranked = sorted(averages, key=key, reverse=True)[:top]
    top_ops = [{"op": e.key, "calls": e.count * per, "self_cpu_ms": e.self_cpu_time_total / 1e3 * per,
                "self_device_ms": e.self_device_time_total / 1e3 * per} for e in ranked]
    counts: Counter[str] = Counter()
    copy_bytes = 0
    op_calls = 0
    syncs = 0
    kernels: dict[str, dict[str, float]] = {}
    for ev in prof.events():
        name = ev.name
        if name.startswith("aten::"):
            op_calls += 1
        if name in _COPY_OPS:
            counts[name] += 1
        if name == "aten::copy_":
            copy_bytes += _copied_bytes(ev)
        if "Synchronize" in name:  # cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize
            syncs += 1
        if on_device and ev.device_type != DeviceType.CPU and ("Memcpy" in name or "Memset" in name
                                                               or "copy" in name.lower()):
            slot = kernels.setdefault(name[:160], {"calls": 0.0, "ms": 0.0})
            slot["calls"] += per
            slot["ms"] += ev.device_time_total / 1e3 * per
    copy_kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])[:15])
    return {"sorted_by": "self_device_time" if on_device else "self_cpu_time", "steps": steps, "top": top_ops,
            "copy_ops": {k: counts[k] * per for k in _COPY_OPS if counts[k]}, "copy_bytes": copy_bytes * per,
            "op_calls": op_calls * per, "phases": _by_phase(prof.events(), per), "copy_kernels": copy_kernels,
            "copy_kernel_ms": sum(v["ms"] for v in kernels.values()), "syncs": syncs * per}


def _by_phase(events: Any, per: float) -> dict[str, dict[str, float]]:
    """Per step and per :data:`_PHASES` range: its host wall time (``cpu_ms``), on a GPU the span of its device work
    (``device_ms``, from the profiler's device-side copy of the range), and the op calls, copies, bytes and scalar
    reads inside it."""
    from torch.autograd import DeviceType

    ranges, out = [], {}
    for name in _PHASES:
        out[name.removeprefix("bench/")] = {"cpu_ms": 0.0, "device_ms": 0.0, "op_calls": 0.0, "copy_calls": 0.0,
                                            "copy_bytes": 0.0, "scalar_reads": 0.0}
    for ev in events:
        if ev.name not in _PHASES:
            continue
        span_ms = (ev.time_range.end - ev.time_range.start) / 1e3 * per
        if ev.device_type == DeviceType.CPU:
            ranges.append((ev.name, ev.time_range.start, ev.time_range.end))
            out[ev.name.removeprefix("bench/")]["cpu_ms"] += span_ms
        else:  # the range as the device ran it (gpu_user_annotation)
            out[ev.name.removeprefix("bench/")]["device_ms"] += span_ms
    for ev in events:
        if not ev.name.startswith("aten::"):
            continue
        t = ev.time_range.start
        phase = next((n for n, a, b in ranges if a <= t <= b), None)
        if phase is None:
            continue
        slot = out[phase.removeprefix("bench/")]
        slot["op_calls"] += per
        if ev.name == "aten::copy_":
            slot["copy_calls"] += per
            slot["copy_bytes"] += _copied_bytes(ev) * per
        elif ev.name == "aten::_local_scalar_dense":  # .item(), float(t), bool(t): a device sync on a GPU
            slot["scalar_reads"] += per
    return out


def bench_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Times ``spec["steps"]`` backbone training steps (after ``spec["warmup"]``) in this process; returns the row.

    With ``spec["profile"] > 0`` the row also has ``"profile"``: :func:`summarise_profile` of that many more steps.
    """
    import torch
    from torch.profiler import record_function

    from offloadfr.config import EngineCfg, TrainCfg
    from offloadfr.models import build_backbone
    from offloadfr.train.ds_engine import DeepSpeedEngine, build_engine
    from offloadfr.train.engine import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() and spec["device"] != "cpu" else "cpu")
    torch.manual_seed(0)
    name = spec["engine"]
    variant = VARIANTS.get(name, Variant(name))
    channels_last = spec.get("channels_last", False)
    model = build_backbone(spec["backbone"], embedding_size=spec["dim"], image_size=spec["image_size"]).to(device)
    if channels_last and name == "plain":
        model = model.to(memory_format=torch.channels_last)  # deepspeed.initialize refuses these: inputs only
    train_cfg = TrainCfg(batch_size=spec["batch_size"], optimizer=spec["optimizer"], precision=spec["precision"],
                         grad_clip=5.0)
    autocast_dtype = resolve_precision(spec["precision"], device)
    if name == "plain":
        engine: Any = build_engine(EngineCfg(kind="plain"), train_cfg, model, device)
    else:
        ds_cfg = ds_config_for(name, spec.get("ds_set"))
        if variant.forward == "module":  # DeepSpeed in fp32; the autocast is ours (hypothesis 1)
            train_cfg = dataclasses.replace(train_cfg, precision="fp32")
        engine = DeepSpeedEngine(model, train_cfg, device, ds_config=ds_cfg)
    size = spec["image_size"]
    images = torch.rand(spec["batch_size"], 3, size, size, device=device).mul_(2).sub_(1)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def forward() -> Any:
        if variant.forward == "module":
            return module_forward(engine, images, autocast_dtype)
        return engine.forward(images)

    def one_step() -> None:
        with record_function("bench/forward"):
            emb_BD = forward()
            loss = emb_BD.float().pow(2).mean()
        with record_function("bench/backward"):
            engine.backward(loss)
        with record_function("bench/grad_norm"):
            engine.grad_norm()
        with record_function("bench/step"):
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
        "bench": "backbone", "status": "ok", **spec, "device_name": device_name(device),
        "step_ms_p50": times_ms[len(times_ms) // 2], "step_ms_min": times_ms[0], "step_ms_max": times_ms[-1],
        "peak_host_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "params": sum(p.numel() for p in engine.model.parameters()),
    }
    if name in VARIANTS:
        row["hypothesis"] = variant.hypothesis
    if name != "plain":
        row["ds_config"] = engine.config  # as run: the JSON, the variant's keys, and what [train] filled in
        row["ds_optimizer"] = type(engine.ds.optimizer).__name__
    if device.type == "cuda":
        row["peak_device_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_device_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    if spec.get("profile", 0) > 0:
        try:
            row["profile"] = _profile(one_step, spec["profile"], device)
        except Exception as e:  # noqa: BLE001 - the timed row above must not be lost to a profiler failure
            row["profile"] = {"error": f"{type(e).__name__}: {e}"}
    return row


def module_forward(engine: Any, images: Any, dtype: Any) -> Any:
    """Hypothesis 1: the DeepSpeed engine's module called directly, inside our own ``torch.autocast(dtype)``.

    ``DeepSpeedEngine.forward`` switches an outer autocast off (docs/deepspeed.md, Precision). Calling
    ``engine.model`` (``ds.module``) skips that forward; for ZeRO 0-2 on one process the step is the same
    (tests/test_ds_engine.py checks the weights against DeepSpeed's own forward, bit for bit, and against the plain
    engine's autocast; docs/deepspeed.md lists what DeepSpeed's forward does). Not for ZeRO-3.
    """
    import torch

    if dtype == torch.float32:
        return engine.model(images).float()
    with torch.autocast(device_type=images.device.type, dtype=dtype):
        return engine.model(images).float()


def _profile(one_step: Any, steps: int, device: Any) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # One step under the profiler before the recorded ones: its first step pays the profiler's own start-up.
    plan = schedule(wait=0, warmup=1, active=steps, repeat=1)
    with profile(activities=activities, record_shapes=True, schedule=plan) as prof:
        one_step()
        prof.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
            prof.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    return {**summarise_profile(prof, steps, on_device=device.type == "cuda"), "step_ms_profiled": wall_ms}


def _parse_ds_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench.py backbone: error: --ds-set {item!r} is not KEY=VALUE; write e.g. "
                             "zero_optimization.overlap_comm=false")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _per_phase(phases: dict[str, dict[str, float]], key: str) -> str:
    """``phases[...][key]`` for forward / backward / grad_norm / step, as one table cell."""
    return " / ".join(f"{phases[k].get(key, 0):.0f}" for k in ("forward", "backward", "grad_norm", "step")
                      if k in phases)


def table(rows_file: str) -> str:
    """A markdown table of the rows in ``rows_file`` and, when it exists, of their profiles beside it.

    ``vs plain`` is the row's ``step_ms_p50`` over that of the last plain row before it with the same backbone,
    precision, optimizer and channels_last (the issue's targets: at most 1.10 for ZeRO 0-2, 1.25 with CPU offload).
    """
    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines() if line.strip()]
    prof_file = profile_path(rows_file)
    profiles = ([json.loads(line) for line in prof_file.read_text().splitlines() if line.strip()]
                if prof_file.exists() else [])

    def same(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["backbone"], r["precision"], r["optimizer"], r.get("channels_last", False)

    plain: dict[tuple[Any, ...], float] = {}
    by_key = {(*same(p), p["engine"], p.get("step_ms_p50")): p["profile"] for p in profiles}
    cols = ["backbone", "engine", "precision", "optimizer", "channels_last", "status", "step_ms_p50", "step_ms_min",
            "vs plain", "peak_device_GiB", "peak_host_rss_GiB", "op calls", "fwd/bwd/norm/step op calls",
            "host ms fwd/bwd/norm/step", "device ms fwd/bwd/norm/step",
            "copy_ calls", "copy_ MB", "scalar reads", "syncs", "copy kernels ms"]
    table_rows = []
    for r in rows:
        if r["engine"] == "plain" and r["status"] == "ok":
            plain[same(r)] = r["step_ms_p50"]
        prof = by_key.get((*same(r), r["engine"], r.get("step_ms_p50")), {})
        phases = prof.get("phases", {})

        base = plain.get(same(r))
        cells = {**r, "vs plain": r["step_ms_p50"] / base if base and "step_ms_p50" in r else "",
                 "op calls": prof.get("op_calls", ""), "fwd/bwd/norm/step op calls": _per_phase(phases, "op_calls"),
                 "host ms fwd/bwd/norm/step": _per_phase(phases, "cpu_ms"),
                 "device ms fwd/bwd/norm/step": _per_phase(phases, "device_ms") if r.get("peak_device_GiB") else "",
                 "copy_ calls": prof.get("copy_ops", {}).get("aten::copy_", ""),
                 "copy_ MB": prof["copy_bytes"] / 1e6 if "copy_bytes" in prof else "",
                 "scalar reads": prof.get("copy_ops", {}).get("aten::_local_scalar_dense", 0) if prof else "",
                 "syncs": prof.get("syncs", ""), "copy kernels ms": prof.get("copy_kernel_ms", "")}
        table_rows.append(cells)
    return "\n".join(markdown_table(cols, table_rows, fmt=lambda v: f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"))


def main(argv: list[str]) -> int:
    """``backbone`` subcommand of launch/bench.py: one subprocess per (backbone, engine); prints JSON rows."""
    if argv and argv[0] == "_one":
        print(json.dumps(bench_one(json.loads(argv[1]))))
        return 0
    if argv and argv[0] == "table":  # bench.py backbone table rows.jsonl: markdown, with the profiles beside it
        print(table(argv[1]))
        return 0
    names = list(ENGINES) + list(VARIANTS)
    p = argparse.ArgumentParser(prog="bench.py backbone", description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["iresnet50", "iresnet100"])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=names, metavar="ENGINE",
                   help="plain, a JSON of ds_configs/deepspeed/ or a variant: " + ", ".join(names))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last images; channels_last parameters too for the plain engine")
    p.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE",
                   help="DeepSpeed key for every DeepSpeed row (dotted, JSON value; null removes); repeatable")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N more steps per row; summaries in <out>.profile.jsonl (needs --out)")
    p.add_argument("--out", help="append the JSON rows to this file")
    args = p.parse_args(argv)
    if args.profile and not args.out:
        p.error("--profile N writes beside --out: pass --out rows.jsonl")
    ds_set = _parse_ds_set(args.ds_set)
    failed = 0
    for backbone in args.backbones:
        for engine in args.engines:
            spec = {"backbone": backbone, "engine": engine, "batch_size": args.batch_size,
                    "image_size": args.image_size, "dim": args.dim, "optimizer": args.optimizer,
                    "precision": args.precision, "device": args.device, "warmup": args.warmup, "steps": args.steps,
                    "channels_last": args.channels_last, "profile": args.profile}
            if ds_set and engine != "plain":
                spec["ds_set"] = ds_set
            row = run_in_own_process("offloadfr.bench.backbone", spec, bench="backbone")
            failed += row["status"] != "ok"
            summary = row.pop("profile", None)  # the summary, or the spec's 0 (no --profile) in the row
            emit_row(row, args.out)
            if isinstance(summary, dict) and args.out:
                keys = ("backbone", "engine", "precision", "optimizer", "channels_last", "ds_set", "step_ms_p50")
                with open(profile_path(args.out), "a") as fh:
                    fh.write(json.dumps({**{k: row[k] for k in keys if k in row}, "profile": summary}) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
