"""Which rank owns which class ids: W contiguous ranges, as in arcface_torch's PartialFC (seeds-spec §1.2).

Rank ``r`` of ``W`` owns the ids ``[class_start, class_end)`` with ``num_local = C // W + (r < C % W)`` and
``class_start = (C // W) * r + min(r, C % W)``: the first ``C % W`` ranks hold one id more than the others. With a
world size of 1 the single rank owns every id and :meth:`ClassPartition.to_local` is the identity on valid ids.

Legend: B = rows of an id tensor (any 1-D shape works), C = num_classes, W = world_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offloadfr.distributed.env import DistEnv
from offloadfr.errors import ConfigError

__all__ = ["ClassPartition"]


@dataclass(frozen=True, slots=True)
class ClassPartition:
    """The contiguous id range of one rank, and conversions between global ids and this rank's local rows.

    Args:
        num_classes: C, the number of identities, ``>= world_size`` (every rank owns at least one id).
        world_size: W, the number of ranks, ``>= 1``.
        rank: this rank, in ``[0, world_size)``.

    Raises:
        ConfigError: a count below 1, ``num_classes < world_size``, or ``rank`` outside ``[0, world_size)``.

    Example::

        >>> p = ClassPartition(37, 2, 1)
        >>> p.num_local, p.class_start, p.class_end
        (18, 19, 37)
        >>> p.to_local(torch.tensor([0, 19, 36])).tolist()
        [-1, 0, 17]
    """

    num_classes: int
    """C, the number of identities over all ranks."""
    world_size: int
    """W, the number of ranks the ids are split over."""
    rank: int
    """The rank whose range this object describes."""
    align: int = 1
    """Range boundaries fall on multiples of ``align`` ids (a bank's ``chunk_rows``, so that every bank chunk has
    exactly one writing rank); the ranges are whole blocks of ``align`` ids split as the docstring says, the last
    block possibly short. 1 gives the arcface_torch split."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world_size = {self.world_size}; it must be >= 1 (check the WORLD_SIZE variable)")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"rank = {self.rank} is outside [0, {self.world_size}); check the RANK and WORLD_SIZE variables"
            )
        if self.align < 1:
            raise ConfigError(f"align = {self.align}; it must be >= 1 (ids per bank chunk)")
        if self._num_blocks < self.world_size:
            raise ConfigError(
                f"num_classes = {self.num_classes} in blocks of {self.align} ids gives {self._num_blocks} blocks, "
                f"fewer than world_size = {self.world_size}; every rank must own at least one block: use fewer "
                "processes, a smaller bank.chunk_rows, or a dataset with more identities"
            )

    @classmethod
    def for_env(cls, num_classes: int, env: DistEnv, align: int = 1) -> ClassPartition:
        """The partition of ``num_classes`` ids for the rank and world size of ``env``.

        Args:
            num_classes: C, the number of identities.
            env: this process's rank and world size.
            align: boundaries on multiples of this many ids (see the attribute).

        Returns:
            ``ClassPartition(num_classes, env.world_size, env.rank, align)``.

        Raises:
            ConfigError: as the constructor.
        """
        return cls(num_classes, env.world_size, env.rank, align)

    @property
    def _num_blocks(self) -> int:
        return -(-self.num_classes // self.align)

    def _block_start(self, rank: int) -> int:
        blocks = self._num_blocks
        return blocks // self.world_size * rank + min(rank, blocks % self.world_size)

    def range_of(self, rank: int) -> tuple[int, int]:
        """``(class_start, class_end)`` of any rank of this partition."""
        start = min(self._block_start(rank) * self.align, self.num_classes)
        end = min(self._block_start(rank + 1) * self.align, self.num_classes)
        return start, end

    @property
    def num_local(self) -> int:
        """Number of ids this rank owns: ``C // W``, plus one on the first ``C % W`` ranks (``align = 1``)."""
        return self.class_end - self.class_start

    @property
    def class_start(self) -> int:
        """First id this rank owns."""
        return self.range_of(self.rank)[0]

    @property
    def class_end(self) -> int:
        """One past the last id this rank owns."""
        return self.range_of(self.rank)[1]

    @property
    def local_slice(self) -> slice:
        """``slice(class_start, class_end)``: this rank's rows of an all-classes (C × D) tensor."""
        return slice(self.class_start, self.class_end)

    def to_local(self, ids_B: torch.Tensor) -> torch.Tensor:
        """Maps global ids to this rank's local rows; ids owned by another rank become ``-1``.

        Ids outside ``[0, num_classes)`` also become ``-1`` (on every rank), so a sharded cross-entropy finds no
        positive for their row and raises; no host synchronisation happens here.

        Args:
            ids_B: global class ids, any integer dtype and shape, on any device.

        Returns:
            Same shape, dtype and device: ``id - class_start`` for ids in ``[class_start, class_end)``, else ``-1``.
        """
        mine = (ids_B >= self.class_start) & (ids_B < self.class_end)
        return torch.where(mine, ids_B - self.class_start, torch.full_like(ids_B, -1))

    def owner_of(self, ids_B: torch.Tensor) -> torch.Tensor:
        """The rank that owns each id.

        Args:
            ids_B: global class ids, any integer dtype and shape, on any device.

        Returns:
            Same shape, dtype and device: the owning rank in ``[0, world_size)``, or ``-1`` for ids outside
            ``[0, num_classes)``.
        """
        base, extra = divmod(self._num_blocks, self.world_size)
        # In units of blocks: the first `extra` ranks hold base + 1 blocks each, so blocks below `boundary` are in
        # equal runs of base + 1 and the rest in runs of base (base >= 1 because num_blocks >= world_size).
        blocks_B = torch.div(ids_B, self.align, rounding_mode="floor")
        boundary = extra * (base + 1)
        owner = torch.where(
            blocks_B < boundary,
            torch.div(blocks_B, base + 1, rounding_mode="floor"),
            extra + torch.div(blocks_B - boundary, base, rounding_mode="floor"),
        )
        valid = (ids_B >= 0) & (ids_B < self.num_classes)
        return torch.where(valid, owner, torch.full_like(ids_B, -1))
