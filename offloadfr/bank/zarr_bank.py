"""``ZarrBank``: a class-center bank persisted as a Zarr group, served from RAM (``ram`` tier) or block by block
(``nvme`` tier).

Legend: N = num_classes, D = dim, R = chunk_rows (ids per block), n = number of ids in one call.

Layout of the group at ``path`` (a local directory; Zarr v3, float32, uncompressed, unsharded)::

    zarr.json            group attributes: format, format_version, head_kind, num_classes, dim, dtype, arrays,
                         chunk_rows, init_seed, init_std, step (last consistent flush, -1 at creation), pending_step
    centers/             (N, D) array, chunks (R, D): one chunk per block of R consecutive ids
    momentum/            same, for learned heads
    journal/centers/     same shape and codecs: blocks written since the last flush (a redo log)
    journal/momentum/

Creation is O(1) in N: chunks are never written at creation, and a block whose chunk is absent holds its
deterministic initial rows (``bank.init``: N(0, init_std) for ``centers``, zeros for other arrays), generated when
the block is first read. Whether a block was written is decided by its chunk *file* existing, not by its values, so a
written block equal to the fill value stays written (journal arrays use ``write_empty_chunks=True``).

All Zarr I/O moves whole blocks: one chunk-aligned slab read or write, never a per-row or scattered ``oindex`` call
(zarr 3.1.6 is 10-100x slower there, and its sharded scattered writes are broken; see env-notes §5).

Tiers:
    ``ram``: one (N, D) host tensor per array (pinned when CUDA is available), filled block by block on first touch;
    reads and writes are ``index_select`` / ``index_copy_``; writes mark their blocks dirty. The tensors are
    allocated on the first read or write, so the host must have N * D * 4 bytes per array (``open_bank`` checks).
    A rank of a multi-process run holds only its own id range: ``hold_rows(start, end)`` before the first access
    makes the tensors (end − start) × D, and ids outside the range are refused.
    ``nvme``: an LRU of at most ``cache_blocks`` blocks per array in RAM; a miss loads the block with one Zarr read
    (or initialises it); writes go into the cached block; evicting a dirty block writes it to the journal.

Crash consistency (the two-phase flush of ``ClassBank``): writes reach the main arrays only through the journal.

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

Thread safety: every public method holds one lock, so a prefetcher thread may read and write while the main thread
flushes; all Zarr writes therefore come from one thread at a time (one writer per chunk). One run at a time may
open a bank read-write (opening read-write discards a journal left without a commit); readers open it read-only.
The W ranks of one run share the bank: each writes only the blocks of its own id range (block-aligned), they prepare
one after another, and rank 0 alone commits (the journal on disk holds every rank's blocks, so one commit point
covers them all); the others then ``follow_commit``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
import zarr.storage

from offloadfr.bank.base import ClassBank
from offloadfr.bank.init import initial_block
from offloadfr.bank.memory import (
    _check_array,
    _check_commit,
    _check_ids,
    _check_not_pending,
    _check_rows,
    _check_shape,
    _check_step,
)
from offloadfr.config import BankCfg
from offloadfr.errors import BankError, DiskFullError
from offloadfr.faults import fault_point

__all__ = ["ZarrBank", "open_bank", "resolve_bank", "check_ram_fits", "auto_chunk_rows", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT = "offloadfr-bank"
FORMAT_VERSION = 1
"""Version of the on-disk layout; ``open`` refuses other versions."""

_CHUNK_BYTES = 2 << 20  # auto chunk_rows targets 2 MiB blocks (env-notes §5.2: 0.6-2.4 ms per 2-8 MiB chunk read)
_STAGE_BYTES = 64 << 20  # the ram tier's flush writes runs of dirty blocks in slabs of at most this size
_JOURNAL = "journal"
_TIERS = ("ram", "nvme")

Tier = Literal["ram", "nvme"]


def auto_chunk_rows(num_classes: int, dim: int) -> int:
    """Rows per block so that a float32 block is about 2 MiB (1024 rows at D=512), at most N.

    Args:
        num_classes: N.
        dim: D.

    Returns:
        The block size R, in ``[1, N]``.
    """
    return max(1, min(num_classes, _CHUNK_BYTES // (4 * dim)))


class _Block:
    """A cached nvme-tier block: its (rows_in_block, D) rows and whether they differ from the stored copy."""

    __slots__ = ("rows", "dirty")

    def __init__(self, rows: torch.Tensor, dirty: bool) -> None:
        self.rows = rows
        self.dirty = dirty


def _check_tier(tier: str, cache_blocks: int) -> None:
    if tier not in _TIERS:
        raise BankError(f"bank tier={tier!r} is not one of {list(_TIERS)}; set bank.tier to 'ram' or 'nvme'")
    if isinstance(cache_blocks, bool) or not isinstance(cache_blocks, int) or cache_blocks < 1:
        raise BankError(f"cache_blocks={cache_blocks!r} must be an int >= 1 (set bank.cache_blocks)")


class ZarrBank(ClassBank):
    """A ClassBank stored as a Zarr group, with ``ram`` and ``nvme`` tiers (see the module docstring).

    Build it with :meth:`create`, :meth:`open` or :func:`open_bank`, not with the constructor.

    Attributes:
        path: the group directory.
        tier: ``"ram"`` or ``"nvme"``.
        head_kind: the head the bank was created for.
        chunk_rows: R, ids per block.
        num_blocks: ceil(N / R).
        seed: the initialiser's seed.
        init_std: the initialiser's standard deviation.

    Example::

        bank = ZarrBank.create("runs/x/bank", num_classes=37, dim=8, arrays=("centers", "momentum"),
                               head_kind="partial_fc", chunk_rows=8)
        bank.write_rows(torch.tensor([3, 30]), torch.ones(2, 8))
        bank.flush(step=100)                      # durable; bank.step == 100
        bank = ZarrBank.open("runs/x/bank", tier="nvme", cache_blocks=64)
    """

    def __init__(self, path: Path, group: zarr.Group, attrs: dict[str, Any], *, tier: Tier, read_only: bool,
                 cache_blocks: int) -> None:
        _check_tier(tier, cache_blocks)
        self.path = path
        self.tier = tier
        self.read_only = read_only
        self.num_classes = int(attrs["num_classes"])
        self.dim = int(attrs["dim"])
        self.arrays = tuple(attrs["arrays"])
        self.head_kind = str(attrs["head_kind"])
        self.chunk_rows = int(attrs["chunk_rows"])
        self.seed = int(attrs["init_seed"])
        self.init_std = float(attrs["init_std"])
        self.num_blocks = math.ceil(self.num_classes / self.chunk_rows)
        self.cache_blocks = cache_blocks
        self._group = group
        self._main = {name: group[name] for name in self.arrays}
        self._journal = {name: group[f"{_JOURNAL}/{name}"].with_config({"write_empty_chunks": True})
                         for name in self.arrays}
        for name in self.arrays:
            # Journal chunk files are moved onto main chunk files, so both arrays must encode chunks identically.
            if self._main[name].metadata.encode_chunk_key((7, 0)) != "c/7/0" or \
                    self._main[name].metadata.to_dict() != self._journal[name].metadata.to_dict():
                raise BankError(f"bank at {path}: array {name!r} has an unexpected chunk layout; it was not written "
                                f"by offloadfr (format_version {FORMAT_VERSION})")
        self._lock = threading.RLock()
        self._closed = False
        self._step = int(attrs["step"])
        self._pending: int | None = None  # a prepared flush: by this process, or found at open (undecided)
        self._pending_found_at_open = False
        self._journaled: dict[str, set[int]] = {name: set() for name in self.arrays}
        self._counts = {"rows_read": 0, "rows_written": 0, "blocks_loaded": 0, "blocks_initialised": 0,
                        "blocks_staged": 0}
        # ram tier state
        self._tensors: dict[str, torch.Tensor] = {}
        self._loaded: dict[str, torch.Tensor] = {}
        self._dirty: dict[str, torch.Tensor] = {}
        # nvme tier state
        self._cache: dict[str, OrderedDict[int, _Block]] = {name: OrderedDict() for name in self.arrays}
        self._held = (0, self.num_classes)  # ram tier: the ids held in RAM (``hold_rows``), allocated on first use
        # Banks written before the two-phase flush recorded pending_step only at their commit point.
        self._recover(attrs.get("pending_step"), bool(attrs.get("pending_committed", True)))

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, num_classes: int, dim: int, arrays: Sequence[str],
               head_kind: str, chunk_rows: int = 0, seed: int = 0, init_std: float = 0.01, tier: Tier = "ram",
               cache_blocks: int = 64) -> ZarrBank:
        """Creates an empty bank (O(1) in N: no chunk is written) and opens it.

        Args:
            path: a directory that does not exist yet or is empty.
            num_classes: N.
            dim: D.
            arrays: array names, e.g. ``("centers", "momentum")``.
            head_kind: the head kind recorded in the attributes (checked by :func:`open_bank`).
            chunk_rows: R, ids per block; 0 picks about 2 MiB per block.
            seed: seed of the per-id initialiser.
            init_std: standard deviation of the initial centers.
            tier: ``"ram"`` or ``"nvme"``.
            cache_blocks: nvme tier: blocks per array kept in RAM.

        Returns:
            The open bank, with ``step == -1``.

        Raises:
            BankError: a bank or other files already exist at ``path``, or an argument is invalid.
        """
        arrays = _check_shape(num_classes, dim, arrays)
        _check_tier(tier, cache_blocks)
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 0:
            raise BankError(f"chunk_rows={chunk_rows!r} must be an int >= 0 (0 = about 2 MiB per block)")
        if not (isinstance(init_std, int | float) and math.isfinite(init_std) and init_std > 0):
            raise BankError(f"init_std={init_std!r} must be a finite float > 0")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise BankError(f"seed={seed!r} must be an int >= 0")
        if not isinstance(head_kind, str) or not head_kind:
            raise BankError(f"head_kind={head_kind!r} must be a non-empty string such as 'partial_fc'")
        root = Path(path)
        if (root / "zarr.json").exists():
            raise BankError(f"a bank already exists at {root}; open it (ZarrBank.open or open_bank) or set "
                            f"bank.path to another directory")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise BankError(f"{root} exists and is not an empty directory; set bank.path to a new directory")
        rows = min(chunk_rows, num_classes) if chunk_rows else auto_chunk_rows(num_classes, dim)
        group = zarr.open_group(zarr.storage.LocalStore(root), mode="w-")
        journal = group.require_group(_JOURNAL)
        for name in arrays:
            for parent in (group, journal):
                parent.create_array(name, shape=(num_classes, dim), chunks=(rows, dim), dtype="float32",
                                    compressors=None, filters=None, fill_value=0.0)
        # The identifying attributes are written last: a bank interrupted during creation is refused by open().
        group.update_attributes({
            "format": FORMAT, "format_version": FORMAT_VERSION, "head_kind": head_kind,
            "num_classes": num_classes, "dim": dim, "dtype": "float32", "arrays": list(arrays),
            "chunk_rows": rows, "init_seed": seed, "init_std": float(init_std), "step": -1, "pending_step": None,
            "pending_committed": False,
        })
        return cls.open(root, tier=tier, cache_blocks=cache_blocks)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, tier: Tier = "ram", read_only: bool = False,
             cache_blocks: int = 64) -> ZarrBank:
        """Opens an existing bank; completes a flush that a crash interrupted after its commit point.

        Args:
            path: the bank directory.
            tier: ``"ram"`` or ``"nvme"``.
            read_only: open without writing anything; ``write_rows`` and ``flush`` then raise.
            cache_blocks: nvme tier: blocks per array kept in RAM.

        Returns:
            The open bank.

        Raises:
            BankError: there is no offloadfr bank at ``path``, or its format version is unsupported.
        """
        _check_tier(tier, cache_blocks)
        root = Path(path)
        if not (root / "zarr.json").is_file():
            raise BankError(f"no bank at {root} (no zarr.json); create one with ZarrBank.create or open_bank, or "
                            f"set bank.path to an existing bank")
        try:
            group = zarr.open_group(zarr.storage.LocalStore(root, read_only=read_only), mode="r" if read_only else "r+")
        except Exception as exc:  # zarr raises several types for a malformed group
            raise BankError(f"{root} is not a readable Zarr group ({exc}); set bank.path to a bank directory") from exc
        attrs = group.attrs.asdict()
        if attrs.get("format") != FORMAT:
            raise BankError(f"{root} is a Zarr group but not an offloadfr bank (attribute format="
                            f"{attrs.get('format')!r}, expected {FORMAT!r}); set bank.path to another directory")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise BankError(f"bank at {root} has format_version={attrs.get('format_version')!r}; this offloadfr "
                            f"reads version {FORMAT_VERSION}")
        return cls(root, group, attrs, tier=tier, read_only=read_only, cache_blocks=cache_blocks)

    # ------------------------------------------------------------------ ClassBank

    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        """Returns the (n, D) float32 rows of ``ids`` (any order, repeats allowed) as a new CPU tensor.

        Raises:
            BankError: the bank is closed, an id is outside ``[0, N)`` or ``array`` is unknown.
        """
        _check_array(self, array)
        ids = _check_ids(ids, self.num_classes, unique=False)
        with self._lock:
            self._check_open()
            self._counts["rows_read"] += ids.numel()
            if self.tier == "ram":
                return self._ram_tensor(array, ids).index_select(0, ids - self._held[0])
            out = torch.empty((ids.numel(), self.dim), dtype=torch.float32)
            for block, pos in self._group_by_block(ids):
                entry = self._nvme_block(array, block)
                out.index_copy_(0, pos, entry.rows.index_select(0, ids[pos] - block * self.chunk_rows))
            return out

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        """Stores ``rows`` (n, D) at unique ``ids``; durable after the next ``flush``.

        Raises:
            BankError: the bank is read-only or closed, an id is out of range or repeated, or ``rows`` has the
                wrong shape.
        """
        if self.read_only:
            raise BankError(f"bank at {self.path} is open read-only; open it with read_only=False to write rows")
        _check_array(self, array)
        ids = _check_ids(ids, self.num_classes, unique=True)
        rows = _check_rows(rows, ids.numel(), self.dim)
        with self._lock:
            self._check_open()
            _check_not_pending(self._pending, f"write rows to the bank at {self.path}")
            self._counts["rows_written"] += ids.numel()
            if self.tier == "ram":
                self._ram_tensor(array, ids).index_copy_(0, ids - self._held[0], rows)
                self._dirty[array][ids // self.chunk_rows - self._held[0] // self.chunk_rows] = True
                return
            for block, pos in self._group_by_block(ids):
                lo, hi = self._block_range(block)
                offsets = ids[pos] - lo
                if pos.numel() == hi - lo:  # the whole block: no read-modify-write, one copy
                    entry = self._nvme_block(array, block, rows=rows.index_select(0, pos[torch.argsort(offsets)]))
                else:
                    entry = self._nvme_block(array, block)
                    entry.rows.index_copy_(0, offsets, rows.index_select(0, pos))
                entry.dirty = True

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

    def close(self) -> None:
        """Drops the in-RAM rows and cache; unflushed writes are lost (reopening reads the last flushed step)."""
        with self._lock:
            self._closed = True
            self._tensors.clear()
            self._loaded.clear()
            self._dirty.clear()
            self._cache.clear()

    # ------------------------------------------------------------------ extras

    def stats(self) -> dict[str, int]:
        """Cumulative traffic counters, named as step metrics.

        Returns:
            ``bank/rows_read``, ``bank/rows_written``, ``bank/blocks_loaded`` (Zarr block reads),
            ``bank/blocks_initialised`` (blocks generated by the initialiser) and ``bank/blocks_staged`` (blocks
            written to the journal by eviction or flush).
        """
        with self._lock:
            return {f"bank/{key}": value for key, value in self._counts.items()}

    def __repr__(self) -> str:
        return (f"ZarrBank(path={str(self.path)!r}, tier={self.tier!r}, num_classes={self.num_classes}, "
                f"dim={self.dim}, arrays={self.arrays}, chunk_rows={self.chunk_rows}, step={self._step})")

    # ------------------------------------------------------------------ blocks

    def _check_open(self) -> None:
        if self._closed:
            raise BankError(f"bank at {self.path} is closed; open it again with ZarrBank.open")

    def _block_range(self, block: int) -> tuple[int, int]:
        lo = block * self.chunk_rows
        return lo, min(lo + self.chunk_rows, self.num_classes)

    def _group_by_block(self, ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Splits ``ids`` by block: (block, positions in ``ids`` of the ids in that block), blocks ascending."""
        blocks_sorted, order = torch.sort(ids // self.chunk_rows, stable=True)
        blocks, counts = torch.unique_consecutive(blocks_sorted, return_counts=True)
        return list(zip(blocks.tolist(), torch.split(order, counts.tolist()), strict=True))

    def _chunk_file(self, prefix: str, array: str, block: int) -> str:
        return os.path.join(self.path, prefix, array, "c", str(block), "0")

    def _load_block(self, array: str, block: int) -> np.ndarray:
        """The current rows of ``block``: from the journal, else the main array, else the initialiser."""
        lo, hi = self._block_range(block)
        if block in self._journaled[array]:
            source = self._journal[array]
        elif os.path.isfile(self._chunk_file("", array, block)):
            source = self._main[array]
        else:
            self._counts["blocks_initialised"] += 1
            return initial_block(array, lo, hi, self.dim, seed=self.seed, std=self.init_std)
        self._counts["blocks_loaded"] += 1
        return np.require(source[lo:hi], dtype=np.float32, requirements=["C", "W"])

    def _stage(self, array: str, first: int, stop: int, rows: np.ndarray) -> None:
        """Writes blocks ``[first, stop)`` (``rows`` covers them exactly) to the journal: one chunk-aligned write."""
        lo, _ = self._block_range(first)
        _, hi = self._block_range(stop - 1)
        assert rows.shape == (hi - lo, self.dim), (rows.shape, lo, hi)
        fault_point("bank.stage")
        try:
            self._journal[array][lo:hi] = rows
        except OSError as exc:  # also reached from an nvme eviction, outside prepare
            if exc.errno in DiskFullError.ERRNOS:
                raise self._disk_full(exc) from exc
            raise
        self._journaled[array].update(range(first, stop))
        self._counts["blocks_staged"] += stop - first

    def _ram_allocate(self) -> None:
        """Allocates the ram tier's tensors for the ids held (pinned when CUDA is available)."""
        start, end = self._held
        num_blocks = math.ceil(end / self.chunk_rows) - start // self.chunk_rows
        pin = torch.cuda.is_available()
        for name in self.arrays:
            self._tensors[name] = torch.empty((end - start, self.dim), dtype=torch.float32, pin_memory=pin)
            self._loaded[name] = torch.zeros(num_blocks, dtype=torch.bool)
            self._dirty[name] = torch.zeros(num_blocks, dtype=torch.bool)

    def _ram_tensor(self, array: str, ids: torch.Tensor) -> torch.Tensor:
        """The ram tier's tensor of ``array`` (row ``i`` holds id ``held start + i``), with the blocks of ``ids``
        loaded; refuses ids outside the held range."""
        if not self._tensors:
            self._ram_allocate()
        start, end = self._held
        if ids.numel() and (int(ids.min()) < start or int(ids.max()) >= end):
            bad = int(ids.min()) if int(ids.min()) < start else int(ids.max())
            raise BankError(f"class id {bad} is outside the ids [{start}, {end}) this process holds of the bank at "
                            f"{self.path}; each rank reads and writes only its own partition")
        loaded = self._loaded[array]
        first_block = start // self.chunk_rows
        blocks = ids // self.chunk_rows - first_block
        tensor = self._tensors[array]
        if bool(loaded[blocks].all()):
            return tensor
        blocks = torch.unique(blocks)
        for local in blocks[~loaded[blocks]].tolist():
            lo, hi = self._block_range(first_block + local)
            tensor[lo - start:hi - start].copy_(torch.from_numpy(self._load_block(array, first_block + local)))
            loaded[local] = True
        return tensor

    def hold_rows(self, start: int, end: int) -> None:
        """Ram tier: holds only ids ``[start, end)`` in RAM (a rank's partition). Call it before the first read or
        write; ``start`` must be a multiple of ``chunk_rows``. The nvme tier ignores it (it holds blocks on demand).

        Raises:
            BankError: the range is empty, not block-aligned or outside ``[0, N)``, or rows are already held.
        """
        if not (0 <= start < end <= self.num_classes) or start % self.chunk_rows:
            raise BankError(f"hold_rows({start}, {end}) on a bank of {self.num_classes} ids with chunk_rows="
                            f"{self.chunk_rows}: the range must be non-empty, inside [0, {self.num_classes}) and start "
                            f"on a block boundary")
        with self._lock:
            if self._tensors and self._held != (start, end):
                raise BankError(f"bank at {self.path} already holds ids {list(self._held)} in RAM; call hold_rows "
                                f"before the first read or write")
            self._held = (start, end)

    def _nvme_block(self, array: str, block: int, rows: torch.Tensor | None = None) -> _Block:
        """The cached block (loaded on a miss), or, given ``rows``, the block replaced by them; evicts LRU blocks."""
        cache = self._cache[array]
        entry = cache.get(block)
        if entry is not None:
            cache.move_to_end(block)
            if rows is not None:
                entry.rows = rows
            return entry
        while len(cache) >= self.cache_blocks:
            old_block, old = cache.popitem(last=False)
            if old.dirty:
                self._stage(array, old_block, old_block + 1, old.rows.numpy())
        entry = _Block(torch.from_numpy(self._load_block(array, block)) if rows is None else rows, dirty=False)
        cache[block] = entry
        return entry

    # ------------------------------------------------------------------ flush and recovery

    def _stage_dirty(self) -> None:
        """Writes every dirty block to the journal (flush step 1)."""
        if self.tier == "nvme":
            for array, cache in self._cache.items():
                for block, entry in cache.items():
                    if entry.dirty:
                        self._stage(array, block, block + 1, entry.rows.numpy())
                        entry.dirty = False
            return
        max_blocks = max(1, _STAGE_BYTES // (4 * self.dim * self.chunk_rows))
        start = self._held[0]
        for array, dirty in self._dirty.items():
            blocks = (torch.nonzero(dirty).flatten() + start // self.chunk_rows).tolist()
            run_start = 0
            for i in range(1, len(blocks) + 1):  # runs of consecutive blocks, at most max_blocks long
                if i == len(blocks) or blocks[i] != blocks[i - 1] + 1 or i - run_start == max_blocks:
                    first, stop = blocks[run_start], blocks[i - 1] + 1
                    lo, _ = self._block_range(first)
                    _, hi = self._block_range(stop - 1)
                    self._stage(array, first, stop, self._tensors[array][lo - start:hi - start].numpy())
                    run_start = i
            dirty.zero_()

    def _write_attrs(self, updates: dict[str, Any]) -> None:
        """Updates group attributes in one atomic write of ``zarr.json``, starting from the attributes on disk (the
        ranks of a multi-process run take turns writing them, so this process's copy may be stale)."""
        self._group = zarr.open_group(self._group.store, mode="r+")
        self._group.update_attributes(updates)

    def _disk_full(self, exc: OSError) -> DiskFullError:
        return DiskFullError(f"no space left on the disk of the bank at {self.path} ({exc.strerror}); the bank and "
                             f"checkpoints written before are intact: free space there (or set bank.path to a larger "
                             f"disk and move the bank), then continue with --resume auto")

    def _reset_memory(self) -> None:
        """Forgets every row held in RAM, so the next reads come from the main arrays (or the initialiser)."""
        for array in self.arrays:
            if self.tier == "ram":
                if self._tensors:
                    self._loaded[array].zero_()
                    self._dirty[array].zero_()
            else:
                self._cache[array].clear()

    def _discard_journal(self) -> None:
        for array in self.arrays:
            shutil.rmtree(os.path.join(self.path, _JOURNAL, array, "c"), ignore_errors=True)
            self._journaled[array] = set()

    def _apply_journal(self, step: int) -> None:
        """Moves journal chunk files over the main ones, then records ``step`` (flush steps 3 and 4)."""
        for array, blocks in self._journaled.items():
            for block in sorted(blocks):
                src = self._chunk_file(_JOURNAL, array, block)
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
        root = os.path.join(self.path, _JOURNAL, array, "c")
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


def resolve_bank(path: str | os.PathLike[str], checkpoint_steps: Sequence[int]) -> str:
    """Settles a flush a crash left prepared in the bank at ``path`` (see ``ClassBank.resolve``); no bank: nothing.

    Args:
        path: the bank directory (it may not exist).
        checkpoint_steps: steps of the run's complete checkpoints.

    Returns:
        What was done: ``"committed"``, ``"rolled back"``, ``"nothing pending"`` or ``"no bank"``.

    Raises:
        BankError: ``path`` holds something that is not an offloadfr bank.
    """
    if not (Path(path) / "zarr.json").exists():
        return "no bank"
    bank = ZarrBank.open(path, tier="nvme", cache_blocks=1)
    try:
        pending = bank.pending_step
        done = bank.resolve(checkpoint_steps)
        if pending is not None:
            log.warning("bank at %s: the flush of step %s prepared before a crash was %s (bank step now %d)",
                        path, pending, done, bank.step)
        return done
    finally:
        bank.close()


_RAM_HEADROOM = 0.9
"""The ram tier may take at most this fraction of the memory available when the bank is opened."""


def check_ram_fits(*, num_classes: int, dim: int, num_arrays: int, available: int | None = None,
                   processes: int = 1) -> None:
    """Refuses ``tier = "ram"`` when the rows held on this machine would not fit in the host memory available now
    (psutil). ``num_classes`` counts the rows of all ``processes`` of this machine together.

    Raises:
        BankError: naming the bytes needed and available, and suggesting ``bank.tier = "nvme"``.
    """
    import psutil

    need = num_classes * dim * 4 * num_arrays
    free = psutil.virtual_memory().available if available is None else available
    if need > _RAM_HEADROOM * free:
        who = f" ({processes} processes on this host)" if processes > 1 else ""
        raise BankError(f"bank.tier = 'ram' needs {need / 2**30:.1f} GiB of host memory{who} for {num_classes} x "
                        f"{dim} x {num_arrays} float32 but {free / 2**30:.1f} GiB is available; set bank.tier = 'nvme' "
                        "(served block by block from disk)")


def open_bank(cfg: BankCfg, *, path: str | os.PathLike[str], num_classes: int, dim: int, arrays: tuple[str, ...],
              head_kind: str, num_processes: int = 1, processes_per_host: int = 1) -> ZarrBank:
    """Opens the bank at ``path`` if it exists (checking that it fits the run), else creates it from ``cfg``.

    Args:
        cfg: the ``[bank]`` section (tier, chunk_rows, init_std, seed, cache_blocks; ``cfg.path`` is ignored).
        path: the resolved bank directory.
        num_classes: N of the run.
        dim: D of the run.
        arrays: the arrays the head needs.
        head_kind: the run's ``head.kind``.
        num_processes: the ranks that share the bank; with the ram tier each holds about N / num_processes ids
            (``ZarrBank.hold_rows``).
        processes_per_host: the ranks on this machine; the ram tier's host-memory check counts all of their shares
            (every rank checks before any of them allocates, so each must count the others on its host).

    Returns:
        The open bank.

    Raises:
        BankError: an existing bank's num_classes, dim, arrays or head_kind differ from the run's (the message names
            the field, both values and the fix), or the bank cannot be created or opened.
    """
    if cfg.tier == "ram":
        on_host = min(max(processes_per_host, 1), num_processes)
        check_ram_fits(num_classes=math.ceil(num_classes / num_processes) * on_host, dim=dim, num_arrays=len(arrays),
                       processes=on_host)
    if not (Path(path) / "zarr.json").exists():
        return ZarrBank.create(path, num_classes=num_classes, dim=dim, arrays=arrays, head_kind=head_kind,
                               chunk_rows=cfg.chunk_rows, seed=cfg.seed, init_std=cfg.init_std, tier=cfg.tier,
                               cache_blocks=cfg.cache_blocks)
    bank = ZarrBank.open(path, tier=cfg.tier, cache_blocks=cfg.cache_blocks)
    wanted = {"num_classes": num_classes, "dim": dim, "arrays": tuple(arrays), "head_kind": head_kind}
    found = {"num_classes": bank.num_classes, "dim": bank.dim, "arrays": bank.arrays, "head_kind": bank.head_kind}
    for field, value in wanted.items():
        same = sorted(found[field]) == sorted(value) if field == "arrays" else found[field] == value
        if not same:
            bank.close()
            raise BankError(f"bank at {path} has {field}={found[field]!r} but this run needs {field}={value!r}; "
                            f"set bank.path to a new directory (or delete {path}) to start a new bank, or run with "
                            f"the settings the bank was created with")
    ignored = {"seed": (cfg.seed, bank.seed), "init_std": (cfg.init_std, bank.init_std)}
    if cfg.chunk_rows:
        ignored["chunk_rows"] = (cfg.chunk_rows, bank.chunk_rows)
    for field, (asked, used) in ignored.items():
        if asked != used:
            log.warning("bank.%s=%r is ignored: the existing bank at %s was created with %s=%r", field, asked, path,
                        field, used)
    return bank
