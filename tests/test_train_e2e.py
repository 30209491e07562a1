"""End to end on a tiny synthetic dataset: synth → train → checkpoint → eval (library and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offloadfr.config import load_config
from offloadfr.train.trainer import train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("e2e")
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", "run.name=e2e",
        "synth.num_identities=24", "synth.num_holdout=8", "synth.image_size=32", "synth.num_pairs=40",
        "synth.min_images=4", "synth.max_images=12", "synth.mean_images=8.0", "synth.samples_per_shard=50",
        "data.num_workers=0", "train.batch_size=16", "train.epochs=3", "train.log_every=2",
        "train.warmup_steps=0", "eval.batch_size=32",
    ])
    return root, train(cfg)


def test_run_writes_config_metrics_checkpoint_and_eval(tiny_run: tuple[Path, object]) -> None:
    """Catches a run that forgets one of its outputs or writes eval.json without the documented keys."""
    root, result = tiny_run
    run_dir = root / "runs" / "e2e"
    assert (run_dir / "config.toml").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all({"step", "loss", "lr", "throughput(img/s)"} <= set(r) for r in rows)
    assert rows[-1]["step"] == result.steps
    assert (result.checkpoint / "state.pt").is_file() and (result.checkpoint / "config.toml").is_file()
    ev = json.loads((run_dir / "eval.json").read_text())
    assert {"accuracy", "accuracy_std", "threshold", "tar_at_far"} <= set(ev)
    assert set(ev["tar_at_far"]) == {"1e-3", "1e-2", "1e-1"}
    assert 0.0 <= ev["accuracy"] <= 1.0


def test_loss_goes_down(tiny_run: tuple[Path, object]) -> None:
    """Catches a training loop that does not update the backbone or the head (loss flat)."""
    root, _ = tiny_run
    rows = [json.loads(line) for line in (root / "runs/e2e/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_eval_cli_reproduces_eval_json(tiny_run: tuple[Path, object]) -> None:
    """Catches `offloadfr eval` rebuilding a different model than was trained (wrong config or weights)."""
    root, result = tiny_run
    before = json.loads((root / "runs/e2e/eval.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "offloadfr.cli", "eval", "--checkpoint", str(result.checkpoint),
                           "--pairs", str(root / "data" / "pairs.bin")], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["accuracy"] == pytest.approx(before["accuracy"])
    assert row["tar_at_far"] == pytest.approx(before["tar_at_far"])


def test_deepspeed_engine_trains_and_checkpoints(tiny_run: tuple[Path, object]) -> None:
    """Catches the trainer not routing engine.kind = "deepspeed" to DeepSpeed (ZeRO-2 with CPU offload), or a
    checkpoint without DeepSpeed's own files or without weights that `offloadfr eval` can load."""
    root, _ = tiny_run
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", "run.name=ds",
        "data.num_workers=0", "train.batch_size=16", "train.epochs=1", "train.log_every=2", "train.warmup_steps=0",
        "engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/deepspeed/zero2_offload_cpu.json",
    ])
    result = train(cfg)
    assert result.steps > 0
    assert (result.checkpoint / "deepspeed").is_dir()
    assert result.eval is not None and 0.0 <= result.eval["accuracy"] <= 1.0


def test_eval_cli_one_row_per_pack(tiny_run: tuple[Path, object]) -> None:
    """Catches `offloadfr eval --pairs A B` evaluating only the first pack."""
    root, result = tiny_run
    pack = str(root / "data" / "pairs.bin")
    proc = subprocess.run([sys.executable, "-m", "offloadfr.cli", "eval", "--checkpoint", str(result.checkpoint),
                           "--pairs", pack, pack], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 2 and rows[0]["accuracy"] == rows[1]["accuracy"] and rows[0]["pairs"] == pack
