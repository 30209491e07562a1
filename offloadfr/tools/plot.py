"""PNG plots of a run directory: ``offloadfr plot RUN_DIR`` writes them into ``RUN_DIR/plots/``.

Files written (each from ``metrics.jsonl`` unless said otherwise):

- ``loss.png``: mean training loss of each log interval (``loss``) over steps;
- ``lr.png``: learning rate (``lr``) over steps;
- ``throughput.png``: training images per second (``throughput(img/s)``) over steps;
- ``prefetch_stall.png``: % of step time waiting for bank rows (``prefetch/stall(%)``, bank-backed heads only);
- ``roc.png``: ROC curve of the last evaluation, log false-accept axis (``eval.json`` ``roc``).

A plot whose data the run does not have (no ``prefetch/stall(%)`` with the ``fc`` head, no ``eval.json`` before the
run ends) is skipped and named in the result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offloadfr.errors import DataError, DataNotFoundError
from offloadfr.tools import require

__all__ = ["PlotResult", "plot_run", "read_metrics"]

_SERIES = {  # file stem -> (metric key, title, y label)
    "loss": ("loss", "training loss", "loss"),
    "lr": ("lr", "learning rate", "lr"),
    "throughput": ("throughput(img/s)", "throughput", "images / s"),
    "prefetch_stall": ("prefetch/stall(%)", "prefetch stall", "% of step time"),
}


@dataclass(frozen=True)
class PlotResult:
    """What :func:`plot_run` wrote.

    Attributes:
        written: the PNG files written.
        skipped: ``{file name: why}`` for plots the run has no data for.
    """

    written: list[Path]
    skipped: dict[str, str]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (one per log step), in file order.

    Raises:
        DataNotFoundError: the run directory has no ``metrics.jsonl``.
        DataError: a line is not JSON.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataNotFoundError(f"{path} does not exist; pass a run directory (runs/<name>) of offloadfr train")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e}); the file is damaged") from e
    return rows


def _last_eval_roc(run_dir: Path) -> tuple[dict[str, list[float]], str] | None:
    """(roc, label) of the first pack of ``eval.json``, or None when there is no ROC data."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())
    row = ev["packs"][0] if "packs" in ev else ev
    if "roc" not in row:
        return None
    if "accuracy" not in row:  # an IJB template-verification row (offloadfr/eval/ijb.py)
        return row["roc"], f"{row.get('protocol')} at step {row.get('step')}, " \
                           f"TAR@FAR=1e-4 {row['tar_at_far'].get('1e-4', float('nan')):.4f}"
    return row["roc"], f"{Path(str(row.get('pairs', 'pairs'))).name} at step {row.get('step')}, " \
                       f"accuracy {row['accuracy']:.4f}"


def plot_run(run_dir: str | Path) -> PlotResult:
    """Writes the PNGs of the table above into ``run_dir/plots/``.

    Raises:
        MissingExtraError: matplotlib is not installed (the ``plot`` extra).
        DataNotFoundError: ``run_dir`` has no ``metrics.jsonl``.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")  # files only, no display needed
    plt = require("matplotlib.pyplot", "plot")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written, skipped = [], {}
    for stem, (key, title, ylabel) in _SERIES.items():
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if not points:
            skipped[f"{stem}.png"] = f"metrics.jsonl has no {key!r} values"
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set(title=f"{run_dir.name}: {title}", xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / f"{stem}.png", plt))
    roc = _last_eval_roc(run_dir)
    if roc is None:
        skipped["roc.png"] = "no eval.json with ROC points (written by offloadfr train and offloadfr eval)"
    else:
        (curve, label) = roc
        fig, ax = plt.subplots(figsize=(5, 5))
        points = [(f, t) for f, t in zip(curve["fpr"], curve["tpr"], strict=True) if f > 0]  # log axis: FAR > 0
        ax.step([p[0] for p in points], [p[1] for p in points], where="post", label=label)
        ax.set_xscale("log")
        ax.set(title=f"{run_dir.name}: ROC", xlabel="false accept rate", ylabel="true accept rate", ylim=(0, 1.01),
               xlim=(points[0][0] / 2, 1.0))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        written.append(_save(fig, out_dir / "roc.png", plt))
    return PlotResult(written=written, skipped=skipped)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
