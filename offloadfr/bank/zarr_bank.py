"""``ZarrBank``: a class-center bank persisted as a Zarr group, served from RAM (``ram`` tier) or block by block
(``nvme`` tier); ``open_bank`` opens or creates one from a ``BankCfg``, ``resolve_bank`` settles a flush a crash left
prepared.

Legend: N = num_classes, D = dim, R = chunk_rows (ids per block), n = number of ids in one call.

``ZarrBank`` is the one class users open. It is composed of parts, one module each, that it inherits: each part sets
up and owns its own attributes of the bank and builds on the parts listed before it (the journal reaches the tier
only through two abstract methods, ``_stage_dirty`` and ``_reset_memory``, which ``ZarrBank`` sends to its tier):

- ``bank.layout``: the Zarr group, its attributes, the blocks and their chunk files, whole-block reads;
- ``bank.journal``: the journal and the two-phase flush (``prepare`` / ``commit`` / ``rollback``), the recovery at
  open: its docstring is the bank's crash-consistency story;
- ``bank.io_pool``: loading the blocks a call misses, serially or on the bank's ``io_threads`` pool;
- ``bank.ram_tier`` and ``bank.nvme_tier``: where rows are held between reads and writes (host tensors, or an LRU
  of blocks); the bank sends each call to the tier it was opened with.

Thread safety: every public method holds one lock, so a prefetcher thread may read and write while the main thread
flushes; all Zarr writes therefore come from one thread at a time (one writer per chunk). The I/O pool's threads
never take the lock: a call waits for the loads it handed out (also when it raises) before it returns.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import zarr

from offloadfr.bank.base import ClassBank
from offloadfr.bank.dtypes import check_dtype
from offloadfr.bank.io_pool import MAX_AUTO_IO_THREADS, default_io_threads
from offloadfr.bank.layout import create_layout, open_layout
from offloadfr.bank.memory import _check_array, _check_ids, _check_not_pending, _check_out, _check_rows, _check_shape
from offloadfr.bank.nvme_tier import NvmeTier
from offloadfr.bank.ram_tier import RamTier, check_ram_fits
from offloadfr.config import BankCfg
from offloadfr.errors import BankError

__all__ = ["ZarrBank", "open_bank", "resolve_bank"]

log = logging.getLogger(__name__)

_TIERS = ("ram", "nvme")

Tier = Literal["ram", "nvme"]


def _check_tier(tier: str, cache_blocks: int, io_threads: int = 0) -> None:
    if tier not in _TIERS:
        raise BankError(f"bank tier={tier!r} is not one of {list(_TIERS)}; set bank.tier to 'ram' or 'nvme'")
    if isinstance(cache_blocks, bool) or not isinstance(cache_blocks, int) or cache_blocks < 1:
        raise BankError(f"cache_blocks={cache_blocks!r} must be an int >= 1 (set bank.cache_blocks)")
    if isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 0:
        raise BankError(f"io_threads={io_threads!r} must be an int >= 0 (set bank.io_threads; 0 = one per CPU core, "
                        f"at most {MAX_AUTO_IO_THREADS}; 1 = load blocks on the calling thread)")


class ZarrBank(RamTier, NvmeTier, ClassBank):
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
        io_threads: threads that load the missing blocks of one call (1: the calling thread alone).
        dtype: the torch dtype of the stored rows (``bank.dtype``; reads return it, writes round to it).

    Example::

        bank = ZarrBank.create("runs/x/bank", num_classes=37, dim=8, arrays=("centers", "momentum"),
                               head_kind="partial_fc", chunk_rows=8)
        bank.write_rows(torch.tensor([3, 30]), torch.ones(2, 8))
        bank.flush(step=100)                      # durable; bank.step == 100
        bank = ZarrBank.open("runs/x/bank", tier="nvme", cache_blocks=64)
    """

    def __init__(self, path: Path, group: zarr.Group, attrs: dict[str, Any], *, tier: Tier, read_only: bool,
                 cache_blocks: int, io_threads: int = 0) -> None:
        _check_tier(tier, cache_blocks, io_threads)
        self.tier = tier
        self.read_only = read_only
        self._init_layout(path, group, attrs)
        self._lock = threading.RLock()
        self._closed = False
        self._counts = {"rows_read": 0, "rows_written": 0, "blocks_loaded": 0, "blocks_initialised": 0,
                        "blocks_staged": 0}
        self._init_loading(io_threads)
        self._init_ram()
        self._init_nvme(cache_blocks)
        self._open_journal(attrs)  # last: it may complete an interrupted commit

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, num_classes: int, dim: int, arrays: Sequence[str],
               head_kind: str, chunk_rows: int = 0, seed: int = 0, init_std: float = 0.01, tier: Tier = "ram",
               cache_blocks: int = 64, io_threads: int = 0, dtype: str = "float32") -> ZarrBank:
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
            io_threads: threads that load (or initialise) the missing blocks of one call; 0 = one per CPU core, at
                most 8; 1 = the calling thread alone.
            dtype: ``"float32"`` or ``"bfloat16"``: what the rows are stored in (recorded; fixed for the bank's life).

        Returns:
            The open bank, with ``step == -1``.

        Raises:
            BankError: a bank or other files already exist at ``path``, or an argument is invalid.
        """
        arrays = _check_shape(num_classes, dim, arrays)
        _check_tier(tier, cache_blocks, io_threads)
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 0:
            raise BankError(f"chunk_rows={chunk_rows!r} must be an int >= 0 (0 = about 2 MiB per block)")
        if not (isinstance(init_std, int | float) and math.isfinite(init_std) and init_std > 0):
            raise BankError(f"init_std={init_std!r} must be a finite float > 0")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise BankError(f"seed={seed!r} must be an int >= 0")
        if not isinstance(head_kind, str) or not head_kind:
            raise BankError(f"head_kind={head_kind!r} must be a non-empty string such as 'partial_fc'")
        check_dtype(dtype)
        root = Path(path)
        create_layout(root, num_classes=num_classes, dim=dim, arrays=arrays, head_kind=head_kind,
                      chunk_rows=chunk_rows, seed=seed, init_std=init_std, dtype=dtype)
        return cls.open(root, tier=tier, cache_blocks=cache_blocks, io_threads=io_threads)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, tier: Tier = "ram", read_only: bool = False,
             cache_blocks: int = 64, io_threads: int = 0) -> ZarrBank:
        """Opens an existing bank; completes a flush that a crash interrupted after its commit point. The dtype is
        the one recorded at creation (:func:`open_bank` checks it against ``bank.dtype``).

        Args:
            path: the bank directory.
            tier: ``"ram"`` or ``"nvme"``.
            read_only: open without writing anything; ``write_rows`` and ``flush`` then raise.
            cache_blocks: nvme tier: blocks per array kept in RAM.
            io_threads: threads that load the missing blocks of one call (see :meth:`create`).

        Returns:
            The open bank.

        Raises:
            BankError: there is no offloadfr bank at ``path``, or its format version or dtype is unsupported.
        """
        _check_tier(tier, cache_blocks, io_threads)
        root = Path(path)
        group, attrs = open_layout(root, read_only=read_only)
        return cls(root, group, attrs, tier=tier, read_only=read_only, cache_blocks=cache_blocks,
                   io_threads=io_threads)

    # ------------------------------------------------------------------ ClassBank

    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        """Returns the (n, D) rows of ``ids`` (any order, repeats allowed) as a new CPU tensor of ``dtype``.

        Raises:
            BankError: the bank is closed, an id is outside ``[0, N)`` or ``array`` is unknown.
        """
        return self._read(ids, array, None)

    def read_rows_into(self, ids: torch.Tensor, out: torch.Tensor, array: str = "centers") -> None:
        self._read(ids, array, out)  # straight into ``out``: no intermediate tensor

    def _read(self, ids: torch.Tensor, array: str, out: torch.Tensor | None) -> torch.Tensor:
        """The checks and the tier's read of ``read_rows`` (``out`` None: a new tensor) and ``read_rows_into``."""
        _check_array(self, array)
        ids = _check_ids(ids, self.num_classes, unique=False)
        if out is not None:
            _check_out(out, ids.numel(), self.dim, self.dtype)
        with self._lock:
            self._check_open()
            self._counts["rows_read"] += ids.numel()
            return self._ram_read(array, ids, out) if self.tier == "ram" else self._nvme_read(array, ids, out)

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        """Stores ``rows`` (n, D; rounded to ``dtype`` to nearest) at unique ``ids``; durable after the next
        ``flush``.

        Raises:
            BankError: the bank is read-only or closed, an id is out of range or repeated, or ``rows`` has the
                wrong shape.
        """
        if self.read_only:
            raise BankError(f"bank at {self.path} is open read-only; open it with read_only=False to write rows")
        _check_array(self, array)
        ids = _check_ids(ids, self.num_classes, unique=True)
        rows = _check_rows(rows, ids.numel(), self.dim, self.dtype)
        with self._lock:
            self._check_open()
            _check_not_pending(self._pending, f"write rows to the bank at {self.path}")
            self._counts["rows_written"] += ids.numel()
            if self.tier == "ram":
                self._ram_write(array, ids, rows)
            else:
                self._nvme_write(array, ids, rows)

    def close(self) -> None:
        """Drops the in-RAM rows and cache; unflushed writes are lost (reopening reads the last flushed step)."""
        with self._lock:
            self._closed = True
            self._ram_close()
            self._nvme_close()
            self._close_pool()

    def _stage_dirty(self) -> None:
        """Writes every dirty block of the tier to the journal (flush step 1)."""
        if self.tier == "nvme":
            self._nvme_stage_dirty()
        else:
            self._ram_stage_dirty()

    def _reset_memory(self) -> None:
        """Forgets every row held in RAM, so the next reads come from the main arrays (or the initialiser)."""
        if self.tier == "ram":
            self._ram_reset()
        else:
            self._nvme_reset()

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
                f"dim={self.dim}, arrays={self.arrays}, dtype={self.dtype_name}, chunk_rows={self.chunk_rows}, "
                f"step={self._step})")


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


def open_bank(cfg: BankCfg, *, path: str | os.PathLike[str], num_classes: int, dim: int, arrays: tuple[str, ...],
              head_kind: str, num_processes: int = 1, processes_per_host: int = 1) -> ZarrBank:
    """Opens the bank at ``path`` if it exists (checking that it fits the run), else creates it from ``cfg``.

    Args:
        cfg: the ``[bank]`` section (tier, dtype, chunk_rows, init_std, seed, cache_blocks, io_threads; ``cfg.path``
            is ignored).
        path: the resolved bank directory.
        num_classes: N of the run.
        dim: D of the run.
        arrays: the arrays the head needs.
        head_kind: the run's ``head.kind``.
        num_processes: the ranks that share the bank; with the ram tier each holds about N / num_processes ids
            (``ZarrBank.hold_rows``).
        processes_per_host: the ranks on this machine; the ram tier's host-memory check counts all of their shares
            (every rank checks before any of them allocates, so each must count the others on its host), and
            ``bank.io_threads = 0`` shares the cores among them (:func:`default_io_threads`).

    Returns:
        The open bank.

    Raises:
        BankError: an existing bank's num_classes, dim, arrays, head_kind or dtype differ from the run's (the message
            names the field, both values and the fix), or the bank cannot be created or opened.
    """
    on_host = min(max(processes_per_host, 1), num_processes)
    io_threads = cfg.io_threads or default_io_threads(on_host)
    if cfg.tier == "ram":
        check_ram_fits(num_classes=math.ceil(num_classes / num_processes) * on_host, dim=dim, num_arrays=len(arrays),
                       processes=on_host, dtype=cfg.dtype)
    if not (Path(path) / "zarr.json").exists():
        return ZarrBank.create(path, num_classes=num_classes, dim=dim, arrays=arrays, head_kind=head_kind,
                               chunk_rows=cfg.chunk_rows, seed=cfg.seed, init_std=cfg.init_std, tier=cfg.tier,
                               cache_blocks=cfg.cache_blocks, io_threads=io_threads, dtype=cfg.dtype)
    bank = ZarrBank.open(path, tier=cfg.tier, cache_blocks=cfg.cache_blocks, io_threads=io_threads)
    wanted = {"num_classes": num_classes, "dim": dim, "arrays": tuple(arrays), "head_kind": head_kind,
              "dtype": cfg.dtype}
    found = {"num_classes": bank.num_classes, "dim": bank.dim, "arrays": bank.arrays, "head_kind": bank.head_kind,
             "dtype": bank.dtype_name}
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
