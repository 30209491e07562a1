"""What the process-per-configuration benchmarks share (``bench.py backbone`` and ``bench.py train``): run one
configuration in its own Python process, so that its peak host and device memory are its own, and print and append
its JSON row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["run_in_own_process", "emit_row"]

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


def emit_row(row: dict[str, Any], out: str | None) -> None:
    """Prints ``row`` as one JSON line and appends it to ``out`` when given."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")
