"""Disk full while writing the bank or a checkpoint: exit code 2 with one line naming the path and the fix, and the
previous checkpoint and bank intact and resumable.

Two ways to fill the disk:

- ``test_injected_enospc_*`` (always runs): ENOSPC is injected at Python's file-I/O layer. ``io.open`` (which
  ``open``, ``Path.open`` and Zarr's ``LocalStore`` all use) is wrapped so that every ``write`` to a file under the
  chosen directory raises ``OSError(errno.ENOSPC)``, as a full filesystem would; everything else about the run is
  real (the trainer, the Zarr bank, the checkpoint writer).
- ``test_real_tmpfs_full`` (skipped unless this process may ``mount -t tmpfs``, i.e. runs as root with
  CAP_SYS_ADMIN): the run directory lives on a 48 MiB tmpfs, which a filler file then fills to the last page.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from offloadfr.bank import ZarrBank
from offloadfr.bank.zarr_bank import resolve_bank
from offloadfr.cli import main
from offloadfr.train.checkpoint import checkpoint_steps

from ._ranks import run_ranks

NUM_IDS = 16
TINY = ["synth.num_identities=16", "synth.num_holdout=6", "synth.num_pairs=20", "synth.min_images=3",
        "synth.max_images=8", "synth.mean_images=5.0", "synth.samples_per_shard=30", "data.num_workers=0",
        "train.cpu_threads=1", "train.batch_size=8", "train.epochs=2", "train.checkpoint_every=2",
        "train.log_every=100", "eval.at_end=false", "head.kind=partial_fc", "cache.num_slots=0",
        "bank.chunk_rows=4", "bank.cache_blocks=1"]


def _train(data: Path, out: Path, tier: str, max_steps: int) -> int:
    argv = ["train", "--resume", "auto"]
    for kv in [f"data.path={data}", f"run.output_dir={out}", "run.name=run", f"bank.tier={tier}",
               f"train.max_steps={max_steps}", *TINY]:
        argv += ["--set", kv]
    return main(argv)


def _bank_state(run_dir: Path, scratch: Path) -> tuple[int, torch.Tensor]:
    """The bank settled (in a copy under ``scratch``) as the next run settles it: (step, centers and momentum)."""
    copy = scratch / "settled"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir / "bank", copy)
    resolve_bank(copy, checkpoint_steps(run_dir))
    bank = ZarrBank.open(copy, read_only=True)
    rows = torch.cat([bank.read_rows(torch.arange(NUM_IDS), a) for a in ("centers", "momentum")])
    step = bank.step
    bank.close()
    return step, rows


class _FullDiskFile:
    """A file whose writes fail with ENOSPC (the rest is the real file object)."""

    def __init__(self, inner: Any, path: str) -> None:
        self._inner, self._path = inner, path

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Append a directory to the yielded list to make every file write under it fail with ENOSPC."""
    full: list[Path] = []
    real_open = io.open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        path = os.path.abspath(os.fspath(file)) if isinstance(file, str | os.PathLike) else ""
        if path and any(c in mode for c in "wax+") and any(path.startswith(str(d) + os.sep) for d in full):
            return _FullDiskFile(handle, path)
        return handle

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr("builtins.open", fake_open)
    yield full


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from offloadfr.config import SynthCfg
    from offloadfr.data.synth import generate_synthetic

    path = tmp_path_factory.mktemp("diskfull") / "data"
    generate_synthetic(path, SynthCfg(num_identities=16, num_holdout=6, num_pairs=20, min_images=3, max_images=8,
                                      mean_images=5.0, samples_per_shard=30))
    return path


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_injected_enospc_in_bank_and_checkpoint(tmp_path: Path, data: Path, tier: str, full_disk: list[Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a full disk that crashes with a traceback, or that leaves the newest checkpoint or the bank at a step
    other than the last complete checkpoint (a half-written bank journal, or a bank committed without its
    checkpoint), or a partial checkpoint directory behind."""
    run_dir = tmp_path / "run"
    assert _train(data, tmp_path, tier, max_steps=4) == 0
    before = _bank_state(run_dir, tmp_path)
    assert before[0] == 4 and checkpoint_steps(run_dir) == [2, 4]

    for full, needle in ((run_dir / "bank", "bank at"), (run_dir / "checkpoints", "checkpoint of step 6")):
        full_disk[:] = [full]
        capsys.readouterr()
        assert _train(data, tmp_path, tier, max_steps=8) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("offloadfr: error: no space left on the disk of"), err[-3:]
        assert needle in err[-1] and str(full.parent) in err[-1] and "--resume auto" in err[-1], err[-1]
        assert checkpoint_steps(run_dir) == [2, 4]
        assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
        after = _bank_state(run_dir, tmp_path)
        assert after[0] == 4 and torch.equal(after[1], before[1])

    full_disk.clear()  # space freed: the run continues from step 4
    assert _train(data, tmp_path, tier, max_steps=8) == 0
    assert checkpoint_steps(run_dir)[-1] == 8 and _bank_state(run_dir, tmp_path)[0] == 8


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, check=False)
    return done.returncode == 0


def test_real_tmpfs_full(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same on a real full filesystem (a 48 MiB tmpfs): catches an ENOSPC that Zarr or torch report in a form
    the error translation misses."""
    fs = tmp_path / "fs"
    if not _mount_tmpfs(fs, "48m"):
        pytest.skip("needs root and mount -t tmpfs (not available here)")
    try:
        run_dir = fs / "run"
        assert _train(data, fs, "nvme", max_steps=4) == 0
        before = _bank_state(run_dir, tmp_path)
        filler = fs / "filler"
        with open(filler, "wb", buffering=0) as fh:  # unbuffered: close() has nothing left to flush into ENOSPC
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        capsys.readouterr()
        assert _train(data, fs, "nvme", max_steps=8) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("offloadfr: error: no space left on the disk of"), last
        assert str(fs) in last and "--resume auto" in last, last  # whichever writer met the full disk first
        assert checkpoint_steps(run_dir) == [2, 4]
        filler.unlink()
        after = _bank_state(run_dir, tmp_path)
        assert after[0] == 4 and torch.equal(after[1], before[1])
        assert _train(data, fs, "nvme", max_steps=8) == 0
        assert checkpoint_steps(run_dir)[-1] == 8
    finally:
        # lazy: a file still open in this process (a cached Zarr handle) makes a plain umount fail with "busy" and
        # leave the tmpfs mounted under pytest's temp directory
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_full_disk_on_rank0_stops_every_rank(tmp_path: Path, data: Path) -> None:
    """Catches rank 1 waiting for, or crashing with a traceback after, a checkpoint that rank 0 could not write (2 real
    gloo ranks): both exit with code 2, rank 0 naming the full disk and rank 1 the failure of rank 0, and no checkpoint
    exists."""
    argv = ["train"]
    for kv in [f"data.path={data}", f"run.output_dir={tmp_path / 'runs'}", "run.name=run", "train.max_steps=4",
               *TINY, "train.batch_size=4"]:
        argv += ["--set", kv]
    outputs = run_ranks([sys.executable, "-m", "tests._diskfull_rank_worker", str(tmp_path), *argv], 2,
                        timeout_s=240, what="2 ranks, rank 0's checkpoint disk full")
    assert [(tmp_path / f"rank{r}.rc").read_text() for r in range(2)] == ["2", "2"], outputs
    assert "no space left on the disk of" in outputs[0], outputs[0]
    assert "rank 0 could not write the checkpoint of step 2" in outputs[1], outputs[1]
    assert checkpoint_steps(tmp_path / "runs" / "run") == []

