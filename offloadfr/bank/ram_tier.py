"""The ``ram`` tier of a ``ZarrBank``: the whole bank (or a rank's partition of it) in host tensors.

Legend: N = num_classes, D = dim, R = chunk_rows (ids per block), n = number of ids in one call.

One (N, D) host tensor per array (in transparent huge pages, below), filled block by block on first touch; reads and
writes are ``index_select`` / ``index_copy_``; writes mark their blocks dirty, and a flush stages the dirty blocks
in runs of consecutive blocks. The tensors hold the bank's dtype (``bank.dtype``: float32, or bfloat16 at half the
memory). They are allocated on the first read or write, so the host must have N * D * 4 bytes per array (2 for
bfloat16; ``check_ram_fits``, which ``open_bank`` calls). A rank of a multi-process run holds only
its own id range: ``hold_rows(start, end)`` before the first access makes the tensors (end − start) × D, and ids
outside the range are refused.

Huge pages. The tensors ask the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``; Linux, where THP is
``madvise`` or ``always``): a step reads and writes some 20 k rows at random places in tensors of up to tens of GB,
and with 4 KiB pages most of those accesses miss the TLB. 21,800 bfloat16 rows of 512 in an 8M-row tensor on the CPU
VM: read 8.4 -> 5.2 ms, write 18.9 -> 13.9 ms. The tensors are not pinned: rows leave them by ``index_select`` into
the prefetcher's own pinned buffers (``read_rows_into``), so pinning tens of GB of host memory would buy nothing.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch

from offloadfr.bank.dtypes import bytes_per_value, to_storage
from offloadfr.bank.io_pool import BlockLoading
from offloadfr.errors import BankError

__all__ = ["RamTier", "check_ram_fits"]

_STAGE_BYTES = 64 << 20  # the ram tier's flush writes runs of dirty blocks in slabs of at most this size

_RAM_HEADROOM = 0.9
"""The ram tier may take at most this fraction of the memory available when the bank is opened."""


def check_ram_fits(*, num_classes: int, dim: int, num_arrays: int, available: int | None = None,
                   processes: int = 1, dtype: str = "float32") -> None:
    """Refuses ``tier = "ram"`` when the rows held on this machine would not fit in the host memory available now
    (psutil). ``num_classes`` counts the rows of all ``processes`` of this machine together; ``dtype`` is the
    ``bank.dtype`` (4 or 2 bytes per value).

    Raises:
        BankError: naming the bytes needed and available, and suggesting ``bank.tier = "nvme"``.
    """
    import psutil

    need = num_classes * dim * bytes_per_value(dtype) * num_arrays
    free = psutil.virtual_memory().available if available is None else available
    if need > _RAM_HEADROOM * free:
        who = f" ({processes} processes on this host)" if processes > 1 else ""
        raise BankError(f"bank.tier = 'ram' needs {need / 2**30:.1f} GiB of host memory{who} for {num_classes} x "
                        f"{dim} x {num_arrays} {dtype} but {free / 2**30:.1f} GiB is available; set bank.tier = 'nvme' "
                        "(served block by block from disk)")


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux's asm-generic/mman-common.h


def _advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Asks Linux to back the whole 2 MiB pages inside ``tensor``'s memory with transparent huge pages (before its
    first touch); returns whether the call was made and succeeded (False elsewhere, or when THP is off)."""
    if not sys.platform.startswith("linux"):
        return False
    ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    start = -(-ptr // _HUGE_PAGE) * _HUGE_PAGE
    length = (ptr + size - start) // _HUGE_PAGE * _HUGE_PAGE
    if length <= 0:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(start, length, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


class RamTier(BlockLoading):
    """The ``ram`` tier's part of ``ZarrBank`` (see the module docstring); not used alone."""

    def _init_ram(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self._loaded: dict[str, torch.Tensor] = {}
        self._dirty: dict[str, torch.Tensor] = {}
        self._held = (0, self.num_classes)  # the ids held in RAM (``hold_rows``), allocated on first use

    def hold_rows(self, start: int, end: int) -> None:
        """Ram tier: holds only ids ``[start, end)`` in RAM (a rank's partition). Call it before the first read or
        write; ``start`` must be a multiple of ``chunk_rows``, and ``end`` too unless it is N (blocks are loaded and
        flushed whole). The nvme tier ignores it (it holds blocks on demand).

        Raises:
            BankError: the range is empty, not block-aligned or outside ``[0, N)``, or rows are already held.
        """
        if not (0 <= start < end <= self.num_classes) or start % self.chunk_rows or \
                (end % self.chunk_rows and end != self.num_classes):
            raise BankError(f"hold_rows({start}, {end}) on a bank of {self.num_classes} ids with chunk_rows="
                            f"{self.chunk_rows}: the range must be non-empty, inside [0, {self.num_classes}), start "
                            f"on a block boundary and end on one or at {self.num_classes}")
        with self._lock:
            if self._tensors and self._held != (start, end):
                raise BankError(f"bank at {self.path} already holds ids {list(self._held)} in RAM; call hold_rows "
                                f"before the first read or write")
            self._held = (start, end)

    def _ram_read(self, array: str, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.index_select(self._ram_tensor(array, ids), 0, ids - self._held[0], out=out)

    def _ram_write(self, array: str, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self._ram_tensor(array, ids).index_copy_(0, ids - self._held[0], rows)
        self._dirty[array][ids // self.chunk_rows - self._held[0] // self.chunk_rows] = True

    def _ram_allocate(self) -> None:
        """Allocates the ram tier's tensors for the ids held, in huge pages where the kernel offers them."""
        start, end = self._held
        num_blocks = math.ceil(end / self.chunk_rows) - start // self.chunk_rows
        for name in self.arrays:
            self._tensors[name] = torch.empty((end - start, self.dim), dtype=self.dtype)
            _advise_huge_pages(self._tensors[name])
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
        missing = [first_block + local for local in blocks[~loaded[blocks]].tolist()]
        with self._loads(array, missing) as loads:
            for block in missing:
                lo, hi = self._block_range(block)
                tensor[lo - start:hi - start].copy_(self._rows_of(self._load_block(array, block, loads)))
                loaded[block - first_block] = True
        return tensor

    def _ram_stage_dirty(self) -> None:
        """Writes the dirty blocks to the journal, in runs of consecutive blocks of at most ``_STAGE_BYTES``."""
        max_blocks = max(1, _STAGE_BYTES // (self.dtype.itemsize * self.dim * self.chunk_rows))
        start = self._held[0]
        for array, dirty in self._dirty.items():
            blocks = (torch.nonzero(dirty).flatten() + start // self.chunk_rows).tolist()
            run_start = 0
            for i in range(1, len(blocks) + 1):  # runs of consecutive blocks, at most max_blocks long
                if i == len(blocks) or blocks[i] != blocks[i - 1] + 1 or i - run_start == max_blocks:
                    first, stop = blocks[run_start], blocks[i - 1] + 1
                    lo, _ = self._block_range(first)
                    _, hi = self._block_range(stop - 1)
                    self._stage(array, first, stop, to_storage(self._tensors[array][lo - start:hi - start]))
                    run_start = i
            dirty.zero_()

    def _ram_reset(self) -> None:
        """Marks every block not loaded (and clean), so the next reads load them again."""
        for array in self.arrays:
            if self._tensors:
                self._loaded[array].zero_()
                self._dirty[array].zero_()

    def _ram_close(self) -> None:
        self._tensors.clear()
        self._loaded.clear()
        self._dirty.clear()
