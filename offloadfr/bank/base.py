"""The ClassBank interface: all N rows of a head's per-identity state, read and written by id.

Legend: N = num_classes, D = dim, n = number of ids in one call.

A bank holds one or more named arrays of shape (N, D) (``"centers"``, and ``"momentum"`` for learned heads). Rows move
in and out by global class id; a bank never sees slots (STYLE R12). A bank stores its rows in one dtype (``dtype``:
float32, or bfloat16 with ``bank.dtype = "bfloat16"``): reads return that dtype, and writes round whatever they get to
it (to nearest; a caller that wants another rounding rounds first, ``bank.dtypes.round_rows``). Implementations:
``MemoryBank`` (the reference) and ``ZarrBank`` (ram and nvme tiers). Every implementation passes
``bank.testing.BankContract``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection

import torch

__all__ = ["ClassBank"]


class ClassBank(ABC):
    """Per-identity rows of a head, addressed by global class id.

    Attributes:
        num_classes: N, the number of ids; valid ids are ``[0, num_classes)``.
        dim: D, the row width.
        arrays: names of the (N, D) arrays the bank holds, e.g. ``("centers", "momentum")``.
        read_only: when true, ``write_rows``, ``prepare`` and ``flush`` raise.
        dtype: the dtype the rows are stored, read and written in (``torch.float32`` or ``torch.bfloat16``).
    """

    num_classes: int
    dim: int
    arrays: tuple[str, ...]
    read_only: bool
    dtype: torch.dtype = torch.float32

    @abstractmethod
    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        """Returns the rows of ``ids`` (int64, shape (n,), any order, may repeat) as an (n, D) CPU tensor of
        ``dtype``.

        Rows never written hold their deterministic initial value (seeded by (seed, id)).
        """

    def read_rows_into(self, ids: torch.Tensor, out: torch.Tensor, array: str = "centers") -> None:
        """``read_rows`` into ``out`` ((n, D) CPU, ``dtype``, contiguous): the prefetcher reads into its own (pinned)
        buffers. Banks that can fill ``out`` directly override this and skip allocating the rows anew (a fresh 40 MB
        tensor is 10 k page faults: a third of a 20 k-row read's time on the CPU VM); ``MemoryBank`` and ``ZarrBank``
        do, and raise ``BankError`` for an ``out`` of the wrong shape, dtype or device."""
        out.copy_(self.read_rows(ids, array))

    @abstractmethod
    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        """Stores ``rows`` (n, D, any floating dtype: rounded to ``dtype`` to nearest) at ``ids`` (int64, shape (n,),
        unique)."""

    # ------------------------------------------------------------------ two-phase flush (checkpoints)
    #
    # A checkpoint is consistent only if the bank and the checkpoint directory agree on the step. The bank cannot
    # write both at once, so a flush has two phases: ``prepare(step)`` makes every write durable *beside* the last
    # consistent state (it can still be rolled back or forward) and records ``pending_step``; the caller then writes
    # its checkpoint (the commit point is the checkpoint's rename) and calls ``commit(step)``. After a crash, whoever
    # knows which checkpoints are complete calls ``resolve(checkpoint_steps)``: forward when a checkpoint of
    # ``pending_step`` exists, back to ``step`` otherwise.

    @abstractmethod
    def prepare(self, step: int) -> None:
        """Phase 1: makes every write so far durable without publishing it, and records ``pending_step = step``.

        Until ``commit`` or ``rollback``, ``step`` still names the last consistent state and ``write_rows`` raises.

        Raises:
            BankError: the bank is read-only, a flush is already pending, or ``step`` is negative.
        """

    @abstractmethod
    def commit(self, step: int) -> None:
        """Phase 2: publishes the prepared flush; afterwards ``step == step`` and ``pending_step is None``.

        Raises:
            BankError: no flush of ``step`` is pending.
        """

    @abstractmethod
    def rollback(self) -> None:
        """Drops the prepared flush and every write since the last commit; the bank reads as at ``step`` again.

        Does nothing when no flush is pending and nothing was written.
        """

    @property
    @abstractmethod
    def pending_step(self) -> int | None:
        """The step of a prepared, not yet committed flush (found at open after a crash, or prepared here)."""

    @property
    @abstractmethod
    def step(self) -> int:
        """The step recorded by the last commit; -1 if the bank was never flushed."""

    def flush(self, step: int) -> None:
        """Both phases at once (``prepare`` then ``commit``): for callers with no checkpoint to coordinate with."""
        self.prepare(step)
        self.commit(step)

    def resolve(self, checkpoint_steps: Collection[int]) -> str:
        """Settles a pending flush after a restart: forward if a complete checkpoint has its step, else back.

        Args:
            checkpoint_steps: steps of the complete checkpoints of the run that owns the bank.

        Returns:
            ``"committed"``, ``"rolled back"`` or ``"nothing pending"``.
        """
        pending = self.pending_step
        if pending is None:
            return "nothing pending"
        if pending in set(checkpoint_steps):
            self.commit(pending)
            return "committed"
        self.rollback()
        return "rolled back"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases files and threads; the bank is unusable afterwards. Does not flush."""
