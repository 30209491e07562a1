"""``bank.dtype = "bfloat16"``: rows stored and moved in bfloat16, updated in float32 on the device, rounded once per
write-back (docs/bank.md#bank-dtype).

Sizes follow STYLE R10: N=37 ids in 8-row blocks (the last block is partial), D=8.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from offloadfr.bank import MemoryBank, ZarrBank, initial_rows, open_bank
from offloadfr.bank.base import ClassBank
from offloadfr.bank.dtypes import from_storage, round_rows, to_storage
from offloadfr.bank.ram_tier import check_ram_fits
from offloadfr.bank.testing import BankContract
from offloadfr.cache import DynamicClassContainer, Prefetcher
from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, load_config
from offloadfr.errors import BankError, ConfigError
from offloadfr.heads import HeadDeps, build_head
from offloadfr.losses import build_margin

from .conftest import DEVICE

N, D, R = 37, 8, 8
ARRAYS = ("centers", "momentum")
BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------- contract


class TestMemoryBankBfloat16(BankContract):
    persistent = False
    bank_dtype = "bfloat16"

    def make_bank(self, tmp_path: Path, num_classes: int, dim: int, arrays: tuple[str, ...]) -> ClassBank:
        return MemoryBank(num_classes, dim, arrays, seed=self.seed, init_std=self.init_std, dtype=self.bank_dtype)

    def reopen(self, bank: ClassBank, tmp_path: Path, *, read_only: bool = False) -> ClassBank:
        import copy

        view = copy.copy(bank)
        view.read_only = read_only
        return view


class TestZarrBankRamBfloat16(BankContract):
    tier = "ram"
    bank_dtype = "bfloat16"

    def make_bank(self, tmp_path: Path, num_classes: int, dim: int, arrays: tuple[str, ...]) -> ClassBank:
        return ZarrBank.create(tmp_path / "bank", num_classes=num_classes, dim=dim, arrays=arrays, head_kind="pfc",
                               chunk_rows=R, seed=self.seed, init_std=self.init_std, tier=self.tier, cache_blocks=2,
                               dtype=self.bank_dtype)

    def reopen(self, bank: ClassBank, tmp_path: Path, *, read_only: bool = False) -> ClassBank:
        bank.close()
        return ZarrBank.open(tmp_path / "bank", tier=self.tier, read_only=read_only, cache_blocks=2)


class TestZarrBankNvmeBfloat16(TestZarrBankRamBfloat16):
    """The nvme tier with a 2-block cache, so nearly every call evicts a bfloat16 block to the journal."""

    tier = "nvme"


# ---------------------------------------------------------------------------------------------- storage


def _create(tmp_path: Path, tier: str = "ram", dtype: str = "bfloat16", name: str = "bank") -> ZarrBank:
    return ZarrBank.create(tmp_path / name, num_classes=N, dim=D, arrays=ARRAYS, head_kind="partial_fc",
                           chunk_rows=R, seed=3, init_std=0.02, tier=tier, cache_blocks=2, dtype=dtype)


@pytest.mark.parametrize("chunk_rows", [8, 5, 37])
def test_initial_rows_are_the_same_rounded_rows_on_every_bank(tmp_path: Path, chunk_rows: int) -> None:
    """Catches the initialiser rounded differently (or not at all) on one tier, a block size, or in MemoryBank: a
    row would change value the first time it is written back."""
    want = initial_rows(torch.arange(N), D, seed=3, std=0.02).to(BF16)
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    for tier in ("ram", "nvme"):
        bank = ZarrBank.create(tmp_path / f"{tier}{chunk_rows}", num_classes=N, dim=D, arrays=ARRAYS,
                               head_kind="partial_fc", chunk_rows=chunk_rows, seed=3, init_std=0.02, tier=tier,
                               cache_blocks=2, dtype="bfloat16")
        assert torch.equal(bank.read_rows(ids), want[ids])
        bank.close()
    assert torch.equal(MemoryBank(N, D, ARRAYS, seed=3, init_std=0.02, dtype="bfloat16").read_rows(ids), want[ids])


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_rows_are_stored_as_bfloat16_bits_at_half_the_bytes(tmp_path: Path, tier: str) -> None:
    """Catches a bfloat16 bank that writes float32 chunks, or bits that plain Zarr plus the recorded dtype do not
    read back as the bank's rows (the layout must be readable without offloadfr)."""
    bank = _create(tmp_path, tier)
    rows = torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    bank.write_rows(torch.arange(N), rows)
    bank.flush(3)
    bank.close()
    root = tmp_path / "bank"
    attrs = json.loads((root / "zarr.json").read_text())["attributes"]
    assert attrs["dtype"] == "bfloat16"
    array = zarr.open_array(zarr.storage.LocalStore(root / "centers", read_only=True))
    assert array.dtype == np.uint16 and array.attrs["offloadfr_dtype"] == "bfloat16"
    assert (root / "centers" / "c" / "0" / "0").stat().st_size == R * D * 2
    stored = from_storage(np.ascontiguousarray(array[:]), "bfloat16")
    assert torch.equal(stored, rows.to(BF16))
    reopened = ZarrBank.open(root, tier=tier, read_only=True)
    assert reopened.dtype == BF16 and torch.equal(reopened.read_rows(torch.arange(N)), rows.to(BF16))
    reopened.close()


def test_storage_views_round_trip_without_copies() -> None:
    """Catches a conversion that copies (and so detaches a staged block from its rows) or scrambles the bits."""
    rows = torch.randn(5, D).to(BF16)
    stored = to_storage(rows)
    assert stored.dtype == np.uint16 and stored.ctypes.data == rows.data_ptr()
    assert torch.equal(from_storage(stored, "bfloat16"), rows)
    assert to_storage(rows.float()).dtype == np.float32


@pytest.mark.parametrize(("made", "asked"), [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_open_bank_refuses_another_dtype(tmp_path: Path, made: str, asked: str) -> None:
    """Catches a run that opens a bank with another bank.dtype than it was created with (its rows would be read as
    the wrong type, or the run would silently keep the other precision)."""
    cfg = BankCfg(tier="nvme", chunk_rows=R, dtype=made)
    bank = open_bank(cfg, path=tmp_path / "bank", num_classes=N, dim=D, arrays=ARRAYS, head_kind="partial_fc")
    bank.write_rows(torch.tensor([4]), torch.ones(1, D))
    bank.flush(1)
    bank.close()
    with pytest.raises(BankError, match=f"dtype='{made}' but this run needs dtype='{asked}'"):
        open_bank(BankCfg(tier="nvme", chunk_rows=R, dtype=asked), path=tmp_path / "bank", num_classes=N, dim=D,
                  arrays=ARRAYS, head_kind="partial_fc")
    again = open_bank(cfg, path=tmp_path / "bank", num_classes=N, dim=D, arrays=ARRAYS, head_kind="partial_fc")
    assert again.step == 1 and torch.equal(again.read_rows(torch.tensor([4])).float(), torch.ones(1, D))
    again.close()


def test_bad_dtypes_are_refused(tmp_path: Path) -> None:
    """Catches an unknown dtype accepted at creation, in the config, or in a bank's attributes."""
    with pytest.raises(BankError, match="float16"):
        _create(tmp_path, dtype="float16")
    with pytest.raises(BankError, match="float16"):
        MemoryBank(N, D, dtype="float16")
    with pytest.raises(ConfigError, match="bank.dtype"):
        load_config(None, ["bank.dtype=float16"])
    assert load_config(None, ["bank.dtype=bfloat16"]).bank.dtype == "bfloat16"
    _create(tmp_path).close()
    meta = tmp_path / "bank" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["dtype"] = "float64"
    meta.write_text(json.dumps(doc))
    with pytest.raises(BankError, match="float64"):
        ZarrBank.open(tmp_path / "bank")


def test_ram_check_counts_two_bytes_per_value() -> None:
    """Catches the host-memory check refusing a bfloat16 ram bank that fits (it needs half of float32's)."""
    need_fp32 = 1000 * 512 * 4 * 2
    check_ram_fits(num_classes=1000, dim=512, num_arrays=2, available=need_fp32, dtype="bfloat16")
    with pytest.raises(BankError, match="float32"):
        check_ram_fits(num_classes=1000, dim=512, num_arrays=2, available=need_fp32, dtype="float32")


# ---------------------------------------------------------------------------------------------- rounding


def test_stochastic_rounding_is_unbiased_seeded_and_exact_on_representable_values() -> None:
    """Catches a stochastic rounding that is biased (small updates would drift or vanish as with round-to-nearest),
    not reproducible from its seed, changes values bfloat16 holds exactly, or breaks non-finite values."""
    x = torch.full((200_000,), 1.0 + 2.0**-10)  # a quarter of bfloat16's step above 1
    assert torch.equal(round_rows(x, BF16), torch.ones_like(x, dtype=BF16))  # nearest loses the whole update
    for sign in (1.0, -1.0):
        got = round_rows(sign * x, BF16, rounding="stochastic", generator=torch.Generator().manual_seed(0))
        assert set(got.float().unique().tolist()) == {sign * 1.0, sign * (1.0 + 2.0**-7)}
        assert abs(float(got.double().mean()) - sign * (1.0 + 2.0**-10)) < 2e-5
    a = round_rows(x, BF16, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    b = round_rows(x, BF16, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    c = round_rows(x, BF16, rounding="stochastic", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    exact = torch.randn(1000).to(BF16).float()
    assert torch.equal(round_rows(exact, BF16, rounding="stochastic"), exact.to(BF16))
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    got = round_rows(special, BF16, rounding="stochastic").float()
    assert torch.equal(got[:2], special[:2]) and bool(got[2].isnan()) and torch.equal(got[3:], special[3:])
    assert round_rows(x, torch.float32, rounding="stochastic") is x
    with pytest.raises(ValueError, match="rounding"):
        round_rows(x, BF16, rounding="down")


# ---------------------------------------------------------------------------------------------- the prefetcher


class _RecordingBank(MemoryBank):
    """A bfloat16 MemoryBank that keeps the dtype of every batch of rows written to it."""

    def __init__(self) -> None:
        super().__init__(N, D, ARRAYS, seed=3, init_std=0.02, dtype="bfloat16")
        self.written_dtypes: list[torch.dtype] = []

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor, array: str = "centers") -> None:
        self.written_dtypes.append(rows.dtype)
        super().write_rows(ids, rows, array)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_prefetcher_moves_rows_narrow_and_rounds_once_per_write_back(rounding: str) -> None:
    """Catches float32 rows crossing the host <-> device boundary of a bfloat16 bank (twice the bytes), a
    container that is not float32, evicted rows rounded otherwise than promised, and a checkpoint after which the
    resident rows differ from the bank's (a resumed run would start from other rows than the uninterrupted one)."""
    bank = _RecordingBank()
    dcc = DynamicClassContainer(8, D, arrays=ARRAYS, device=DEVICE)
    pf = Prefetcher(bank, dcc, arrays=ARRAYS, rounding=rounding, seed=1)
    assert pf.dtype == BF16 and dcc["centers"].dtype == torch.float32
    step_ids = [torch.arange(8 * t, 8 * t + 8) % N for t in range(4)]
    evicted: dict[int, torch.Tensor] = {}
    for t, ids in enumerate(step_ids):
        pf.submit(ids, t)
        if t:  # the rows of the previous step are about to be evicted: record them (float32, updated below)
            slots = dcc.slots_of(step_ids[t - 1])
            evicted.update(zip(step_ids[t - 1].tolist(), dcc["centers"][slots].cpu(), strict=True))
        pf.ready(t)
        slots = dcc.slots_of(ids)
        dcc["centers"][slots] += 1e-4 * torch.randn(8, D, generator=torch.Generator().manual_seed(t)).to(DEVICE)
    pf.flush()
    metrics = pf.metrics()
    assert metrics["bank/bytes_read"] == metrics["bank/rows_read"] * D * 2 * 2  # 2 arrays, 2 bytes per value
    assert set(bank.written_dtypes) == {BF16}
    for i, before in evicted.items():
        got = bank.read_rows(torch.tensor([i]))[0].float()
        if rounding == "nearest":
            assert torch.equal(got, before.to(BF16).float())
        else:  # one of the two bfloat16 neighbours
            low, high = torch.minimum(got, before), torch.maximum(got, before)
            assert bool(((high - low) <= before.abs() * 2.0**-7).all())
    pf.write_back_all()
    used = torch.nonzero(dcc.valid_K).reshape(-1)
    ids = dcc.slot_ids_K[used].cpu()
    assert torch.equal(dcc["centers"][used].cpu(), bank.read_rows(ids).float())
    pf.close()


# ---------------------------------------------------------------------------------------------- partial_fc


def _deps(tmp_path: Path, *, tier: str, dtype: str) -> HeadDeps:
    return HeadDeps(margin=build_margin(LossCfg(kind="arcface", s=16.0, arcface_m=0.3)), num_classes=N, dim=D,
                    device=DEVICE, bank=BankCfg(tier=tier, seed=5, chunk_rows=R, cache_blocks=2, dtype=dtype),
                    cache=CacheCfg(num_slots=24, lookahead=1), bank_path=tmp_path / "bank")


def _train(head: torch.nn.Module, steps: int) -> list[float]:
    """A linear 'backbone' and the head trained together, plans one batch ahead (rows cycle through 24 slots)."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(12, D).to(DEVICE)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 12, generator=gen), torch.randint(0, N, (6,), generator=gen)) for _ in range(steps)]
    head.plan(batches[0][1])
    losses = []
    for t, (x, labels) in enumerate(batches):
        if t + 1 < steps:
            head.plan(batches[t + 1][1])
        loss = head(backbone(x.to(DEVICE)), labels.to(DEVICE))
        loss.backward()
        opt.step()
        opt.zero_grad()
        head.update(lr=0.05)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_partial_fc_trains_on_a_bfloat16_bank_as_on_float32(tmp_path: Path, tier: str) -> None:
    """Catches a bfloat16 bank that changes training beyond its rounding: rows updated in bfloat16 on the device,
    rounded every step instead of once per write-back, momentum lost in the narrow copy, or rows scrambled by the
    bit views. 30 steps with every id cycling through 24 slots: losses within 3 %, final rows within bfloat16's
    precision of the float32 run's, and the bank on disk in bfloat16."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        head = build_head(HeadCfg(kind="partial_fc"), _deps(tmp_path / dtype, tier=tier, dtype=dtype))
        assert head.dcc["centers"].dtype == torch.float32
        losses = _train(head, 30)
        head.flush(30)
        assert head.bank.dtype == (BF16 if dtype == "bfloat16" else torch.float32)
        rows = head.bank.read_rows(torch.arange(N)).float()
        momentum = head.bank.read_rows(torch.arange(N), "momentum").float()
        head.close()
        runs[dtype] = (torch.tensor(losses), rows, momentum)
    (loss32, rows32, mom32), (loss16, rows16, mom16) = runs["float32"], runs["bfloat16"]
    assert torch.allclose(loss16, loss32, rtol=3e-2, atol=0)
    init = initial_rows(torch.arange(N), D, seed=5, std=0.01)
    assert bool(((rows32 - init).abs().amax(dim=1) > 0).all())  # every row trained
    assert float((rows16 - rows32).norm() / rows32.norm()) < 2e-2
    assert float((mom16 - mom32).norm() / mom32.norm()) < 5e-2
    attrs = json.loads((tmp_path / "bfloat16" / "bank" / "zarr.json").read_text())["attributes"]
    assert attrs["dtype"] == "bfloat16"


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_chunk_file_reads_equal_zarr_reads(tmp_path: Path, tier: str) -> None:
    """Catches the direct chunk-file read decoding bfloat16 bits differently from Zarr's own read path (the bank
    falls back to it for any other layout)."""
    bank = _create(tmp_path, tier)
    assert bank._raw_chunks  # noqa: SLF001 - the uint16 layout is read from the chunk files
    ids = torch.arange(N)
    rows = torch.randn(N, D, generator=torch.Generator().manual_seed(4))
    bank.write_rows(ids[::2], rows[::2])
    bank.write_rows(ids[1::3], -rows[1::3], "momentum")
    bank.flush(1)
    bank._reset_memory()  # noqa: SLF001 - read every block again
    direct = {a: bank.read_rows(ids, a) for a in ARRAYS}
    bank._raw_chunks = False  # noqa: SLF001 - the Zarr path, for the reference
    bank._reset_memory()  # noqa: SLF001
    for a in ARRAYS:
        assert torch.equal(bank.read_rows(ids, a), direct[a]), a
    assert torch.equal(direct["centers"][::2], rows[::2].to(BF16))
    bank.close()
