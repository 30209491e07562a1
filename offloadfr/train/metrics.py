"""Metrics sinks and the console progress of a run (STYLE R14: one flat dict per log step, units in the names)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["JsonlSink", "TensorBoardSink", "MetricSinks", "open_sinks", "Progress", "warn_once"]

_log = logging.getLogger("offloadfr")
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Logs ``message`` as a warning the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)


class JsonlSink:
    """Appends one JSON object per ``log`` call to ``path`` (``runs/<name>/metrics.jsonl``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh: TextIO = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    """Writes each numeric metric of a ``log`` call as a TensorBoard scalar (tag = metric name) to ``directory``.

    Raises:
        ImportError: the ``tensorboard`` package is not installed (``pip install 'offloadfr[tensorboard]'``).
    """

    def __init__(self, directory: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # raises ImportError without the tensorboard package

        self.directory = Path(directory)
        self._writer = SummaryWriter(log_dir=str(self.directory))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class MetricSinks:
    """Sends every ``log`` call to each of ``sinks`` (a JSONL file, TensorBoard, ...)."""

    def __init__(self, sinks: list[JsonlSink | TensorBoardSink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(run_dir: str | Path, *, tensorboard: bool) -> MetricSinks:
    """The metric sinks of a run: ``run_dir/metrics.jsonl`` always, ``run_dir/tensorboard/`` when ``tensorboard``
    is on and the package is installed (else a warning, once, and the run goes on without it)."""
    sinks: list[JsonlSink | TensorBoardSink] = [JsonlSink(Path(run_dir) / "metrics.jsonl")]
    if tensorboard:
        try:
            sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
        except ImportError:
            warn_once("run.tensorboard is on but the tensorboard package is not installed: metrics go to "
                      "metrics.jsonl only; pip install 'offloadfr[tensorboard]' or set run.tensorboard=false")
    return MetricSinks(sinks)


class Progress:
    """A progress bar with loss, img/s, lr and ETA on a terminal; one plain line per log step elsewhere.

    Args:
        total: steps the run will take.
        initial: steps already done (a resumed run).
        enabled: False on every rank but 0.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._t0 = time.perf_counter()
        self._start_step = initial
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         disable=not (enabled and self.tty))

    def update(self, step: int, metrics: dict[str, Any] | None = None) -> None:
        """Advances to ``step`` (steps done); shows ``metrics`` when given (a log step)."""
        self._bar.update(step - self._bar.n)
        if metrics is None or not self.enabled:
            return
        shown = {"loss": f"{metrics['loss']:.3f}", "img/s": f"{metrics['throughput(img/s)']:.0f}",
                 "lr": f"{metrics['lr']:.3g}"}
        if "prefetch/stall(%)" in metrics:
            shown["stall(%)"] = f"{metrics['prefetch/stall(%)']:.1f}"
        if self.tty:
            self._bar.set_postfix(shown, refresh=False)
            return
        elapsed = time.perf_counter() - self._t0
        done = step - self._start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        fields = " ".join(f"{k} {v}" for k, v in shown.items())
        print(f"step {step}/{self.total} {fields} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._bar.close()
