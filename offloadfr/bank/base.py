"""The ClassBank interface: all N rows of a head's per-identity state, read and written by id.

Legend: N = num_classes, D = dim, n = number of ids in one call.

A bank holds one or more named arrays of shape (N, D) (``"centers"``, and ``"momentum"`` for learned heads). Rows
move in and out by global class id; a bank never sees slots (STYLE R12). Implementations: ``MemoryBank`` (the
reference) and ``ZarrBank`` (ram and nvme tiers). Every implementation passes ``bank.testing.BankContract``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

__all__ = ["ClassBank"]


class ClassBank(ABC):
    """Per-identity rows of a head, addressed by global class id.

    Attributes:
        num_classes: N, the number of ids; valid ids are ``[0, num_classes)``.
        dim: D, the row width.
        arrays: names of the (N, D) arrays the bank holds, e.g. ``("centers", "momentum")``.
        read_only: when true, ``write_rows`` and ``flush`` raise.
    """

    num_classes: int
    dim: int
    arrays: tuple[str, ...]
    read_only: bool

    @abstractmethod
    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        """Returns the rows of ``ids`` (int64, shape (n,), any order, may repeat) as a float32 (n, D) CPU tensor.

        Rows never written hold their deterministic initial value (seeded by (seed, id)).
        """

    @abstractmethod
    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        """Stores ``rows`` (n, D) at ``ids`` (int64, shape (n,), unique)."""

    @abstractmethod
    def flush(self, step: int) -> None:
        """Makes every write so far durable, then records ``step`` as the last consistent step (written last)."""

    @property
    @abstractmethod
    def step(self) -> int:
        """The step recorded by the last completed ``flush``; -1 if the bank was never flushed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases files and threads; the bank is unusable afterwards. Does not flush."""
