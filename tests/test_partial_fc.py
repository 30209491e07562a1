"""The offloadable ``partial_fc`` head: exact agreement with ``fc`` when every id fits, and rows cycling through the
device container when they do not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offloadfr.bank import ZarrBank, initial_rows
from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg
from offloadfr.heads import HeadDeps, build_head
from offloadfr.losses import build_margin

from .conftest import DEVICE

C, D, B, IN = 37, 8, 6, 12


def _deps(tmp_path: Path, *, tier: str = "ram", num_slots: int = 0, lookahead: int = 2) -> HeadDeps:
    return HeadDeps(margin=build_margin(LossCfg(kind="arcface", s=16.0, arcface_m=0.3)), num_classes=C, dim=D,
                    device=DEVICE, bank=BankCfg(tier=tier, seed=5, chunk_rows=8, cache_blocks=2),
                    cache=CacheCfg(num_slots=num_slots, lookahead=lookahead), bank_path=tmp_path / "bank")


def _train(head: torch.nn.Module, steps: int, *, lookahead: int) -> list[float]:
    """A linear 'backbone' and a head trained together with plans submitted ``lookahead`` batches ahead."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(IN, D).to(DEVICE)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(B, IN, generator=gen), torch.randint(0, C, (B,), generator=gen)) for _ in range(steps)]
    for t in range(min(lookahead, steps)):
        head.plan(batches[t][1])
    losses = []
    for t, (x, labels) in enumerate(batches):
        if t + lookahead < steps:
            head.plan(batches[t + lookahead][1])
        loss = head(backbone(x.to(DEVICE)), labels.to(DEVICE))
        loss.backward()
        opt.step()
        opt.zero_grad()
        head.update(lr=0.05)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_matches_fc_when_every_id_is_resident(tmp_path: Path, tier: str) -> None:
    """Catches any divergence from fc semantics: a wrong target slot, free slots leaking into the softmax, a row
    update that differs, or momentum not carried with the rows (20 steps, relative difference < 1e-5)."""
    fc = build_head(HeadCfg(kind="fc"), _deps(tmp_path / "fc"))
    pfc = build_head(HeadCfg(kind="partial_fc"), _deps(tmp_path / "pfc", tier=tier))
    ref = _train(fc, 20, lookahead=2)
    got = _train(pfc, 20, lookahead=2)
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0)
    pfc.flush(20)
    rows = pfc.bank.read_rows(torch.arange(C))
    assert torch.allclose(rows, fc.weight.detach().cpu(), rtol=1e-5, atol=1e-7)
    pfc.close()


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_every_active_slot_trains_the_rows_in_place(tmp_path: Path, sample_rate: float) -> None:
    """With every slot active the forward takes the DCC's rows themselves (no ``index_select`` copy) and the update
    runs on them in place; with a sampled subset it takes a copy and scatters back. Either way the update equals
    ``index_select`` + ``sgd_rows_`` + ``index_copy_`` of the same gradient, bit for bit. Catches the copy coming
    back on the every-slot path, a view taken of a subset, and an in-place update that differs from the gathered
    one."""
    from offloadfr.kernels import sgd_rows_

    head = build_head(HeadCfg(kind="partial_fc", sample_rate=sample_rate), _deps(tmp_path))
    labels = torch.tensor([0, 3, 3, 9, 36, 20])
    loss = head(torch.randn(B, D, device=DEVICE), labels.to(DEVICE))
    shares = head._w_AD.data_ptr() == head.dcc["centers"].data_ptr()
    assert shares == (sample_rate == 1.0) and head._active_slots.numel() == int(sample_rate * C)
    loss.backward()
    slots_A, grad_AD = head._active_slots.clone(), head._w_AD.grad.clone()
    w_AD = head.dcc["centers"].index_select(0, slots_A)
    m_KD = head.dcc["momentum"].clone()
    m_KD.normal_()  # non-zero momentum, so that it takes part
    head.dcc["momentum"].copy_(m_KD)
    m_AD = m_KD.index_select(0, slots_A)
    sgd_rows_(w_AD, grad_AD, m_AD, lr=0.1, momentum=head.cfg.momentum, weight_decay=head.cfg.weight_decay)
    head.update(lr=0.1)
    assert torch.equal(head.dcc["centers"].index_select(0, slots_A), w_AD)
    assert torch.equal(head.dcc["momentum"].index_select(0, slots_A), m_AD)
    head.close()


def test_every_id_cycles_through_a_small_container(tmp_path: Path) -> None:
    """Catches negatives that never rotate (ids that are never resident are never trained) and evicted rows that
    are not written back (their updates would be lost)."""
    head = build_head(HeadCfg(kind="partial_fc"), _deps(tmp_path, num_slots=24, lookahead=1))
    init = initial_rows(torch.arange(C), D, seed=5, std=0.01)
    _train(head, 30, lookahead=1)
    assert head.dcc.num_used <= 24
    head.flush(30)
    head.close()
    bank = ZarrBank.open(tmp_path / "bank", read_only=True)
    assert bank.step == 30
    rows = bank.read_rows(torch.arange(C))
    moved = (rows - init).abs().amax(dim=1) > 0
    assert bool(moved.all()), f"ids never trained: {torch.nonzero(~moved).reshape(-1).tolist()}"
    momentum = bank.read_rows(torch.arange(C), "momentum")
    assert bool((momentum.abs().amax(dim=1) > 0).all())


def test_metrics_count_block_reads_since_the_previous_call(tmp_path: Path) -> None:
    """Catches an nvme run whose metrics hide the Zarr block reads it pays for, or count them cumulatively."""
    head = build_head(HeadCfg(kind="partial_fc"), _deps(tmp_path, tier="nvme", num_slots=24, lookahead=1))
    _train(head, 6, lookahead=1)
    head.prefetcher.write_back_all()  # the worker thread is idle from here, so the counters stand still
    first = head.metrics()  # 5 blocks, 2 cached: evicted dirty blocks are staged, then read back from the journal
    assert first["bank/blocks_read"] > 0 and first["bank/blocks_staged"] > 0
    assert first["bank/blocks_read"] == head.bank.stats()["bank/blocks_loaded"]
    assert head.metrics()["bank/blocks_read"] == 0.0  # nothing happened since
    head.close()


def test_sample_rate_keeps_positives_and_trains(tmp_path: Path) -> None:
    """Catches a sampled softmax that drops a positive (its loss would be wrong) or samples free slots."""
    head = build_head(HeadCfg(kind="partial_fc", sample_rate=0.5), _deps(tmp_path))
    labels = torch.tensor([0, 3, 3, 9, 36, 20])
    head.plan(labels)
    loss = head(torch.randn(B, D, device=DEVICE), labels.to(DEVICE))
    active = head._active_slots
    assert active.numel() == int(0.5 * C)
    assert bool(torch.isin(head.dcc.slots_of(labels.to(DEVICE)), active).all())
    assert bool(head.dcc.valid_K[active].all())
    loss.backward()
    head.update(lr=0.1)
    assert torch.isfinite(loss)
    head.close()


def test_open_existing_bank_of_other_size_is_refused(tmp_path: Path) -> None:
    """Catches silently training on a bank made for another dataset."""
    from offloadfr.errors import BankError

    head = build_head(HeadCfg(kind="partial_fc"), _deps(tmp_path))
    head.close()
    deps = _deps(tmp_path)
    deps = HeadDeps(**{**deps.__dict__, "num_classes": C + 1})
    with pytest.raises(BankError, match="num_classes"):
        build_head(HeadCfg(kind="partial_fc"), deps)
