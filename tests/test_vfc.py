"""Virtual FC (``head.kind = "vfc"``): anchor assignment and re-grouping invariants, anchors equal the detached
feature sums, borrowed anchors come back, identities beyond the free anchors are ignored (no crash), and a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, load_config
from offloadfr.heads import HeadDeps, build_head
from offloadfr.heads.vfc import VirtualFCHead, assign_anchors
from offloadfr.losses import build_margin, margin_cross_entropy

from .conftest import DEVICE

REPO = Path(__file__).resolve().parent.parent
D = 8


def _head(num_anchors: int, **kw: float) -> VirtualFCHead:
    margin = build_margin(LossCfg(kind="arcface", s=16.0, arcface_m=0.5)).to(DEVICE)
    deps = HeadDeps(margin=margin, num_classes=1000, dim=D, device=DEVICE, bank=BankCfg(), cache=CacheCfg(),
                    bank_path=Path("unused"))
    head = build_head(HeadCfg(kind="vfc", num_anchors=num_anchors, **kw), deps)
    assert isinstance(head, VirtualFCHead)
    return head


def _emb(labels: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(labels), D, generator=g).to(DEVICE).requires_grad_(True)
    return emb, torch.tensor(labels, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("seed", range(30))
def test_assignment_invariants_on_random_batches(seed: int) -> None:
    """Catches two identities sharing an anchor, an owner that is not the smallest id of its group, a borrowed
    anchor that a present group owns, or an identity ignored while a free anchor is left (and any crash when the
    batch has more identities than anchors)."""
    g = torch.Generator().manual_seed(seed)
    num_anchors = int(torch.randint(2, 12, (1,), generator=g))
    ids = torch.unique(torch.randint(0, 40, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g))
    anchor, borrowed = assign_anchors(ids, num_anchors)
    kept = anchor[anchor >= 0]
    assert kept.unique().numel() == kept.numel()  # one identity per anchor
    groups = {int(i) % num_anchors for i in ids}
    for grp in groups:  # the smallest id of each present group owns that group's anchor
        owner = min(int(i) for i in ids if int(i) % num_anchors == grp)
        assert int(anchor[ids == owner]) == grp
    assert not set(borrowed.tolist()) & groups
    assert borrowed.tolist() == sorted(borrowed.tolist())
    movers = [int(i) for i, a in zip(ids, anchor, strict=True) if int(a) != int(i) % num_anchors]
    assert [int(a) for i, a in zip(ids, anchor, strict=True) if int(i) in movers and a >= 0] == borrowed.tolist()
    num_free = num_anchors - len(groups)
    assert int((anchor < 0).sum()) == max(0, len(movers) - num_free)
    assert set(anchor[anchor < 0].tolist()) <= {-1}


def test_conflict_borrows_a_free_anchor_which_is_restored_on_the_next_step() -> None:
    """The spec check: two ids of one residue class in a batch: the smaller takes ``n mod M``, the other a free
    anchor, which holds its feature sum during the step and its own row again afterwards; the owner's anchor points
    along the mean of its features before the SGD step."""
    head = _head(5)
    emb, labels = _emb([2, 7, 7, 2, 2, 3])  # 2 and 7 share group 2; 3 owns group 3; free: 0, 1, 4
    w_before = head.weight.detach().clone()
    loss = head(emb, labels)
    w_step = head.weight.detach().clone()
    torch.testing.assert_close(w_step[2], emb[[0, 3, 4]].detach().sum(0))
    torch.testing.assert_close(w_step[0], emb[[1, 2]].detach().sum(0))  # 7 borrowed the lowest free anchor
    torch.testing.assert_close(w_step[3], emb[5].detach())
    assert torch.equal(w_step[[1, 4]], w_before[[1, 4]])  # untouched groups keep their rows
    mean = emb[[0, 3, 4]].detach().mean(0)
    assert F.cosine_similarity(w_step[2], mean, dim=0).item() == pytest.approx(1.0, abs=1e-6)
    assert head.metrics()["vfc/borrowed_anchors"] == 1.0 and head.metrics()["vfc/ignored_ids"] == 0.0
    loss.backward()
    head.update(lr=0.1)
    assert torch.equal(head.weight.detach()[0], w_before[0])  # the loan is over: group 0's row is back
    assert not torch.equal(head.weight.detach()[2], w_step[2])  # the owner's anchor took its SGD step
    assert not torch.equal(head.weight.detach()[1], w_before[1])  # absent groups are negatives: they move too


def test_anchors_are_detached_feature_sums() -> None:
    """Catches anchors that keep a graph to the features (a second gradient path into the backbone) or that are
    means instead of sums: the gradient must equal that of the same loss with the anchors as constants."""
    head = _head(6)
    emb, labels = _emb([0, 0, 0, 1, 1, 4, 10, 10])  # 4 and 10 share group 4: 10 borrows anchor 2
    loss = head(emb, labels)
    loss.backward()
    w_const = head.weight.detach().clone()
    for ident, anchor in ((0, 0), (1, 1), (4, 4), (10, 2)):
        torch.testing.assert_close(w_const[anchor], emb.detach()[labels == ident].sum(0))
    emb2 = emb.detach().clone().requires_grad_(True)
    target = torch.tensor([0, 0, 0, 1, 1, 4, 2, 2], device=DEVICE)
    cos = F.normalize(emb2, dim=1) @ F.normalize(w_const, dim=1).t()
    ref = margin_cross_entropy(head.margin(cos, target), target)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(emb.grad, emb2.grad)


def test_no_free_anchor_left_ignores_identities_without_crashing() -> None:
    """Catches the authors' assert (a crash) when a batch has more identities than anchors, and ignored identities
    that still reach the loss or the backbone's gradient."""
    head = _head(4)
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 4]  # 10 identities, 4 anchors: 6 ignored
    emb, lab = _emb(labels)
    loss = head(emb, lab)
    assert torch.isfinite(loss)
    assert head.metrics()["vfc/ignored_ids"] == 6.0 and head.metrics()["vfc/borrowed_anchors"] == 0.0
    loss.backward()
    kept = torch.tensor([x < 4 for x in labels], device=DEVICE)
    assert torch.equal(emb.grad[~kept], torch.zeros_like(emb.grad[~kept]))
    assert (emb.grad[kept].abs().sum(1) > 0).all()
    head.update(lr=0.1)


def test_skip_ends_the_loan_without_an_update() -> None:
    """Catches a skipped step (non-finite guard) that still moves anchors by SGD or leaves a borrowed row lent."""
    head = _head(5, momentum=0.0)
    emb, labels = _emb([1, 6])  # 6 borrows anchor 0
    w_before = head.weight.detach().clone()
    head(emb, labels).backward()
    w_step = head.weight.detach().clone()
    head.skip()
    assert head.weight.grad is None
    assert torch.equal(head.weight.detach()[0], w_before[0])
    assert torch.equal(head.weight.detach()[1], w_step[1]) and torch.equal(head.momentum_buf, torch.zeros_like(
        head.momentum_buf))


def test_forward_twice_without_update_restores_the_first_loan() -> None:
    """Catches a loan that is never returned when forward runs twice (benchmarks, tests): the borrowed row's own
    value must come back, not the first step's feature sum."""
    head = _head(5)
    w_before = head.weight.detach().clone()
    head(*_emb([1, 6]))
    head(*_emb([3], seed=1))
    head.update(lr=0.0)
    assert torch.equal(head.weight.detach()[0], w_before[0])


def test_vfc_learns_with_identity_batches() -> None:
    """Catches a head whose gradient does not separate identities: a linear "backbone" on noisy Gaussian
    identities, trained through the head with P×K batches (P = 6 identities × K = 4 images, 40 identities, 8
    anchors, so groups collide and anchors are borrowed), must raise the gap between same- and different-identity
    cosines on held-out samples."""
    g = torch.Generator().manual_seed(0)
    num_ids, dim_in = 40, 32
    centers = torch.randn(num_ids, dim_in, generator=g)
    lin = torch.nn.Linear(dim_in, D).to(DEVICE)
    head = _head(8)

    def sample(ids: torch.Tensor) -> torch.Tensor:
        return (centers[ids] + 1.5 * torch.randn(ids.numel(), dim_in, generator=g)).to(DEVICE)

    def gap() -> float:
        ids = torch.arange(num_ids).repeat_interleave(2)
        with torch.no_grad():
            e = F.normalize(lin(sample(ids)), dim=1)
        cos = e @ e.t()
        same = ids[:, None] == ids[None, :]
        off = ~torch.eye(ids.numel(), dtype=torch.bool)
        return (cos[same & off].mean() - cos[~same].mean()).item()

    before = gap()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    borrowed = 0.0
    for _ in range(150):
        ids = torch.randperm(num_ids, generator=g)[:6].repeat_interleave(4)
        loss = head(lin(sample(ids)), ids.to(DEVICE))
        borrowed += head.metrics()["vfc/borrowed_anchors"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        head.update(lr=0.1)
    after = gap()
    assert borrowed > 0
    assert after > before + 0.1, (before, after)


@pytest.mark.slow
def test_vfc_trains_through_the_trainer(tmp_path: Path) -> None:
    """A real run (trainer, tiny data, fewer anchors than identities so groups collide): catches vfc not selectable
    by config, a non-finite loss, a backbone that does not move, or its metrics missing from metrics.jsonl.
    (With the instance loader most identities appear once per batch, so the positive is the feature itself and the
    loss does not fall steadily; the identity P×K sampler is what vfc is meant for.)"""
    from offloadfr.train.checkpoint import load_checkpoint
    from offloadfr.train.trainer import train

    base = [f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'runs'}",
            "synth.num_identities=24", "synth.num_holdout=8", "synth.num_pairs=40", "synth.min_images=4",
            "synth.max_images=12", "synth.mean_images=8.0", "synth.samples_per_shard=50", "data.num_workers=0",
            "train.batch_size=16", "train.log_every=2", "train.warmup_steps=0", "eval.batch_size=32",
            "head.kind=vfc", "head.num_anchors=12", "data.sampler=instance"]
    start = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml", [*base, "run.name=v0", "train.max_steps=1",
                                                                        "eval.at_end=false"]))
    result = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml", [*base, "run.name=vfc", "train.epochs=2"]))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e4 for r in rows)
    assert all({"vfc/borrowed_anchors", "vfc/ignored_ids"} <= set(r) for r in rows)
    assert sum(r["vfc/borrowed_anchors"] for r in rows) > 0  # groups did collide
    a, _ = load_checkpoint(start.checkpoint)
    b, _ = load_checkpoint(result.checkpoint)
    assert b["head"]["weight"].shape == (12, 128)
    assert any(not torch.equal(v, b["engine"]["model"][k]) for k, v in a["engine"]["model"].items())
    assert result.eval is not None and 0.0 <= result.eval["accuracy"] <= 1.0


def test_default_anchor_count_is_the_codes_but_fewer_than_the_identities() -> None:
    """Catches the default M staying at 1000 for a training set of fewer identities (every identity then owns an
    anchor that its own batch features overwrite: 11.7 points below fc on the real faces), or an explicit M ignored."""
    from offloadfr.heads.vfc import resolve_num_anchors

    assert resolve_num_anchors(0, 2000) == 1000 and resolve_num_anchors(0, 10_000_000) == 1000
    assert resolve_num_anchors(0, 249) == 124 and resolve_num_anchors(0, 3) == 2
    assert resolve_num_anchors(64, 249) == 64 and resolve_num_anchors(5000, 249) == 5000
    head = _head(0)  # N = 1000 identities
    assert head.num_anchors == 500 and head.weight.shape[0] == 500
