"""Checkpoints: ``<run dir>/checkpoints/step_XXXXXXXX/`` written into a temporary directory and renamed when whole.

A checkpoint directory holds ``state.pt`` (engine, head, step, epoch, RNG states) and ``config.toml`` (the resolved
run config, so ``offloadfr eval`` can rebuild the backbone). A directory that is not named ``step_*`` is never
complete, so a crash mid-write leaves the previous checkpoint as the newest one.

The rename is the commit point of the whole checkpoint, bank included: the trainer prepares the bank's flush before
it and commits the bank after it, and after a crash ``ZarrBank`` settles a prepared flush by whether the checkpoint
of its step exists (docs/checkpoints.md). A full disk raises ``DiskFullError`` and removes the partial directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from offloadfr.config import Config, config_from_dict, to_toml
from offloadfr.errors import CheckpointError, DiskFullError
from offloadfr.faults import fault_point

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints", "checkpoint_steps", "load_checkpoint_config"]

_PREFIX = "step_"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first."""
    return [int(p.name[len(_PREFIX):]) for p in list_checkpoints(run_dir)]


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], cfg: Config, *, keep: int,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Writes ``state`` and the config atomically, then deletes all but the newest ``keep`` checkpoints.

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints/step_XXXXXXXX``.
        step: the step the state belongs to.
        state: what ``state.pt`` holds.
        cfg: the resolved config, saved beside it.
        keep: how many checkpoints to keep.
        write_extra: writes more files (e.g. a DeepSpeed checkpoint) into the temporary directory before the
            rename, so they are part of the same atomic checkpoint.

    Returns:
        The directory of the new checkpoint.

    Raises:
        DiskFullError: the disk filled up; the partial directory is removed and older checkpoints are intact.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale_temporaries(root)
    try:
        tmp.mkdir()
        _save_state(state, tmp / "state.pt")
        (tmp / "config.toml").write_text(to_toml(cfg))
        if write_extra is not None:
            write_extra(tmp)
        for f in tmp.iterdir():
            if f.is_dir():
                continue
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, RuntimeError) as exc:  # torch's C++ writers (DeepSpeed) report ENOSPC as a RuntimeError
        if not _disk_full(exc, root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(f"no space left on the disk of {root} while writing the checkpoint of step {step}; "
                            f"the checkpoints before it are intact: free space there (or lower "
                            f"train.keep_checkpoints), then continue with --resume auto") from exc
    fault_point("checkpoint.before_rename")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fault_point("checkpoint.after_rename")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class _RecordingWriter:
    """The file ``torch.save`` streams into, remembering the OSError of a failed write: torch reports it as a
    RuntimeError without the errno, and a full disk must still be recognised as one."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self._fh.write(data))
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._fh.flush()


def _save_state(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` straight into the file, not through an in-memory copy: the state holds every row of an ``fc``
    head (41 GB at 10M ids), and serialising it in memory first would hold it twice on rank 0."""
    with open(path, "wb") as fh:
        writer = _RecordingWriter(fh)
        try:
            torch.save(state, writer)
        except RuntimeError as exc:
            if writer.error is None:
                raise
            raise writer.error from exc


def _remove_stale_temporaries(root: Path) -> None:
    """Deletes temporary directories left by processes that died while writing a checkpoint (they hold space)."""
    for partial in root.glob(".tmp-step_*-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # still running (another rank writing): leave it
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass


def _disk_full(exc: BaseException, root: Path) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in DiskFullError.ERRNOS
    return shutil.disk_usage(root).free < (1 << 20)  # a writer that lost the errno: judge by the space left


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir() and not (p / "state.pt").exists() and (p / "checkpoints").is_dir():
        found = list_checkpoints(p)  # a run directory: take its newest checkpoint
        if not found:
            raise CheckpointError(f"run directory {str(p)!r} has no complete checkpoint")
        p = found[-1]
    if not (p / "state.pt").is_file():
        raise CheckpointError(f"{str(p)!r} is not a checkpoint (no state.pt); pass runs/<name>/checkpoints/step_N "
                              "or a run directory")
    return p


def load_checkpoint_config(path: str | Path) -> Config:
    """The resolved config saved with a checkpoint (or with the newest checkpoint of a run directory)."""
    import tomllib

    p = _resolve(path)
    return config_from_dict(tomllib.loads((p / "config.toml").read_text()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """Loads ``state.pt`` of a checkpoint (or of the newest checkpoint of a run directory).

    The file is memory-mapped (``mmap=True``): its tensors are read from the page cache when touched, so W ranks on
    one host that each keep their own range of ``fc``'s rows share one copy of the file instead of holding W.

    Returns:
        The state dict and the checkpoint directory it came from.

    Raises:
        CheckpointError: ``path`` is neither a checkpoint nor a run directory with one.
    """
    p = _resolve(path)
    return torch.load(p / "state.pt", map_location=map_location, weights_only=True, mmap=True), p
