"""The twin heads (dcp, attfc) on 2 real gloo processes (tests/_dist_twin_worker.py): data parallel, with one pool or
queue that every rank holds identically, written with the generated centers of both ranks; and their bank mode, with
the ids partitioned over the ranks' center banks over one global bank."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offloadfr.bank import ZarrBank
from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg
from offloadfr.heads import HeadDeps, build_head
from offloadfr.heads.center_bank import CenterBank
from offloadfr.losses import build_margin
from offloadfr.models import build_backbone
from offloadfr.train.trainer import train_step

from . import _dist_twin_worker as twin_worker
from ._ranks import run_ranks


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dcp", "attfc"])
def test_two_ranks_keep_one_store_written_from_both(tmp_path: Path, kind: str) -> None:
    """Each rank trains on ids of its own half. Catches a pool (dcp) or queue (attfc) written with this rank's centers
    only (the ranks' copies would differ, and hold one half's ids each; F2C's code and MoCo all-gather them), and twin
    networks that drift apart. Both ranks must end with the same store bit for bit, holding ids of both halves."""
    run_ranks([sys.executable, "-m", "tests._dist_twin_worker", str(tmp_path), kind], 2, timeout_s=240,
              what=f"{kind} 2-process workers")
    r0, r1 = (torch.load(tmp_path / f"{kind}_rank{r}.pt", weights_only=False) for r in range(2))
    for key, value in r0["store"].items():
        assert torch.equal(value, r1["store"][key]), f"the ranks' {kind} stores differ in {key}"
    ids = r0["store"]["labels"][r0["store"]["labels"] >= 0]
    assert (ids < 12).any() and (ids >= 12).any(), f"the {kind} store holds one rank's ids only: {ids.tolist()}"
    for a, b in zip(r0["twin"] + r0["backbone"], r1["twin"] + r1["backbone"], strict=True):
        assert torch.equal(a, b)
    assert all(math.isfinite(x) for x in r0["losses"] + r1["losses"])


def _one_process_steps(kind: str, tmp_path: Path, steps: int, *, state: dict | None = None
                       ) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """``steps`` trainer steps of the bank-mode head on 1 process over ``tmp_path/bank`` (after loading ``state``);
    returns the head (closed), what its center bank read and wrote per step, and its state after the flush."""
    engine, head = twin_worker.build(kind, tmp_path, 0, 1, bank=True)
    if state is not None:
        head.load_state_dict(state)
    record = twin_worker.record_bank(head.center_bank)
    g = torch.Generator().manual_seed(7)
    start = head.center_bank.num_steps
    for _ in range(steps):
        images_u8, labels, dual = twin_worker._batch(kind, 0, g, every_id=True)
        assert train_step(engine, head, images_u8, labels, 0.1, torch.device("cpu"), dual=dual)[2]
    head.prepare(start + steps)
    saved = head.state_dict()
    head.commit(start + steps)
    head.close()
    return head, record["write"], saved


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dcp", "attfc"])
def test_bank_mode_on_two_ranks_reads_and_writes_one_global_bank(tmp_path: Path, kind: str) -> None:
    """Bank mode on 2 gloo ranks with the trainer's lookahead, resumed from a 1-process checkpoint and resumed again
    on 1 process. Catches: a rank appending other bank columns than the other (the losses would use different
    negatives), a rank reading only its own share (n/2 columns), negatives read from rows older than the newest
    write (a write that missed the container, or a row read before its write-back), a rank writing another rank's
    chunks or the centers of its own batch only (the global bank would differ from the 1-process bank given the same
    writes), a checkpoint of W = 2 that does not load on 1 (or of 1 on 2), and the seen bitmap lost on a resume."""
    _, first_writes, start = _one_process_steps(kind, tmp_path, twin_worker.START_STEP)
    torch.save(start, tmp_path / "start.pt")
    run_ranks([sys.executable, "-m", "tests._dist_twin_worker", str(tmp_path), kind, "bank"], 2, timeout_s=240,
              what=f"{kind} bank-mode 2-process workers")
    r0, r1 = (torch.load(tmp_path / f"{kind}_bank_rank{r}.pt", weights_only=False) for r in range(2))
    for key, value in r0["store"].items():
        assert torch.equal(value, r1["store"][key]), f"the ranks' {kind} stores differ in {key}"
    latest: dict[int, torch.Tensor] = {}  # id -> its newest center, as the bank must hold it

    def written(writes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for ids, rows in writes:
            for i, row in zip(ids.tolist(), rows, strict=True):
                latest[i] = row

    written(first_writes)
    half = twin_worker.NUM_CLASSES // 2
    assert len(r0["bank"]["read"]) == len(r1["bank"]["read"]) == twin_worker.BANK_STEPS
    for step, ((ids, rows), (ids1, rows1)) in enumerate(zip(r0["bank"]["read"], r1["bank"]["read"], strict=True)):
        assert torch.equal(ids, ids1) and torch.equal(rows, rows1), f"step {step}: the ranks appended other columns"
        assert ids.numel() == twin_worker.BANK_NEGATIVES and ids.unique().numel() == ids.numel(), ids
        assert (ids[:3] < half).all() and (ids[3:] >= half).all(), f"not 3 ids of each rank in rank order: {ids}"
        for i, row in zip(ids.tolist(), rows, strict=True):
            assert torch.equal(row, latest[i]), f"step {step}: the negative {i} is not its newest center"
        (w0, c0), (w1, c1) = r0["bank"]["write"][step], r1["bank"]["write"][step]
        assert torch.equal(w0, w1) and torch.equal(c0, c1), "the ranks wrote other centers"
        assert (w0 < half).any() and (w0 >= half).any()  # the global batch's centers, of both ranks' ranges
        written([(w0, c0)])
    assert "prefetch/stall(%)" in r0["metrics"] and r0["metrics"]["bank/seen"] == len(latest)

    everything = torch.arange(twin_worker.NUM_CLASSES)
    bank = ZarrBank.open(tmp_path / "bank", read_only=True)
    assert bank.step == twin_worker.START_STEP + twin_worker.BANK_STEPS
    on_two = bank.read_rows(everything)
    bank.close()
    for i, row in latest.items():
        assert torch.equal(on_two[i], row), f"the bank's row {i} is not its newest center"
    # The same writes through 1 process: the same bank, the never-written rows included
    deps = HeadDeps(margin=build_margin(LossCfg()), num_classes=twin_worker.NUM_CLASSES, dim=twin_worker.DIM,
                    device=torch.device("cpu"), bank=BankCfg(chunk_rows=4), cache=CacheCfg(),
                    bank_path=tmp_path / "replay")
    replay = CenterBank(deps, head_kind=kind, num_negatives=twin_worker.BANK_NEGATIVES)
    for ids, rows in first_writes + [w for w in r0["bank"]["write"]]:
        replay.write(ids, rows)
    replay.prepare(1)
    replay.commit(1)
    assert torch.equal(replay.bank.read_rows(everything), on_two)
    replay.close()

    # 2 -> 1: the state saved by 2 ranks loads on 1 process and trains on from the same bank
    saved_seen = r0["state"]["center_bank._extra_state"]["seen"].numpy()
    assert set(np.flatnonzero(np.unpackbits(saved_seen, count=twin_worker.NUM_CLASSES)).tolist()) == set(latest)
    head, _, _ = _one_process_steps(kind, tmp_path, 1, state=r0["state"])
    assert head.center_bank.last_ids.numel() == twin_worker.BANK_NEGATIVES


@pytest.mark.parametrize("kind", ["dcp", "attfc"])
def test_bank_mode_builds_on_several_processes(kind: str, tmp_path: Path) -> None:
    """Catches bank mode refused on W processes again, and each rank's share of the n negatives: n = 5 over 2 ranks
    is 3 + 2 (the first n % W ranks take one more), so that every rank appends n columns in all. One process plays
    each rank in turn (no process group: the bank's turns are no-ops)."""
    shares = []
    for rank in range(2):
        deps = HeadDeps(margin=build_margin(LossCfg()), num_classes=40, dim=8, device=torch.device("cpu"),
                        bank=BankCfg(chunk_rows=4), cache=CacheCfg(), bank_path=tmp_path / "bank", rank=rank,
                        world_size=2, backbone=build_backbone("tiny", embedding_size=8, image_size=16))
        head = build_head(HeadCfg(kind=kind, bank_negatives=5), deps)
        center_bank = head.center_bank
        assert center_bank is not None
        assert (center_bank.partition.class_start, center_bank.partition.class_end) == ((0, 20), (20, 40))[rank]
        assert center_bank.pointer == center_bank.partition.class_start
        shares.append(center_bank.share)
        head.close()
    assert shares == [3, 2]
