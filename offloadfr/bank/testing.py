"""``BankContract``: the pytest suite every ClassBank implementation must pass (STYLE R11).

Legend: N = num_classes, D = dim.

Subclass it in a test module, name the subclass ``Test...`` and implement :meth:`BankContract.make_bank` (and
:meth:`BankContract.reopen` for banks that persist)::

    class TestMyBank(BankContract):
        def make_bank(self, tmp_path, num_classes, dim, arrays):
            return MyBank(num_classes, dim, arrays, seed=self.seed, init_std=self.init_std)

Sizes are small and uneven (N=37 with 8-row blocks leaves a partial last block). ``bank_dtype`` is the dtype the
bank under test stores (``make_bank`` must create it so): reads must return it, a write must store the nearest value of
that dtype (ties to even, as ``Tensor.to``) and a read return it exactly, and untouched rows are the initial rows so
rounded. The rows the tests write are representable in ``bank_dtype`` unless a test says otherwise, so every other
test checks exact round trips in any dtype. Bad ids, repeated ids in a write,
bad shapes, unknown arrays, writes to a read-only bank and negative steps must raise ``BankError`` (a ``ValueError``).

The two-phase flush (``prepare`` / ``commit`` / ``rollback`` / ``resolve``) is part of the contract: after
``prepare`` the bank still reports the old ``step`` and refuses writes; ``commit`` publishes, ``rollback`` returns to
the rows of the last commit. Persistent banks must also keep a prepared flush pending across a reopen (a crash
between the bank flush and the checkpoint) until ``resolve`` settles it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from offloadfr.bank.base import ClassBank
from offloadfr.bank.dtypes import torch_dtype
from offloadfr.bank.init import initial_rows
from offloadfr.errors import BankError

__all__ = ["BankContract"]

_ARRAYS = ("centers", "momentum")


class BankContract:
    """Contract tests for a :class:`ClassBank`; subclasses provide the bank.

    Attributes:
        num_classes: N of the banks under test (uneven on purpose).
        dim: D of the banks under test.
        seed: the init seed ``make_bank`` must use.
        init_std: the init std ``make_bank`` must use.
        persistent: whether a flushed bank survives ``reopen`` (tests of persistence are skipped otherwise).
        bank_dtype: the ``bank.dtype`` ``make_bank`` must create (``"float32"`` or ``"bfloat16"``).
    """

    num_classes: ClassVar[int] = 37
    dim: ClassVar[int] = 8
    seed: ClassVar[int] = 3
    init_std: ClassVar[float] = 0.02
    persistent: ClassVar[bool] = True
    bank_dtype: ClassVar[str] = "float32"

    def make_bank(self, tmp_path: Path, num_classes: int, dim: int, arrays: tuple[str, ...]) -> ClassBank:
        """Returns a new, empty bank with ``self.seed``, ``self.init_std`` and ``self.bank_dtype``, storing anything
        under ``tmp_path``."""
        raise NotImplementedError

    def reopen(self, bank: ClassBank, tmp_path: Path, *, read_only: bool = False) -> ClassBank:
        """Closes ``bank`` and returns a bank over the same storage (as after a process restart)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def _bank(self, tmp_path: Path, arrays: tuple[str, ...] = _ARRAYS) -> ClassBank:
        return self.make_bank(tmp_path, self.num_classes, self.dim, arrays)

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` rounded to the bank's dtype (to nearest), as float32: what a bank must return after writing them."""
        return rows.to(torch_dtype(self.bank_dtype)).float()

    def _init(self, ids: torch.Tensor) -> torch.Tensor:
        return self._stored(initial_rows(ids, self.dim, seed=self.seed, std=self.init_std))

    def _rows(self, num: int, dim: int, salt: int = 0) -> torch.Tensor:
        """Distinct test rows (float32), representable in the bank's dtype."""
        return self._stored(torch.arange(num * dim, dtype=torch.float32).reshape(num, dim) + 1000.0 * (salt + 1))

    # ------------------------------------------------------------------ tests

    def test_shapes_dtype_and_step(self, tmp_path: Path) -> None:
        """Catches a bank returning the wrong shape/dtype/device, or a fresh bank not reporting step -1."""
        bank = self._bank(tmp_path)
        assert (bank.num_classes, bank.dim, tuple(bank.arrays)) == (self.num_classes, self.dim, _ARRAYS)
        assert bank.step == -1
        for array in _ARRAYS:
            rows = bank.read_rows(torch.tensor([0, 36, 9]), array)
            assert rows.shape == (3, self.dim) and rows.device.type == "cpu"
            assert rows.dtype == torch_dtype(self.bank_dtype) == bank.dtype
        assert bank.read_rows(torch.empty(0, dtype=torch.int64)).shape == (0, self.dim)
        bank.close()

    def test_untouched_rows_are_initial(self, tmp_path: Path) -> None:
        """Catches lazy init that depends on the block, the order of ids or the seed, or random momentum."""
        bank = self._bank(tmp_path)
        ids = torch.randperm(self.num_classes, generator=torch.Generator().manual_seed(0))
        assert torch.equal(bank.read_rows(ids), self._init(ids))
        assert torch.equal(bank.read_rows(ids, "momentum"), torch.zeros(self.num_classes, self.dim))
        # The same values again, now that the blocks were touched.
        assert torch.equal(bank.read_rows(torch.tensor([36, 0])), self._init(torch.tensor([36, 0])))
        std = float(bank.read_rows(torch.arange(self.num_classes)).std())
        assert 0.5 * self.init_std < std < 1.5 * self.init_std
        bank.close()

    def test_write_then_read(self, tmp_path: Path) -> None:
        """Catches writes landing in the wrong row or block, or clobbering their untouched block neighbours."""
        bank = self._bank(tmp_path)
        ids = torch.tensor([36, 0, 9, 17])  # the partial last block, the first row, and middle blocks
        rows = self._rows(4, self.dim)
        bank.write_rows(ids, rows)
        assert torch.equal(bank.read_rows(ids), rows)
        others = torch.tensor([1, 8, 10, 16, 18, 32, 35])
        assert torch.equal(bank.read_rows(others), self._init(others))
        bank.write_rows(torch.tensor([9]), rows[:1] * -1)  # overwrite one row
        assert torch.equal(bank.read_rows(torch.tensor([9, 17])), torch.stack([rows[0] * -1, rows[3]]))
        bank.close()

    def test_writes_round_to_the_dtype_and_reads_are_exact(self, tmp_path: Path) -> None:
        """Catches a bank that stores another dtype than it declares, rounds a write other than to nearest (or
        twice), or loses precision on the way back (float32 rows read from bfloat16 storage must be exact)."""
        bank = self._bank(tmp_path)
        dtype = torch_dtype(self.bank_dtype)
        ids = torch.tensor([36, 0, 9, 17])
        rows = torch.randn(4, self.dim, generator=torch.Generator().manual_seed(5)) * 0.05
        rows[0, :3] = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8)])  # bfloat16 ties
        for array in _ARRAYS:
            bank.write_rows(ids, rows, array)
            got = bank.read_rows(ids, array)
            assert got.dtype == dtype
            assert torch.equal(got, rows.to(dtype))
            assert bool(((got.float() - rows).abs() <= rows.abs() * torch.finfo(dtype).eps / 2).all())
            bank.write_rows(ids, got, array)  # values of the dtype: stored exactly
            assert torch.equal(bank.read_rows(ids, array), got)
        bank.flush(1)
        if self.persistent:
            bank = self.reopen(bank, tmp_path)
            assert torch.equal(bank.read_rows(ids), rows.to(dtype))
        bank.close()

    def test_read_repeated_and_unordered_ids(self, tmp_path: Path) -> None:
        """Catches a gather that sorts, deduplicates or drops repeated ids instead of following the request."""
        bank = self._bank(tmp_path)
        bank.write_rows(torch.tensor([5, 30]), self._rows(2, self.dim))
        ids = torch.tensor([30, 5, 30, 2, 5, 36, 30])
        expect = torch.stack([self._rows(2, self.dim)[1], self._rows(2, self.dim)[0], self._rows(2, self.dim)[1],
                              self._init(torch.tensor([2]))[0], self._rows(2, self.dim)[0],
                              self._init(torch.tensor([36]))[0], self._rows(2, self.dim)[1]])
        assert torch.equal(bank.read_rows(ids), expect)
        bank.close()

    def test_arrays_are_independent(self, tmp_path: Path) -> None:
        """Catches arrays sharing storage or a cache keyed by block only (momentum writes showing up in centers)."""
        bank = self._bank(tmp_path)
        ids = torch.tensor([3, 4, 36])
        bank.write_rows(ids, self._rows(3, self.dim, salt=1), "momentum")
        assert torch.equal(bank.read_rows(ids, "momentum"), self._rows(3, self.dim, salt=1))
        assert torch.equal(bank.read_rows(ids, "centers"), self._init(ids))
        bank.close()

    def test_results_do_not_alias_the_bank(self, tmp_path: Path) -> None:
        """Catches a bank that keeps the caller's rows tensor or returns a view of its own storage."""
        bank = self._bank(tmp_path)
        rows = self._rows(2, self.dim)
        bank.write_rows(torch.tensor([1, 2]), rows)
        rows.zero_()
        out = bank.read_rows(torch.tensor([1, 2]))
        assert torch.equal(out, self._rows(2, self.dim))
        out.zero_()
        assert torch.equal(bank.read_rows(torch.tensor([1, 2])), self._rows(2, self.dim))
        bank.close()

    def test_out_of_range_ids_raise(self, tmp_path: Path) -> None:
        """Catches a silent wrap-around or clamp of an id outside [0, N) (corrupting another identity's row)."""
        bank = self._bank(tmp_path)
        for bad in (-1, self.num_classes, 10**12):
            with pytest.raises(BankError, match=f"id {bad} is outside"):
                bank.read_rows(torch.tensor([0, bad]))
            with pytest.raises(BankError, match=f"id {bad} is outside"):
                bank.write_rows(torch.tensor([bad]), torch.zeros(1, self.dim))
        assert torch.equal(bank.read_rows(torch.tensor([0])), self._init(torch.tensor([0])))
        bank.close()

    def test_bad_calls_raise(self, tmp_path: Path) -> None:
        """Catches repeated ids in a write (an undefined last-writer-wins), bad shapes, dtypes and array names."""
        bank = self._bank(tmp_path)
        with pytest.raises(BankError, match="more than once"):
            bank.write_rows(torch.tensor([4, 2, 4]), torch.zeros(3, self.dim))
        with pytest.raises(BankError, match="shape"):
            bank.write_rows(torch.tensor([4, 2]), torch.zeros(2, self.dim + 1))
        with pytest.raises(BankError):
            bank.read_rows(torch.tensor([1.0, 2.0]))
        with pytest.raises(BankError):
            bank.read_rows(torch.tensor([[1, 2]]))
        with pytest.raises(BankError, match="weights"):
            bank.read_rows(torch.tensor([1]), "weights")
        with pytest.raises(BankError):
            bank.flush(-1)
        # A rejected write changed nothing.
        assert torch.equal(bank.read_rows(torch.tensor([2, 4])), self._init(torch.tensor([2, 4])))
        bank.close()

    def test_flush_records_step(self, tmp_path: Path) -> None:
        """Catches flush not recording the step, or recording it before the writes are durable."""
        bank = self._bank(tmp_path)
        bank.write_rows(torch.tensor([7]), self._rows(1, self.dim))
        bank.flush(5)
        assert bank.step == 5
        bank.flush(9)  # a flush with nothing new still records the step
        assert bank.step == 9
        assert torch.equal(bank.read_rows(torch.tensor([7])), self._rows(1, self.dim))
        bank.close()

    def test_read_only_rejects_writes(self, tmp_path: Path) -> None:
        """Catches a read-only bank that accepts writes or flushes (e.g. an eval job corrupting a training bank)."""
        bank = self._bank(tmp_path)
        bank.write_rows(torch.tensor([3]), self._rows(1, self.dim))
        bank.flush(1)
        ro = self.reopen(bank, tmp_path, read_only=True)
        assert ro.read_only
        with pytest.raises(BankError, match="read-only"):
            ro.write_rows(torch.tensor([3]), torch.zeros(1, self.dim))
        with pytest.raises(BankError, match="read-only"):
            ro.flush(2)
        assert torch.equal(ro.read_rows(torch.tensor([3])), self._rows(1, self.dim))
        assert ro.step == 1
        ro.close()

    def test_reopen_after_flush(self, tmp_path: Path) -> None:
        """Catches flushed rows, momentum or step that do not survive a restart."""
        if not self.persistent:
            pytest.skip("this bank does not persist")
        bank = self._bank(tmp_path)
        ids = torch.tensor([36, 0, 12])
        bank.write_rows(ids, self._rows(3, self.dim))
        bank.write_rows(ids[:2], self._rows(2, self.dim, salt=2), "momentum")
        bank.flush(11)
        bank = self.reopen(bank, tmp_path)
        assert bank.step == 11
        assert torch.equal(bank.read_rows(ids), self._rows(3, self.dim))
        assert torch.equal(bank.read_rows(ids[:2], "momentum"), self._rows(2, self.dim, salt=2))
        assert torch.equal(bank.read_rows(ids[2:], "momentum"), torch.zeros(1, self.dim))
        rest = torch.tensor([1, 13, 35])
        assert torch.equal(bank.read_rows(rest), self._init(rest))
        bank.close()

    def test_random_ops_match_a_dense_reference(self, tmp_path: Path) -> None:
        """Catches lost updates under many writes across every block (eviction, dirty tracking, partial blocks)."""
        gen = torch.Generator().manual_seed(1)
        bank = self._bank(tmp_path)
        ref = {"centers": self._init(torch.arange(self.num_classes)),
               "momentum": torch.zeros(self.num_classes, self.dim)}
        for it in range(40):
            array = _ARRAYS[it % 2]
            ids = torch.randperm(self.num_classes, generator=gen)[: int(torch.randint(1, 20, (1,), generator=gen))]
            rows = torch.randn(ids.numel(), self.dim, generator=gen)
            bank.write_rows(ids, rows, array)  # random floats: stored rounded to the bank's dtype
            ref[array][ids] = self._stored(rows)
            probe = torch.randint(0, self.num_classes, (15,), generator=gen)
            assert torch.equal(bank.read_rows(probe, array), ref[array][probe])
            if it % 10 == 9:
                bank.flush(it)
        for array in _ARRAYS:
            assert torch.equal(bank.read_rows(torch.arange(self.num_classes), array), ref[array])
        if self.persistent:
            bank.flush(100)
            bank = self.reopen(bank, tmp_path)
            for array in _ARRAYS:
                assert torch.equal(bank.read_rows(torch.arange(self.num_classes), array), ref[array])
        bank.close()

    def test_concurrent_reads_writes_and_flush(self, tmp_path: Path) -> None:
        """Catches a missing lock: a prefetcher thread reading/writing while the main thread flushes loses rows."""
        bank = self._bank(tmp_path)
        errors: list[BaseException] = []

        def worker(ids: torch.Tensor, salt: int) -> None:
            try:
                for rep in range(15):
                    bank.write_rows(ids, self._rows(ids.numel(), self.dim, salt=salt) + rep)
                    got = bank.read_rows(ids)
                    assert torch.equal(got, self._stored(self._rows(ids.numel(), self.dim, salt=salt) + rep))
            except BaseException as exc:  # noqa: BLE001 - reported to the main thread
                errors.append(exc)

        evens, odds = torch.arange(0, self.num_classes, 2), torch.arange(1, self.num_classes, 2)
        threads = [threading.Thread(target=worker, args=(evens, 0)), threading.Thread(target=worker, args=(odds, 1))]
        for thread in threads:
            thread.start()
        for step in range(5):
            bank.flush(step)
        for thread in threads:
            thread.join()
        assert not errors, errors
        bank.flush(99)
        assert torch.equal(bank.read_rows(evens), self._stored(self._rows(evens.numel(), self.dim, salt=0) + 14))
        assert torch.equal(bank.read_rows(odds), self._stored(self._rows(odds.numel(), self.dim, salt=1) + 14))
        bank.close()

    # ------------------------------------------------------------------ two-phase flush

    def test_prepare_then_commit(self, tmp_path: Path) -> None:
        """Catches a prepare that publishes its step early, accepts writes while pending, or a commit of the wrong
        step (a bank that claims a step no checkpoint has)."""
        bank = self._bank(tmp_path)
        bank.flush(1)
        bank.write_rows(torch.tensor([7, 30]), self._rows(2, self.dim))
        bank.prepare(2)
        assert (bank.step, bank.pending_step) == (1, 2)
        assert torch.equal(bank.read_rows(torch.tensor([7, 30])), self._rows(2, self.dim))
        with pytest.raises(BankError, match="prepared but not committed"):
            bank.write_rows(torch.tensor([3]), torch.zeros(1, self.dim))
        with pytest.raises(BankError, match="prepared but not committed"):
            bank.prepare(3)
        with pytest.raises(BankError, match="no prepared flush of step 3"):
            bank.commit(3)
        bank.commit(2)
        assert (bank.step, bank.pending_step) == (2, None)
        with pytest.raises(BankError, match="no prepared flush of step 2"):
            bank.commit(2)
        bank.write_rows(torch.tensor([3]), self._rows(1, self.dim, salt=4))  # writable again
        assert torch.equal(bank.read_rows(torch.tensor([7, 30, 3])),
                           torch.cat([self._rows(2, self.dim), self._rows(1, self.dim, salt=4)]))
        bank.close()

    def test_rollback_returns_to_the_last_commit(self, tmp_path: Path) -> None:
        """Catches a rollback that keeps rows written after the last commit (a bank ahead of its checkpoint)."""
        bank = self._bank(tmp_path)
        ids = torch.tensor([0, 9, 36])
        bank.write_rows(ids, self._rows(3, self.dim))
        bank.flush(4)
        bank.write_rows(torch.arange(self.num_classes), torch.full((self.num_classes, self.dim), 5.0))
        bank.write_rows(ids, self._rows(3, self.dim, salt=1), "momentum")
        bank.prepare(8)
        bank.rollback()
        assert (bank.step, bank.pending_step) == (4, None)
        assert torch.equal(bank.read_rows(ids), self._rows(3, self.dim))
        rest = torch.tensor([1, 20, 35])
        assert torch.equal(bank.read_rows(rest), self._init(rest))
        assert torch.equal(bank.read_rows(ids, "momentum"), torch.zeros(3, self.dim))
        bank.write_rows(torch.tensor([1]), self._rows(1, self.dim))  # unpending: writable, and a rollback without
        bank.rollback()                                               # a prepare drops unflushed writes too
        assert torch.equal(bank.read_rows(rest), self._init(rest))
        bank.close()

    @pytest.mark.parametrize("has_checkpoint", [True, False])
    def test_resolve_follows_the_checkpoints(self, tmp_path: Path, has_checkpoint: bool) -> None:
        """Catches resolve rolling forward without a checkpoint of the pending step (or back with one)."""
        bank = self._bank(tmp_path)
        bank.flush(4)
        assert bank.resolve([4]) == "nothing pending"
        bank.write_rows(torch.tensor([2]), self._rows(1, self.dim))
        bank.prepare(8)
        done = bank.resolve([4, 8] if has_checkpoint else [4])
        assert done == ("committed" if has_checkpoint else "rolled back")
        assert (bank.step, bank.pending_step) == ((8, None) if has_checkpoint else (4, None))
        expect = self._rows(1, self.dim) if has_checkpoint else self._init(torch.tensor([2]))
        assert torch.equal(bank.read_rows(torch.tensor([2])), expect)
        bank.close()

    @pytest.mark.parametrize("has_checkpoint", [True, False])
    def test_prepared_flush_survives_a_crash_until_resolved(self, tmp_path: Path, has_checkpoint: bool) -> None:
        """Catches a bank that, after dying between prepare and commit, reads (or trains on) rows of the pending
        step before anyone decided, or settles it the wrong way."""
        if not self.persistent:
            pytest.skip("this bank does not persist")
        bank = self._bank(tmp_path)
        old, new = self._rows(self.num_classes, self.dim), self._rows(self.num_classes, self.dim, salt=7)
        every = torch.arange(self.num_classes)
        bank.write_rows(every, old)
        bank.flush(4)
        bank.write_rows(every, new)
        bank.write_rows(every[:5], new[:5], "momentum")
        bank.prepare(8)
        bank = self.reopen(bank, tmp_path)  # the crash: the checkpoint of step 8 may or may not have been renamed
        assert (bank.step, bank.pending_step) == (4, 8)
        assert torch.equal(bank.read_rows(every), old)  # undecided: the last consistent state
        with pytest.raises(BankError, match="prepared but not committed"):
            bank.write_rows(torch.tensor([3]), torch.zeros(1, self.dim))
        bank.resolve([4, 8] if has_checkpoint else [4])
        for _ in range(2):  # the decision and its rows survive another restart
            want_step, want = (8, new) if has_checkpoint else (4, old)
            assert (bank.step, bank.pending_step) == (want_step, None)
            assert torch.equal(bank.read_rows(every), want)
            momentum = bank.read_rows(every[:5], "momentum")
            assert torch.equal(momentum, new[:5] if has_checkpoint else torch.zeros(5, self.dim))
            bank = self.reopen(bank, tmp_path)
        bank.close()
