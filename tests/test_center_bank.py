"""Bank mode of the generated-center heads (``head.bank_negatives > 0``, ``heads/center_bank.py``): the rotation over
seen ids, latest-center writes, same-label masking, the two-phase flush and its state, and real runs of ``dcp``
(both tiers) and ``attfc`` through the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, load_config
from offloadfr.errors import CheckpointError
from offloadfr.heads import HeadDeps, build_head
from offloadfr.heads.center_bank import CenterBank
from offloadfr.losses import build_margin

from .conftest import DEVICE
from .test_dcp import _backbone, _dual_batch, _loss

REPO = Path(__file__).resolve().parent.parent
D = 8


def _deps(tmp_path: Path, num_classes: int = 20, tier: str = "ram", **kw: object) -> HeadDeps:
    margin = build_margin(LossCfg(kind="cosface", s=32.0, cosface_m=0.5)).to(DEVICE)
    return HeadDeps(margin=margin, num_classes=num_classes, dim=D, device=DEVICE,
                    bank=BankCfg(tier=tier, chunk_rows=4), cache=CacheCfg(), bank_path=tmp_path / "bank", **kw)


def test_rotation_takes_seen_ids_in_turn_and_never_unseen_ones(tmp_path: Path) -> None:
    """Catches negatives drawn from never-written (lazy-init) rows, a pointer that does not advance or wrap, and an id
    repeated within one step when fewer than n are seen."""
    bank = CenterBank(_deps(tmp_path), head_kind="dcp", num_negatives=3)
    assert bank.next_ids().tolist() == []
    bank.write(torch.tensor([2, 5]), torch.randn(2, D))
    assert bank.next_ids().tolist() == [2, 5]  # fewer seen than n: each once
    bank.write(torch.tensor([7, 11, 19]), torch.randn(3, D))
    got = [bank.next_ids().tolist() for _ in range(4)]
    assert got == [[7, 11, 19], [2, 5, 7], [11, 19, 2], [5, 7, 11]]  # from after 5, wrapping
    bank.close()


def test_write_keeps_each_ids_latest_center_and_append_masks_the_own_id(tmp_path: Path) -> None:
    """Catches an earlier occurrence of a repeated id winning the write, and a bank column of a row's own identity
    left as a negative."""
    bank = CenterBank(_deps(tmp_path), head_kind="dcp", num_negatives=4)
    rows = F.normalize(torch.randn(3, D), dim=1)
    bank.write(torch.tensor([4, 9, 4]), rows)
    assert torch.equal(bank.bank.read_rows(torch.tensor([4, 9])), rows[[2, 1]])
    e = F.normalize(torch.randn(2, D), dim=1).to(DEVICE)
    cos, mask = bank.extend(e, torch.tensor([9, 1], device=DEVICE), e @ e.t(), None)
    assert cos.shape == (2, 4) and bank.last_ids.tolist() == [4, 9]
    assert torch.allclose(cos[:, 2:], e @ rows[[2, 1]].to(DEVICE).t(), atol=1e-6)
    assert mask.tolist() == [[False, False, False, True], [False, False, False, False]]
    bank.close()


@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_state_and_two_phase_flush(tmp_path: Path, tier: str) -> None:
    """Catches the seen bitmap or the pointer missing from the state, a state recording the pre-flush step, and a
    resume accepted against a bank of another step."""
    deps = _deps(tmp_path, tier=tier)
    bank = CenterBank(deps, head_kind="attfc", num_negatives=2)
    bank.write(torch.tensor([3, 8, 13]), torch.randn(3, D))
    bank.next_ids()
    bank.prepare(5)
    state = bank.get_extra_state()
    bank.commit(5)
    bank.write(torch.tensor([1]), torch.randn(1, D))  # trained on after the checkpoint, never flushed
    bank.close()
    again = CenterBank(deps, head_kind="attfc", num_negatives=2)
    again.set_extra_state(state)
    assert again.num_seen == 3 and again.pointer == 9 and again.next_ids().tolist() == [13, 3]
    again.prepare(7)
    again.commit(7)
    with pytest.raises(CheckpointError, match="step 7 but the checkpoint is at step 5"):
        again.set_extra_state(state)
    again.close()


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
    """A real run with the bank on: catches bank mode not selectable by config, no rows written or read, the bank not
    flushed with the checkpoint (the resume's step check), and the seen bitmap not restored on resume."""
    from offloadfr.train.checkpoint import load_checkpoint
    from offloadfr.train.trainer import train

    sampler = ["data.sampler=dual", "head.pool_fraction=0.5"] if head == "dcp" else ["data.sampler=attention"]
    base = [*_base(tmp_path), f"head.kind={head}", f"bank.tier={tier}", *sampler, "run.name=bank"]
    first = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml", [*base, "train.max_steps=3"]))
    rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["bank/rows_read"] == 0 and rows[-1]["bank/rows_read"] > 0 and rows[-1]["bank/seen"] > 0
    state, _ = load_checkpoint(first.checkpoint)
    saved = state["head"]["center_bank._extra_state"]
    assert saved["bank_step"] == 3
    resumed = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml", [*base, "train.max_steps=5"]),
                    resume="auto")
    assert resumed.steps == 5
    after, _ = load_checkpoint(resumed.checkpoint)
    assert after["head"]["center_bank._extra_state"]["bank_step"] == 5
    logged = (first.run_dir / "metrics.jsonl").read_text().splitlines()
    seen = {r["step"]: r["bank/seen"] for r in map(json.loads, logged)}
    assert seen[4] >= seen[3] > 0  # the resumed bitmap starts from the checkpoint's, not empty
