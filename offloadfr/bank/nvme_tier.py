"""The ``nvme`` tier of a ``ZarrBank``: the bank served block by block from its store, through a block cache.

Legend: D = dim, R = chunk_rows (ids per block), n = number of ids in one call.

An LRU of at most ``cache_blocks`` blocks per array in RAM; a miss loads the block with one read of its chunk file
(or initialises it); writes go into the cached block (a write that covers a whole block replaces it without reading
it); evicting a dirty block writes it to the journal. Blocks are tensors of the bank's dtype (``bank.dtype``), so
with bfloat16 the same ``cache_blocks`` take half the RAM.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from offloadfr.bank.dtypes import to_storage
from offloadfr.bank.io_pool import BlockLoading, BlockLoads

__all__ = ["NvmeTier"]


class _Block:
    """A cached nvme-tier block: its (rows_in_block, D) rows and whether they differ from the stored copy."""

    __slots__ = ("rows", "dirty")

    def __init__(self, rows: torch.Tensor, dirty: bool) -> None:
        self.rows = rows
        self.dirty = dirty


class NvmeTier(BlockLoading):
    """The ``nvme`` tier's part of ``ZarrBank`` (see the module docstring); not used alone.

    Attributes:
        cache_blocks: blocks per array kept in RAM.
    """

    def _init_nvme(self, cache_blocks: int) -> None:
        self.cache_blocks = cache_blocks
        self._cache: dict[str, OrderedDict[int, _Block]] = {name: OrderedDict() for name in self.arrays}

    def _nvme_read(self, array: str, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty((ids.numel(), self.dim), dtype=self.dtype)
        groups = self._group_by_block(ids)
        cache = self._cache[array]
        with self._loads(array, [b for b, _ in groups if b not in cache]) as loads:
            for block, pos in groups:
                entry = self._nvme_block(array, block, loads=loads)
                out.index_copy_(0, pos, entry.rows.index_select(0, ids[pos] - block * self.chunk_rows))
        return out

    def _nvme_write(self, array: str, ids: torch.Tensor, rows: torch.Tensor) -> None:
        groups = self._group_by_block(ids)
        cache = self._cache[array]
        partial = [b for b, pos in groups if b not in cache and pos.numel() < self._block_size(b)]
        with self._loads(array, partial) as loads:
            for block, pos in groups:
                lo, hi = self._block_range(block)
                offsets = ids[pos] - lo
                if pos.numel() == hi - lo:  # the whole block: no read-modify-write, one copy
                    entry = self._nvme_block(array, block, rows=rows.index_select(0, pos[torch.argsort(offsets)]))
                else:
                    entry = self._nvme_block(array, block, loads=loads)
                    entry.rows.index_copy_(0, offsets, rows.index_select(0, pos))
                entry.dirty = True

    def _nvme_block(self, array: str, block: int, rows: torch.Tensor | None = None,
                    loads: BlockLoads | None = None) -> _Block:
        """The cached block (loaded on a miss, by ``loads`` when it has the block), or, given ``rows``, the block
        replaced by them; evicts LRU blocks."""
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
                self._stage(array, old_block, old_block + 1, to_storage(old.rows))
        entry = _Block(self._rows_of(self._load_block(array, block, loads)) if rows is None else rows, dirty=False)
        cache[block] = entry
        return entry

    def _nvme_stage_dirty(self) -> None:
        """Writes the dirty cached blocks to the journal, one block at a time, and marks them clean."""
        for array, cache in self._cache.items():
            for block, entry in cache.items():
                if entry.dirty:
                    self._stage(array, block, block + 1, to_storage(entry.rows))
                    entry.dirty = False

    def _nvme_reset(self) -> None:
        """Empties the cache, so the next reads load every block again."""
        for array in self.arrays:
            self._cache[array].clear()

    def _nvme_close(self) -> None:
        self._cache.clear()
