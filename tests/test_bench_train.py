"""``launch/bench.py train`` (offloadfr/bench/train.py): the end-to-end scale benchmark in CI size, and its
synthetic label orders against the samplers they stand for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offloadfr.bench.train import make_labels
from offloadfr.data.samplers import SamplerSpec, plan_epoch
from offloadfr.data.shards import DatasetIndex, ShardInfo
from offloadfr.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_train_bench_rows_at_1m_ids(tmp_path: Path) -> None:
    """The command of the GPU runs at N = 1M in CI size: catches a head, tier or label order the benchmark cannot
    build or step (a row with status error), missing fields, bank traffic that is not counted, a head share or a
    ratio outside what a real measurement can give, and banks left behind in --bank-dir."""
    out = tmp_path / "rows.jsonl"
    banks = tmp_path / "banks"
    banks.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/bench.py"), "train", "--num-classes", "1000000", "--backbone", "tiny",
         "--batch-size", "16", "--image-size", "32", "--dim", "16", "--num-slots", "2048",
         "--heads", "partial_fc:ram", "partial_fc:nvme", "--labels", "uniform", "grouped", "--steps", "3",
         "--warmup", "1", "--bank-dir", str(banks), "--set", "train.cpu_threads=1", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["head"], r["labels"], r["status"]) for r in rows] == [
        ("backbone_only", "none", "ok"), ("partial_fc:ram", "uniform", "ok"), ("partial_fc:ram", "grouped", "ok"),
        ("partial_fc:nvme", "uniform", "ok"), ("partial_fc:nvme", "grouped", "ok")]
    for r in rows:
        assert r["num_classes"] == 1_000_000 and r["engine"] == "plain" and r["skipped_steps"] == 0
        assert r["images_per_s"] > 0 and r["peak_host_rss_GiB"] > 0 and 0 < r["step_ms_p50"] <= r["step_ms_max"]
        assert 0 < r["head_share"] < 1 and r["env"]["torch"] and r["device_name"]
    base = rows[0]
    assert "ratio_to_backbone_only" not in base and "bank_read_Bps" not in base
    for r in rows[1:]:
        assert 0 < r["ratio_to_backbone_only"] < 1.5
        assert r["ratio_to_backbone_only"] == pytest.approx(r["images_per_s"] / base["images_per_s"])
        assert r["head_share"] > base["head_share"]  # a 1M-id softmax costs more than the mean of squares
        assert r["bank_read_Bps"] > 0 and r["bank_written_Bps"] >= 0 and r["prefetch_stall_pct"] >= 0
        assert r["config"]["cache"]["num_slots"] == 2048 and r["config"]["bank"]["tier"] == r["head"].split(":")[1]
    for r in rows[3:]:  # nvme: blocks come from the store or, never written yet, from the initialiser
        assert r["bank_blocks_loaded_per_s"] + r["bank_blocks_initialised_per_s"] > 0
    assert list(banks.iterdir()) == []
    table = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "train", "--table", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.count("\n") == 2 + len(rows), table.stderr


@pytest.mark.slow
def test_train_bench_runs_the_generated_center_heads(tmp_path: Path) -> None:
    """Issue 9 asks for dcp and attfc rows: catches a head whose batches the benchmark cannot build (dcp's dual
    batches, attfc's query + keys) or whose own work (the dual split, the key images) escapes the head's time."""
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/bench.py"), "train", "--num-classes", "1000", "--backbone", "tiny",
         "--batch-size", "16", "--image-size", "32", "--dim", "16", "--heads", "dcp", "attfc", "--labels", "uniform",
         "--steps", "2", "--warmup", "1", "--set", "train.cpu_threads=1", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["head"], r["status"]) for r in rows] == [("backbone_only", "ok"), ("dcp", "ok"), ("attfc", "ok")]
    for r in rows[1:]:
        assert r["skipped_steps"] == 0 and 0 < r["head_share"] < 1 and r["head_share"] > rows[0]["head_share"]


def test_grouped_labels_are_p_identities_times_k() -> None:
    """Catches a grouped batch that is not the identity sampler's layout (K consecutive rows per identity)."""
    batches = make_labels("grouped", num_classes=1_000_000, batch_size=12, num_batches=5, images_per_identity=4,
                          block_rows=1, block_window=1, seed=0)
    assert len(batches) == 5
    for labels in batches:
        assert labels.dtype == torch.int64 and labels.shape == (12,)
        groups = labels.reshape(3, 4)
        assert bool((groups == groups[:, :1]).all()) and int(labels.max()) < 1_000_000
    with pytest.raises(ConfigError, match="multiple of 4"):
        make_labels("grouped", num_classes=100, batch_size=10, num_batches=1, images_per_identity=4, block_rows=1,
                    block_window=1, seed=0)


def test_block_labels_follow_the_block_sampler() -> None:
    """The ``block`` order against ``plan_epoch`` of the block sampler on a dataset with K images per id: catches a
    window that spreads a batch over more (or fewer) bank blocks than the sampler does, or ids seen too often."""
    n, rows, window, k, b, steps = 4000, 50, 4, 2, 32, 40
    index = DatasetIndex(root=Path("/nonexistent"), num_classes=n, num_samples=n * k, image_size=32,
                         shards=tuple(ShardInfo(path=Path(f"/nonexistent/{s}.tar"), ids=tuple(range(s, s + 500)),
                                                counts=(k,) * 500, num_samples=500 * k) for s in range(0, n, 500)),
                         meta={})
    plan = plan_epoch(index, SamplerSpec(kind="block", batch_size=b, window=window, block_rows=rows), seed=0, epoch=0,
                      rank=0, world_size=1)
    ours = make_labels("block", num_classes=n, batch_size=b, num_batches=steps, images_per_identity=k,
                       block_rows=rows, block_window=window, seed=0)
    theirs = plan.labels[:steps]

    def blocks_per_batch(batches: list) -> float:
        return float(np.mean([len(np.unique(np.asarray(x) // rows)) for x in batches]))

    assert blocks_per_batch(ours) == pytest.approx(blocks_per_batch(theirs), rel=0.25)
    seen = np.bincount(torch.cat(ours).numpy(), minlength=n)
    assert seen.max() <= k and seen.sum() == steps * b


def test_head_backward_interval_ends_between_head_and_backbone_gradients() -> None:
    """The head share's backward part ends after the head's own row gradient and before any backbone gradient:
    catches a marker that closes the interval too early (head work counted as backbone) or too late."""
    from offloadfr.bench.train import _Clock, _timed_head
    from offloadfr.heads import Head

    order: list[str] = []

    class RowHead(Head):
        def __init__(self) -> None:
            super().__init__()
            self.w_CD = torch.nn.Parameter(torch.randn(300, 8))
            self.w_CD.register_hook(lambda g: order.append("head rows"))

        def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
            cos_BC = torch.nn.functional.normalize(emb_BD) @ torch.nn.functional.normalize(self.w_CD).t()
            return torch.nn.functional.cross_entropy(10 * cos_BC, labels_B)

    backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    for p in backbone.parameters():
        p.register_hook(lambda g: order.append("backbone"))
    head = _timed_head(RowHead(), _Clock(torch.device("cpu")))
    end_backward = head._end_backward
    head._end_backward = lambda: (order.append("end of head backward"), end_backward())
    loss = head(backbone(torch.randn(6, 4)), torch.randint(0, 300, (6,)))
    loss.backward()
    assert order == ["head rows", "end of head backward"] + ["backbone"] * 4
    assert len(head.intervals) == 2 and all(t1 >= t0 for t0, t1 in head.intervals)  # forward, backward
