"""Parallel block loads (``bank.io_threads``) and the blocked initialiser: same rows and same bytes as the serial path.

Sizes: N=203 ids in 8-row blocks (26 blocks, the last one partial), D=8, a 3-block nvme cache, so one call misses many
blocks and evicts blocks, dirty ones included, while the I/O pool is loading the next ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from offloadfr.bank import ZarrBank, open_bank
from offloadfr.bank.base import ClassBank
from offloadfr.bank.init import _COL_BITS, _GAMMA, _TWO_PI_2_32, _seed_key, initial_rows_np
from offloadfr.bank.io_pool import default_io_threads
from offloadfr.bank.testing import BankContract
from offloadfr.config import BankCfg, load_config
from offloadfr.errors import BankError, ConfigError, DiskFullError

from .test_diskfull import full_disk  # noqa: F401  (the fixture that makes writes under a directory fail: ENOSPC)

REPO = Path(__file__).resolve().parent.parent
N, D, R = 203, 8, 8
ARRAYS = ("centers", "momentum")


def _create(path: Path, tier: str, io_threads: int, cache_blocks: int = 3) -> ZarrBank:
    return ZarrBank.create(path, num_classes=N, dim=D, arrays=ARRAYS, head_kind="partial_fc", chunk_rows=R, seed=3,
                           init_std=0.02, tier=tier, cache_blocks=cache_blocks, io_threads=io_threads)


def _io_threads() -> set[int | None]:
    """The live threads of banks' I/O pools."""
    return {t.ident for t in threading.enumerate() if t.name.startswith("bank-io")}


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (chunks of the main arrays and the journal, metadata), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- contract


class TestZarrBankNvmeSerialIO(BankContract):
    """The contract with the blocks of a call loaded one by one on the calling thread (``io_threads = 1``)."""

    io_threads = 1

    def make_bank(self, tmp_path: Path, num_classes: int, dim: int, arrays: tuple[str, ...]) -> ClassBank:
        return ZarrBank.create(tmp_path / "bank", num_classes=num_classes, dim=dim, arrays=arrays, head_kind="pfc",
                               chunk_rows=4, seed=self.seed, init_std=self.init_std, tier="nvme", cache_blocks=2,
                               io_threads=self.io_threads)

    def reopen(self, bank: ClassBank, tmp_path: Path, *, read_only: bool = False) -> ClassBank:
        bank.close()
        return ZarrBank.open(tmp_path / "bank", tier="nvme", read_only=read_only, cache_blocks=2,
                             io_threads=self.io_threads)


class TestZarrBankNvmeParallelIO(TestZarrBankNvmeSerialIO):
    """The contract with 4 I/O threads and 4-row blocks: most calls miss several blocks and evict others."""

    io_threads = 4


# ---------------------------------------------------------------------------------------------- serial vs parallel


def _mixed_run(root: Path, tier: str, io_threads: int, hold: tuple[int, int] | None) -> list[torch.Tensor]:
    """A fixed random sequence of reads, writes (partial and whole blocks), flushes, two-phase flushes with commit
    and rollback, and close/reopen; returns everything read, and leaves the bank closed."""
    gen = torch.Generator().manual_seed(11)
    lo, hi = hold if hold is not None else (0, N)
    reads: list[torch.Tensor] = []

    def bank_open(create: bool) -> ZarrBank:
        bank = _create(root, tier, io_threads) if create else ZarrBank.open(root, tier=tier, cache_blocks=3,
                                                                             io_threads=io_threads)
        if hold is not None:
            bank.hold_rows(*hold)
        return bank

    bank = bank_open(create=True)
    step = 0
    for op in range(60):
        array = ARRAYS[op % 2]
        kind = op % 10
        if kind in (0, 3, 6, 8):  # a read of many blocks, with repeats
            ids = torch.randint(lo, hi, (int(torch.randint(1, 120, (1,), generator=gen)),), generator=gen)
            reads.append(bank.read_rows(ids, array))
        elif kind in (1, 4, 7):  # a partial write over many blocks
            ids = torch.randperm(hi - lo, generator=gen)[: int(torch.randint(1, 90, (1,), generator=gen))] + lo
            bank.write_rows(ids, torch.randn(ids.numel(), D, generator=gen), array)
        elif kind == 2:  # whole blocks (no read-modify-write) next to a partial one
            first = lo + R * int(torch.randint(0, (hi - lo) // R - 3, (1,), generator=gen))
            ids = torch.arange(first, first + 2 * R + 3)[torch.randperm(2 * R + 3, generator=gen)]
            bank.write_rows(ids, torch.randn(ids.numel(), D, generator=gen), array)
        elif kind == 5:
            step += 1
            if op % 20 == 5:
                bank.flush(step)
            else:
                bank.prepare(step)
                if op % 30 == 15:
                    bank.commit(step)
                else:
                    bank.rollback()
        else:  # kind == 9: a restart
            reads.append(bank.read_rows(torch.arange(lo, hi), "centers"))
            bank.close()
            bank = bank_open(create=False)
    reads.append(torch.cat([bank.read_rows(torch.arange(lo, hi), a) for a in ARRAYS]))
    bank.close()
    return reads


@pytest.mark.parametrize(("tier", "hold"), [("nvme", None), ("ram", None), ("ram", (16, 184))])
def test_parallel_loads_give_the_serial_rows_and_bytes(tmp_path: Path, tier: str,
                                                       hold: tuple[int, int] | None) -> None:
    """Catches parallel loads that change what the bank holds: a block used before its load finished, loads applied
    in another order than the writes and evictions, a journal or main chunk written differently (the bytes on disk
    are compared), or a block read from the wrong source (main array, journal, initialiser)."""
    serial = _mixed_run(tmp_path / "serial", tier, 1, hold)
    parallel = _mixed_run(tmp_path / "parallel", tier, 4, hold)
    assert len(serial) == len(parallel) > 10
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a, b)
    serial_files, parallel_files = _files(tmp_path / "serial"), _files(tmp_path / "parallel")
    assert serial_files.keys() == parallel_files.keys()
    assert any(name.startswith("centers/c/") for name in serial_files)  # commits reached the main arrays
    for name, data in serial_files.items():
        assert parallel_files[name] == data, name


def test_parallel_counters_match_serial(tmp_path: Path) -> None:
    """Catches blocks loaded twice, or counted in the wrong counter, when the pool loads them."""
    stats = []
    for threads in (1, 4):
        bank = _create(tmp_path / str(threads), "nvme", threads, cache_blocks=30)
        bank.write_rows(torch.arange(0, 80), torch.ones(80, D))
        bank.flush(1)
        bank.close()
        bank = ZarrBank.open(tmp_path / str(threads), tier="nvme", cache_blocks=30, io_threads=threads)
        bank.read_rows(torch.arange(0, N, 3))
        bank.read_rows(torch.arange(N - 1, -1, -2), "momentum")
        stats.append(bank.stats())
        bank.close()
    assert stats[0] == stats[1]
    # centers: 10 blocks stored, 16 never written; momentum: 26 never written
    assert stats[1]["bank/blocks_loaded"] == 10 and stats[1]["bank/blocks_initialised"] == 42


def test_a_block_evicted_by_the_same_call_is_read_back_from_the_journal(tmp_path: Path) -> None:
    """Catches a load planned from the cache's content at the start of a call going stale: block 20 is cached (and
    dirty) when the call starts, the call's earlier blocks evict it to the journal, and it must come back from
    there, not from the initialiser."""
    bank = _create(tmp_path / "bank", "nvme", 4, cache_blocks=2)
    ids20 = torch.arange(20 * R, 21 * R)
    bank.write_rows(ids20, torch.full((R, D), 7.0))
    ids = torch.cat([torch.tensor([0, R, 2 * R, 3 * R]), ids20])
    rows = bank.read_rows(ids)
    assert torch.equal(rows[4:], torch.full((R, D), 7.0))
    assert bank.stats()["bank/blocks_staged"] >= 1
    bank.close()


def test_a_failing_load_raises_the_serial_error_and_leaves_the_bank_usable(tmp_path: Path) -> None:
    """Catches an error in a pool thread that is lost, turned into another error, or that leaves loads running
    (the bank then still serves other blocks, and close() returns)."""
    errors = []
    before = _io_threads()
    for threads in (1, 4):
        root = tmp_path / str(threads)
        bank = _create(root, "nvme", threads)
        bank.write_rows(torch.arange(N), torch.ones(N, D))
        bank.flush(1)
        bank.close()
        with open(root / "centers" / "c" / "5" / "0", "r+b") as f:  # a torn chunk file: 3 bytes of 256
            f.truncate(3)
        bank = ZarrBank.open(root, tier="nvme", cache_blocks=3, io_threads=threads)
        with pytest.raises(BankError, match=r"centers.c.5.0: block 5 of 'centers' cannot be read") as info:
            bank.read_rows(torch.arange(N))
        errors.append((type(info.value), str(info.value).replace(str(root), "ROOT")))  # the paths differ
        assert torch.equal(bank.read_rows(torch.arange(6 * R, N)), torch.ones(N - 6 * R, D))
        bank.close()
        assert _io_threads() <= before
    assert errors[0] == errors[1]


def test_disk_full_during_an_eviction_with_loads_in_flight(tmp_path: Path, full_disk: list[Path]) -> None:  # noqa: F811
    """Catches a full disk that surfaces as another error when the pool is loading the call's next blocks while the
    calling thread stages an evicted dirty block, or that changes the committed rows."""
    bank = _create(tmp_path / "bank", "nvme", 4, cache_blocks=2)
    bank.write_rows(torch.arange(N), torch.ones(N, D))
    bank.flush(1)
    bank.write_rows(torch.arange(0, 2 * R), torch.full((2 * R, D), 5.0))  # blocks 0 and 1 cached and dirty
    full_disk.append(tmp_path / "bank" / "journal")
    with pytest.raises(DiskFullError, match="no space left on the disk of the bank"):
        bank.read_rows(torch.arange(4 * R, N))
    full_disk.clear()
    bank.close()
    bank = ZarrBank.open(tmp_path / "bank", tier="nvme", cache_blocks=2, io_threads=4)
    assert bank.step == 1
    assert torch.equal(bank.read_rows(torch.arange(N)), torch.ones(N, D))
    bank.close()


# ---------------------------------------------------------------------------------------------- io_threads


def test_io_threads_validation_and_default(tmp_path: Path) -> None:
    """Catches a bad io_threads accepted (or a traceback instead of a one-line error), and an automatic default
    outside [1, 8]."""
    for bad in (-1, 1.5, True):
        with pytest.raises(BankError, match=r"io_threads=.* must be an int >= 0 \(set bank.io_threads"):
            _create(tmp_path / "bad", "nvme", bad)  # type: ignore[arg-type]
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError) as info:
        load_config(None, ["bank.io_threads=-2"])
    assert str(info.value).startswith("bank.io_threads = -2 is out of range: must be >= 0") and "\n" not in str(
        info.value)
    assert load_config(None, ["bank.io_threads=3"]).bank.io_threads == 3
    assert 1 <= default_io_threads() <= 8
    assert default_io_threads(processes=1000) == 1  # W processes on one machine share its cores
    assert default_io_threads(processes=2) == max(1, min(8, len(os.sched_getaffinity(0)) // 2))
    bank = _create(tmp_path / "auto", "ram", 0)
    assert bank.io_threads == default_io_threads()
    bank.close()
    shared = open_bank(BankCfg(tier="nvme"), path=tmp_path / "shared", num_classes=N, dim=D, arrays=("centers",),
                       head_kind="partial_fc", num_processes=4, processes_per_host=4)
    assert shared.io_threads == default_io_threads(processes=4)  # the run's 4 processes on this machine
    shared.close()


# ---------------------------------------------------------------------------------------------- initialiser


def _plain_normals(ids: np.ndarray, dim: int, seed: int, std: float) -> np.ndarray:
    """The initialiser's formula in one whole-array pass (the version before the blocked one): the reference."""
    num_pairs = (dim + 1) // 2
    counter = (ids.astype(np.uint64) << np.uint64(_COL_BITS))[:, None] + np.arange(num_pairs, dtype=np.uint64)[None]
    z = counter * _GAMMA + _seed_key(seed)
    for shift, mult in ((30, np.uint64(0xBF58476D1CE4E5B9)), (27, np.uint64(0x94D049BB133111EB)), (31, None)):
        z ^= z >> np.uint64(shift)
        if mult is not None:
            z *= mult
    halves = z.view(np.uint32).reshape(*z.shape, 2)
    high, low = (halves[..., 1], halves[..., 0]) if sys.byteorder == "little" else (halves[..., 0], halves[..., 1])
    radius = np.sqrt(-2.0 * np.log((high.astype(np.float64) + 1.0) * (1.0 / 2.0**32))).astype(np.float32)
    radius *= np.float32(std)
    theta = low.astype(np.float32) * np.float32(_TWO_PI_2_32)
    out = np.empty((ids.shape[0], 2 * num_pairs), dtype=np.float32)
    out[:, 0::2] = radius * np.cos(theta)
    out[:, 1::2] = radius * np.sin(theta)
    return np.ascontiguousarray(out[:, :dim])


@pytest.mark.parametrize(("num", "dim"), [(0, 8), (1, 1), (300, 512), (37, 513), (20_000, 1), (5, 1000)])
def test_blocked_initialiser_is_bit_identical_to_the_plain_formula(num: int, dim: int) -> None:
    """Catches a faster initialiser that changes a single bit of a row (banks created before would then read other
    initial rows): sizes below, at and across the piece size, odd widths, several seeds and stds."""
    ids = np.random.default_rng(num + dim).integers(0, 1 << 40, num)
    for seed, std in ((0, 0.01), (7, 1.0), (2**63 + 5, 0.3)):
        fast = initial_rows_np(ids, dim, seed=seed, std=std)
        plain = _plain_normals(ids, dim, seed, std)
        assert fast.shape == plain.shape == (num, dim) and fast.flags.c_contiguous
        assert np.array_equal(fast.view(np.uint32), plain.view(np.uint32))


def test_io_pool_threads_end_with_close(tmp_path: Path) -> None:
    """Catches a bank that leaves its I/O threads behind after close (a long run opens banks again and again)."""
    before = _io_threads()
    for i in range(3):
        bank = _create(tmp_path / str(i), "nvme", 3)
        bank.read_rows(torch.arange(N))
        assert _io_threads() - before  # the pool did run
        bank.close()
        assert _io_threads() <= before


def test_bank_bench_rows(tmp_path: Path) -> None:
    """Catches ``launch/bench.py bank`` rotting: one row per (source, tier, io_threads) with sane timings, the
    serial row's speedup 1, in CI size."""
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "bank", "--num-blocks", "6", "--block-rows",
                           "8", "--dim", "8", "--threads", "1", "3", "--rounds", "2", "--bank-dir", str(tmp_path),
                           "--sources", "init", "zarr", "zarr_api", "--out", str(out)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["source"], r["tier"], r["io_threads"]) for r in rows) == sorted(
        (s, t, n) for s in ("init", "zarr", "zarr_api") for t in ("nvme", "ram") for n in (1, 3))
    for row in rows:
        assert row["status"] == "ok" and row["ms_median"] > 0 and row["cpu_per_wall"] > 0 and row["env"]["python"]
        assert row["speedup_vs_1_thread"] == 1.0 if row["io_threads"] == 1 else row["speedup_vs_1_thread"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # the temporary banks are gone


# ---------------------------------------------------------------------------------------------- raw chunk reads
def test_chunk_files_read_directly_equal_zarr_reads(tmp_path: Path) -> None:
    """Catches a direct chunk-file read (the fast path of block loads) that differs from Zarr's own read of the same
    block: the last block is partial (203 ids in blocks of 8), some blocks come from the journal (nvme evictions), some
    from the main arrays, some from the initialiser."""
    bank = _create(tmp_path / "bank", "nvme", 2, cache_blocks=2)
    assert bank._raw_chunks  # noqa: SLF001 - the layout ZarrBank.create writes is the raw one
    bank.write_rows(torch.arange(0, N, 2), torch.randn(len(range(0, N, 2)), D), "centers")
    bank.flush(1)
    bank.write_rows(torch.arange(3, N, 5), torch.randn(len(range(3, N, 5)), D), "momentum")  # evicted: journal
    ids = torch.arange(N)
    direct = {a: bank.read_rows(ids, a) for a in ARRAYS}
    bank._raw_chunks = False  # noqa: SLF001 - the Zarr path, for the reference
    bank._reset_memory()  # noqa: SLF001 - read every block again
    assert bank.stats()["bank/blocks_loaded"] > 0
    for a in ARRAYS:
        assert torch.equal(bank.read_rows(ids, a), direct[a]), a
    bank.close()


def test_only_the_raw_layout_is_read_directly(tmp_path: Path) -> None:
    """Catches the direct read applied to chunks whose bytes are not the rows (a compressed or big-endian array)."""
    import zarr
    from zarr.codecs import BytesCodec

    from offloadfr.bank.layout import _is_raw_layout

    group = zarr.open_group(tmp_path / "g", mode="w")
    raw = group.create_array("raw", shape=(16, D), chunks=(8, D), dtype="float32", compressors=None, filters=None)
    packed = group.create_array("packed", shape=(16, D), chunks=(8, D), dtype="float32")  # zarr's default: zstd
    big = group.create_array("big", shape=(16, D), chunks=(8, D), dtype="float32", compressors=None, filters=None,
                             serializer=BytesCodec(endian="big"))
    assert _is_raw_layout(raw) and not _is_raw_layout(packed) and not _is_raw_layout(big)
