"""Crash test: a real training run (``launch/train.py`` in a subprocess, ``partial_fc`` on a Zarr bank) is killed
with SIGKILL at the points where a crash could break the bank/checkpoint consistency, resumed with ``--resume auto``
each time, and must end with exactly the backbone weights and bank rows of an uninterrupted run.

Kill points (``offloadfr/faults.py``; the process sends itself a real SIGKILL there):

- ``bank.stage``: during the bank flush of a checkpoint, with some blocks in the journal and no ``pending_step``;
- ``bank.prepared``: the bank's flush is prepared, the checkpoint not written;
- ``checkpoint.before_rename``: the checkpoint is written into its temporary directory, not renamed (rolls back);
- ``checkpoint.after_rename``: the checkpoint is complete, the bank not committed (rolls forward);
- ``bank.commit``: the bank decided to commit and died before moving its journal (completes on open);
- a plain training step: the test itself SIGKILLs the process once ``metrics.jsonl`` shows it training.

The reference run and the last (unkilled) life run in the test's process. After each kill, a copy of the bank is
settled the way the next run settles it (``resolve_bank`` with the complete checkpoints) and must hold only finite
rows, at the newest checkpoint's step. The config is deterministic on the CPU
(1 compute thread, no data workers, every id resident in the device container), so a resumed run is bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offloadfr.bank import ZarrBank
from offloadfr.bank.zarr_bank import resolve_bank
from offloadfr.config import load_config
from offloadfr.train.checkpoint import checkpoint_steps, list_checkpoints, load_checkpoint
from offloadfr.train.trainer import TrainResult, train

REPO = Path(__file__).resolve().parent.parent
NUM_IDS = 16
SETTINGS = ["synth.num_identities=16", "synth.num_holdout=6", "synth.num_pairs=20", "synth.min_images=3",
            "synth.max_images=8", "synth.mean_images=5.0", "synth.samples_per_shard=30", "data.num_workers=0",
            "train.cpu_threads=1", "train.batch_size=8", "train.epochs=2", "train.checkpoint_every=2",
            "train.keep_checkpoints=3", "train.log_every=1", "eval.at_end=false", "head.kind=partial_fc",
            "cache.num_slots=0", "bank.chunk_rows=4", "bank.cache_blocks=1"]

# The kill points of each life of the run, in order; None = the plain-step kill by the test.
CHAINS = {
    "nvme": ["bank.stage@2", "checkpoint.before_rename@2", "checkpoint.after_rename@1", "bank.commit@1",
             "bank.prepared@1", None],
    "ram": ["bank.stage@2", "checkpoint.after_rename@2"],
}


def _sets(root: Path, name: str, tier: str) -> list[str]:
    return [f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", f"run.name={name}", f"bank.tier={tier}",
            *SETTINGS]


def _argv(root: Path, name: str, tier: str) -> list[str]:
    argv = [sys.executable, str(REPO / "launch/train.py"), "--resume", "auto"]
    for kv in _sets(root, name, tier):
        argv += ["--set", kv]
    return argv


def _train_here(root: Path, name: str, tier: str) -> TrainResult:
    """A life that is not killed, in this process (saves an interpreter start; the same code and threads)."""
    return train(load_config(REPO / "ds_configs/runs/synth_tiny.toml", _sets(root, name, tier)), resume="auto")


def _run(root: Path, name: str, tier: str, fault: str | None) -> subprocess.CompletedProcess[str]:
    """One life of the run in a subprocess, killed at ``fault`` (None: by this test, at a plain step)."""
    env = {**_env(), "OFFLOADFR_FAULT": fault or ""}
    proc = subprocess.Popen(_argv(root, name, tier), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if fault is None:
        metrics = root / "runs" / name / "metrics.jsonl"
        start = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        deadline = time.monotonic() + 60
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= start + 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "OFFLOADFR_FAULT"}


def _bank_rows(path: Path) -> dict[str, torch.Tensor]:
    bank = ZarrBank.open(path, read_only=True)
    try:
        return {a: bank.read_rows(torch.arange(NUM_IDS), a) for a in bank.arrays} | {"step": torch.tensor(bank.step)}
    finally:
        bank.close()


def _check_settled_bank(root: Path, name: str, fault: str | None) -> None:
    """Settles a copy of the bank as the next run will and checks it: finite rows, at the newest checkpoint."""
    run_dir = root / "runs" / name
    copy = root / f"settled-{name}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir / "bank", copy)
    steps = checkpoint_steps(run_dir)
    resolve_bank(copy, steps)
    rows = _bank_rows(copy)
    assert int(rows["step"]) == (steps[-1] if steps else -1), (fault, steps, int(rows["step"]))
    for array in ("centers", "momentum"):
        assert bool(torch.isfinite(rows[array]).all()), (fault, array)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data and the uninterrupted reference run ``full`` (nvme tier; the tier does not change any value)."""
    root = tmp_path_factory.mktemp("crash")
    _train_here(root, "full", "nvme")  # generates the data, then trains uninterrupted
    return root


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["nvme", "ram"])
def test_sigkill_anywhere_then_resume_equals_uninterrupted(root: Path, tier: str) -> None:
    """Catches every way a crash can break a resume: a bank committed at a step no checkpoint has (the bank flushed
    before the checkpoint's rename), a prepared flush rolled the wrong way, a half-moved journal, rows newer than
    the checkpoint, or a resume that loses the data position, RNG, optimizer or rows (the final weights differ)."""
    total = checkpoint_steps(root / "runs" / "full")[-1]
    assert total >= 12, total  # enough checkpoints for every kill point of the chain
    name = f"cut_{tier}"
    for fault in CHAINS[tier]:
        life = _run(root, name, tier, fault)
        assert life.returncode == -signal.SIGKILL, (fault, life.returncode, life.stderr[-2000:])
        _check_settled_bank(root, name, fault)
    final = _train_here(root, name, tier)
    assert final.steps == total and not final.stopped
    assert not list((root / "runs" / name / "checkpoints").glob(".tmp-*"))  # partial checkpoints cleaned up

    a, _ = load_checkpoint(list_checkpoints(root / "runs" / "full")[-1])
    b, _ = load_checkpoint(list_checkpoints(root / "runs" / name)[-1])
    assert a["step"] == b["step"] == total
    for key, value in a["engine"]["model"].items():
        assert torch.equal(value, b["engine"]["model"][key]), key
    rows_full, rows_cut = _bank_rows(root / "runs" / "full" / "bank"), _bank_rows(root / "runs" / name / "bank")
    assert int(rows_full["step"]) == int(rows_cut["step"]) == total
    for array in ("centers", "momentum"):
        assert torch.equal(rows_full[array], rows_cut[array]), array
    lines = [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(line.get("train/skipped_steps", 0) == 0 for line in lines)
