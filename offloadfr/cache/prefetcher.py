"""``Prefetcher``: streams the rows that planned steps need from a ClassBank into a DynamicClassContainer.

Legend: K = num_slots, D = dim, n = number of ids in one batch of rows, L = lookahead (steps submitted ahead).

Per step, on the training (main) thread::

    pf.submit(plan_ids, step + L)   # ids the batch of step + L needs (any order, repeats allowed)
    pf.ready(step)                  # waits for step's rows, evicts, admits: every id of step's plan is resident
    ... forward / backward / update of the resident rows of step ...

Threads. One worker thread does all bank I/O; the main thread owns the container. The worker never touches the
container and the main thread never calls the bank (so a bank need not be thread-safe). They share, under one lock:
the fetch queue (``(step, ids)`` jobs), the fetched results (rows per step, on the device), the write-behind queue of
evicted rows (``_pending``), the traffic counters and the first error. The worker serves fetches before write-backs
(fetches are on the critical path; a write-back already running delays a fetch by at most that one batch) unless
more than ``_MAX_PENDING_BATCHES`` evicted batches wait (then it writes one first: the queue stays bounded when the
fetches alone keep the worker busy); write-backs run in FIFO order, so the bank ends with the newest value of a row.

Invariants (why no row is ever stale):

1. A resident row is the truth. Rows change only while resident (the head updates them in place).
2. A submitted step's plan is *queued* until its ``ready``. Every id of every queued plan is protected from eviction,
   so an id resident when its step was submitted is still resident at that step's ``ready``. (The plan of step t + L
   is submitted before step t's update; the resident rows it counts on are updated in place and stay resident.)
3. ``submit`` fetches only the plan's ids that are neither resident nor *in flight* (being fetched for an earlier
   queued step). An in-flight id is admitted at the earlier step's ``ready`` and then protected by (2). So no id is
   fetched twice while it is queued, and an id is fetched only while it is not resident, i.e. its newest value is in
   ``_pending`` or in the bank, and nothing can change it before the fetch is admitted (an id is admitted only by the
   step whose fetch brought it).
4. Evicted rows enter ``_pending`` (on the main thread, before any later ``submit`` can plan their ids) and leave it
   only after ``bank.write_rows`` returned. A fetch takes each id from the newest pending batch holding it, else from
   the bank: read-your-writes, never a stale bank value.
5. By (2) the union of the queued plans must fit in K: ``submit`` raises ``ConfigError`` otherwise (raise
   ``cache.num_slots`` or lower ``cache.lookahead``).

Devices. On CUDA, fetched rows are assembled in pinned host buffers (PyTorch's caching host allocator recycles them
once their copies finished) and copied to the device on a side stream; ``ready`` makes the current stream wait on that
copy's event. Evicted rows are gathered on the current stream and copied to pinned buffers with ``non_blocking``; the
worker waits on their event before using them. On CPU rows are plain tensors and there are no streams.

Dtypes. Rows move in the bank's dtype (``bank.dtype``, ``ClassBank.dtype``): fetched rows are assembled and copied to
the device narrow, and the container upcasts them when it admits them (its rows stay float32, where the head updates
them). Evicted rows are rounded to the bank's dtype on the device, once per write-back, before their copy to the host
(to nearest, or stochastically with ``rounding = "stochastic"``: the noise is seeded by (``seed``, step, batch), so a
run is reproducible); ``write_back_all`` also rounds the resident rows in place, so after a checkpoint the container
and the bank hold the same values, and a resumed run starts from the rows an uninterrupted one continues with. A
float32 bank rounds nothing.

Host syncs: ``submit`` (residency of the plan) and ``ready`` (free slots, evicted ids) synchronise with the device; the
training loop calls them back to back at the step boundary, so they cost about one wait for the device per step.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from offloadfr.bank.base import ClassBank
from offloadfr.bank.dtypes import ROUNDINGS, round_rows
from offloadfr.cache.container import DynamicClassContainer
from offloadfr.errors import ConfigError, DataError

__all__ = ["Prefetcher"]

_MAX_PENDING_BATCHES = 4
"""Evicted batches (one per step) that may wait for write-back while fetches go first; beyond it the worker writes
one before its next fetch, so a worker kept busy by fetches cannot let the write-behind queue (host memory, and the
pending batches every fetch searches) grow without bound."""

_WRITE_BACK_CHUNK = 65536
"""Rows per write-back batch in ``write_back_all`` (bounds the pinned host memory it takes)."""


def _in_sorted(ids: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
    """Whether each of ``ids`` (CPU int64) is in ``sorted_ids`` (CPU int64, ascending): one numpy ``searchsorted``,
    several times faster than ``torch.isin`` (21.8 k ids against 43.6 k on the CPU VM: 8 ms for isin, 1-2 ms here;
    numpy's search is also faster than torch's on the CPU)."""
    if not sorted_ids.numel():
        return torch.zeros(ids.shape, dtype=torch.bool)
    ref = sorted_ids.numpy()
    pos = np.minimum(np.searchsorted(ref, ids.numpy()), ref.size - 1)
    return torch.from_numpy(ref[pos] == ids.numpy())


@dataclass
class _RowBatch:
    """Rows of some ids on the host, waiting to be written to the bank (write-behind) or served to a fetch."""

    ids: torch.Tensor  # (n,) int64 CPU, unique
    rows: dict[str, torch.Tensor]  # (n, D) per array, CPU (pinned on CUDA), in the bank's dtype
    event: torch.cuda.Event | None  # D2H copy done
    sorted_ids: torch.Tensor = field(init=False)
    order: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sorted_ids, self.order = torch.sort(self.ids)


@dataclass
class _Fetched:
    """The rows a step's fetch brought, on the device, in the order of ``ids``."""

    ids: torch.Tensor  # (n,) int64 CPU
    rows: dict[str, torch.Tensor]  # in the bank's dtype; the container upcasts them on admit
    event: torch.cuda.Event | None  # H2D copy done (side stream)


@dataclass
class _Plan:
    """A submitted step: its unique ids and the subset its fetch reads."""

    step: int
    ids: torch.Tensor  # unique and ascending, int64 CPU
    fetch_ids: torch.Tensor  # unique and ascending, int64 CPU, subset of ids


class Prefetcher:
    """Keeps the ids of planned steps resident in a container, with bank reads ahead of time and writes behind.

    Args:
        bank: where every row lives when it is not resident.
        container: the device rows; the prefetcher is its only admitter and evicter.
        arrays: the arrays moved between them (each must be in both).
        device: the container's device (defaults to ``container.device``).
        rounding: how evicted rows are rounded to a bank dtype narrower than the container's: ``"nearest"`` or
            ``"stochastic"`` (module docstring); no effect with a float32 bank.
        seed: seeds the noise of stochastic rounding.

    Raises:
        ConfigError: an array is missing from the bank or the container, the sizes disagree, or ``rounding`` is
            unknown.

    Example::

        pf = Prefetcher(bank, DynamicClassContainer(1024, 512, device=dev), device=dev)
        for t in range(L):
            pf.submit(labels_of_batch[t], t)
        for t in range(num_steps):
            if t + L < num_steps:
                pf.submit(labels_of_batch[t + L], t + L)
            pf.ready(t)
            slots_B = pf.container.slots_of(labels_of_batch[t])
            ...  # train on pf.container["centers"]
        pf.write_back_all(); bank.flush(num_steps); pf.close()
    """

    def __init__(self, bank: ClassBank, container: DynamicClassContainer, *, arrays: Sequence[str] = ("centers",),
                 device: torch.device | str | None = None, rounding: str = "nearest", seed: int = 0) -> None:
        self.bank = bank
        self.container = container
        self.arrays = tuple(arrays)
        self.device = torch.device(device) if device is not None else container.device
        for name in self.arrays:
            if name not in bank.arrays:
                raise ConfigError(f"array {name!r} is not in the bank (it holds {list(bank.arrays)})")
            if name not in container.arrays:
                raise ConfigError(f"array {name!r} is not in the container (it holds {list(container.arrays)})")
        if set(self.arrays) != set(container.arrays):
            raise ConfigError(f"arrays={list(self.arrays)} must be every array of the container "
                              f"({list(container.arrays)}), or admitted rows would be incomplete")
        if bank.dim != container.dim:
            raise ConfigError(f"bank dim {bank.dim} != container dim {container.dim}")
        if self.device != container.device:
            raise ConfigError(f"device {self.device} != container device {container.device}")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"rounding={rounding!r} is not one of {list(ROUNDINGS)}")
        self.rounding = rounding
        self.seed = seed
        self.dtype = bank.dtype
        """The dtype rows move in between the bank and the device (the bank's)."""
        self._narrow = any(container[name].dtype != self.dtype for name in self.arrays)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None

        self._cond = threading.Condition()
        # Shared with the worker (guarded by _cond).
        self._fetch_queue: deque[_Plan] = deque()
        self._fetched: dict[int, _Fetched] = {}
        self._pending: deque[_RowBatch] = deque()
        self._busy = False
        self._stop = False
        self._error: BaseException | None = None
        self._error_reported = False
        self._rows_read = 0
        self._rows_from_pending = 0
        self._rows_written = 0
        self._fetch_s = 0.0  # the worker's time in fetches and in write-backs (its busy time, by kind)
        self._write_s = 0.0
        # Main thread only.
        self._plans: deque[_Plan] = deque()
        self._last_step = -1
        self._stall_s = 0.0
        self._wall_start = time.perf_counter()
        self._planned = 0
        self._hits = 0
        self._bytes_per_row = self.dtype.itemsize * bank.dim * len(self.arrays)
        self._ready_step = -1  # the last step made ready: with the batch number, it seeds the rounding noise

        self._thread = threading.Thread(target=self._run, name="offloadfr-prefetcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- main thread
    def submit(self, plan_ids: torch.Tensor, step: int) -> None:
        """Announces the ids the batch of ``step`` needs; their missing rows start loading in the background.

        Args:
            plan_ids: global class ids (any device, any order, repeats allowed).
            step: the step that will use them; strictly greater than every step submitted before.

        Raises:
            DataError: an id is outside ``[0, bank.num_classes)``.
            ConfigError: the queued plans together need more than ``num_slots`` rows.
            ValueError: ``step`` is not after the last submitted step.
        """
        self._raise_if_failed()
        if step <= self._last_step:
            raise ValueError(f"submit step={step} must be greater than the last submitted step {self._last_step}")
        ids = torch.unique(plan_ids.detach().to(device="cpu", dtype=torch.int64).reshape(-1))
        if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= self.bank.num_classes):
            bad = int(ids[0]) if int(ids[0]) < 0 else int(ids[-1])
            raise DataError(f"class id {bad} in the plan of step {step} is outside [0, {self.bank.num_classes}); "
                            f"labels must be global ids below num_classes")
        queued = [p.ids for p in self._plans] + [ids]
        num_needed = sum(q.numel() for q in queued)  # an upper bound; the exact union only when it matters
        if num_needed > self.container.num_slots and len(queued) > 1:
            num_needed = torch.unique(torch.cat(queued)).numel()
        if num_needed > self.container.num_slots:
            raise ConfigError(f"cache.num_slots={self.container.num_slots} cannot hold the {num_needed} distinct "
                              f"ids of the {len(queued)} queued steps (up to {step}); raise cache.num_slots or "
                              f"lower cache.lookahead")
        resident = self.container.slots_of(ids).cpu() >= 0
        missing = ids[~resident]
        for queued_plan in self._plans:  # not in flight: not fetched for an earlier queued step (sorted ids)
            if not missing.numel():
                break
            missing = missing[~_in_sorted(missing, queued_plan.fetch_ids)]
        plan = _Plan(step=step, ids=ids, fetch_ids=missing)
        self._plans.append(plan)
        self._last_step = step
        with self._cond:
            self._fetch_queue.append(plan)
            self._cond.notify_all()

    def ready(self, step: int) -> None:
        """Waits for the rows of ``step`` (counted as stall), evicts as needed and admits them.

        Afterwards every id of the step's plan is resident; the ids of later queued steps that were resident stay so.

        Args:
            step: the oldest submitted step not yet ready.

        Raises:
            ValueError: ``step`` is not the oldest queued step.
            Exception: whatever the worker raised (a bank error), re-raised here.
        """
        self._raise_if_failed()
        if not self._plans or self._plans[0].step != step:
            queued = [p.step for p in self._plans]
            raise ValueError(f"ready(step={step}) but the queued steps are {queued}; call ready for the oldest "
                             f"submitted step (submit it first)")
        plan = self._plans[0]
        t0 = time.perf_counter()
        with self._cond:
            while step not in self._fetched and self._error is None:
                self._cond.wait()
            fetched = self._fetched.pop(step, None)
        self._stall_s += time.perf_counter() - t0
        self._raise_if_failed()
        assert fetched is not None
        if fetched.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(fetched.event)
            for rows in fetched.rows.values():
                rows.record_stream(current)
        num_new = fetched.ids.numel()
        self._ready_step = step
        if num_new > self.container.num_free:
            protect = torch.cat([p.ids for p in self._plans])
            self._evict(num_new - self.container.num_free, protect)
        self.container.admit(fetched.ids, fetched.rows)
        self.container.touch(self.container.slots_of(plan.ids))
        self._plans.popleft()
        self._planned += plan.ids.numel()
        self._hits += plan.ids.numel() - plan.fetch_ids.numel()

    def flush(self) -> None:
        """Waits until the worker is idle: every queued fetch done and every pending write-back in the bank.

        Call ``bank.flush(step)`` afterwards (and before the next ``submit``) to make the writes durable.

        Raises:
            Exception: whatever the worker raised, re-raised here.
        """
        self._raise_if_failed()
        with self._cond:
            while (self._fetch_queue or self._pending or self._busy) and self._error is None:
                self._cond.wait()
        self._raise_if_failed()

    def write_back_all(self) -> None:
        """Writes every resident row to the bank, then waits for all write-backs (``flush``); rows stay resident.

        After it, the bank holds the newest value of every id, as a checkpoint needs. With a bank dtype narrower than
        the container's, the resident rows are rounded in place to what the bank now holds.

        Raises:
            Exception: whatever the worker raised, re-raised here.
        """
        self._raise_if_failed()
        used_slots = torch.nonzero(self.container.valid_K).reshape(-1)
        for chunk, lo in enumerate(range(0, used_slots.numel(), _WRITE_BACK_CHUNK)):
            slots = used_slots[lo:lo + _WRITE_BACK_CHUNK]
            ids = self.container.slot_ids_K.index_select(0, slots)
            rows = {name: self.container[name].index_select(0, slots) for name in self.arrays}
            rows = self._round(rows, chunk + 1)
            if self._narrow:
                for name, r in rows.items():
                    self.container[name].index_copy_(0, slots, r.to(self.container[name].dtype))
            self._push_write_back(ids, rows)
            with self._cond:  # keep at most two chunks of pinned rows alive
                while len(self._pending) > 2 and self._error is None:
                    self._cond.wait()
            self._raise_if_failed()
        self.flush()

    def metrics(self) -> dict[str, float]:
        """Traffic and stall since the previous call.

        Returns:
            ``prefetch/stall(%)`` (time ``ready`` waited / wall time), ``cache/hit_rate(%)`` (planned ids of the steps
            made ready that needed no fetch), ``bank/rows_read``, ``bank/bytes_read`` (rows read from the bank, all
            arrays), ``prefetch/rows_from_pending`` (fetched rows served from the write-behind queue),
            ``bank/rows_written``, ``bank/bytes_written``, and the worker thread's busy time by kind over the wall
            time, ``prefetch/fetch_busy(%)`` and ``prefetch/write_busy(%)`` (their sum near 100: the worker is the
            bottleneck, and ``ready`` stalls once the fetches fall behind).

        Raises:
            Exception: whatever the worker raised, re-raised here.
        """
        self._raise_if_failed()
        now = time.perf_counter()
        wall = max(now - self._wall_start, 1e-9)
        with self._cond:
            rows_read, rows_pending, rows_written = self._rows_read, self._rows_from_pending, self._rows_written
            fetch_s, write_s = self._fetch_s, self._write_s
            self._rows_read = self._rows_from_pending = self._rows_written = 0
            self._fetch_s = self._write_s = 0.0
        out = {
            "prefetch/stall(%)": 100.0 * self._stall_s / wall,
            "cache/hit_rate(%)": 100.0 * self._hits / self._planned if self._planned else 100.0,
            "bank/rows_read": float(rows_read),
            "bank/bytes_read": float(rows_read * self._bytes_per_row),
            "prefetch/rows_from_pending": float(rows_pending),
            "bank/rows_written": float(rows_written),
            "bank/bytes_written": float(rows_written * self._bytes_per_row),
            "prefetch/fetch_busy(%)": 100.0 * fetch_s / wall,
            "prefetch/write_busy(%)": 100.0 * write_s / wall,
        }
        self._wall_start, self._stall_s, self._planned, self._hits = now, 0.0, 0, 0
        return out

    def close(self) -> None:
        """Finishes the pending write-backs, drops queued fetches and joins the worker thread.

        Resident rows are not written back (call ``write_back_all`` first to keep them). Safe to call twice.

        Raises:
            Exception: an error of the worker that no earlier call re-raised.
        """
        with self._cond:
            self._stop = True
            self._fetch_queue.clear()
            self._cond.notify_all()
        self._thread.join()
        self._plans.clear()
        self._fetched.clear()
        if self._error is not None and not self._error_reported:
            self._raise_if_failed()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers
    def _raise_if_failed(self) -> None:
        """Re-raises the worker's error (every call after it failed, since the state is no longer consistent)."""
        if self._error is not None:
            self._error_reported = True
            raise self._error
        if self._stop:
            raise RuntimeError("this Prefetcher is closed; build a new one")

    def _evict(self, n: int, protect: torch.Tensor) -> None:
        """Evicts n unprotected rows into the write-behind queue."""
        ids, rows = self.container.evict(n, protect=protect)  # invariant 5 guarantees enough unprotected rows
        self._push_write_back(ids, self._round(rows, 0))

    def _round(self, rows: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        """``rows`` (device) rounded to the bank's dtype; stochastic noise seeded by (seed, ready step, batch)."""
        if not self._narrow:
            return rows
        generator = None
        if self.rounding == "stochastic":
            generator = torch.Generator(device=self.device)
            generator.manual_seed(((self.seed * 1_000_003 + self._ready_step + 1) * 65_537 + batch) % (1 << 62))
        return {name: round_rows(r, self.dtype, rounding=self.rounding, generator=generator)
                for name, r in rows.items()}

    def _push_write_back(self, ids: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Copies rows (fresh device tensors, already in the bank's dtype) to the host and queues them for
        ``bank.write_rows``."""
        event = None
        if self._cuda:
            host = {}
            for name, r in rows.items():
                host[name] = torch.empty(r.shape, dtype=r.dtype, pin_memory=True)
                host[name].copy_(r, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            rows = host
        batch = _RowBatch(ids=ids.cpu(), rows=rows, event=event)
        with self._cond:
            self._pending.append(batch)
            self._cond.notify_all()

    # ----------------------------------------------------------- worker thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._fetch_queue or self._pending or self._stop):
                        self._cond.wait()
                    behind = len(self._pending) > _MAX_PENDING_BATCHES  # write one before the next fetch
                    if self._fetch_queue and not behind:
                        plan, batch = self._fetch_queue.popleft(), None
                    elif self._pending:
                        plan, batch = None, self._pending[0]
                    else:  # stopped and nothing left to write
                        return
                    self._busy = True
                started = time.perf_counter()
                if plan is not None:
                    fetched = self._fetch(plan.fetch_ids)
                    with self._cond:
                        self._fetched[plan.step] = fetched
                        self._fetch_s += time.perf_counter() - started
                        self._busy = False
                        self._cond.notify_all()
                else:
                    assert batch is not None
                    self._write(batch)
                    with self._cond:
                        popped = self._pending.popleft()  # only the worker removes, so this is `batch`
                        assert popped is batch
                        self._rows_written += batch.ids.numel()
                        self._write_s += time.perf_counter() - started
                        self._busy = False
                        self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, never swallowed
            with self._cond:
                self._error = exc
                self._busy = False
                self._cond.notify_all()

    def _fetch(self, ids: torch.Tensor) -> _Fetched:
        """Reads the rows of ``ids`` (unique, not resident): newest pending write-back first, else the bank."""
        n, dim = ids.numel(), self.container.dim
        rows = {name: torch.empty(n, dim, dtype=self.dtype, pin_memory=self._cuda) for name in self.arrays}
        need = torch.ones(n, dtype=torch.bool)
        with self._cond:
            pending = list(self._pending)
        if n:
            for batch in reversed(pending):  # newest first
                if batch.ids.numel() == 0:
                    continue
                pos = torch.searchsorted(batch.sorted_ids, ids).clamp_(max=batch.ids.numel() - 1)
                hit = need & (batch.sorted_ids[pos] == ids)
                if not bool(hit.any()):
                    continue
                if batch.event is not None:
                    batch.event.synchronize()
                src = batch.order[pos[hit]]
                for name in self.arrays:
                    rows[name][hit] = batch.rows[name].index_select(0, src)
                need &= ~hit
            num_pending = n - int(need.sum())
            bank_ids = ids[need]
            if bank_ids.numel():
                for name in self.arrays:
                    if num_pending:
                        rows[name][need] = self.bank.read_rows(bank_ids, name)
                    else:  # the common case: straight into the (pinned) buffer, no intermediate rows
                        self.bank.read_rows_into(bank_ids, rows[name], name)
            with self._cond:
                self._rows_read += bank_ids.numel()
                self._rows_from_pending += num_pending
        if not self._cuda:
            return _Fetched(ids=ids, rows=rows, event=None)
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            dev_rows = {name: r.to(self.device, non_blocking=True) for name, r in rows.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        return _Fetched(ids=ids, rows=dev_rows, event=event)

    def _write(self, batch: _RowBatch) -> None:
        if batch.event is not None:
            batch.event.synchronize()
        for name in self.arrays:
            self.bank.write_rows(batch.ids, batch.rows[name], name)
