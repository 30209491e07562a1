"""Prefetcher: bank + container equal a cache-free reference under continuous eviction (read-your-writes), worker
errors reach the main thread, no row is fetched twice, reads overlap compute, and close() leaves no thread."""

from __future__ import annotations

import faulthandler
import os
import random
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from offloadfr.bank.base import ClassBank
from offloadfr.bank.memory import MemoryBank
from offloadfr.cache import DynamicClassContainer, Prefetcher
from offloadfr.cache import prefetcher as prefetcher_module
from offloadfr.cache.testing import BankWrapper, CountingBank, FailingBank, LatencyBank
from offloadfr.errors import BankError, ConfigError, DataError

DEVICE = torch.device(os.environ.get("OFFLOADFR_TEST_DEVICE", "cpu"))
N, D = 37, 8
ARRAYS = ("centers", "momentum")
THREAD_NAME = "offloadfr-prefetcher"


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    """A hung worker or a wait that never wakes kills the run with every thread's traceback, instead of hanging."""
    faulthandler.dump_traceback_later(60, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


def _no_prefetcher_threads() -> bool:
    return not any(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate())


def _update(rows: dict[str, torch.Tensor], ids: torch.Tensor, step: int) -> None:
    """A step's in-place update: order-dependent, so a stale or twice-applied row changes the result.

    Each op rounds once (no ``alpha=``, which a GPU may fuse into an FMA), so CPU and CUDA agree bit for bit.
    """
    c, m = rows["centers"], rows["momentum"]
    m.mul_(0.9).add_(c)
    c.mul_(0.5).add_(step + 1).add_(ids.to(c).reshape(-1, 1) * 0.01)


def _train(pf: Prefetcher, plans: list[torch.Tensor], lookahead: int, ref: dict[str, torch.Tensor],
           compute_s: float = 0.0) -> None:
    """Runs the per-step protocol (submit L ahead, ready, update resident rows) and the same updates on ``ref``."""
    dcc = pf.container
    for t in range(min(lookahead, len(plans))):
        pf.submit(plans[t], t)
    for t in range(len(plans)):
        if t + lookahead < len(plans):
            pf.submit(plans[t + lookahead], t + lookahead)
        pf.ready(t)
        ids = torch.unique(plans[t])
        slots = dcc.slots_of(ids)
        assert bool((slots >= 0).all()), f"step {t}: planned ids not resident after ready"
        rows = {name: dcc[name][slots] for name in ARRAYS}
        _update(rows, ids, t)
        for name in ARRAYS:
            dcc[name][slots] = rows[name]
        ref_rows = {name: ref[name][ids] for name in ARRAYS}
        _update(ref_rows, ids, t)
        for name in ARRAYS:
            ref[name][ids] = ref_rows[name]
        if compute_s:
            time.sleep(compute_s)


def _reference() -> dict[str, torch.Tensor]:
    fresh = MemoryBank(N, D, ARRAYS, init_std=0.01, seed=0)
    return {name: fresh.read_rows(torch.arange(N), name) for name in ARRAYS}


def _random_plans(num_steps: int, plan_size: int, seed: int, num_classes: int = N) -> list[torch.Tensor]:
    rng = random.Random(seed)
    # Repeats inside a plan are allowed (labels of a batch); the prefetcher deduplicates.
    return [torch.tensor(rng.choices(rng.sample(range(num_classes), plan_size), k=plan_size + 2)) for _ in
            range(num_steps)]


def _prefetcher(bank: ClassBank, num_slots: int, policy: str = "lru") -> Prefetcher:
    dcc = DynamicClassContainer(num_slots, D, arrays=ARRAYS, device=DEVICE, policy=policy)  # type: ignore[arg-type]
    return Prefetcher(bank, dcc, arrays=ARRAYS, device=DEVICE)


@pytest.mark.parametrize(("policy", "lookahead", "latency_s"),
                         [("lru", 0, 0.0), ("lru", 1, 0.0), ("lru", 2, 0.0), ("fifo", 2, 0.0), ("lru", 3, 0.0),
                          ("lru", 2, 0.002), ("fifo", 3, 0.001)])
def test_bank_plus_container_equal_cache_free_reference(policy: str, lookahead: int, latency_s: float) -> None:
    """Catches any stale row under continuous eviction: a fetch that reads the bank while the row's write-back is
    pending, an id evicted between its plan and its step, a row fetched again while resident (a stale duplicate),
    a lost or reordered write-back, or write_back_all missing rows."""
    mem = MemoryBank(N, D, ARRAYS, init_std=0.01, seed=0)
    bank = LatencyBank(mem, latency_s=latency_s) if latency_s else mem
    ref = _reference()
    plans = _random_plans(60, 4, seed=lookahead * 10 + len(policy))
    num_slots = 4 * (lookahead + 1)  # just enough for the queued plans: evictions nearly every step
    with _prefetcher(bank, num_slots, policy) as pf:
        _train(pf, plans, lookahead, ref)
        pf.flush()
        dcc = pf.container
        resident = dcc.resident_ids().cpu()
        assert resident.numel() <= num_slots
        slots = dcc.slots_of(resident)
        out = {name: mem.read_rows(torch.arange(N), name) for name in ARRAYS}
        for name in ARRAYS:  # the truth is the container where resident, else the bank
            out[name][resident] = dcc[name][slots].cpu()
            assert torch.equal(out[name], ref[name]), name
        metrics = pf.metrics()
        assert metrics["bank/rows_written"] > 0 and metrics["bank/rows_read"] > 0
        pf.write_back_all()
        for name in ARRAYS:
            assert torch.equal(mem.read_rows(torch.arange(N), name), ref[name]), name
        assert torch.equal(dcc.resident_ids().cpu(), resident)  # write_back_all keeps rows resident
    assert _no_prefetcher_threads()


class _GatedBank(BankWrapper):
    """Blocks the ``gated_call``-th read until ``gate`` is set, to hold the worker inside one fetch."""

    def __init__(self, inner: ClassBank, gated_call: int) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.gated_call = gated_call
        self.num_reads = 0

    def read_rows(self, ids: torch.Tensor, array: str = "centers") -> torch.Tensor:
        call, self.num_reads = self.num_reads, self.num_reads + 1
        if call == self.gated_call:
            self.entered.set()
            assert self.gate.wait(timeout=20)
        return self.inner.read_rows(ids, array)


def test_row_evicted_and_rerequested_is_served_from_pending_write_back() -> None:
    """Catches the read-your-writes bug directly: id 1 is updated, evicted, and planned again while its write-back is
    still queued behind a slow fetch; reading the bank would return its initial (stale) value."""
    mem = MemoryBank(N, D, ("centers", "momentum"), init_std=0.01, seed=0)
    counting = CountingBank(mem)
    bank = _GatedBank(counting, gated_call=2 * len(ARRAYS))  # the fetch of step 2 (reads: step 0, 1, 2 ...)
    ref = _reference()
    with _prefetcher(bank, num_slots=3) as pf:
        dcc = pf.container

        def step(t: int, ids: list[int]) -> None:
            pf.ready(t)
            ids_t = torch.tensor(ids)
            rows = {name: dcc[name][dcc.slots_of(ids_t)] for name in ARRAYS}
            _update(rows, ids_t, t)
            for name in ARRAYS:
                dcc[name][dcc.slots_of(ids_t)] = rows[name]
            ref_rows = {name: ref[name][ids_t] for name in ARRAYS}
            _update(ref_rows, ids_t, t)
            for name in ARRAYS:
                ref[name][ids_t] = ref_rows[name]

        pf.submit(torch.tensor([1, 2]), 0)
        step(0, [1, 2])
        pf.submit(torch.tensor([3, 4]), 1)
        pf.submit(torch.tensor([5]), 2)  # its read blocks the worker
        assert bank.entered.wait(timeout=20)
        step(1, [3, 4])  # evicts id 1 (LRU, lower slot on a tie); its write-back waits behind the blocked fetch
        assert dcc.slots_of(torch.tensor([1])).item() == -1
        pf.submit(torch.tensor([1]), 3)  # queued before the write-back, and fetches win over writes
        bank.gate.set()
        step(2, [5])
        step(3, [1])
        assert pf.metrics()["prefetch/rows_from_pending"] == 1
        pf.write_back_all()
    for name in ARRAYS:
        assert torch.equal(mem.read_rows(torch.arange(N), name), ref[name]), name
    assert sum(int((ids == 1).sum()) for ids in counting.reads("centers")) == 1  # only the cold read of step 0


def test_error_in_read_rows_surfaces_in_main_thread() -> None:
    """Catches a worker exception that is swallowed (ready would hang or train on garbage) and a thread left behind."""
    bank = FailingBank(MemoryBank(N, D, ARRAYS), BankError("disk gone"), fail_on=len(ARRAYS))  # step 1's read
    pf = _prefetcher(bank, num_slots=8)
    pf.submit(torch.tensor([1, 2]), 0)
    pf.ready(0)
    pf.submit(torch.tensor([3]), 1)
    with pytest.raises(BankError, match="disk gone"):
        pf.ready(1)
    with pytest.raises(BankError, match="disk gone"):  # the prefetcher stays failed
        pf.submit(torch.tensor([4]), 2)
    pf.close()  # already reported: close does not raise again
    assert _no_prefetcher_threads()


def test_error_in_write_rows_surfaces_at_flush_and_close() -> None:
    """Catches a failed write-back that is lost silently (the bank would miss the evicted rows)."""
    bank = FailingBank(MemoryBank(N, D, ARRAYS), OSError("no space"), method="write_rows")
    pf = _prefetcher(bank, num_slots=2)
    pf.submit(torch.tensor([1, 2]), 0)
    pf.ready(0)
    pf.submit(torch.tensor([3, 4]), 1)
    pf.ready(1)  # evicts 1 and 2; their write-back fails in the worker
    with pytest.raises(OSError, match="no space"):
        pf.flush()
    pf.close()

    pf = _prefetcher(FailingBank(MemoryBank(N, D, ARRAYS), OSError("no space"), method="write_rows"), num_slots=2)
    pf.submit(torch.tensor([1, 2]), 0)
    pf.ready(0)
    pf.submit(torch.tensor([3, 4]), 1)
    pf.ready(1)
    with pytest.raises(OSError, match="no space"):  # never reported before: close re-raises it
        pf.close()
    assert _no_prefetcher_threads()


def test_no_row_is_read_twice_unless_written_in_between() -> None:
    """Catches overlapping plans fetching the same id for two queued steps, or refetching a resident id: every read
    call has unique ids, and an id is read from the bank again only after its write-back reached the bank."""
    counting = CountingBank(MemoryBank(N, D, ARRAYS))
    plans = _random_plans(50, 5, seed=7)
    plans = [torch.cat([p, plans[max(t - 1, 0)][:3]]) for t, p in enumerate(plans)]  # consecutive plans overlap
    with _prefetcher(counting, num_slots=8 * 3) as pf:
        _train(pf, plans, 2, _reference())
        pf.flush()
    for name in ARRAYS:
        last_read: dict[int, int] = {}
        last_write: dict[int, int] = {}
        for k, (method, array, ids) in enumerate(counting.calls):
            if array != name:
                continue
            if method == "read_rows":
                assert ids.unique().numel() == ids.numel()
                for i in ids.tolist():
                    assert i not in last_read or last_write.get(i, -1) > last_read[i], f"id {i} read twice"
                    last_read[i] = k
            else:
                for i in ids.tolist():
                    last_write[i] = k

    # With every id fitting, each id is read exactly once over the whole run.
    counting = CountingBank(MemoryBank(N, D, ARRAYS))
    with _prefetcher(counting, num_slots=N) as pf:
        _train(pf, plans, 2, _reference())
        assert pf.metrics()["cache/hit_rate(%)"] > 50.0
    planned = torch.unique(torch.cat(plans))
    assert sorted(torch.cat(counting.reads("centers")).tolist()) == planned.tolist()
    assert counting.rows_written() == 0  # no eviction, no write-back


def test_lookahead_overlaps_bank_latency_with_compute() -> None:
    """Catches a prefetcher that reads synchronously in ready (no overlap): with a 30 ms bank and 30 ms of compute per
    step, lookahead 2 must stall far less than submitting each plan right before its step."""
    num_classes = 400
    plans = [torch.arange(16 * t, 16 * t + 16) for t in range(12)]  # disjoint: every step needs a fetch
    stall = {}
    for lookahead in (0, 2):
        mem = MemoryBank(num_classes, D, ARRAYS)
        dcc = DynamicClassContainer(64, D, arrays=ARRAYS, device=DEVICE)
        with Prefetcher(LatencyBank(mem, latency_s=0.015), dcc, arrays=ARRAYS, device=DEVICE) as pf:
            pf.metrics()
            _train(pf, plans, lookahead, {n: mem.read_rows(torch.arange(num_classes), n) for n in ARRAYS},
                   compute_s=0.03)
            stall[lookahead] = pf.metrics()["prefetch/stall(%)"]
    assert stall[0] > 20.0, stall  # two 15 ms reads per step against 30 ms of compute
    assert stall[2] < stall[0] / 2, stall


def test_close_joins_thread_and_finishes_write_backs() -> None:
    """Catches a close() that leaves the worker running or drops evicted rows still queued for the bank."""
    mem = MemoryBank(N, D, ARRAYS)
    bank = _GatedBank(mem, gated_call=2 * len(ARRAYS))  # the fetch of step 2
    pf = _prefetcher(bank, num_slots=4)
    thread = pf._thread
    pf.submit(torch.tensor([1, 2, 8, 9]), 0)
    pf.ready(0)
    pf.container["centers"][pf.container.slots_of(torch.tensor([1, 2]))] = 7.0
    pf.submit(torch.tensor([3, 4]), 1)
    pf.submit(torch.tensor([5]), 2)  # its read holds the worker
    assert bank.entered.wait(timeout=20)
    pf.ready(1)  # evicts 1 and 2; their write-back is queued behind the held fetch
    pf.submit(torch.tensor([6]), 3)  # a fetch still queued at close
    threading.Timer(0.1, bank.gate.set).start()
    pf.close()
    assert not thread.is_alive() and _no_prefetcher_threads()
    assert bool((mem.read_rows(torch.tensor([1, 2])) == 7.0).all())
    assert bank.num_reads == 3 * len(ARRAYS)  # the fetch of step 3 was dropped
    with pytest.raises(RuntimeError, match="closed"):
        pf.submit(torch.tensor([7]), 4)
    pf.close()  # idempotent


def test_bad_plans_raise_clear_errors() -> None:
    """Catches out-of-range labels accepted (a silent wrong row), steps out of order, and plans that cannot fit."""
    with _prefetcher(MemoryBank(N, D, ARRAYS), num_slots=6) as pf:
        with pytest.raises(DataError, match="outside"):
            pf.submit(torch.tensor([3, N]), 0)
        pf.submit(torch.tensor([1, 2, 3]), 0)
        with pytest.raises(ValueError, match="greater"):
            pf.submit(torch.tensor([1]), 0)
        with pytest.raises(ConfigError, match="num_slots"):
            pf.submit(torch.tensor([10, 11, 12, 13]), 1)  # 7 distinct ids queued > 6 slots
        with pytest.raises(ValueError, match="oldest"):
            pf.ready(1)
        pf.ready(0)
    with pytest.raises(ConfigError, match="momentum"):
        Prefetcher(MemoryBank(N, D, ("centers",)), DynamicClassContainer(4, D, arrays=ARRAYS, device=DEVICE),
                   arrays=ARRAYS)


@pytest.mark.gpu
def test_reference_equality_on_cuda() -> None:
    """Catches CUDA-only races: H2D on the side stream not awaited before admit, or D2H of evicted rows read by the
    worker before the copy finished (reason for the gpu mark: needs streams and pinned memory)."""
    global DEVICE
    saved, DEVICE = DEVICE, torch.device("cuda")
    try:
        test_bank_plus_container_equal_cache_free_reference("lru", 2, 0.0)
        test_bank_plus_container_equal_cache_free_reference("fifo", 1, 0.001)
    finally:
        DEVICE = saved


def test_write_backs_keep_up_when_fetches_keep_the_worker_busy() -> None:
    """Catches a write-behind queue that grows without bound: with slow reads and a training loop that never waits,
    a fetch is always queued, and a worker that served every fetch first would never write (host memory, and every
    fetch searching more pending batches). The rows must still end equal to the reference."""
    mem = MemoryBank(400, D, ARRAYS, init_std=0.01, seed=0)
    bank = LatencyBank(mem, latency_s=0.003)
    fresh = MemoryBank(400, D, ARRAYS, init_std=0.01, seed=0)
    ref = {name: fresh.read_rows(torch.arange(400), name) for name in ARRAYS}
    plans = [torch.arange(10 * t, 10 * t + 10) % 400 for t in range(60)]  # new ids every step: 10 evicted per step
    most_pending = 0
    with _prefetcher(bank, num_slots=30) as pf:
        ready = pf.ready

        def ready_and_count(step: int) -> None:
            nonlocal most_pending
            ready(step)
            most_pending = max(most_pending, len(pf._pending))  # noqa: SLF001 - the queue under test

        pf.ready = ready_and_count  # type: ignore[method-assign]
        _train(pf, plans, 2, ref)
        pf.write_back_all()
    assert prefetcher_module._MAX_PENDING_BATCHES == 4  # noqa: SLF001 - the bound the next line checks
    assert most_pending <= 6, most_pending  # the limit, one batch being written, the one evicted just now
    for name in ARRAYS:
        assert torch.equal(mem.read_rows(torch.arange(400), name), ref[name]), name
