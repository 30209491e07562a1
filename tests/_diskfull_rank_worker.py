"""One rank of a 2-process training run whose rank 0 finds the disk of the checkpoints full (test_diskfull.py).

Usage: python -m tests._diskfull_rank_worker OUT_DIR TRAIN_ARGV...; the command's exit code goes to OUT_DIR/rank<r>.rc.
Rank 0's writes under OUT_DIR/runs/run/checkpoints fail with ENOSPC at ``open``, as on a full filesystem.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import sys
from pathlib import Path
from typing import Any

from offloadfr.cli import main


def _fill(directory: str) -> None:
    real_open = io.open

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        path = os.path.abspath(os.fspath(file)) if isinstance(file, str | os.PathLike) else ""
        if path.startswith(directory + os.sep) and any(c in mode for c in "wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_open(file, mode, *args, **kwargs)

    io.open = builtins.open = full_open  # type: ignore[assignment]


if __name__ == "__main__":
    out, rank = Path(sys.argv[1]), os.environ["RANK"]
    if rank == "0":
        _fill(str(out / "runs" / "run" / "checkpoints"))
    code = main(sys.argv[2:])
    (out / f"rank{rank}.rc").write_text(str(code))
