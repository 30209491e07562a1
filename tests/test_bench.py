"""The benchmark harness in CI size, so it cannot rot: every head row comes back with status ok."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_head_bench_rows(tmp_path: Path) -> None:
    """Catches a head the benchmark cannot build or step (a row with status error) or missing fields."""
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/bench.py"), "head", "--num-classes", "1000", "--heads", "fc", "pfc_dense",
         "partial_fc:ram", "partial_fc:nvme", "--batch-size", "16", "--dim", "8", "--num-slots", "256",
         "--steps", "6", "--warmup", "1", "--labels", "window", "--window", "300", "--bank-dir", str(tmp_path),
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["head"] for r in rows] == ["fc", "pfc_dense", "partial_fc:ram", "partial_fc:nvme"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_ms_p50"] > 0 and r["peak_host_rss_GiB"] > 0
    assert rows[2]["bank/rows_read_per_step"] > 0 and "prefetch_stall_pct" in rows[2]
    assert rows[2]["logit_columns"] == 256 and rows[0]["logit_columns"] == 1000
    table = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "table", str(out)], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.count("\n") == 6


@pytest.mark.slow
def test_backbone_bench_rows(tmp_path: Path) -> None:
    """``bench.py backbone`` in CI size: the plain engine and the ZeRO-2 CPU-offload engine each give an ok row."""
    out = tmp_path / "backbone.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/bench.py"), "backbone", "--backbones", "tiny", "--engines", "plain",
         "zero2_offload_cpu", "--batch-size", "4", "--image-size", "32", "--dim", "16", "--steps", "2",
         "--warmup", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["backbone"], r["engine"], r["status"]) for r in rows] == [("tiny", "plain", "ok"),
                                                                         ("tiny", "zero2_offload_cpu", "ok")]
    for r in rows:
        assert 0 < r["step_ms_min"] <= r["step_ms_p50"] <= r["step_ms_max"] and r["peak_host_rss_GiB"] > 0
        assert r["device_name"]


def test_kernel_bench_rows(tmp_path: Path) -> None:
    """``bench.py kernel`` in CI size: a row per variant and K, the plain ones timed; with the Triton interpreter on
    (conftest's TRITON_INTERPRET=1 reaches the subprocess) the fused ones too, agreeing with ``torch:fp32``. Catches a
    variant the benchmark cannot run, a fused step that computes another loss or row update, or a table that drops the
    kernel rows' columns."""
    out = tmp_path / "kernel.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/bench.py"), "kernel", "--num-slots", "100", "300", "--batch-size", "4",
         "--dim", "8", "--steps", "1", "--warmup", "1", "--out", str(out)], capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["num_slots"], r["variant"]) for r in rows] == [(k, v) for k in (100, 300) for v in (
        "torch:fp32", "torch:tf32", "torch:bf16", "triton:fp32", "triton:tf32", "triton:bf16")]
    has_triton = importlib.util.find_spec("triton") is not None
    runnable = has_triton and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
    for r in rows:
        if r["kernel"] == "triton" and not runnable:
            assert r["status"] == "skipped" and "triton" in r["reason"]
            continue
        assert r["status"] == "ok" and 0 < r["step_ms_p50"] <= r["step_ms_p90"], r
        assert r["loss_rel_diff"] < (1e-5 if r["gemm_precision"] == "fp32" else 1e-2), r
        assert r["step_ms_p50"] >= r["backward_ms_p50"] > 0 and r["update_ms_p50"] > 0, r
        assert r["update_rel_diff"] < 1e-6 and r["fused"] == {"torch": "none", "triton": "normalize+margin_ce+row_sgd"}[
            r["kernel"]], r
    table = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "table", str(out)], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.count("\n") == 2 + len(rows), table.stderr
    assert "| update_ms_p50 |" in table.stdout and "| 300 | triton:bf16 | normalize+margin_ce+row_sgd |" in table.stdout
