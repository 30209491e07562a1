"""The on-disk layout of a ``ZarrBank``: the Zarr group, its attributes, and whole-block reads of its chunk files.

Legend: N = num_classes, D = dim, R = chunk_rows (ids per block).

Layout of the group at ``path`` (a local directory; Zarr v3, uncompressed, unsharded; float32, or bfloat16 stored as
``uint16`` bits, ``bank.dtypes``)::

    zarr.json            group attributes: format, format_version, head_kind, num_classes, dim, dtype, arrays,
                         chunk_rows, init_seed, init_std, step (last consistent flush, -1 at creation), pending_step
    centers/             (N, D) array, chunks (R, D): one chunk per block of R consecutive ids; its attribute
                         ``offloadfr_dtype`` names the dtype of the rows (``bfloat16`` when the array is ``uint16``)
    momentum/            same, for learned heads
    journal/centers/     same shape and codecs: blocks written since the last flush (a redo log, ``bank.journal``)
    journal/momentum/

Creation is O(1) in N: chunks are never written at creation, and a block whose chunk is absent holds its
deterministic initial rows (``bank.init``: N(0, init_std) for ``centers``, zeros for other arrays), generated when
the block is first read. Whether a block was written is decided by its chunk *file* existing, not by its values, so a
written block equal to the fill value stays written (journal arrays use ``write_empty_chunks=True``).

All Zarr I/O moves whole blocks: one chunk-aligned slab read or write, never a per-row or scattered ``oindex`` call
(zarr 3.1.6 is 10-100x slower there, and its sharded scattered writes are broken; see env-notes §5).

Block reads bypass Zarr's read path when they can: the bank's arrays are uncompressed, little-endian float32 (or
bfloat16 bits in uint16) in C order with one file per chunk (``c/<block>/0``, full ``chunk_rows`` rows even at the last
block), so a chunk file's bytes are the block's rows, and ``np.fromfile`` reads them in about a third of the time of
``array[lo:hi]`` (256 page-cached 2 MiB blocks: 86-89 ms against 241-247 ms on the CPU VM,
docs/benchmarks/bank_io_cpu-2core_202611.md; Zarr's per-call overhead, not the disk), and the reads overlap in the I/O
pool where Zarr's do not. The bank checks that layout when it opens (``_raw_chunks``) and reads through Zarr otherwise
(an array with a codec, a big-endian host). Journal blocks are written the same way, as whole chunk files (temporary
name, then renamed; ``_write_chunk_files``), when the layout allows it: 1 ms per 2 MiB block against Zarr's 3.4 ms.
Everything else (array creation, attributes) goes through Zarr, and the files are those Zarr writes: a bank reads the
same through Zarr's API (tests/test_bank.py).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.storage

from offloadfr.bank.dtypes import BANK_DTYPES, from_storage, storage_dtype, to_storage, torch_dtype
from offloadfr.bank.init import initial_block
from offloadfr.errors import BankError

__all__ = ["BankLayout", "create_layout", "open_layout", "auto_chunk_rows", "FORMAT", "FORMAT_VERSION", "JOURNAL",
           "SOURCE_JOURNAL", "SOURCE_MAIN", "SOURCE_INIT"]

FORMAT = "offloadfr-bank"
FORMAT_VERSION = 1
"""Version of the on-disk layout; ``open`` refuses other versions."""

JOURNAL = "journal"
"""The subgroup that holds the journal arrays (and the directory prefix of their chunk files)."""

SOURCE_JOURNAL, SOURCE_MAIN, SOURCE_INIT = "journal", "main", "init"
"""Where the current rows of a block are read from: a journal chunk, a main chunk, or the initialiser."""

_CHUNK_BYTES = 2 << 20  # auto chunk_rows targets 2 MiB blocks (env-notes §5.2: 0.6-2.4 ms per 2-8 MiB chunk read)


def auto_chunk_rows(num_classes: int, dim: int) -> int:
    """Rows per block so that a float32 block is about 2 MiB (1024 rows at D=512), at most N.

    The same for every ``bank.dtype`` (a bfloat16 block of 1024 rows at D=512 is 1 MiB), so that the blocks, the
    samplers' block order and the ranks' partitions do not depend on the dtype.

    Args:
        num_classes: N.
        dim: D.

    Returns:
        The block size R, in ``[1, N]``.
    """
    return max(1, min(num_classes, _CHUNK_BYTES // (4 * dim)))


_FLOAT32 = np.dtype("<f4")


def _is_raw_layout(array: zarr.Array, stored: np.dtype = _FLOAT32) -> bool:
    """True when each chunk file of ``array`` holds exactly its rows as native ``stored`` values in C order: no codec
    but the little-endian bytes codec, on a little-endian host (the layout ``ZarrBank.create`` writes)."""
    from zarr.codecs import BytesCodec

    codecs = tuple(array.metadata.codecs)
    return (sys.byteorder == "little" and array.dtype == stored and array.order == "C" and len(codecs) == 1
            and isinstance(codecs[0], BytesCodec) and getattr(codecs[0].endian, "value", None) == "little")


def create_layout(root: Path, *, num_classes: int, dim: int, arrays: Sequence[str], head_kind: str, chunk_rows: int,
                  seed: int, init_std: float, dtype: str = "float32") -> None:
    """Writes the group of an empty bank at ``root``: the main and journal arrays (no chunk), then the attributes.

    The arguments are those of ``ZarrBank.create``, already checked; ``chunk_rows`` 0 picks about 2 MiB per block;
    ``dtype`` is a ``bank.dtype`` (bfloat16 arrays are uint16 holding the bits, ``bank.dtypes``).

    Raises:
        BankError: a bank or other files already exist at ``root``.
    """
    if (root / "zarr.json").exists():
        raise BankError(f"a bank already exists at {root}; open it (ZarrBank.open or open_bank) or set "
                        f"bank.path to another directory")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise BankError(f"{root} exists and is not an empty directory; set bank.path to a new directory")
    rows = min(chunk_rows, num_classes) if chunk_rows else auto_chunk_rows(num_classes, dim)
    group = zarr.open_group(zarr.storage.LocalStore(root), mode="w-")
    journal = group.require_group(JOURNAL)
    for name in arrays:
        for parent in (group, journal):
            parent.create_array(name, shape=(num_classes, dim), chunks=(rows, dim), dtype=storage_dtype(dtype),
                                compressors=None, filters=None, fill_value=0,
                                attributes={"offloadfr_dtype": dtype})
    # The identifying attributes are written last: a bank interrupted during creation is refused by open().
    group.update_attributes({
        "format": FORMAT, "format_version": FORMAT_VERSION, "head_kind": head_kind,
        "num_classes": num_classes, "dim": dim, "dtype": dtype, "arrays": list(arrays),
        "chunk_rows": rows, "init_seed": seed, "init_std": float(init_std), "step": -1, "pending_step": None,
        "pending_committed": False,
    })


def open_layout(root: Path, *, read_only: bool) -> tuple[zarr.Group, dict[str, Any]]:
    """Opens the group of the bank at ``root`` and checks that it is an offloadfr bank of this format version.

    Returns:
        The group and its attributes.

    Raises:
        BankError: there is no offloadfr bank at ``root``, or its format version is unsupported.
    """
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
    return group, attrs


class BankLayout:
    """The part of ``ZarrBank`` that knows its group: sizes and arrays (from the attributes), blocks and their chunk
    files, whole-block reads, and attribute writes. The base of the other parts (``bank.journal``,
    ``bank.io_pool``, ``bank.ram_tier``, ``bank.nvme_tier``); not used alone.

    Attributes:
        path: the group directory.
        num_classes: N.
        dim: D.
        arrays: the names of the (N, D) arrays.
        head_kind: the head the bank was created for.
        chunk_rows: R, ids per block.
        num_blocks: ceil(N / R).
        seed: the initialiser's seed.
        init_std: the initialiser's standard deviation.
        dtype: the torch dtype of the rows (``torch.float32`` or ``torch.bfloat16``, ``bank.dtype``).
        dtype_name: its name, as in the attributes (``"float32"`` or ``"bfloat16"``).
    """

    path: Path
    num_classes: int
    dim: int
    arrays: tuple[str, ...]
    _closed: bool  # set by ZarrBank: close() ran

    def _init_layout(self, path: Path, group: zarr.Group, attrs: dict[str, Any]) -> None:
        """Reads the sizes from ``attrs`` and opens the arrays of ``group``; refuses a chunk layout it cannot use."""
        self.path = path
        self.num_classes = int(attrs["num_classes"])
        self.dim = int(attrs["dim"])
        self.arrays = tuple(attrs["arrays"])
        self.head_kind = str(attrs["head_kind"])
        self.chunk_rows = int(attrs["chunk_rows"])
        self.seed = int(attrs["init_seed"])
        self.init_std = float(attrs["init_std"])
        self.num_blocks = math.ceil(self.num_classes / self.chunk_rows)
        if attrs.get("dtype") not in BANK_DTYPES:
            raise BankError(f"bank at {path} has dtype={attrs.get('dtype')!r}; this offloadfr reads banks of "
                            f"{list(BANK_DTYPES)}")
        self.dtype_name = str(attrs["dtype"])
        self.dtype = torch_dtype(self.dtype_name)
        self._stored = storage_dtype(self.dtype_name)
        self._group = group
        self._main = {name: group[name] for name in self.arrays}
        self._journal = {name: group[f"{JOURNAL}/{name}"].with_config({"write_empty_chunks": True})
                         for name in self.arrays}
        for name in self.arrays:
            # Journal chunk files are moved onto main chunk files, so both arrays must encode chunks identically.
            if self._main[name].metadata.encode_chunk_key((7, 0)) != "c/7/0" or \
                    self._main[name].metadata.to_dict() != self._journal[name].metadata.to_dict():
                raise BankError(f"bank at {path}: array {name!r} has an unexpected chunk layout; it was not written "
                                f"by offloadfr (format_version {FORMAT_VERSION})")
            if self._main[name].dtype != self._stored:
                raise BankError(f"bank at {path}: array {name!r} stores {self._main[name].dtype} but the bank's dtype "
                                f"{self.dtype_name!r} is stored as {self._stored}; it was not written by offloadfr")
        self._raw_chunks = all(_is_raw_layout(self._main[name], self._stored) for name in self.arrays)
        """Whether block reads may read chunk files directly (module docstring); checked once, here."""

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

    def _write_chunk_files(self, prefix: str, array: str, first: int, stop: int, rows: np.ndarray) -> None:
        """Writes blocks ``[first, stop)`` (``rows``, as stored, covers them exactly) as their chunk files, bypassing
        Zarr's write path (only with the raw layout, ``_raw_chunks``): each file is written under a temporary name
        and renamed, so a reader never sees half a block, and the last block is padded with the fill value (0) to
        ``chunk_rows`` rows, as Zarr writes it. A 2 MiB block takes about 1 ms here against 3.4 ms through
        ``array[lo:hi] = rows`` on the CPU VM (Zarr's codec pipeline and event loop), and the nvme tier's journal
        writes are a worker's busiest work (docs/benchmarks/host_cpu-2core_202612.md)."""
        base = first * self.chunk_rows
        for block in range(first, stop):
            lo, hi = self._block_range(block)
            part = rows[lo - base: hi - base]
            if hi - lo < self.chunk_rows:
                full = np.zeros((self.chunk_rows, self.dim), dtype=self._stored)
                full[: hi - lo] = part
                part = full
            path = self._chunk_file(prefix, array, block)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".partial", "wb") as fh:
                fh.write(np.ascontiguousarray(part, dtype=self._stored).data)
            os.replace(path + ".partial", path)

    def _block_size(self, block: int) -> int:
        lo, hi = self._block_range(block)
        return hi - lo

    def _read_block(self, array: str, block: int, source: str) -> np.ndarray:
        """The rows of ``block`` from ``source``, as stored (``bank.dtypes``: bfloat16 as uint16 bits; ``_rows_of``
        makes them a tensor). Touches no bank state, so the I/O pool's threads run it. Initial rows are rounded to
        the bank's dtype to nearest, as ``MemoryBank`` rounds them."""
        lo, hi = self._block_range(block)
        if source == SOURCE_INIT:
            rows = initial_block(array, lo, hi, self.dim, seed=self.seed, std=self.init_std)
            return rows if self.dtype == torch.float32 else to_storage(torch.from_numpy(rows).to(self.dtype))
        path = self._chunk_file(JOURNAL if source == SOURCE_JOURNAL else "", array, block)
        size = self._stored.itemsize
        try:
            if self._raw_chunks:
                rows = np.fromfile(path, dtype=self._stored)
                if rows.size != self.chunk_rows * self.dim:
                    raise ValueError(f"{rows.size * size} bytes where a chunk has {self.chunk_rows * self.dim * size}")
                rows = rows[: (hi - lo) * self.dim].reshape(hi - lo, self.dim)
            else:
                stored = self._journal[array] if source == SOURCE_JOURNAL else self._main[array]
                rows = stored[lo:hi]
        except ValueError as exc:  # a chunk file of the wrong size: its bytes are not the block's rows
            raise BankError(f"{path}: block {block} of {array!r} cannot be read ({exc}); the file is damaged: restore "
                            "the bank directory from a copy, or set bank.path to a new directory to start a new "
                            "bank") from exc
        return np.require(rows, dtype=self._stored, requirements=["C", "W"])

    def _rows_of(self, stored: np.ndarray) -> torch.Tensor:
        """Rows read by ``_read_block`` as a tensor of the bank's dtype (no copy)."""
        return from_storage(stored, self.dtype_name)

    def _write_attrs(self, updates: dict[str, Any]) -> None:
        """Updates group attributes in one atomic write of ``zarr.json``, starting from the attributes on disk (the
        ranks of a multi-process run take turns writing them, so this process's copy may be stale)."""
        self._group = zarr.open_group(self._group.store, mode="r+")
        self._group.update_attributes(updates)
