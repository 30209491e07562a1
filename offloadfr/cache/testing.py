"""Bank wrappers for testing the cache layer's I/O without slow storage (STYLE R11).

Each wrapper is a real ``ClassBank`` around any other bank: ``LatencyBank`` sleeps per call (to show prefetch overlap
without NVMe), ``CountingBank`` records the ids of every call (to show that no row is fetched twice), and
``FailingBank`` raises on a chosen call (to show that a worker error reaches the training loop).
"""

from __future__ import annotations

import threading
import time

import torch

from offloadfr.bank.base import ClassBank

__all__ = ["BankWrapper", "LatencyBank", "CountingBank", "FailingBank"]


class BankWrapper(ClassBank):
    """Forwards every call to ``inner``; subclasses override what they test.

    Args:
        inner: the wrapped bank.
    """

    def __init__(self, inner: ClassBank) -> None:
        self.inner = inner
        self.num_classes = inner.num_classes
        self.dim = inner.dim
        self.arrays = inner.arrays
        self.read_only = inner.read_only
        self.dtype = inner.dtype

    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        """Forwards to ``inner.read_rows``."""
        return self.inner.read_rows(ids, array)

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        """Forwards to ``inner.write_rows``."""
        self.inner.write_rows(ids, rows, array)

    def prepare(self, step: int) -> None:
        """Forwards to ``inner.prepare``."""
        self.inner.prepare(step)

    def commit(self, step: int) -> None:
        """Forwards to ``inner.commit``."""
        self.inner.commit(step)

    def rollback(self) -> None:
        """Forwards to ``inner.rollback``."""
        self.inner.rollback()

    @property
    def pending_step(self) -> int | None:
        """The inner bank's pending step."""
        return self.inner.pending_step

    @property
    def step(self) -> int:
        """The inner bank's step."""
        return self.inner.step

    def close(self) -> None:
        """Closes the inner bank."""
        self.inner.close()


class LatencyBank(BankWrapper):
    """Sleeps ``latency_s`` (plus ``per_row_s`` per id) before each read and write, like slow storage.

    Args:
        inner: the wrapped bank.
        latency_s: seconds per call.
        per_row_s: extra seconds per id of the call.

    Example::

        bank = LatencyBank(MemoryBank(37, 8), latency_s=0.02)
    """

    def __init__(self, inner: ClassBank, *, latency_s: float, per_row_s: float = 0.0) -> None:
        super().__init__(inner)
        self.latency_s = latency_s
        self.per_row_s = per_row_s

    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        """Sleeps, then reads."""
        time.sleep(self.latency_s + self.per_row_s * ids.numel())
        return self.inner.read_rows(ids, array)

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        """Sleeps, then writes."""
        time.sleep(self.latency_s + self.per_row_s * ids.numel())
        self.inner.write_rows(ids, rows, array)


class CountingBank(BankWrapper):
    """Records every read and write as ``(method, array, ids)`` in call order (thread-safe).

    Attributes:
        calls: ``("read_rows" | "write_rows", array, ids)`` of each call, in the order the calls started.

    Example::

        bank = CountingBank(MemoryBank(37, 8))
        ...
        assert bank.rows_read() == 12
    """

    def __init__(self, inner: ClassBank) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self.calls: list[tuple[str, str, torch.Tensor]] = []

    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        """Records, then reads."""
        with self._lock:
            self.calls.append(("read_rows", array, ids.detach().cpu().clone()))
        return self.inner.read_rows(ids, array)

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        """Writes, then records (so a read recorded after a write saw that write)."""
        self.inner.write_rows(ids, rows, array)
        with self._lock:
            self.calls.append(("write_rows", array, ids.detach().cpu().clone()))

    def reads(self, array: str = "centers") -> list[torch.Tensor]:
        """The ids of each ``read_rows`` call on ``array``."""
        with self._lock:
            return [ids for method, name, ids in self.calls if method == "read_rows" and name == array]

    def writes(self, array: str = "centers") -> list[torch.Tensor]:
        """The ids of each ``write_rows`` call on ``array``."""
        with self._lock:
            return [ids for method, name, ids in self.calls if method == "write_rows" and name == array]

    def rows_read(self, array: str = "centers") -> int:
        """Ids read from ``array`` so far (with repeats)."""
        return sum(ids.numel() for ids in self.reads(array))

    def rows_written(self, array: str = "centers") -> int:
        """Ids written to ``array`` so far (with repeats)."""
        return sum(ids.numel() for ids in self.writes(array))

    def reset(self) -> None:
        """Forgets the calls recorded so far."""
        with self._lock:
            self.calls.clear()


class FailingBank(BankWrapper):
    """Raises ``exc`` on the ``fail_on``-th call (0-based) of ``read_rows`` or ``write_rows``.

    Args:
        inner: the wrapped bank.
        exc: the exception to raise.
        fail_on: index of the failing call among calls of ``method``.
        method: ``"read_rows"`` or ``"write_rows"``.
    """

    def __init__(self, inner: ClassBank, exc: BaseException, *, fail_on: int = 0,
                 method: str = "read_rows") -> None:
        super().__init__(inner)
        if method not in ("read_rows", "write_rows"):
            raise ValueError(f"method={method!r} must be 'read_rows' or 'write_rows'")
        self.exc = exc
        self.fail_on = fail_on
        self.method = method
        self.num_calls = 0

    def _maybe_fail(self, method: str) -> None:
        if method != self.method:
            return
        call, self.num_calls = self.num_calls, self.num_calls + 1
        if call == self.fail_on:
            raise self.exc

    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        """Reads, or raises on the chosen call."""
        self._maybe_fail("read_rows")
        return self.inner.read_rows(ids, array)

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        """Writes, or raises on the chosen call."""
        self._maybe_fail("write_rows")
        self.inner.write_rows(ids, rows, array)
