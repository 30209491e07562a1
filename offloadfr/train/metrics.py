"""Metrics sinks and the console progress of a run (STYLE R14: one flat dict per log step, units in the names)."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from offloadfr.errors import ConfigError, DiskFullError

__all__ = ["JsonlSink", "TensorBoardSink", "MetricSinks", "check_sinks", "open_sinks", "Progress", "warn_once"]

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


@contextmanager
def _disk_full_as_error(run_dir: Path) -> Iterator[None]:
    """Turns a full disk met while writing metrics into ``DiskFullError`` (exit 2, one line) instead of a traceback."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DiskFullError.ERRNOS:
            raise
        raise DiskFullError(f"no space left on the disk of {run_dir} while writing the run's metrics; the checkpoints "
                            "are intact: free space there, then continue with --resume auto") from exc


class MetricSinks:
    """Sends every ``log`` call to each of ``sinks`` (a JSONL file, TensorBoard, ...) in ``run_dir``.

    Raises:
        DiskFullError: the disk of ``run_dir`` is full.
    """

    def __init__(self, run_dir: Path, sinks: list[JsonlSink | TensorBoardSink]) -> None:
        self.run_dir = run_dir
        self.sinks = sinks

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._each(lambda sink: sink.log(metrics, step))

    def close(self) -> None:
        self._each(lambda sink: sink.close())

    def _each(self, call: Callable[[JsonlSink | TensorBoardSink], None]) -> None:
        with _disk_full_as_error(self.run_dir):
            for sink in self.sinks:
                call(sink)


def check_sinks(tensorboard: str) -> None:
    """Refuses ``run.tensorboard = "on"`` without the tensorboard package, before a run starts (every rank).

    Raises:
        ConfigError: naming the setting and the fix.
    """
    if tensorboard == "on" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tensorboard = 'on' but the tensorboard package is not installed; pip install "
                          "'offloadfr[tensorboard]', or set run.tensorboard = 'auto'")


def open_sinks(run_dir: str | Path, *, tensorboard: str) -> MetricSinks:
    """The metric sinks of a run: ``run_dir/metrics.jsonl`` always, and ``run_dir/tensorboard/`` when
    ``tensorboard`` (``run.tensorboard``) is ``"on"``, or ``"auto"`` and the package is installed.

    Raises:
        ConfigError: ``tensorboard = "on"`` and the tensorboard package is not installed.
    """
    run_dir = Path(run_dir)
    with _disk_full_as_error(run_dir):
        sinks: list[JsonlSink | TensorBoardSink] = [JsonlSink(run_dir / "metrics.jsonl")]
        if tensorboard != "off":
            try:
                sinks.append(TensorBoardSink(run_dir / "tensorboard"))
            except ImportError as exc:  # "auto": go on without it
                if tensorboard == "on":
                    raise ConfigError(f"run.tensorboard = 'on' but TensorBoard cannot be loaded ({exc}); pip install "
                                      "'offloadfr[tensorboard]', or set run.tensorboard = 'auto'") from exc
    return MetricSinks(run_dir, sinks)


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
