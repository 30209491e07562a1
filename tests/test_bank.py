"""Tests of the class-center bank: the contract for every implementation, plus ZarrBank's storage guarantees.

Sizes follow STYLE R10: N=37 ids in 8-row blocks (the last block is partial), D=8.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from offloadfr.bank import MemoryBank, ZarrBank, auto_chunk_rows, initial_rows, open_bank
from offloadfr.bank.base import ClassBank
from offloadfr.bank.init import initial_block, initial_rows_np
from offloadfr.bank.testing import BankContract
from offloadfr.config import BankCfg
from offloadfr.errors import BankError

N, D, R = 37, 8, 8
ARRAYS = ("centers", "momentum")


def _du(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks, so sparse files count at their real size)."""
    return sum(os.stat(os.path.join(root, f)).st_blocks * 512 for root, _, files in os.walk(path) for f in files)


def _create(tmp_path: Path, tier: str = "ram", **kwargs: object) -> ZarrBank:
    args: dict[str, object] = {"num_classes": N, "dim": D, "arrays": ARRAYS, "head_kind": "partial_fc",
                               "chunk_rows": R, "seed": 3, "init_std": 0.02, "tier": tier, "cache_blocks": 2}
    args.update(kwargs)
    return ZarrBank.create(tmp_path / "bank", **args)  # type: ignore[arg-type]


def _rows(num: int, value: float) -> torch.Tensor:
    return torch.full((num, D), value, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- contract


class TestMemoryBank(BankContract):
    persistent = False

    def make_bank(self, tmp_path: Path, num_classes: int, dim: int, arrays: tuple[str, ...]) -> ClassBank:
        return MemoryBank(num_classes, dim, arrays, seed=self.seed, init_std=self.init_std)

    def reopen(self, bank: ClassBank, tmp_path: Path, *, read_only: bool = False) -> ClassBank:
        # Nothing persists; a read-only view over the same tensors stands in for "the same storage".
        view = copy.copy(bank)
        view.read_only = read_only
        return view


class TestZarrBankRam(BankContract):
    tier = "ram"

    def make_bank(self, tmp_path: Path, num_classes: int, dim: int, arrays: tuple[str, ...]) -> ClassBank:
        return ZarrBank.create(tmp_path / "bank", num_classes=num_classes, dim=dim, arrays=arrays, head_kind="pfc",
                               chunk_rows=R, seed=self.seed, init_std=self.init_std, tier=self.tier, cache_blocks=2)

    def reopen(self, bank: ClassBank, tmp_path: Path, *, read_only: bool = False) -> ClassBank:
        bank.close()
        return ZarrBank.open(tmp_path / "bank", tier=self.tier, read_only=read_only, cache_blocks=2)


class TestZarrBankNvme(TestZarrBankRam):
    """The nvme tier with a 2-block cache, so nearly every call evicts (5 blocks per array)."""

    tier = "nvme"


# ---------------------------------------------------------------------------------------------- initialiser


def test_initial_rows_depend_only_on_seed_and_id() -> None:
    """Catches an initialiser whose row values depend on the batch, order, position or block they come in."""
    ids = np.random.default_rng(0).integers(0, 100_000_000, 300)
    full = initial_rows_np(ids, 37, seed=5, std=0.01)
    for k in (0, 1, 150, 299):
        assert np.array_equal(initial_rows_np(ids[k : k + 1], 37, seed=5, std=0.01)[0], full[k])
    perm = np.random.default_rng(1).permutation(300)
    assert np.array_equal(initial_rows_np(ids[perm], 37, seed=5, std=0.01), full[perm])
    block = initial_block("centers", 1000, 1037, 37, seed=5, std=0.01)
    assert np.array_equal(block, initial_rows_np(np.arange(1000, 1037), 37, seed=5, std=0.01))
    assert np.array_equal(initial_rows_np(ids, 36, seed=5, std=0.01), full[:, :36])  # a row's prefix is stable
    assert torch.equal(initial_rows(torch.from_numpy(ids), 37, seed=5, std=0.01), torch.from_numpy(full))


def test_initial_rows_are_normal_and_seeded() -> None:
    """Catches a wrong std, a non-normal shape (e.g. uniform), or seeds that give the same or correlated rows."""
    rows = initial_rows(torch.arange(4000), 512, seed=0, std=0.01).double()
    assert abs(float(rows.mean())) < 1e-4
    assert abs(float(rows.std()) - 0.01) < 2e-4
    kurtosis = float(((rows / rows.std()) ** 4).mean())
    assert 2.9 < kurtosis < 3.1  # 1.8 for a uniform
    other = initial_rows(torch.arange(4000), 512, seed=1, std=0.01).double()
    assert abs(float(torch.corrcoef(torch.stack([rows.flatten(), other.flatten()]))[0, 1])) < 0.01
    assert not torch.equal(initial_rows(torch.tensor([7]), 8, seed=0, std=1.0),
                           initial_rows(torch.tensor([8]), 8, seed=0, std=1.0))
    assert np.array_equal(initial_block("momentum", 0, 5, 8, seed=0, std=0.01), np.zeros((5, 8), np.float32))


@pytest.mark.parametrize("chunk_rows", [8, 5, 0])
def test_memory_and_zarr_banks_give_identical_initial_rows(tmp_path: Path, chunk_rows: int) -> None:
    """Catches ZarrBank's block-wise init disagreeing with MemoryBank's (e.g. a value that depends on chunk_rows)."""
    mem = MemoryBank(N, D, ARRAYS, seed=3, init_std=0.02)
    for tier in ("ram", "nvme"):
        bank = ZarrBank.create(tmp_path / tier, num_classes=N, dim=D, arrays=ARRAYS, head_kind="pfc",
                               chunk_rows=chunk_rows, seed=3, init_std=0.02, tier=tier, cache_blocks=2)
        ids = torch.randperm(N)
        for array in ARRAYS:
            assert torch.equal(bank.read_rows(ids, array), mem.read_rows(ids, array))
        bank.close()


# ---------------------------------------------------------------------------------------------- ZarrBank


def test_create_100m_ids_is_instant_and_lazy(tmp_path: Path) -> None:
    """Catches creation that writes or allocates per id (a 100M x 512 bank must take < 2 s and < 100 MB)."""
    n, dim = 100_000_000, 512
    start = time.perf_counter()
    bank = ZarrBank.create(tmp_path / "big", num_classes=n, dim=dim, arrays=ARRAYS, head_kind="partial_fc",
                           tier="nvme", cache_blocks=4)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"creating the bank took {elapsed:.2f} s"
    assert _du(tmp_path) < 100e6
    assert bank.chunk_rows == auto_chunk_rows(n, dim) == 1024
    ids = torch.tensor([n - 1, 0, 57_123_456, 1024, 99_999_000])
    expect = initial_rows(ids, dim, seed=0, std=0.01)
    assert torch.equal(bank.read_rows(ids), expect)
    assert torch.equal(bank.read_rows(ids, "momentum"), torch.zeros(5, dim))
    bank.write_rows(ids[:1], torch.ones(1, dim))
    bank.flush(0)
    bank.close()
    assert _du(tmp_path) < 100e6
    bank = ZarrBank.open(tmp_path / "big", tier="nvme", cache_blocks=4)
    assert torch.equal(bank.read_rows(ids[1:]), expect[1:])
    assert torch.equal(bank.read_rows(ids[:1]), torch.ones(1, dim))
    bank.close()


def test_attributes_and_layout(tmp_path: Path) -> None:
    """Catches missing group attributes, compressed or sharded chunks, or chunks written for untouched blocks."""
    import zarr

    bank = _create(tmp_path)
    bank.write_rows(torch.tensor([9, 36]), _rows(2, 1.0))
    bank.flush(4)
    bank.close()
    group = zarr.open_group(str(tmp_path / "bank"), mode="r")
    attrs = group.attrs.asdict()
    assert {k: attrs[k] for k in ("head_kind", "num_classes", "dim", "dtype", "chunk_rows", "init_seed", "init_std",
                                   "format_version", "step", "arrays")} == {
        "head_kind": "partial_fc", "num_classes": N, "dim": D, "dtype": "float32", "chunk_rows": R, "init_seed": 3,
        "init_std": 0.02, "format_version": 1, "step": 4, "arrays": list(ARRAYS)}
    arr = group["centers"]
    assert arr.shape == (N, D) and arr.chunks == (R, D) and arr.dtype == np.float32
    assert arr.compressors == () and arr.shards is None
    chunk_dir = tmp_path / "bank" / "centers" / "c"
    assert sorted(int(p.name) for p in chunk_dir.iterdir()) == [1, 4]  # only the written blocks
    assert (chunk_dir / "1" / "0").stat().st_size == R * D * 4  # uncompressed
    assert np.array_equal(arr[8:16][1], np.ones(D, np.float32))  # plain zarr readers see the flushed rows
    momentum_chunks = tmp_path / "bank" / "momentum" / "c"
    assert not momentum_chunks.exists() or not any(momentum_chunks.iterdir())


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_written_block_equal_to_fill_value_stays_written(tmp_path: Path, tier: str) -> None:
    """Catches "was this block written?" decided by its values: an all-zero centers block must not re-initialise."""
    bank = _create(tmp_path, tier)
    bank.write_rows(torch.arange(8, 16), torch.zeros(8, D))  # a whole block of the fill value
    bank.write_rows(torch.arange(16, 24), _rows(8, 5.0), "momentum")
    bank.flush(1)
    bank.close()
    bank = ZarrBank.open(tmp_path / "bank", tier=tier)
    assert torch.equal(bank.read_rows(torch.arange(8, 16)), torch.zeros(8, D))
    assert torch.equal(bank.read_rows(torch.arange(16, 24), "momentum"), _rows(8, 5.0))
    bank.close()


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_unflushed_writes_are_not_visible_after_reopen(tmp_path: Path, tier: str) -> None:
    """Catches writes (including nvme evictions between flushes) reaching the stored step without a flush."""
    bank = _create(tmp_path, tier)
    bank.write_rows(torch.tensor([0, 20]), _rows(2, 1.0))
    bank.flush(10)
    # Touch every block so the 2-block nvme cache evicts dirty blocks to disk before any flush.
    bank.write_rows(torch.arange(N), _rows(N, 2.0))
    bank.write_rows(torch.arange(N), _rows(N, 3.0), "momentum")
    assert bank.stats()["bank/blocks_staged"] > 0 or tier == "ram"
    bank.close()  # a crash: no flush
    bank = ZarrBank.open(tmp_path / "bank", tier=tier)
    assert bank.step == 10
    assert torch.equal(bank.read_rows(torch.tensor([0, 20])), _rows(2, 1.0))
    rest = torch.tensor([1, 19, 36])
    assert torch.equal(bank.read_rows(rest), initial_rows(rest, D, seed=3, std=0.02))
    assert torch.equal(bank.read_rows(torch.arange(N), "momentum"), torch.zeros(N, D))
    bank.close()


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_flush_interrupted_before_commit_keeps_old_step_and_rows(tmp_path: Path, tier: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a flush that records its step before its rows, or leaves a mix of two steps after a crash."""
    bank = _create(tmp_path, tier)
    bank.write_rows(torch.arange(N), _rows(N, 1.0))
    bank.flush(1)
    bank.write_rows(torch.arange(N), _rows(N, 2.0))

    def crash(self: ZarrBank, updates: dict[str, object]) -> None:
        raise OSError("simulated crash before the attribute write")

    monkeypatch.setattr(ZarrBank, "_write_attrs", crash)
    with pytest.raises(OSError, match="simulated"):
        bank.flush(2)
    assert bank.step == 1
    monkeypatch.undo()
    bank.close()
    bank = ZarrBank.open(tmp_path / "bank", tier=tier)
    assert bank.step == 1
    assert torch.equal(bank.read_rows(torch.arange(N)), _rows(N, 1.0))  # all rows of step 1, none of step 2
    bank.close()


@pytest.mark.parametrize("tier", ["ram", "nvme"])
@pytest.mark.parametrize("crash", ["after_prepare", "after_rank0_commit", "none"])
def test_two_ranks_share_one_commit_point(tmp_path: Path, tier: str, crash: str) -> None:
    """Two ranks of one run hold the bank, each writing its own blocks; they prepare in turn, rank 0 commits.
    Catches a commit that moves only rank 0's blocks (a crash before rank 1 takes note would then leave rank 1's
    blocks of the committed step in a journal that the next open discards: a bank at step 2 with rows of step 1),
    and attributes that one rank's stale copy turns back."""
    rank0 = _create(tmp_path, tier)
    rank1 = ZarrBank.open(tmp_path / "bank", tier=tier, cache_blocks=2)
    ids0, ids1 = torch.arange(0, R), torch.arange(R, 2 * R)  # block 0 and block 1
    for step, value in ((1, 1.0), (2, 2.0)):
        rank0.write_rows(ids0, _rows(R, value))
        rank1.write_rows(ids1, _rows(R, -value))
        rank0.prepare(step)
        rank1.prepare(step)
        if step == 2 and crash == "after_prepare":  # the checkpoint of step 2 was written: resolve rolls forward
            break
        rank0.commit(step)
        if step == 2 and crash == "after_rank0_commit":
            break
        rank1.follow_commit(step)
        assert rank0.step == rank1.step == step
    rank0.close()
    rank1.close()
    bank = ZarrBank.open(tmp_path / "bank", tier=tier)
    assert bank.resolve([1, 2]) in ("committed", "nothing pending")
    assert bank.step == 2
    assert torch.equal(bank.read_rows(ids0), _rows(R, 2.0)) and torch.equal(bank.read_rows(ids1), _rows(R, -2.0))
    bank.close()


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_flush_interrupted_after_commit_completes_on_reopen(tmp_path: Path, tier: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a committed flush that is lost or half-applied when the process dies before writing its step."""
    bank = _create(tmp_path, tier)
    bank.write_rows(torch.arange(N), _rows(N, 1.0))
    bank.flush(1)
    bank.write_rows(torch.arange(0, N, 3), _rows(len(range(0, N, 3)), 2.0))
    real = ZarrBank._write_attrs

    def crash_on_step(self: ZarrBank, updates: dict[str, object]) -> None:
        if "step" in updates:
            raise OSError("simulated crash before the step write")
        real(self, updates)

    monkeypatch.setattr(ZarrBank, "_write_attrs", crash_on_step)
    with pytest.raises(OSError, match="simulated"):
        bank.flush(2)
    assert bank.step == 1  # the step attribute is the last write, so it still says 1
    monkeypatch.undo()
    bank.close()
    expect = _rows(N, 1.0)
    expect[0::3] = 2.0
    ro = ZarrBank.open(tmp_path / "bank", read_only=True)  # read-only: reads through the journal
    assert ro.step == 2 and torch.equal(ro.read_rows(torch.arange(N)), expect)
    ro.close()
    bank = ZarrBank.open(tmp_path / "bank", tier=tier)  # read-write: completes the flush
    assert bank.step == 2 and torch.equal(bank.read_rows(torch.arange(N)), expect)
    bank.close()
    bank = ZarrBank.open(tmp_path / "bank", tier=tier, read_only=True)
    assert bank.step == 2 and torch.equal(bank.read_rows(torch.arange(N)), expect)


def test_nvme_reads_each_block_once_and_skips_reads_for_whole_block_writes(tmp_path: Path) -> None:
    """Catches per-row Zarr calls or a read-modify-write when a write replaces a whole block."""
    bank = _create(tmp_path, "nvme", cache_blocks=4)
    bank.write_rows(torch.arange(N), _rows(N, 1.0))  # whole blocks: nothing to read or initialise
    assert bank.stats()["bank/blocks_loaded"] == 0 and bank.stats()["bank/blocks_initialised"] == 0
    bank.flush(1)
    bank.close()
    bank = ZarrBank.open(tmp_path / "bank", tier="nvme", cache_blocks=4)
    bank.read_rows(torch.tensor([9, 15, 8, 9, 12]))  # five ids, one block
    assert bank.stats()["bank/blocks_loaded"] == 1
    bank.write_rows(torch.tensor([10, 11]), _rows(2, 3.0))  # partial write of a cached block: no new read
    assert bank.stats()["bank/blocks_loaded"] == 1
    bank.close()


def test_ram_tier_loads_blocks_on_first_touch(tmp_path: Path) -> None:
    """Catches a ram tier that reads or initialises the whole bank when one block is needed."""
    bank = _create(tmp_path, "ram")
    bank.read_rows(torch.tensor([17, 20]))
    assert bank.stats()["bank/blocks_initialised"] == 1
    bank.read_rows(torch.tensor([17, 20, 23]))
    assert bank.stats()["bank/blocks_initialised"] == 1
    bank.close()


def test_create_and_open_errors(tmp_path: Path) -> None:
    """Catches create overwriting an existing bank or directory, and open of a missing or foreign directory."""
    _create(tmp_path).close()
    with pytest.raises(BankError, match="already exists"):
        _create(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(BankError, match="not an empty directory"):
        ZarrBank.create(tmp_path / "other", num_classes=N, dim=D, arrays=ARRAYS, head_kind="pfc")
    with pytest.raises(BankError, match="no bank at"):
        ZarrBank.open(tmp_path / "missing")
    with pytest.raises(BankError, match="tier"):
        ZarrBank.open(tmp_path / "bank", tier="disk")  # type: ignore[arg-type]
    import zarr

    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(BankError, match="not an offloadfr bank"):
        ZarrBank.open(tmp_path / "plain")
    bank = ZarrBank.open(tmp_path / "bank")
    bank.close()
    with pytest.raises(BankError, match="closed"):
        bank.read_rows(torch.tensor([0]))


def test_open_bank_creates_then_reopens(tmp_path: Path) -> None:
    """Catches open_bank re-creating (wiping) an existing bank, or ignoring the tier of the config."""
    cfg = BankCfg(tier="nvme", chunk_rows=R, seed=3, init_std=0.02, cache_blocks=2)
    kwargs = {"path": str(tmp_path / "bank"), "num_classes": N, "dim": D, "arrays": ARRAYS, "head_kind": "pfc"}
    bank = open_bank(cfg, **kwargs)  # type: ignore[arg-type]
    assert bank.tier == "nvme" and bank.chunk_rows == R and bank.step == -1
    bank.write_rows(torch.tensor([5]), _rows(1, 7.0))
    bank.flush(3)
    bank.close()
    bank = open_bank(BankCfg(tier="ram", chunk_rows=R, seed=3, init_std=0.02), **kwargs)  # type: ignore[arg-type]
    assert bank.tier == "ram" and bank.step == 3
    assert torch.equal(bank.read_rows(torch.tensor([5])), _rows(1, 7.0))
    bank.close()


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("num_classes", 38, "num_classes=37"),
    ("dim", 16, "dim=8"),
    ("arrays", ("centers",), "arrays=('centers', 'momentum')"),
    ("head_kind", "dcp", "head_kind='pfc'"),
])
def test_open_bank_mismatch_names_field_values_and_fix(tmp_path: Path, field: str, value: object,
                                                       shown: str) -> None:
    """Catches a run silently reusing a bank built for another head, size or width."""
    kwargs: dict[str, object] = {"path": str(tmp_path / "bank"), "num_classes": N, "dim": D, "arrays": ARRAYS,
                                 "head_kind": "pfc"}
    open_bank(BankCfg(chunk_rows=R), **kwargs).close()  # type: ignore[arg-type]
    kwargs[field] = value
    with pytest.raises(BankError) as info:
        open_bank(BankCfg(chunk_rows=R), **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert shown in message and f"{field}={value!r}" in message and "bank.path" in message


def test_open_bank_accepts_reordered_arrays_and_warns_on_ignored_seed(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Catches a spurious mismatch on array order, or a silently ignored init seed of an existing bank."""
    kwargs = {"path": str(tmp_path / "bank"), "num_classes": N, "dim": D, "head_kind": "pfc"}
    open_bank(BankCfg(chunk_rows=R, seed=3), arrays=ARRAYS, **kwargs).close()  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="offloadfr.bank.zarr_bank"):
        cfg = BankCfg(chunk_rows=R, seed=4)
        bank = open_bank(cfg, arrays=("momentum", "centers"), **kwargs)  # type: ignore[arg-type]
    assert bank.seed == 3
    assert any("bank.seed=4 is ignored" in rec.getMessage() for rec in caplog.records)
    bank.close()


def test_ram_tier_that_does_not_fit_is_refused_before_training(tmp_path: Path) -> None:
    """Catches a ram-tier bank that would exhaust host memory hours into a run instead of failing up front."""
    from offloadfr.bank.ram_tier import check_ram_fits
    from offloadfr.config import BankCfg

    check_ram_fits(num_classes=1000, dim=512, num_arrays=2, available=10 * 2**30)
    with pytest.raises(BankError, match="bank.tier = 'nvme'"):
        check_ram_fits(num_classes=10_000_000, dim=512, num_arrays=2, available=16 * 2**30)
    with pytest.raises(BankError, match="host memory"):  # 100M x 512 x 2 float32 = 381 GiB: never fits here
        open_bank(BankCfg(tier="ram"), path=tmp_path / "b", num_classes=100_000_000, dim=512,
                  arrays=("centers", "momentum"), head_kind="partial_fc")
    assert not (tmp_path / "b").exists()


def test_ram_tier_check_counts_every_process_on_the_host(tmp_path: Path) -> None:
    """Catches a ram-tier check that counts one rank's share only: 4 ranks on one machine each hold N / 4 ids, so a
    bank whose share fits but whose 4 shares together do not must be refused on every rank, before any allocates."""
    import psutil

    available = psutil.virtual_memory().available
    n = int(1.5 * available / (512 * 4 * 2))  # all of it: 1.5 x what is available; one rank's quarter: 0.375 x
    kwargs = {"num_classes": n, "dim": 512, "arrays": ("centers", "momentum"), "head_kind": "partial_fc",
              "num_processes": 4}
    open_bank(BankCfg(tier="ram"), path=tmp_path / "spread", processes_per_host=1, **kwargs).close()  # 4 hosts
    with pytest.raises(BankError, match=r"\(4 processes on this host\)"):
        open_bank(BankCfg(tier="ram"), path=tmp_path / "one_host", processes_per_host=4, **kwargs)
    assert not (tmp_path / "one_host").exists()


def test_ram_tier_rank_holds_only_its_partition(tmp_path: Path) -> None:
    """Catches a ram tier that allocates (and, with CUDA, pins) the whole bank in every rank of a multi-process run:
    a rank holding ids [R, 3R) must have a 2R-row tensor, serve and flush its rows at the right global ids, and
    refuse ids of other ranks."""
    _create(tmp_path, "ram").close()
    bank = ZarrBank.open(tmp_path / "bank", tier="ram")
    bank.hold_rows(R, 3 * R)
    ids = torch.tensor([R, 2 * R + 1, 3 * R - 1])
    bank.write_rows(ids, _rows(3, 7.0))
    assert bank._tensors["centers"].shape == (2 * R, bank.dim)  # noqa: SLF001 - the allocation is the point
    assert torch.equal(bank.read_rows(ids), _rows(3, 7.0))
    with pytest.raises(BankError, match=rf"outside the ids \[{R}, {3 * R}\)"):
        bank.read_rows(torch.tensor([R - 1]))
    with pytest.raises(BankError, match="before the first read"):
        bank.hold_rows(0, R)
    bank.flush(1)
    bank.close()
    full = ZarrBank.open(tmp_path / "bank", tier="ram")
    assert torch.equal(full.read_rows(ids), _rows(3, 7.0))
    untouched = torch.tensor([R + 1])
    assert torch.equal(full.read_rows(untouched), initial_rows(untouched, full.dim, seed=3, std=0.02))
    with pytest.raises(BankError, match="block boundary"):
        ZarrBank.open(tmp_path / "bank", tier="ram").hold_rows(1, R)
    with pytest.raises(BankError, match="end on one or at 37"):  # a short last block exists only at N
        ZarrBank.open(tmp_path / "bank", tier="ram").hold_rows(R, 2 * R + 3)
    full.close()


@pytest.mark.parametrize(("tier", "dtype"), [("ram", "float32"), ("nvme", "float32"), ("ram", "bfloat16"),
                                             ("nvme", "bfloat16"), ("memory", "float32")])
def test_read_rows_into_fills_the_given_buffer_with_read_rows_values(tmp_path: Path, tier: str, dtype: str) -> None:
    """The prefetcher reads into its own buffer: the rows must be ``read_rows``'s (written and never-written ids,
    repeats, any order), in that very tensor; a buffer of the wrong shape or dtype is refused."""
    n, d = 300, 8
    if tier == "memory":
        bank: ClassBank = MemoryBank(n, d, ("centers",), init_std=0.01, seed=3)
    else:
        bank = ZarrBank.create(tmp_path / "b", num_classes=n, dim=d, arrays=("centers",), head_kind="partial_fc",
                               chunk_rows=64, tier=tier, cache_blocks=2, dtype=dtype)
    bank.write_rows(torch.arange(100, 180), torch.randn(80, d))
    ids = torch.tensor([299, 5, 150, 150, 0, 101, 64, 250])
    out = torch.full((ids.numel(), d), float("nan"), dtype=bank.dtype)
    address = out.data_ptr()
    bank.read_rows_into(ids, out)
    assert out.data_ptr() == address and torch.equal(out, bank.read_rows(ids))
    with pytest.raises(BankError, match="read_rows_into needs"):
        bank.read_rows_into(ids, torch.empty(ids.numel(), d + 1, dtype=bank.dtype))
    if tier != "memory":
        bank.close()


@pytest.mark.parametrize(("tier", "dtype"), [("nvme", "float32"), ("ram", "bfloat16")])
def test_journal_chunk_files_read_the_same_through_zarr(tmp_path: Path, tier: str, dtype: str) -> None:
    """Journal blocks are written as chunk files by the bank itself, not through Zarr: after a flush, Zarr's own API
    must read the rows the bank wrote (a partial last block included), and reopening must too."""
    import zarr

    n, d = 1000, 8  # 4 blocks of 256, the last one 232 rows
    bank = ZarrBank.create(tmp_path / "b", num_classes=n, dim=d, arrays=("centers",), head_kind="partial_fc",
                           chunk_rows=256, tier=tier, cache_blocks=1, dtype=dtype)
    assert bank._raw_chunks  # noqa: SLF001 - the path under test
    ids = torch.cat([torch.arange(0, 256), torch.arange(700, 1000)])
    bank.write_rows(ids, torch.randn(ids.numel(), d))
    bank.flush(1)
    want = bank.read_rows(torch.arange(n))
    bank.close()
    stored = zarr.open_group(str(tmp_path / "b"), mode="r")["centers"][:]
    got = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" \
        else torch.from_numpy(stored)
    written = torch.cat([torch.arange(0, 256), torch.arange(512, 1000)])  # blocks 0, 2, 3; block 1 never written
    assert torch.equal(got[written], want[written]) and not got[256:512].any()  # unwritten: Zarr's fill value
    reopened = ZarrBank.open(tmp_path / "b", tier=tier, read_only=True)
    assert reopened.step == 1 and torch.equal(reopened.read_rows(torch.arange(n)), want)
    reopened.close()


def test_ram_tier_tensors_ask_for_huge_pages(tmp_path: Path) -> None:
    """The ram tier's big tensors are advised into transparent huge pages (where the kernel has THP), and are plain
    pageable memory (the prefetcher copies rows out into its own pinned buffers)."""
    from offloadfr.bank.ram_tier import _advise_huge_pages

    bank = ZarrBank.create(tmp_path / "b", num_classes=8192, dim=512, arrays=("centers",), head_kind="partial_fc",
                           chunk_rows=1024, tier="ram")
    bank.read_rows(torch.arange(10))
    tensor = bank._tensors["centers"]  # noqa: SLF001 - the allocation under test
    assert not tensor.is_pinned()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert _advise_huge_pages(tensor)  # 16 MiB: whole huge pages inside it
    assert not _advise_huge_pages(torch.empty(16))  # no whole huge page inside 64 bytes
    bank.close()
