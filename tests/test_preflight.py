"""Pre-flight checks (offloadfr/train/preflight.py) and checkpoints by wall time (offloadfr/train/checkpoint_timer.py):
a bad input is refused before the first step, not after the whole run has trained; a dataset without a verification
pack trains and exits 0; a killed run loses at most ``train.checkpoint_every_minutes`` of training by default."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offloadfr.cli import main
from offloadfr.config import TrainCfg, load_config
from offloadfr.distributed import DistEnv
from offloadfr.train import checkpoint_timer
from offloadfr.train.checkpoint import checkpoint_steps
from offloadfr.train.checkpoint_timer import CheckpointTimer
from offloadfr.train.preflight import (
    OutputPathError,
    check_output,
    check_writable_dir,
    estimate_checkpoint_bytes,
    preflight,
)
from offloadfr.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
TINY = ["synth.num_identities=16", "synth.num_holdout=6", "synth.num_pairs=20", "synth.min_images=3",
        "synth.max_images=8", "synth.mean_images=5.0", "synth.samples_per_shard=30", "data.num_workers=0",
        "train.batch_size=8", "train.epochs=1", "eval.at_end=false", "run.tensorboard=off"]


def _overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", f"run.name={name}", *TINY, *extra]


def _sets(root: Path, name: str, *extra: str) -> list[str]:
    return [arg for kv in _overrides(root, name, *extra) for arg in ("--set", kv)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset and one finished run (run.name=ok)."""
    root = tmp_path_factory.mktemp("preflight")
    assert main(["train", *_sets(root, "ok")]) == 0
    return root


def test_a_bad_pack_stops_the_run_before_its_first_step(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a typo in eval.pairs (or a truncated pack) reported only after the whole run has trained: nothing of
    the run (metrics, checkpoints) may be written before the refusal."""
    truncated = root / "truncated.bin"
    truncated.write_bytes((root / "data" / "pairs.bin").read_bytes()[:300])
    for name, pack in (("typo", root / "pairz.bin"), ("cut", truncated)):
        assert main(["train", *_sets(root, name, "eval.at_end=true", f"eval.pairs=['{pack}']")]) == 2
        assert "eval.pairs: verification pack" in capsys.readouterr().err
        run_dir = root / "runs" / name
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()



def test_a_bad_ijb_root_stops_the_run_before_its_first_step(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a typo in eval.ijb reported only after the whole run has trained."""
    assert main(["train", *_sets(root, "ijb", "eval.at_end=true", f"eval.ijb={root / 'no_ijb'}")]) == 2
    assert "eval.ijb:" in capsys.readouterr().err
    assert not (root / "runs" / "ijb" / "metrics.jsonl").exists()


def test_a_dataset_without_pairs_trains_says_so_and_exits_0(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches the convert-then-train flow (a converted dataset has no pairs.bin) training to the end and then exiting
    2: the run must say at the start that it will not evaluate, and finish with exit code 0 and no eval.json."""
    data = root / "no_pairs"
    shutil.copytree(root / "data", data)
    (data / "pairs.bin").unlink()
    capsys.readouterr()
    code = main(["train", *_sets(root, "np", f"data.path={data}", "data.generate_if_missing=false",
                                 "eval.at_end=true")])
    out, err = capsys.readouterr()
    assert code == 0, err
    notice = err.index("no verification pack")
    assert notice < err.index("step "), "the notice comes before training"
    assert "not evaluated" in out
    assert not (root / "runs" / "np" / "eval.json").exists()


def test_a_resume_of_an_incomplete_checkpoint_is_refused_before_training(root: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Catches --resume of a checkpoint without config.toml or with a truncated state.pt ending in a traceback."""
    for damage in ("config.toml", "state.pt"):
        ckpt = root / f"broken_{damage}" / "step_00000010"
        shutil.copytree(root / "runs" / "ok" / "checkpoints" / "step_00000010", ckpt)
        if damage == "config.toml":
            (ckpt / damage).unlink()
        else:
            os.truncate(ckpt / damage, 2000)
        assert main(["train", "--resume", str(ckpt), *_sets(root, f"r_{damage}")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("offloadfr: error: --resume") and "Traceback" not in "".join(err), err


def test_probes_leave_nothing_and_a_directory_is_not_an_output_file(tmp_path: Path) -> None:
    """Catches a writability probe that leaves its file behind (a bank directory must be empty to be created in)."""
    made = check_writable_dir(tmp_path / "a" / "b", "the test directory")
    assert made.is_dir() and not any(made.iterdir())
    with pytest.raises(OutputPathError, match="is a directory"):
        check_output(made, "--onnx")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a directory"):
        check_writable_dir(tmp_path / "f" / "bank", "the bank directory")


def test_a_disk_too_small_for_checkpoints_and_bank_warns(root: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Catches a run that starts on a disk too small for its checkpoints and its nvme bank without a word."""
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml",
                      _overrides(root, "disk", "head.kind=partial_fc", "bank.tier=nvme"))
    monkeypatch.setattr("offloadfr.train.preflight.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1))
    run_dir = root / "runs" / "disk"
    with caplog.at_level(logging.WARNING):
        preflight(cfg, run_dir=run_dir, bank_path=run_dir / "bank", resume=None, env=DistEnv.from_env("cpu"))
    warned = [r.getMessage() for r in caplog.records if "free disk" in r.getMessage()]
    assert len(warned) == 1 and "3 checkpoints" in warned[0] and "nvme tier bank" in warned[0], warned


def test_the_checkpoint_estimate_matches_the_written_state(root: Path) -> None:
    """Catches a free-disk estimate far from what a checkpoint really writes (fc: backbone, momentum, centers)."""
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", _overrides(root, "ok"))
    state = root / "runs" / "ok" / "checkpoints" / "step_00000010" / "state.pt"
    assert abs(estimate_checkpoint_bytes(cfg, 16) - state.stat().st_size) < 0.1 * state.stat().st_size


def test_the_default_config_checkpoints_every_30_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a default that checkpoints only at the end (a killed run then loses everything), and a timer that
    counts from the start of the run instead of from the last checkpoint."""
    now = [0.0]
    monkeypatch.setattr(checkpoint_timer, "_now_s", lambda: now[0])
    defaults = TrainCfg()
    timer = CheckpointTimer(defaults.checkpoint_every, defaults.checkpoint_every_minutes)
    now[0] = 29 * 60.0
    assert not timer.due(5, 100)
    now[0] = 30 * 60.0
    assert timer.due(6, 100)
    timer.saved()
    now[0] = 59 * 60.0
    assert not timer.due(7, 100)
    now[0] = 61 * 60.0
    assert not timer.due(100, 100), "the last step's checkpoint is the final one"
    assert CheckpointTimer(10, 0.0).due(20, 100) and not CheckpointTimer(10, 0.0).due(21, 100)


def test_ranks_checkpoint_when_any_rank_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ranks deciding on their own clocks (one rank in the checkpoint's collectives, another stepping: a
    hang): the flag goes through an all-reduce, here one where another rank is due."""
    calls = []

    def other_rank_is_due(x: torch.Tensor) -> torch.Tensor:
        calls.append(float(x))
        return x.add_(1.0)

    monkeypatch.setattr(checkpoint_timer, "all_reduce_sum_", other_rank_is_due)
    timer = CheckpointTimer(0, 30.0, world_size=2)
    assert timer.due(1, 100) and calls == [0.0]


def test_trainer_checkpoints_by_wall_time_with_the_defaults(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a trainer that ignores the wall-time interval: with the default settings and a clock that moves 31
    minutes per reading, the run checkpoints after steps, not only at the end."""
    now = [0.0]

    def clock() -> float:
        now[0] += 31 * 60.0
        return now[0]

    monkeypatch.setattr(checkpoint_timer, "_now_s", clock)
    result = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml",
                               _overrides(root, "clock", "train.keep_checkpoints=100")))
    steps = checkpoint_steps(result.run_dir)
    assert steps == list(range(1, result.steps + 1)), steps


def test_a_killed_run_resumes_from_its_last_wall_time_checkpoint(root: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a SIGKILLed run that restarts from step 0 under --resume auto because it checkpointed only at the end
    (no step interval here: only the wall-time one, a tiny one)."""
    name, sets = "killed", _overrides(root, "killed", "train.checkpoint_every=0", "train.checkpoint_every_minutes=1e-5")
    argv = [sys.executable, str(REPO / "launch/train.py")] + [a for kv in sets for a in ("--set", kv)]
    proc = subprocess.run(argv, env={**os.environ, "OFFLOADFR_FAULT": "checkpoint.after_rename@2"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoint_steps(root / "runs" / name) == [1, 2]
    capsys.readouterr()
    result = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml", sets), resume="auto")
    assert "at step 2" in capsys.readouterr().err
    assert result.steps > 2
