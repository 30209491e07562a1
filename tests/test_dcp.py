"""F2C / FFC (``head.kind = "dcp"``): the pool's LRU against a reference, dual-queue row alternation, exact rollback,
the outlier term, gradients and the gallery EMA, single vs symmetric, skip, the state round trip, real runs and
resume through the trainer, and the config refusals."""

from __future__ import annotations

import json
import math
import random
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, load_config
from offloadfr.errors import ConfigError
from offloadfr.heads import HeadDeps, build_head
from offloadfr.heads.dcp import DCPHead, DynamicClassPool, dual_halves, hard_negative_count, outlier_loss
from offloadfr.losses import build_margin

from .conftest import DEVICE

REPO = Path(__file__).resolve().parent.parent
D, S = 8, 4


def _backbone(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    norm: nn.Module = nn.BatchNorm1d(16) if bn else nn.Identity()
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 16), norm, nn.ReLU(), nn.Linear(16, D)).to(DEVICE)


def _head(backbone: nn.Module, num_classes: int = 40, **kw: object) -> DCPHead:
    margin = build_margin(LossCfg(kind="cosface", s=32.0, cosface_m=0.5)).to(DEVICE)
    deps = HeadDeps(margin=margin, num_classes=num_classes, dim=D, device=DEVICE, bank=BankCfg(), cache=CacheCfg(),
                    bank_path=Path("unused"), backbone=backbone)
    head = build_head(HeadCfg(kind="dcp", **kw), deps)  # type: ignore[arg-type]
    assert isinstance(head, DCPHead)
    return head


def _dual_batch(instance: list[int], identities: list[int], k: int = 2, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A dual batch: the instance rows, then k rows of each identity."""
    g = torch.Generator().manual_seed(seed)
    labels = instance + [i for i in identities for _ in range(k)]
    return torch.randn(len(labels), 3, S, S, generator=g).to(DEVICE), torch.tensor(labels, device=DEVICE)


def _loss(head: DCPHead, backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, b: int, k: int = 2
          ) -> torch.Tensor:
    probe, probe_labels = head.take_dual_batch(images, labels, instance_rows=b, images_per_identity=k)
    return head(backbone(probe), probe_labels)


def _pool_state(pool: DynamicClassPool) -> tuple:
    return (pool.rows_2SD.clone(), dict(pool.slot_of), pool.id_of.copy(), pool.stamp.copy(), pool.next_row.copy(),
            pool.clock, pool.num_used)


def _assert_same_pool(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1] == b[1]
    for x, y in zip(a[2:5], b[2:5], strict=True):
        assert (x == y).all()
    assert a[5:] == b[5:]


class _ReferenceLRU:
    """The code's LRU (lru_python_impl.py) as plain Python: free slots in order, then evict the least recently used."""

    def __init__(self, size: int) -> None:
        self.size, self.order, self.pos = size, OrderedDict[int, int](), [0] * size

    def write(self, labels: list[int]) -> list[tuple[int, int]]:
        out = []
        for label in labels:
            if label in self.order:
                slot = self.order.pop(label)
                row, self.pos[slot] = self.pos[slot], self.pos[slot] ^ 1
            else:
                slot = len(self.order) if len(self.order) < self.size else self.order.popitem(last=False)[1]
                row, self.pos[slot] = 0, 1
            self.order[label] = slot
            out.append((row, slot))
        return out


def test_pool_follows_the_reference_lru_and_never_exceeds_its_size() -> None:
    """Catches an LRU that grows beyond S, evicts the wrong identity (e.g. one written earlier in the same batch, or
    the most recent), or writes the wrong row: every write compared with the code's LRU, with batches larger than
    the pool and repeated labels."""
    rng = random.Random(0)
    for size in (1, 3, 7):
        pool, ref = DynamicClassPool(size, D, device=DEVICE, seed=0), _ReferenceLRU(size)
        for step in range(40):
            labels = [rng.randrange(12) for _ in range(rng.randrange(1, 10))]
            feats = torch.arange(len(labels), dtype=torch.float32)[:, None].expand(-1, D).to(DEVICE) + 100 * step
            pool.write(feats, labels)
            expected = ref.write(labels)
            assert len(pool) <= size and pool.num_used <= size
            assert pool.slot_of == dict(ref.order)
            last = {where: i for i, where in enumerate(expected)}  # the later gallery row wins a (row, slot)
            for (row, slot), i in last.items():
                assert float(pool.rows_2SD[row, slot, 0]) == float(feats[i, 0])


def test_dual_queue_rows_alternate_and_cos2_uses_row_one_of_existing_ids() -> None:
    """Catches a dual queue that always writes row 0, does not toggle the position, or marks new identities as
    existing (then cos2 would read their stale row 1)."""
    pool = DynamicClassPool(4, D, device=DEVICE, seed=0)
    rows = []
    for n in range(5):
        w = pool.write(torch.full((1, D), float(n), device=DEVICE), [7])
        rows.append(int(w.rows[0]))
        assert bool(w.ones_S[pool.slot_of[7]]) == (n > 0)
    assert rows == [0, 1, 0, 1, 0]
    slot = pool.slot_of[7]
    assert float(pool.rows_2SD[0, slot, 0]) == 4.0 and float(pool.rows_2SD[1, slot, 0]) == 3.0
    w = pool.write(torch.ones(2, D, device=DEVICE), [9, 9])  # new then existing within one pass: rows 0, 1
    assert w.rows.tolist() == [0, 1] and bool(w.ones_S[pool.slot_of[9]])


def test_rollback_restores_the_pool_bit_for_bit() -> None:
    """Catches a rollback that forgets rows, ids, the LRU order (stamps), the positions, the clock or the used count,
    including evictions of identities that the same pass re-inserts and (row, slot) written twice."""
    rng = random.Random(1)
    pool = DynamicClassPool(5, D, device=DEVICE, seed=0)
    for _ in range(6):
        pool.write(torch.randn(6, D, device=DEVICE), [rng.randrange(9) for _ in range(6)])
    for _ in range(20):
        before = _pool_state(pool)
        labels = [rng.randrange(9) for _ in range(rng.randrange(1, 12))]
        w = pool.write(torch.randn(len(labels), D, device=DEVICE), labels)
        pool.undo(w)
        _assert_same_pool(_pool_state(pool), before)
        pool.write(torch.randn(3, D, device=DEVICE), [rng.randrange(9) for _ in range(3)])  # move on


def test_outlier_term_on_a_hand_made_case() -> None:
    """Catches a term averaged over all rows, over all columns, or without the clip at 0."""
    cos = torch.tensor([[0.9, 0.1, -0.5, 0.3],   # positive row: not in the term
                        [0.2, -0.1, 0.6, -0.3],  # outlier: top-2 = 0.6, 0.2
                        [-0.2, -0.4, 0.1, -0.9]])  # outlier: top-2 = 0.1, -0.2 -> 0.1, 0
    target = torch.tensor([0, -1, -1])
    assert math.isclose(float(outlier_loss(cos, target, 2)), ((0.6 + 0.2) / 2 + (0.1 + 0.0) / 2) / 2, rel_tol=1e-6)
    assert float(outlier_loss(cos, torch.tensor([0, 1, 2]), 2)) == 0.0
    assert hard_negative_count(857) == 3 and hard_negative_count(30_000) == 6 and hard_negative_count(10**6) == 10


def test_dual_halves_put_every_identity_in_x_and_y() -> None:
    """Catches x and y sharing an image, losing one, or an identity of the identity part missing from one side."""
    x, y = dual_halves(8 + 3 * 4, 8, 4)
    assert sorted(torch.cat([x, y]).tolist()) == list(range(20))
    assert x.tolist() == [8, 9, 12, 13, 16, 17, 0, 1, 2, 3] and y.tolist() == [10, 11, 14, 15, 18, 19, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="groups"):
        dual_halves(8 + 5, 8, 2)


def test_gradients_reach_only_the_probe_net_and_the_gallery_follows_the_ema() -> None:
    """Catches a gradient into the gallery net or the pool, a gallery net that is the probe net itself, and an EMA with
    the momentum on the wrong side (θ_G ← m·θ_G + (1 − m)·θ_P)."""
    probe = _backbone()
    head = _head(probe, pool_fraction=0.5, dcp_form="symmetric", gallery_momentum=0.9)
    opt = torch.optim.SGD(probe.parameters(), lr=0.5)
    images, labels = _dual_batch([1, 2, 3, 4], [5, 6, 7])
    loss = _loss(head, probe, images, labels, b=4)
    loss.backward()
    assert all(p.grad is None for p in head.gallery_net.parameters()) and not head.pool.rows_2SD.requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probe.parameters())
    gallery_before = [p.detach().clone() for p in head.gallery_net.parameters()]
    opt.step()
    head.update(0.5)
    for g_old, p_g, p_p in zip(gallery_before, head.gallery_net.parameters(), probe.parameters(), strict=True):
        assert torch.allclose(p_g, 0.9 * g_old + 0.1 * p_p.detach(), atol=1e-6)
        assert not torch.equal(p_g, p_p)


def test_symmetric_is_pass_a_rolled_back_plus_the_single_pass() -> None:
    """Catches a symmetric form whose first pass leaks into the pool, or whose loss is not A + B: without BatchNorm,
    symmetric(batch) must equal single(batch) + single(batch with x and y swapped), each from the same start, and
    leave the pool exactly as single(batch) does."""
    inst, ids = [1, 2, 3, 4], [5, 6, 1]
    images, labels = _dual_batch(inst, ids)
    swap = torch.tensor([2, 3, 0, 1, 5, 4, 7, 6, 9, 8])  # A1 <-> A2 and u <-> v: single then runs pass A
    heads = [_head(_backbone(bn=False), pool_fraction=0.2, dcp_form=form) for form in ("symmetric", "single", "single")]
    for h in heads:  # a pool with some identities of the batch already in it
        h.pool.write(F.normalize(torch.randn(4, D, generator=torch.Generator().manual_seed(3)), dim=1).to(DEVICE),
                     [6, 2, 30, 31])
    sym, single, swapped = heads
    net = _backbone(bn=False)
    loss_sym = _loss(sym, net, images, labels, b=4)
    loss_b = _loss(single, net, images, labels, b=4)
    loss_a = _loss(swapped, net, images[swap], labels[swap], b=4)
    assert torch.allclose(loss_sym, loss_a + loss_b, atol=1e-5)
    assert float(loss_a) > 0 and float(loss_b) > 0
    a, b = _pool_state(sym.pool), _pool_state(single.pool)  # the gallery net saw [x, y] vs x: rows equal to rounding
    assert torch.allclose(a[0], b[0], atol=1e-6)
    _assert_same_pool((b[0], *a[1:]), b)


def test_skip_undoes_the_pool_and_keeps_the_gallery_net() -> None:
    """Catches a refused step whose gallery features stay in the pool or whose EMA runs anyway."""
    probe = _backbone()
    head = _head(probe, pool_fraction=0.2)
    _loss(head, probe, *_dual_batch([1, 2], [3, 4], seed=1), b=2).backward()
    head.update(0.1)
    before = _pool_state(head.pool)
    gallery = [p.clone() for p in head.gallery_net.parameters()]
    _loss(head, probe, *_dual_batch([5, 6], [7, 8], seed=2), b=2)
    assert not torch.equal(head.pool.rows_2SD, before[0])
    head.skip()
    _assert_same_pool(_pool_state(head.pool), before)
    assert all(torch.equal(a, b) for a, b in zip(gallery, head.gallery_net.parameters(), strict=True))


@pytest.mark.parametrize("form", ["single", "symmetric"])
def test_state_round_trip_continues_identically(form: str) -> None:
    """Catches pool rows, LRU order, positions or the gallery net missing from ``state_dict``: a head restored from
    it computes the same next loss and reaches the same pool as the original."""
    probe = _backbone()
    head = _head(probe, pool_fraction=0.15, dcp_form=form)
    for step in range(4):
        loss = _loss(head, probe, *_dual_batch([step, step + 10], [step + 20, step + 3], seed=step), b=2)
        loss.backward()
        head.update(0.1)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in head.state_dict().items()}
    restored = _head(probe, pool_fraction=0.15, dcp_form=form)
    restored.load_state_dict(state)
    batch = _dual_batch([3, 22], [1, 30], seed=9)
    assert torch.equal(_loss(head, probe, *batch, b=2), _loss(restored, probe, *batch, b=2))
    _assert_same_pool(_pool_state(head.pool), _pool_state(restored.pool))
    fresh = _head(probe, pool_fraction=0.15, dcp_form=form)
    assert not torch.equal(_loss(fresh, probe, *batch, b=2), _loss(head, probe, *batch, b=2))


def test_forward_without_the_dual_batch_is_refused() -> None:
    probe = _backbone()
    head = _head(probe)
    with pytest.raises(RuntimeError, match="take_dual_batch"):
        head(probe(torch.randn(4, 3, S, S, device=DEVICE)), torch.arange(4, device=DEVICE))


# ------------------------------------------------------------------------------------------- through the trainer


def _base(tmp_path: Path) -> list[str]:
    return [f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'runs'}",
            "synth.num_identities=24", "synth.num_holdout=8", "synth.num_pairs=40", "synth.min_images=4",
            "synth.max_images=12", "synth.mean_images=8.0", "synth.samples_per_shard=50", "data.num_workers=0",
            "train.batch_size=16", "train.log_every=2", "train.warmup_steps=0", "eval.batch_size=32",
            "head.kind=dcp", "data.sampler=dual", "head.pool_fraction=0.5", "train.scheduler=cosine",
            "head.gallery_momentum=0.99"]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["single", "symmetric"])
def test_dcp_trains_through_the_trainer_and_resumes(tmp_path: Path, form: str) -> None:
    """A real run (trainer, dual sampler, tiny data): catches dcp not selectable by config, the dual batch not reaching
    the head, a non-finite loss, metrics missing, and the pool or the gallery net not saved and restored on resume
    (the resumed run ends with the pool an uninterrupted run ends with)."""
    from offloadfr.train.checkpoint import load_checkpoint
    from offloadfr.train.trainer import train

    base = [*_base(tmp_path), f"head.dcp_form={form}", "eval.at_end=false", "train.max_steps=5"]
    straight = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml",
                                 [*base, "run.name=straight", "train.checkpoint_every=3"]))
    step3 = straight.run_dir / "checkpoints" / "step_00000003"
    state, _ = load_checkpoint(step3)
    head = state["head"]
    assert head["pool.rows_2SD"].shape == (2, 12, 128) and head["pool._extra_state"]["num_used"] > 0
    moved = [k for k, v in head.items() if k.startswith("gallery_net.") and k.endswith("weight")
             and not torch.equal(v, state["engine"]["model"][k.removeprefix("gallery_net.")])]
    assert moved, "the gallery net should trail the trained backbone"
    rows = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) and r["dcp/positives"] > 0 for r in rows)

    resumed = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml", [*base, "run.name=cut"]), resume=str(step3))
    assert resumed.steps == 5
    a, _ = load_checkpoint(resumed.checkpoint)
    b, _ = load_checkpoint(straight.checkpoint)
    pool_a, pool_b = a["head"]["pool._extra_state"], b["head"]["pool._extra_state"]
    for key in ("id_of", "stamp", "next_row"):
        assert torch.equal(pool_a[key], pool_b[key])
    assert torch.allclose(a["head"]["pool.rows_2SD"], b["head"]["pool.rows_2SD"], atol=1e-5)
    fresh, _ = load_checkpoint(step3)
    assert not torch.allclose(fresh["head"]["pool.rows_2SD"], b["head"]["pool.rows_2SD"], atol=1e-5)


@pytest.mark.parametrize(("sampler", "k"), [("instance", 4), ("dual", 1)])
def test_dcp_needs_the_dual_sampler_with_pairs(tmp_path: Path, sampler: str, k: int) -> None:
    """Catches dcp fed plain batches, or dual batches whose identities have one image (no pair for x and y): refused
    when the config is loaded."""
    with pytest.raises(ConfigError, match="dcp") as err:
        load_config(REPO / "ds_configs/runs/synth_tiny.toml",
                    [*_base(tmp_path), f"data.sampler={sampler}", f"data.images_per_identity={k}"])
    assert "data.sampler = 'dual'" in str(err.value)

