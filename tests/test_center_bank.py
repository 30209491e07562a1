"""Bank mode of the generated-center heads (``head.bank_negatives > 0``, ``heads/center_bank.py``): the rotation over
seen ids, latest-center writes, same-label masking, the two-phase flush and its state, the prefetched reads against
a synchronous reference and the lag of the lookahead, an exact resume, and real runs of ``dcp`` (both tiers) and
``attfc`` through the trainer. The 2-process runs are in tests/test_twin_dist.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offloadfr.bank.zarr_bank import open_bank
from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, load_config
from offloadfr.errors import CheckpointError
from offloadfr.heads import HeadDeps, build_head
from offloadfr.heads.center_bank import CenterBank
from offloadfr.losses import build_margin
from offloadfr.train.trainer import with_lookahead

from .conftest import DEVICE
from .test_attfc import _batch as _attfc_batch
from .test_dcp import _backbone, _dual_batch, _loss

REPO = Path(__file__).resolve().parent.parent
D, N, S = 8, 60, 4
LOOKAHEAD, NEGATIVES = 2, 5
NUM_SLOTS = 33  # of 60 ids: 3 queued plans (L = 2) of <= 6 ids + 5 negatives fit, and rows are evicted


def _deps(tmp_path: Path, num_classes: int = 20, tier: str = "ram", num_slots: int = 0, **kw: object) -> HeadDeps:
    margin = build_margin(LossCfg(kind="cosface", s=32.0, cosface_m=0.5)).to(DEVICE)
    return HeadDeps(margin=margin, num_classes=num_classes, dim=D, device=DEVICE,
                    bank=BankCfg(tier=tier, chunk_rows=4), cache=CacheCfg(num_slots=num_slots, lookahead=LOOKAHEAD),
                    bank_path=tmp_path / "bank", **kw)


def test_rotation_takes_seen_ids_in_turn_and_never_unseen_ones(tmp_path: Path) -> None:
    """Catches negatives drawn from never-written (lazy-init) rows, a pointer that does not advance or wrap, and an id
    repeated within one step when fewer than n are seen."""
    bank = CenterBank(_deps(tmp_path), head_kind="dcp", num_negatives=3)
    assert bank.next_ids().tolist() == []
    bank.mark_seen(np.array([2, 5]))
    assert bank.next_ids().tolist() == [2, 5]  # fewer seen than n: each once
    bank.mark_seen(np.array([7, 11, 19]))
    got = [bank.next_ids().tolist() for _ in range(4)]
    assert got == [[7, 11, 19], [2, 5, 7], [11, 19, 2], [5, 7, 11]]  # from after 5, wrapping
    bank.close()


def test_write_keeps_each_ids_latest_center_and_append_masks_the_own_id(tmp_path: Path) -> None:
    """Catches an earlier occurrence of a repeated id winning the write, a written center that never reaches the
    bank (write-back at the flush), and a bank column of a row's own identity left as a negative."""
    bank = CenterBank(_deps(tmp_path), head_kind="dcp", num_negatives=4)
    rows = F.normalize(torch.randn(3, D), dim=1)
    bank.write(torch.tensor([4, 9, 4]), rows)  # a step nobody planned or read: it plans and readies itself
    bank.prepare(1)
    bank.commit(1)
    assert torch.equal(bank.bank.read_rows(torch.tensor([4, 9])), rows[[2, 1]])
    e = F.normalize(torch.randn(2, D), dim=1).to(DEVICE)
    cos, mask = bank.extend(e, torch.tensor([9, 1], device=DEVICE), e @ e.t(), None)
    assert cos.shape == (2, 4) and bank.last_ids.tolist() == [4, 9]
    assert torch.allclose(cos[:, 2:], e @ rows[[2, 1]].to(DEVICE).t(), atol=1e-6)
    assert mask.tolist() == [[False, False, False, True], [False, False, False, False]]
    with pytest.raises(RuntimeError, match=r"ids \[3\] written at step 1 were not in its plan"):
        bank.write(torch.tensor([3]), rows[:1])  # step 1 was planned with 9 and 1 only
    bank.close()


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_state_and_two_phase_flush(tmp_path: Path, tier: str) -> None:
    """Catches the seen bitmap, the pointer or the negatives of the plans already submitted missing from the state
    (a resumed run would read other negatives than the uninterrupted one), a state recording the pre-flush step,
    rows not written back by the flush, and a resume accepted against a bank of another step."""
    deps = _deps(tmp_path, tier=tier)
    bank = CenterBank(deps, head_kind="attfc", num_negatives=2)
    rows = torch.randn(3, D)
    bank.write(torch.tensor([3, 8, 13]), rows)  # step 0
    bank.plan(torch.tensor([1]))  # step 1, planned ahead: its negatives 3, 8 are taken from the rotation now
    bank.prepare(5)
    state = bank.get_extra_state()
    bank.commit(5)
    assert bank.read(torch.tensor([1]))[0].tolist() == [3, 8]
    bank.write(torch.tensor([1]), torch.randn(1, D))  # trained on after the checkpoint, never flushed
    bank.close()
    again = CenterBank(deps, head_kind="attfc", num_negatives=2)
    again.set_extra_state(state)
    assert again.num_seen == 3 and again.pointer == 9 and again.num_steps == 1
    ids, got = again.read(torch.tensor([1]))  # step 1 again: the checkpoint's queued negatives, rows from the bank
    assert ids.tolist() == [3, 8] and torch.equal(got, rows[:2].to(DEVICE))
    again.skip()
    assert again.read(torch.tensor([2]))[0].tolist() == [13, 3]
    again.skip()
    again.prepare(7)
    again.commit(7)
    with pytest.raises(CheckpointError, match="step 7 but the checkpoint is at step 5"):
        again.set_extra_state(state)
    again.close()


class _SyncBank(nn.Module):
    """The reference: bank mode as it was before the prefetcher, over its own real bank. ``read`` takes the next n
    seen ids from the rotation and reads their rows from the bank on the calling thread, ``write`` writes the bank
    at once and marks the ids seen (a sorted list instead of the bitmap scan)."""

    append = staticmethod(CenterBank.append)

    def __init__(self, deps: HeadDeps, *, head_kind: str, num_negatives: int, every_id_seen: bool) -> None:
        super().__init__()
        self.bank = open_bank(deps.bank, path=str(deps.bank_path), num_classes=deps.num_classes, dim=deps.dim,
                              arrays=("centers",), head_kind=head_kind)
        self.num_classes, self.n, self.pointer = deps.num_classes, num_negatives, 0
        self.seen = set(range(deps.num_classes)) if every_id_seen else set()
        self.last_ids = torch.empty(0, dtype=torch.int64)

    def plan(self, labels_B: torch.Tensor) -> None:
        """Nothing ahead of time."""

    def read(self, labels_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = sorted(self.seen)
        ring = [i for i in order if i >= self.pointer] + [i for i in order if i < self.pointer]
        ids = torch.tensor(ring[: self.n], dtype=torch.int64)
        if ids.numel():
            self.pointer = (int(ids[-1]) + 1) % self.num_classes
        self.last_ids = ids
        return ids.to(DEVICE), self.bank.read_rows(ids).to(DEVICE)

    def extend(self, e_BD: torch.Tensor, labels_B: torch.Tensor, cos_BC: torch.Tensor, mask_BC: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.append(e_BD, labels_B, cos_BC, mask_BC, *self.read(labels_B))

    def write(self, ids_B: torch.Tensor, centers_BD: torch.Tensor) -> None:
        for i, row in zip(ids_B.tolist(), centers_BD.detach().cpu(), strict=True):  # in order: the last one wins
            self.bank.write_rows(torch.tensor([i]), row[None])
            self.seen.add(i)

    def skip(self) -> None:
        """Nothing to undo."""

    def prepare(self, step: int) -> None:
        self.bank.prepare(step)

    def commit(self, step: int) -> None:
        self.bank.commit(step)

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.bank.close()


def _traced(read: Callable, threads: list[str]) -> Callable:
    """``read`` that also notes the name of the thread calling it."""

    def traced(*args: object) -> object:
        threads.append(threading.current_thread().name)
        return read(*args)

    return traced


def _batches(kind: str, num_steps: int) -> list[tuple[torch.Tensor, ...]]:
    """dcp: dual batches of 2 instance rows and 2 identities x 2 (6 ids); attfc: 4 queries (an id may repeat)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(num_steps):
        ids = torch.randperm(N, generator=g)[:4].tolist()
        if kind == "dcp":
            images, labels = _dual_batch(ids[:2], ids[2:], seed=step)
            out.append((images, labels))
        else:
            query, keys, labels = _attfc_batch([ids[0], ids[1], ids[2], ids[0]], seed=step)
            out.append((query, keys, labels))
    return out


def _train(kind: str, head: nn.Module, backbone: nn.Module, batches: list[tuple[torch.Tensor, ...]],
           lookahead: int, after_step: Callable | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Trains the head and its backbone (plain SGD) on ``batches``, planned ``lookahead`` ahead as the trainer does
    (0: no plan, ``forward`` plans each step itself), calling ``after_step(step, head, backbone)`` after each update
    (where the trainer checkpoints); returns each step's loss and bank negatives."""
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    steps = ((0, (batch, batch[-1])) for batch in batches)
    planned = with_lookahead(steps, lookahead, head.plan) if lookahead else steps
    out = []
    for step, (_, (batch, _)) in enumerate(planned):
        if kind == "dcp":
            loss = _loss(head, backbone, *batch, b=2)
        else:
            query, keys, labels = batch
            head.set_key_images(keys)
            loss = head(backbone(query), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        head.update(0.1)
        out.append((loss.detach(), head.center_bank.last_ids.clone()))
        if after_step is not None:
            after_step(step, head, backbone)
    return out


def _head(kind: str, deps: HeadDeps) -> nn.Module:
    cfg = HeadCfg(kind="dcp", pool_fraction=0.1) if kind == "dcp" else HeadCfg(kind="attfc", queue_fraction=0.1)
    return build_head(dataclasses.replace(cfg, bank_negatives=NEGATIVES), deps)


@pytest.mark.parametrize("kind", ["dcp", "attfc"])
@pytest.mark.parametrize(("lookahead", "every_id_seen", "num_slots"), [(0, False, 16), (LOOKAHEAD, True, NUM_SLOTS)])
def test_prefetched_bank_mode_equals_synchronous_reads(tmp_path: Path, kind: str, lookahead: int,
                                                       every_id_seen: bool, num_slots: int) -> None:
    """The prefetched bank mode against the synchronous reference (``_SyncBank``), with fewer device slots than the
    60 ids so that rows are evicted, written back and fetched again. Without a lookahead the two pick the same negatives
    (the plan made in forward has no lag); with the trainer's lookahead they do once every id is seen (the steady
    state after an epoch; the rows of ids never written are the bank's initial ones). Catches a negative whose row
    is not its newest center (a write lost in the container, an eviction written back late or over a newer row, a
    fetch that missed the write-behind queue), another rotation, a center written to the wrong row, a bank read on
    the training thread instead of the prefetcher's, and the stall metric missing: every loss must be bit-identical,
    the banks equal after the flush, and the prefetcher must have evicted rows."""
    threads: list[str] = []
    losses: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    banks = []
    for name in ("prefetched", "synchronous"):
        backbone = _backbone(seed=1)
        deps = _deps(tmp_path / name, num_classes=N, num_slots=num_slots, backbone=backbone)
        head = _head(kind, deps)
        if name == "synchronous":
            head.center_bank.close()
            head.center_bank = _SyncBank(deps, head_kind=kind, num_negatives=NEGATIVES, every_id_seen=every_id_seen)
        else:
            center_bank = head.center_bank
            if every_id_seen:
                center_bank.seen[:] = True
                center_bank.num_seen = N
            for method in ("read_rows", "read_rows_into"):  # the bank's two reads: where do they run?
                setattr(center_bank.bank, method, _traced(getattr(center_bank.bank, method), threads))
        losses.append(_train(kind, head, backbone, _batches(kind, 16), lookahead))
        threads = list(threads)  # the reads of training; the test's own below are not traced
        metrics = head.metrics()
        if name == "prefetched":
            assert {"prefetch/stall(%)", "bank/rows_read", "bank/seen"} <= metrics.keys()
            assert metrics["bank/rows_written"] > 0, "no row was evicted: the test would not exercise write-backs"
        head.prepare(16)
        head.commit(16)
        banks.append(head.center_bank.bank.read_rows(torch.arange(N)))
        head.close()
    assert threads and set(threads) == {"offloadfr-prefetcher"}, set(threads)
    assert sum(ids.numel() for _, ids in losses[0]) > 3 * NEGATIVES  # bank columns in most steps
    for step, ((loss, ids), (ref_loss, ref_ids)) in enumerate(zip(*losses, strict=True)):
        assert torch.equal(ids, ref_ids), f"step {step}: negatives {ids.tolist()} != {ref_ids.tolist()}"
        assert torch.equal(loss, ref_loss), f"step {step}: loss {float(loss)} != {float(ref_loss)}"
    assert torch.equal(banks[0], banks[1])


def test_lookahead_makes_new_ids_join_the_rotation_L_steps_later(tmp_path: Path) -> None:
    """Catches a rotation that reads the seen bitmap at forward time (the reads would not be known ahead) or marks
    ids seen before their write: with L = 2, ids written at step 0 are negatives from step 3 on, not before."""
    bank = CenterBank(_deps(tmp_path), head_kind="attfc", num_negatives=4)
    for step in range(LOOKAHEAD):
        bank.plan(torch.tensor([step]))
    read = []
    for step in range(5):
        bank.plan(torch.tensor([step + LOOKAHEAD]))
        read.append(bank.read(torch.tensor([step]))[0].tolist())
        bank.write(torch.tensor([step]), torch.randn(1, D))
    assert read == [[], [], [], [0], [1, 0]]  # step 4: 1 joined, from the pointer past 0
    bank.close()


def test_resume_reads_what_the_uninterrupted_run_reads(tmp_path: Path) -> None:
    """A dcp run with the trainer's lookahead, checkpointed after step 5 (the plans of steps 6 and 7 already
    submitted, as in the trainer) and resumed from the bank directory saved with the checkpoint. Catches a resume
    that plans the queued steps again from the pointer (other negatives), the bitmap or the pointer not restored, and
    rows not written back at the checkpoint: the resumed losses, negatives and final bank must equal the
    uninterrupted run's."""
    batches = _batches("dcp", 10)
    saved: dict[str, dict] = {}

    def checkpoint(step: int, head: nn.Module, backbone: nn.Module) -> None:
        if step == 5:
            head.prepare(6)
            saved["head"], saved["backbone"] = copy.deepcopy(head.state_dict()), copy.deepcopy(backbone.state_dict())
            head.commit(6)
            shutil.copytree(tmp_path / "a" / "bank", tmp_path / "b" / "bank")

    runs, banks = [], []
    for name in ("a", "b"):
        backbone = _backbone(seed=2)
        if name == "b":
            backbone.load_state_dict(saved["backbone"])
        head = _head("dcp", _deps(tmp_path / name, num_classes=N, num_slots=NUM_SLOTS, backbone=backbone))
        if name == "b":
            head.load_state_dict(saved["head"])
        runs.append(_train("dcp", head, backbone, batches if name == "a" else batches[6:], LOOKAHEAD,
                           after_step=checkpoint if name == "a" else None))
        head.prepare(10)
        head.commit(10)
        banks.append(head.center_bank.bank.read_rows(torch.arange(N)))
        head.close()
    uninterrupted, resumed = runs[0][6:], runs[1]
    assert any(ids.numel() for _, ids in resumed[:LOOKAHEAD])  # the replayed steps had bank columns
    for (loss, ids), (ref_loss, ref_ids) in zip(resumed, uninterrupted, strict=True):
        assert torch.equal(ids, ref_ids) and torch.equal(loss, ref_loss)
    assert torch.equal(banks[0], banks[1])


def test_bank_negatives_enter_the_dcp_loss(tmp_path: Path) -> None:
    """Catches bank mode that reads rows but leaves them out of the logits: after one identical step, a dcp head with
    the bank gives another loss than one without, and the gallery centers of the kept pass are in the bank."""
    probe = _backbone()
    heads = []
    for n, sub in ((0, "off"), (4, "on")):
        deps = _deps(tmp_path / sub, num_classes=40, backbone=probe)
        heads.append(build_head(HeadCfg(kind="dcp", pool_fraction=0.1, bank_negatives=n), deps))
    off, on = heads
    first = _dual_batch([1, 2], [3, 4], seed=1)
    losses = [_loss(h, probe, *first, b=2) for h in heads]
    assert torch.equal(losses[0], losses[1])  # nothing seen yet: no bank column
    for h in heads:
        h.update(0.1)
    assert on.center_bank is not None and on.center_bank.num_seen == 3  # x = [u: 3, 4; A1: 1]
    second = _dual_batch([5, 6], [7, 8], seed=2)
    assert not torch.allclose(_loss(off, probe, *second, b=2), _loss(on, probe, *second, b=2))
    on.close()


def _base(tmp_path: Path) -> list[str]:
    return [f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'runs'}",
            "synth.num_identities=24", "synth.num_holdout=8", "synth.num_pairs=40", "synth.min_images=4",
            "synth.max_images=12", "synth.mean_images=8.0", "synth.samples_per_shard=50", "data.num_workers=0",
            "train.batch_size=16", "train.log_every=1", "train.warmup_steps=0", "eval.at_end=false",
            "train.scheduler=cosine", "head.bank_negatives=6", "bank.chunk_rows=8"]


@pytest.mark.slow
@pytest.mark.parametrize(("head", "tier"), [("dcp", "ram"), ("dcp", "nvme"), ("attfc", "ram")])
def test_bank_mode_trains_through_the_trainer_and_resumes(tmp_path: Path, head: str, tier: str) -> None:
    """A real run with the bank on: catches bank mode not selectable by config, no rows written or read or not through
    the prefetcher, the bank not flushed with the checkpoint (the resume's step check), and the seen bitmap not
    restored on resume."""
    from offloadfr.train.checkpoint import load_checkpoint
    from offloadfr.train.trainer import train

    sampler = ["data.sampler=dual", "head.pool_fraction=0.5"] if head == "dcp" else ["data.sampler=attention"]
    base = [*_base(tmp_path), f"head.kind={head}", f"bank.tier={tier}", *sampler, "run.name=bank"]
    first = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml", [*base, "train.max_steps=3"]))
    rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["bank/rows_read"] for r in rows) > 0 and rows[-1]["bank/seen"] > 0
    assert all("prefetch/stall(%)" in r for r in rows)  # the reads go through the prefetcher
    state, _ = load_checkpoint(first.checkpoint)
    saved = state["head"]["center_bank._extra_state"]
    assert saved["bank_step"] == 3
    resumed = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml", [*base, "train.max_steps=5"]),
                    resume="auto")
    assert resumed.steps == 5
    after, _ = load_checkpoint(resumed.checkpoint)
    assert after["head"]["center_bank._extra_state"]["bank_step"] == 5
    logged = {r["step"]: r for r in map(json.loads, (first.run_dir / "metrics.jsonl").read_text().splitlines())}
    assert logged[4]["bank/seen"] >= logged[3]["bank/seen"] > 0  # the resumed bitmap is the checkpoint's, not empty
    assert logged[4]["bank/negatives"] == 6  # planned from it: bank columns at once (3 steps had not, the lag)
