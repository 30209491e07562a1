"""``launch/bench.py host`` (offloadfr/bench/host.py): partial_fc's host path at a device step of T ms, in CI size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offloadfr.bank.zarr_bank import ZarrBank
from offloadfr.bench.host import prepare_warm_bank

REPO = Path(__file__).resolve().parent.parent


def _host_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    out = tmp_path / "rows.jsonl"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/bench.py"), "host", "--num-classes", "20000", "--batch-size", "64",
         "--dim", "16", "--num-slots", "3072", "--warmup", "0", "--steps", "12", "--set", "bank.chunk_rows=256",
         "--bank-dir", str(tmp_path / "fresh"), "--out", str(out), *args],
        capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return proc, rows


@pytest.mark.slow
def test_host_bench_rows(tmp_path: Path) -> None:
    """Every tier, bank state and label order steps at T ms: catches a row that errors, a step rate above what the
    wait allows, traffic that is not counted (rows through the prefetcher, blocks from the store or the initialiser),
    a warm bank that is made twice or starts with unstored blocks, and fresh banks left behind."""
    warm_dir = tmp_path / "warm"
    proc, rows = _host_bench(tmp_path, "--tiers", "ram", "nvme", "--bank-states", "fresh", "warm",
                             "--labels", "uniform", "block", "--device-ms", "20", "--warm-bank-dir", str(warm_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(r["tier"], r["bank_state"], r["labels"], r["status"]) for r in rows] == [
        (tier, state, labels, "ok") for tier in ("ram", "nvme") for state in ("fresh", "warm")
        for labels in ("uniform", "block")]
    for r in rows:
        assert 0 < r["steps_per_s"] <= r["ideal_steps_per_s"] * 1.02 and r["ideal_steps_per_s"] == pytest.approx(50)
        assert 0 <= r["device_idle_pct"] < 100 and 0 <= r["prefetch_stall_pct"] < 100 and r["boundary_ms"] > 0
        assert r["plan_ms"] > 0 and r["container_ms"] > 0 and r["worker_ms_per_step"] > 0
        # 3072 slots over L + 1 = 3 queued steps: about 1000 new ids a plan, 12 + L plans in the 12 steps (no warmup),
        # each row 2 arrays x 16 float32
        assert 700 < r["rows_read_per_step"] <= 1024 * 14 / 12
        assert r["bank_read_Bps"] == pytest.approx(r["rows_read_per_step"] * r["steps_per_s"] * 2 * 16 * 4, rel=0.1)
        assert r["bank_written_Bps"] > 0 and r["cpu_cores_used"] > 0 and r["peak_host_rss_GiB"] > 0
        assert r["block_rows"] == 256 and r["bank_dtype"] == "float32" and r["env"]["torch"]
        assert r["config"]["cache"]["num_slots"] == 3072 and r["config"]["bank"]["tier"] == r["tier"]
    by = {(r["tier"], r["bank_state"], r["labels"]): r for r in rows}
    assert by[("ram", "fresh", "uniform")]["bank_blocks_initialised_per_s"] > 0  # first touches (no warmup steps)
    assert by[("ram", "warm", "uniform")]["bank_blocks_initialised_per_s"] == 0  # every block resident before it
    for labels in ("uniform", "block"):
        assert by[("nvme", "fresh", labels)]["bank_blocks_initialised_per_s"] > 0
        warm = by[("nvme", "warm", labels)]
        assert warm["bank_blocks_initialised_per_s"] == 0 and warm["storage_read_Bps"] > 0  # from the store
    assert "warm_bank_prepare_s" in by[("nvme", "warm", "uniform")]  # made once, for the first of its rows
    assert "warm_bank_prepare_s" not in by[("nvme", "warm", "block")]
    assert [p.name for p in warm_dir.iterdir()] == ["partial_fc-n20000-d16-float32-r256"]
    assert list((tmp_path / "fresh").iterdir()) == []
    table = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "host", "--table",
                            str(tmp_path / "rows.jsonl")], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.count("\n") == 2 + len(rows), table.stderr


def test_host_bench_refuses_warm_nvme_without_its_directory(tmp_path: Path) -> None:
    proc, rows = _host_bench(tmp_path, "--tiers", "nvme", "--bank-states", "warm")
    assert proc.returncode == 2 and "--warm-bank-dir" in proc.stderr and rows == []


def test_prepare_warm_bank_stores_every_block_with_its_initial_rows(tmp_path: Path) -> None:
    """A warm bank reads like a fresh one (the initial rows), but from the store; a second call keeps it."""
    path = tmp_path / "warm"
    seconds = prepare_warm_bank(path, num_classes=1000, dim=8, dtype="bfloat16", chunk_rows=128, seed=5,
                                init_std=0.02, progress=False)
    assert seconds > 0 and prepare_warm_bank(path, num_classes=1000, dim=8, dtype="bfloat16", chunk_rows=128,
                                             seed=5, init_std=0.02, progress=False) == 0.0
    fresh = ZarrBank.create(tmp_path / "fresh", num_classes=1000, dim=8, arrays=("centers", "momentum"),
                            head_kind="partial_fc", chunk_rows=128, seed=5, init_std=0.02, dtype="bfloat16")
    warm = ZarrBank.open(path, tier="nvme", read_only=True, cache_blocks=16)
    ids = torch.arange(1000)
    for name in ("centers", "momentum"):
        assert torch.equal(warm.read_rows(ids, name), fresh.read_rows(ids, name))
    stats = warm.stats()
    assert warm.step == 0 and stats["bank/blocks_initialised"] == 0 and stats["bank/blocks_loaded"] == 2 * 8
    warm.close()
    fresh.close()


@pytest.mark.slow
def test_host_bench_center_bank_rows(tmp_path: Path) -> None:
    """The bank mode of dcp and attfc through the same path: each step reads about its n negatives (the rotation
    pointer's next seen ids: every id is seen) plus the batch's new identities, from the store when the bank is
    warm, and each head gets its own warm bank (one array, its own head kind)."""
    warm_dir = tmp_path / "warm"
    proc, rows = _host_bench(tmp_path, "--heads", "dcp", "attfc", "--bank-negatives", "512", "--tiers", "nvme",
                             "--bank-states", "fresh", "warm", "--labels", "block", "--device-ms", "20",
                             "--warm-bank-dir", str(warm_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(r["head"], r["bank_state"], r["status"]) for r in rows] == [
        (head, state, "ok") for head in ("dcp", "attfc") for state in ("fresh", "warm")]
    for r in rows:
        assert r["config"]["head"]["bank_negatives"] == 512 and r["bank_negatives"] == 512
        assert 400 < r["rows_read_per_step"] <= (512 + 64) * 14 / 12
        assert r["bank_read_Bps"] == pytest.approx(r["rows_read_per_step"] * r["steps_per_s"] * 16 * 4, rel=0.1)
        if r["bank_state"] == "warm":
            assert r["bank_blocks_initialised_per_s"] == 0 and r["storage_read_Bps"] > 0
    assert sorted(p.name for p in warm_dir.iterdir()) == ["attfc-n20000-d16-float32-r256",
                                                          "dcp-n20000-d16-float32-r256"]
