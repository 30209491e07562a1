"""What the benchmarks share: run one configuration in its own Python process, so that its peak host and device
memory are its own (``bench.py backbone`` and ``bench.py train``), print and append its JSON row, and render rows as
a markdown table (every ``bench.py`` table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_in_own_process", "row_commands", "emit_row", "markdown_table", "device_name", "environment"]

_ROOT = Path(__file__).resolve().parents[2]  # the checkout, so the child imports this offloadfr


def run_in_own_process(module: str, spec: dict[str, Any], *, bench: str) -> dict[str, Any]:
    """Runs ``python -m module _one <spec as JSON>`` and returns the JSON row it printed last.

    A child that fails gives a row with ``"status": "oom"`` (out of memory, or killed by the OOM killer: a result,
    for the in-device heads at large N) or ``"error"``, with the spec and the child's last line of stderr.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", module, "_one", json.dumps(spec)], capture_output=True, text=True,
                          cwd=_ROOT, env=env)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    err = proc.stderr.strip().splitlines()
    oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
    return {"bench": bench, "status": "oom" if oom else "error", **spec,
            "error": err[-1] if err else str(proc.returncode)}


def row_commands(argv: Sequence[str], *, bench: str, bench_one: Callable[[dict[str, Any]], dict[str, Any]],
                 table: Callable[[list[dict[str, Any]]], str]) -> int | None:
    """The two commands of a benchmark that runs each configuration in its own process, answered before its options:
    ``_one SPEC`` (the child of :func:`run_in_own_process`: runs ``bench_one`` on the JSON spec, prints its row) and
    ``--table ROWS.jsonl`` (prints ``table`` of the file's rows of this ``bench``). Returns the exit code, or None
    when ``argv`` is neither."""
    if argv and argv[0] == "_one":
        print(json.dumps(bench_one(json.loads(argv[1]))))
        return 0
    if argv and argv[0] == "--table":
        if len(argv) != 2:
            raise SystemExit(f"usage: bench.py {bench} --table ROWS.jsonl")
        lines = Path(argv[1]).read_text().splitlines()
        print(table([row for row in map(json.loads, lines) if row.get("bench") == bench]))
        return 0
    return None


def emit_row(row: dict[str, Any], out: str | None) -> None:
    """Prints ``row`` as one JSON line and appends it to ``out`` when given."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")


def _three_digits(value: float) -> str:
    return f"{value:.3g}"


def markdown_table(columns: Sequence[str], rows: Iterable[Mapping[str, Any]],
                   fmt: Callable[[float], str] = _three_digits) -> list[str]:
    """The lines of a markdown table: the header, the separator, then one line per row with its ``columns`` (a
    missing cell is empty, a float goes through ``fmt``, anything else through ``str``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt(v) if isinstance(v, float) else str(v) for v in (row.get(c, "") for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_PACKAGES = ("deepspeed", "zarr", "numcodecs", "webdataset", "numpy", "triton")
"""The packages whose versions a row's ``env`` records (besides torch); read from their metadata, not imported."""


def environment() -> dict[str, str]:
    """The ``env`` of every benchmark row: Python, torch and CUDA, the CPU (model and core count), the device, the
    versions of the packages that decide the numbers (``absent`` when not installed), and the checkout's commit."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
           "machine": platform.machine(), "cpus": str(os.cpu_count()), "cpu": _cpu_model(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for package in _PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_ROOT)
    if git.returncode == 0:
        out["commit"] = git.stdout.strip()
    return out


def _cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: Any) -> str:
    """What a row names as its machine: the GPU's name, or the CPU and the threads torch uses on it."""
    import platform

    import torch

    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
