"""Runs a command as the W processes of one gloo group, the way a launcher (torchrun, accelerate) would: the tests of
real multi-process training use it (test_dist, test_dist_train, test_dist_resume)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(argv: list[str], world: int, *, timeout_s: float, what: str) -> list[str]:
    """Runs ``argv`` (from the repo root, 1 thread each) as ranks ``0 .. world-1`` and returns each rank's output.

    With ``world == 1`` no distributed variable is set (the plain 1-process path). A hang past ``timeout_s`` kills
    every rank and fails the test with their logs; a rank exiting non-zero fails it with that rank's output.
    """
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(world))
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join(f"--- rank {r}\n{p.communicate()[0]}" for r, p in enumerate(procs))
        pytest.fail(f"{what}: {world} processes did not finish in {timeout_s} s (hang?)\n{logs}")
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"{what}: rank {rank} of {world} exited with {p.returncode}:\n{out}"
    return outputs
