"""Benchmarks: ``python launch/bench.py {head,data,kernel,bank,table,backbone,quality,train,host} ...``.

One JSON row per measurement (stdout, and appended to ``--out``); results go to docs/benchmarks/. Every benchmark is
a module of ``offloadfr/bench/``; ``offloadfr/bench/cli.py`` documents the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offloadfr.bench.cli import main  # noqa: E402 - after the path setup

if __name__ == "__main__":
    sys.exit(main())
