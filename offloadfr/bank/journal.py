"""The journal of a ``ZarrBank`` and its two-phase flush (``ClassBank.prepare`` / ``commit``): crash consistency.

Writes reach the main arrays only through the journal (``journal/<array>``, a redo log of whole blocks, see
``bank.layout``): a dirty block leaves RAM by being staged there (at a flush, or when the nvme tier evicts it), and
a block's current rows are read from the journal first, then the main array, then the initialiser.

1. ``prepare(step)`` writes every dirty block to ``journal/`` and then ``pending_step=step, pending_committed=false``
   (one atomic write of ``zarr.json``). The main arrays still hold the state of ``step`` (the attribute), the journal
   holds the state of ``pending_step``; either can become the truth. Writes are refused until it is settled.
2. The caller writes its checkpoint; the checkpoint's rename is the commit point of the whole.
3. ``commit(step)`` writes ``pending_committed=true`` (from here on only forward), moves each journal chunk file
   over the main chunk file (``os.replace``, atomic per file, no data copied), and writes ``step=step,
   pending_step=null`` last.

``rollback()`` writes ``pending_step=null`` and deletes the journal. Reopening after a crash: with no
``pending_step`` the journal (blocks of an unfinished prepare, or nvme evictions since the last commit) is
discarded, so the bank reads exactly as at ``step``; with ``pending_committed`` the commit is completed; otherwise
the flush stays pending and the bank reads as at ``step`` until ``resolve(checkpoint_steps)`` (the trainer calls it
before building the head) commits it if a complete checkpoint of ``pending_step`` exists and rolls it back if not.
So the main arrays always hold exactly the state of one checkpoint, never a mix, and the trainer's check "bank step
== checkpoint step" is sufficient. Durability against power loss is the filesystem's (no fsync). A full disk raises
``DiskFullError`` and leaves the main arrays and attributes as they were.

One run at a time may open a bank read-write (opening read-write discards a journal left without a commit); readers
open it read-only. The W ranks of one run share the bank: each writes only the blocks of its own id range
(block-aligned), they prepare one after another, and rank 0 alone commits (the journal on disk holds every rank's
blocks, so one commit point covers them all); the others then ``follow_commit``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from abc import abstractmethod
from typing import Any

import numpy as np
import zarr

from offloadfr.bank.base import ClassBank
from offloadfr.bank.layout import JOURNAL, SOURCE_INIT, SOURCE_JOURNAL, SOURCE_MAIN, BankLayout
from offloadfr.bank.memory import _check_commit, _check_not_pending, _check_step
from offloadfr.errors import BankError, DiskFullError
from offloadfr.faults import fault_point

__all__ = ["Journal"]

log = logging.getLogger(__name__)


class Journal(BankLayout, ClassBank):
    """The part of ``ZarrBank`` that makes its writes durable: staging blocks in the journal, the two-phase flush,
    and the recovery at open (see the module docstring). The tier supplies the dirty blocks (``_stage_dirty``) and
    forgets its rows when the main arrays change under them (``_reset_memory``); not used alone.

    Attributes:
        read_only: when true, ``write_rows``, ``prepare``, ``commit``, ``flush`` and ``rollback`` raise.
    """

    read_only: bool
    _lock: threading.RLock  # set by ZarrBank: every public method holds it
    _counts: dict[str, int]  # set by ZarrBank: the traffic counters of ``stats``

    def _open_journal(self, attrs: dict[str, Any]) -> None:
        """Reads the flush state from ``attrs`` and recovers from a crash (see ``_recover``); called last at open."""
        self._step = int(attrs["step"])
        self._pending: int | None = None  # a prepared flush: by this process, or found at open (undecided)
        self._pending_found_at_open = False
        self._journaled: dict[str, set[int]] = {name: set() for name in self.arrays}
        # Banks written before the two-phase flush recorded pending_step only at their commit point.
        self._recover(attrs.get("pending_step"), bool(attrs.get("pending_committed", True)))

    @abstractmethod
    def _stage_dirty(self) -> None:
        """Writes every dirty block held in RAM to the journal (``_stage``) and marks it clean (flush step 1)."""

    @abstractmethod
    def _reset_memory(self) -> None:
        """Forgets every row held in RAM, so the next reads come from the main arrays (or the initialiser)."""

    # ------------------------------------------------------------------ the two-phase flush

    def flush(self, step: int) -> None:
        """``prepare`` then ``commit``, under one lock, so that a writer thread never sees the pending state."""
        with self._lock:
            super().flush(step)

    def prepare(self, step: int) -> None:
        """Phase 1 of a flush: writes every dirty block to the journal, then records ``pending_step = step``.

        Raises:
            BankError: the bank is read-only or closed, a flush is already pending, or ``step`` is negative.
            DiskFullError: the disk filled up; the bank still reads as at ``step`` (the attribute) after a reopen.
        """
        if self.read_only:
            raise BankError(f"bank at {self.path} is open read-only; open it with read_only=False to flush")
        step = _check_step(step)
        with self._lock:
            self._check_open()
            _check_not_pending(self._pending, f"prepare a flush of the bank at {self.path}")
            try:
                self._stage_dirty()
                self._write_attrs({"pending_step": step, "pending_committed": False})
            except OSError as exc:
                if exc.errno in DiskFullError.ERRNOS:
                    raise self._disk_full(exc) from exc
                raise
            self._pending = step
        fault_point("bank.prepared")

    def commit(self, step: int) -> None:
        """Phase 2: moves the journal of the prepared flush into the main arrays and records ``step`` (last).

        Raises:
            BankError: the bank is read-only or closed, or no flush of ``step`` is pending.
        """
        if self.read_only:
            raise BankError(f"bank at {self.path} is open read-only; open it with read_only=False to commit")
        with self._lock:
            self._check_open()
            _check_commit(self._pending, step, f"the bank at {self.path}")
            self._write_attrs({"pending_committed": True})  # from here on a crash completes the commit
            fault_point("bank.commit")
            found_at_open = self._pending_found_at_open
            for array in self.arrays:  # the journal on disk: also blocks staged by a crashed run or by other ranks
                self._journaled[array] |= self._list_journal(array)
            self._apply_journal(step)
            if found_at_open:  # rows read before the commit were those of the old step
                self._reset_memory()

    def follow_commit(self, step: int) -> None:
        """Takes note that another process sharing this bank (rank 0 of a multi-process run) committed the flush of
        ``step`` that this process prepared its blocks of: they are in the main arrays now.

        Raises:
            BankError: the bank is closed, no flush of ``step`` is pending here, or the bank on disk is not committed
                at ``step``.
        """
        with self._lock:
            self._check_open()
            _check_commit(self._pending, step, f"the bank at {self.path}")
            attrs = zarr.open_group(self._group.store, mode="r").attrs.asdict()
            if attrs.get("step") != step or attrs.get("pending_step") is not None:
                raise BankError(f"bank at {self.path}: expected the flush of step {step} committed by rank 0, found "
                                f"step={attrs.get('step')} pending_step={attrs.get('pending_step')}; resume from the "
                                "newest checkpoint with --resume auto")
            for array in self.arrays:
                self._journaled[array] = set()
            self._step, self._pending, self._pending_found_at_open = step, None, False

    def rollback(self) -> None:
        """Drops the prepared flush (if any) and every write since the last commit; reads are as at ``step``.

        Raises:
            BankError: the bank is read-only or closed.
        """
        if self.read_only:
            raise BankError(f"bank at {self.path} is open read-only; open it with read_only=False to roll back")
        with self._lock:
            self._check_open()
            self._discard_journal()  # first: it frees space, and a crash here leaves a pending flush to roll back
            self._write_attrs({"pending_step": None, "pending_committed": False})
            self._reset_memory()
            self._pending = None
            self._pending_found_at_open = False

    @property
    def pending_step(self) -> int | None:
        """The step of a prepared flush not yet committed or rolled back; None when there is none."""
        return self._pending

    @property
    def step(self) -> int:
        """The step of the last commit; -1 if the bank was never flushed."""
        return self._step

    # ------------------------------------------------------------------ the journal's blocks

    def _block_source(self, array: str, block: int) -> str:
        """Where the current rows of ``block`` are: the journal, else the main array, else the initialiser."""
        if block in self._journaled[array]:
            return SOURCE_JOURNAL
        if os.path.isfile(self._chunk_file("", array, block)):
            return SOURCE_MAIN
        return SOURCE_INIT

    def _stage(self, array: str, first: int, stop: int, rows: np.ndarray) -> None:
        """Writes blocks ``[first, stop)`` (``rows`` covers them exactly) to the journal: one chunk-aligned write."""
        lo, _ = self._block_range(first)
        _, hi = self._block_range(stop - 1)
        assert rows.shape == (hi - lo, self.dim), (rows.shape, lo, hi)
        fault_point("bank.stage")
        try:
            if self._raw_chunks:  # the chunk files themselves: a third of Zarr's time per block (layout.py)
                self._write_chunk_files(JOURNAL, array, first, stop, rows)
            else:
                self._journal[array][lo:hi] = rows
        except OSError as exc:  # also reached from an nvme eviction, outside prepare
            if exc.errno in DiskFullError.ERRNOS:
                raise self._disk_full(exc) from exc
            raise
        self._journaled[array].update(range(first, stop))
        self._counts["blocks_staged"] += stop - first

    def _disk_full(self, exc: OSError) -> DiskFullError:
        return DiskFullError(f"no space left on the disk of the bank at {self.path} ({exc.strerror}); the bank and "
                             f"checkpoints written before are intact: free space there (or set bank.path to a larger "
                             f"disk and move the bank), then continue with --resume auto")

    def _discard_journal(self) -> None:
        for array in self.arrays:
            shutil.rmtree(os.path.join(self.path, JOURNAL, array, "c"), ignore_errors=True)
            self._journaled[array] = set()

    def _apply_journal(self, step: int) -> None:
        """Moves journal chunk files over the main ones, then records ``step`` (flush steps 3 and 4)."""
        for array, blocks in self._journaled.items():
            for block in sorted(blocks):
                src = self._chunk_file(JOURNAL, array, block)
                dst = self._chunk_file("", array, block)
                if os.path.isfile(src):  # absent when a previous, interrupted recovery already moved it
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    os.replace(src, dst)
                    try:
                        os.rmdir(os.path.dirname(src))
                    except OSError:
                        pass  # a leftover temp file of an interrupted write; harmless
                # Reads now find the block in the main array.
                blocks.discard(block)
        self._write_attrs({"step": step, "pending_step": None, "pending_committed": False})  # written last
        self._step = step
        self._pending = None
        self._pending_found_at_open = False

    def _list_journal(self, array: str) -> set[int]:
        root = os.path.join(self.path, JOURNAL, array, "c")
        if not os.path.isdir(root):
            return set()
        return {int(entry.name) for entry in os.scandir(root)
                if entry.name.isdigit() and os.path.isfile(os.path.join(entry.path, "0"))}

    def _recover(self, pending_step: int | None, committed: bool) -> None:
        """At open: discards a journal that belongs to no step, completes a decided commit, keeps an undecided one."""
        if pending_step is None:
            if not self.read_only:  # blocks staged after the last commit belong to no consistent step
                self._discard_journal()
            return
        if not committed:  # prepared, then the process died: resolve() decides, reads stay at the old step
            self._pending = int(pending_step)
            self._pending_found_at_open = True
            if self.read_only:
                log.warning("bank at %s: a flush of step %d is prepared but not committed; reading step %d (the "
                            "next training run settles it)", self.path, pending_step, self._step)
            return
        for array in self.arrays:
            self._journaled[array] = self._list_journal(array)
        if self.read_only:
            log.warning("bank at %s: a commit of step %d was interrupted; reading it through the journal (open "
                        "read-write once to complete it)", self.path, pending_step)
            self._step = int(pending_step)
            return
        log.warning("bank at %s: completing a commit of step %d that was interrupted", self.path, pending_step)
        self._apply_journal(int(pending_step))
