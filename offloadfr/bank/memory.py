"""``MemoryBank``: the reference ClassBank, plain (N, D) CPU tensors with nothing persisted.

Legend: N = num_classes, D = dim, n = number of ids in one call.

It defines the semantics every bank must match (``bank.testing.BankContract``): untouched ``"centers"`` rows equal
``bank.init.initial_rows`` (rounded to the bank's dtype to nearest) and other arrays start at zero, rows are stored in
the bank's dtype (a write rounds to nearest, a read returns the stored values exactly), reads take ids in any order with
repeats, writes take unique ids, and an id outside ``[0, N)`` raises ``BankError`` (a ``ValueError``; the bank treats a
bad id as bad input, not as a Python sequence index). The validation helpers here are shared with ``ZarrBank``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from offloadfr.bank.base import ClassBank
from offloadfr.bank.dtypes import torch_dtype
from offloadfr.bank.init import initial_block
from offloadfr.errors import BankError

__all__ = ["MemoryBank"]


def _check_shape(num_classes: int, dim: int, arrays: Sequence[str]) -> tuple[str, ...]:
    """Validates the bank's sizes and array names; returns the names as a tuple."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise BankError(f"num_classes={num_classes!r} must be an int >= 1")
    if not isinstance(dim, int) or dim < 1:
        raise BankError(f"dim={dim!r} must be an int >= 1")
    names = tuple(arrays)
    if not names or len(set(names)) != len(names):
        raise BankError(f"arrays={names!r} must be a non-empty tuple of distinct names, e.g. ('centers', 'momentum')")
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or name == "journal":
            raise BankError(f"array name {name!r} must be a Python identifier other than 'journal'")
    return names


def _check_array(bank: ClassBank, array: str) -> None:
    if array not in bank.arrays:
        raise BankError(f"array {array!r} is not in this bank; it holds {list(bank.arrays)}")


def _check_ids(ids: torch.Tensor, num_classes: int, *, unique: bool) -> torch.Tensor:
    """Returns ``ids`` as a 1-D int64 CPU tensor, raising BankError on a bad dtype, shape, range or repeat."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
            or ids.dtype == torch.bool:
        raise BankError(f"ids must be an integer tensor of class ids, got {type(ids).__name__} "
                        f"{getattr(ids, 'dtype', '')}; pass torch.int64 ids")
    if ids.dim() != 1:
        raise BankError(f"ids must have shape (n,), got {tuple(ids.shape)}; flatten them with ids.reshape(-1)")
    ids = ids.to(device="cpu", dtype=torch.int64)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise BankError(f"class id {bad} is outside [0, {num_classes}) of this bank; labels must be global ids "
                            f"below num_classes={num_classes}")
    if unique and ids.numel() > 1:
        sorted_ids = torch.sort(ids).values
        repeats = sorted_ids[1:] == sorted_ids[:-1]
        if bool(repeats.any()):
            dup = int(sorted_ids[1:][repeats][0])
            raise BankError(f"write_rows got id {dup} more than once; a write needs unique ids (deduplicate, e.g. "
                            f"with torch.unique, and merge their rows first)")
    return ids


def _check_rows(rows: torch.Tensor, num_ids: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns ``rows`` as a CPU tensor of ``dtype`` (rounded to nearest) and shape (n, D), raising BankError on a bad
    shape or dtype."""
    if not isinstance(rows, torch.Tensor) or not rows.dtype.is_floating_point:
        raise BankError(f"rows must be a floating-point tensor, got {type(rows).__name__} "
                        f"{getattr(rows, 'dtype', '')}")
    if tuple(rows.shape) != (num_ids, dim):
        raise BankError(f"rows have shape {tuple(rows.shape)} but {num_ids} ids of a D={dim} bank need "
                        f"({num_ids}, {dim})")
    return rows.detach().to(device="cpu", dtype=dtype)


def _check_out(out: torch.Tensor, num_ids: int, dim: int, dtype: torch.dtype) -> None:
    """Refuses a ``read_rows_into`` buffer that is not an (n, D) CPU tensor of the bank's dtype (``index_select``
    would resize or convert it silently)."""
    if tuple(out.shape) != (num_ids, dim) or out.dtype != dtype or out.device.type != "cpu":
        raise BankError(f"out has shape {tuple(out.shape)}, {out.dtype} on {out.device}; read_rows_into needs "
                        f"({num_ids}, {dim}) {dtype} on the CPU")


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise BankError(f"flush step={step!r} must be an int >= 0 (the training step of the checkpoint)")
    return step


def _check_not_pending(pending: int | None, action: str) -> None:
    if pending is not None:
        raise BankError(f"cannot {action}: a flush of step {pending} is prepared but not committed; call "
                        f"commit({pending}) once its checkpoint is written, or rollback()")


def _check_commit(pending: int | None, step: int, what: str) -> None:
    if pending is None or pending != step:
        raise BankError(f"commit({step}) but {what} has no prepared flush of step {step} (pending_step={pending}); "
                        f"call prepare({step}) first")


class MemoryBank(ClassBank):
    """All arrays as (N, D) CPU tensors of ``dtype``; nothing is persisted.

    The two-phase flush keeps a copy of the committed rows, so ``rollback`` restores them exactly as ``ZarrBank``
    does after a crash.

    Args:
        num_classes: N, the number of ids.
        dim: D, the row width.
        arrays: names of the arrays; ``"centers"`` starts at ``initial_rows``, every other array at zero.
        init_std: standard deviation of the initial centers.
        seed: seed of the per-id initialiser.
        read_only: when true, ``write_rows`` and ``flush`` raise ``BankError``.
        dtype: ``"float32"`` or ``"bfloat16"`` (``bank.dtype``): the dtype rows are stored and returned in.

    Raises:
        BankError: a size, an array name or the dtype is invalid.

    Example::

        bank = MemoryBank(37, 8, ("centers", "momentum"))
        rows = bank.read_rows(torch.tensor([3, 1, 3]))          # (3, 8) float32
        bank.write_rows(torch.tensor([1]), torch.zeros(1, 8))
    """

    def __init__(self, num_classes: int, dim: int, arrays: Sequence[str] = ("centers",), *, init_std: float = 0.01,
                 seed: int = 0, read_only: bool = False, dtype: str = "float32") -> None:
        self.arrays = _check_shape(num_classes, dim, arrays)
        self.dtype = torch_dtype(dtype)
        self.num_classes = num_classes
        self.dim = dim
        self.read_only = read_only
        self.init_std = init_std
        self.seed = seed
        self._tensors = {name: torch.from_numpy(initial_block(name, 0, num_classes, dim, seed=seed, std=init_std))
                         .to(self.dtype) for name in self.arrays}
        self._committed = {name: t.clone() for name, t in self._tensors.items()}  # what rollback restores
        self._step = -1
        self._pending: int | None = None
        self._lock = threading.RLock()
        self._rows_read = 0
        self._rows_written = 0

    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        """Returns the (n, D) rows of ``ids`` (any order, repeats allowed) as a new CPU tensor of ``dtype``.

        Raises:
            BankError: an id is outside ``[0, N)`` or ``array`` is unknown.
        """
        return self._read(ids, array, None)

    def read_rows_into(self, ids: torch.Tensor, out: torch.Tensor, array: str = "centers") -> None:
        self._read(ids, array, out)  # straight into ``out``: no intermediate tensor

    def _read(self, ids: torch.Tensor, array: str, out: torch.Tensor | None) -> torch.Tensor:
        """The checks and the read of ``read_rows`` (``out`` None: a new tensor) and ``read_rows_into``."""
        _check_array(self, array)
        ids = _check_ids(ids, self.num_classes, unique=False)
        if out is not None:
            _check_out(out, ids.numel(), self.dim, self.dtype)
        with self._lock:
            self._rows_read += ids.numel()
            return torch.index_select(self._tensors[array], 0, ids, out=out)

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        """Stores ``rows`` (n, D; rounded to ``dtype`` to nearest) at unique ``ids``.

        Raises:
            BankError: the bank is read-only, an id is out of range or repeated, or ``rows`` has the wrong shape.
        """
        if self.read_only:
            raise BankError("this bank is read-only; open it with read_only=False to write rows")
        _check_array(self, array)
        ids = _check_ids(ids, self.num_classes, unique=True)
        rows = _check_rows(rows, ids.numel(), self.dim, self.dtype)
        with self._lock:
            _check_not_pending(self._pending, "write rows")
            self._rows_written += ids.numel()
            self._tensors[array].index_copy_(0, ids, rows)

    def flush(self, step: int) -> None:
        """``prepare`` then ``commit``, under one lock, so that a writer thread never sees the pending state."""
        with self._lock:
            super().flush(step)

    def prepare(self, step: int) -> None:
        """Records ``pending_step = step`` (the rows are already in memory); writes are refused until it is settled.

        Raises:
            BankError: the bank is read-only, a flush is already pending, or ``step`` is negative.
        """
        if self.read_only:
            raise BankError("this bank is read-only; open it with read_only=False to flush")
        step = _check_step(step)
        with self._lock:
            _check_not_pending(self._pending, "prepare a flush")
            self._pending = step

    def commit(self, step: int) -> None:
        """Makes the prepared rows the committed state and records ``step``.

        Raises:
            BankError: no flush of ``step`` is pending.
        """
        with self._lock:
            _check_commit(self._pending, step, "this bank")
            self._committed = {name: t.clone() for name, t in self._tensors.items()}
            self._step, self._pending = step, None

    def rollback(self) -> None:
        """Restores the rows of the last commit (or the initial rows) and drops the pending flush.

        Raises:
            BankError: the bank is read-only.
        """
        if self.read_only:
            raise BankError("this bank is read-only; open it with read_only=False to roll it back")
        with self._lock:
            for name, tensor in self._tensors.items():
                tensor.copy_(self._committed[name])
            self._pending = None

    @property
    def pending_step(self) -> int | None:
        """The step of a prepared, uncommitted flush; None when there is none."""
        return self._pending

    @property
    def step(self) -> int:
        """The step of the last commit; -1 before the first one."""
        return self._step

    def stats(self) -> dict[str, int]:
        """Cumulative traffic counters, named as step metrics (``bank/rows_read``, ``bank/rows_written``)."""
        return {"bank/rows_read": self._rows_read, "bank/rows_written": self._rows_written}

    def __repr__(self) -> str:
        return f"MemoryBank(num_classes={self.num_classes}, dim={self.dim}, arrays={self.arrays}, dtype={self.dtype})"
