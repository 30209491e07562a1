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


@pytest.mark.slow
def test_backbone_bench_knobs_profile_channels_last_and_variants(tmp_path: Path) -> None:
    """The knobs the hypotheses of docs/deepspeed.md need, in CI size: ``--profile`` writes one summary per row
    beside ``--out`` (top ops, copy counts and bytes), ``--channels-last`` reaches the rows (DeepSpeed with
    channels_last images and contiguous parameters runs), a named variant and ``--ds-set`` change the config that
    runs, and the module-under-our-autocast variant trains. Catches a knob that is parsed but never applied."""
    out = tmp_path / "backbone.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/bench.py"), "backbone", "--backbones", "tiny", "--engines", "plain",
         "zero0_nosection", "zero2_module", "--batch-size", "4", "--image-size", "32", "--dim", "16", "--steps", "1",
         "--warmup", "1", "--precision", "bf16", "--channels-last", "--profile", "1",
         "--ds-set", "zero_optimization.reduce_bucket_size=1000",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["engine"], r["status"], r["channels_last"]) for r in rows] == [
        ("plain", "ok", True), ("zero0_nosection", "ok", True), ("zero2_module", "ok", True)]
    assert "ds_config" not in rows[0] and "profile" not in rows[0]  # the profile goes to its own file
    assert rows[1]["ds_config"]["zero_optimization"] == {"reduce_bucket_size": 1000}  # section removed, then set
    assert rows[1]["ds_config"]["torch_autocast"]["enabled"] is True  # bf16 through DeepSpeed's forward
    zero2 = rows[2]["ds_config"]
    assert zero2["zero_optimization"]["stage"] == 2 and rows[2]["ds_optimizer"] == "DeepSpeedZeroOptimizer"
    assert zero2["bf16"]["enabled"] is False and "torch_autocast" not in zero2  # fp32 engine, our autocast
    profiles = [json.loads(line) for line in (tmp_path / "backbone.profile.jsonl").read_text().splitlines()]
    assert [p["engine"] for p in profiles] == ["plain", "zero0_nosection", "zero2_module"]
    for p in profiles:
        summary = p["profile"]
        assert summary["sorted_by"] == "self_cpu_time" and 0 < len(summary["top"]) <= 25
        assert summary["op_calls"] > 0 and summary["copy_ops"]["aten::copy_"] > 0 and summary["copy_bytes"] > 0
    # ZeRO-2 copies every gradient into its partition: more bytes than the plain engine's step.
    assert profiles[2]["profile"]["copy_bytes"] > profiles[0]["profile"]["copy_bytes"]
    phases = profiles[2]["profile"]["phases"]
    assert list(phases) == ["forward", "backward", "grad_norm", "step"] and all(
        p["op_calls"] > 0 and p["cpu_ms"] > 0 for p in phases.values())
    table = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "backbone", "table", str(out)],
                           capture_output=True, text=True, timeout=60)
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and len(lines) == 2 + 3, table.stdout + table.stderr
    assert lines[2].startswith("| tiny | plain | bf16 |") and "| 1 |" in lines[2]  # its own reference


def test_backbone_bench_config_helpers() -> None:
    """Catches a variant whose keys do not reach the JSON (or do not remove it), a profile file that overwrites the
    rows, and a --ds-set value left as a string."""
    from offloadfr.bench.backbone import VARIANTS, _parse_ds_set, ds_config_for, profile_path

    assert "zero_optimization" not in ds_config_for("zero0_nosection")
    assert ds_config_for("zero2_no_overlap")["zero_optimization"]["overlap_comm"] is False
    assert ds_config_for("zero2")["zero_optimization"]["overlap_comm"] is True
    assert ds_config_for("zero2_bf16", {"bf16.enabled": None}).get("bf16") == {}
    assert all(v.base in ("zero0", "zero2", "zero2_offload_cpu") for v in VARIANTS.values())
    assert profile_path("out/rows.jsonl") == Path("out/rows.profile.jsonl")
    assert _parse_ds_set(["a.b=false", "c=5e7", "d=null", "e=cpu"]) == {"a.b": False, "c": 5e7, "d": None, "e": "cpu"}


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
