"""AttFC (``head.kind = "attfc"``): queue pointer arithmetic with wrap-around, same-label masks, GCCs equal the
attention-weighted key sums, the EMA key encoder, the state round trip, a real run, and the config refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, load_config
from offloadfr.errors import ConfigError
from offloadfr.heads import HeadDeps, build_head
from offloadfr.heads.attfc import AttFCHead, generative_centers, queue_slots
from offloadfr.losses import build_margin

from .conftest import DEVICE

REPO = Path(__file__).resolve().parent.parent
D, S = 8, 4


def _backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, D)).to(DEVICE)


def _head(backbone: nn.Module, num_classes: int = 40, **kw: object) -> AttFCHead:
    margin = build_margin(LossCfg(kind="arcface", s=16.0, arcface_m=0.5)).to(DEVICE)
    deps = HeadDeps(margin=margin, num_classes=num_classes, dim=D, device=DEVICE, bank=BankCfg(), cache=CacheCfg(),
                    bank_path=Path("unused"), backbone=backbone)
    head = build_head(HeadCfg(kind="attfc", **kw), deps)  # type: ignore[arg-type]
    assert isinstance(head, AttFCHead)
    return head


def _batch(labels: list[int], k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(len(labels), 3, S, S, generator=g).to(DEVICE)
    keys = torch.randn(len(labels), k, 3, S, S, generator=g).to(DEVICE)
    return query, keys, torch.tensor(labels, dtype=torch.int64, device=DEVICE)


def _step(head: AttFCHead, backbone: nn.Module, opt: torch.optim.Optimizer, labels: list[int], seed: int
          ) -> torch.Tensor:
    query, keys, y = _batch(labels, seed=seed)
    head.set_key_images(keys)
    loss = head(backbone(query), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    head.update(0.1)
    return loss


def test_queue_slots_wrap_around_like_one_at_a_time_writes() -> None:
    """Catches pointer arithmetic without the modulo, a batch larger than the queue writing duplicate slots, or a
    pointer that is not (N·B) mod Q after N writes: compared with a plain Python FIFO written item by item."""
    for size in (1, 3, 7, 8):
        for count in (1, 3, 8, 11):
            ref, ptr = [None] * size, 0
            head_ptr, n = 0, 0
            for step in range(5):
                batch = list(range(n, n + count))
                for item in batch:  # the reference: one item at a time
                    ref[ptr] = item
                    ptr = (ptr + 1) % size
                items, slots, head_ptr = queue_slots(head_ptr, count, size)
                assert len(set(slots.tolist())) == len(slots) == min(count, size)  # never beyond the queue's size
                got = list(ref)
                for i, s in zip(items.tolist(), slots.tolist(), strict=True):
                    assert got[s] == batch[i]
                assert head_ptr == ptr == ((step + 1) * count) % size
                n += count


def test_enqueue_writes_the_newest_gccs_and_never_grows() -> None:
    """Catches a queue that grows, newest columns that are not this step's GCCs, or a pointer that drifts from
    (N·B) mod Q (Q = 0.3·40 = 12, B = 5: wraps on the third step)."""
    backbone = _backbone()
    head = _head(backbone)
    assert head.queue_size == 12 and head.queue_QD.shape == (12, D)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    for n in range(1, 7):
        labels = [(3 * n + i) % 40 for i in range(5)]
        _step(head, backbone, opt, labels, seed=n)
        assert int(head.queue_ptr) == (n * 5) % 12
        assert head.queue_QD.shape == (12, D) and head.queue_labels_Q.shape == (12,)
        slots = [((n - 1) * 5 + i) % 12 for i in range(5)]
        assert head.queue_labels_Q[slots].tolist() == labels
    torch.testing.assert_close(head.queue_QD.norm(dim=1), torch.ones(12, device=DEVICE))


def test_big_batch_keeps_only_the_last_q_items() -> None:
    """Catches a batch larger than the queue (B = 7 > Q = 3) leaving an item other than the last Q ones."""
    backbone = _backbone()
    head = _head(backbone, num_classes=10)  # Q = 3
    gcc = F.normalize(torch.randn(7, D, device=DEVICE), dim=1)
    head.enqueue(gcc, torch.arange(7, device=DEVICE))
    assert int(head.queue_ptr) == 7 % 3
    # slots of items 4, 5, 6: (0 + i) mod 3 = 1, 2, 0
    assert head.queue_labels_Q.tolist() == [6, 4, 5]
    torch.testing.assert_close(head.queue_QD, gcc[[6, 4, 5]])


@pytest.mark.parametrize("batch_negatives", [False, True])
def test_same_label_mask(batch_negatives: bool) -> None:
    """Catches a queue entry of the query's own identity left as a negative, a positive masked, or batch columns
    masked differently from the documented rule; and masked columns must get probability < 1e-20 (exactly 0)."""
    backbone = _backbone()
    head = _head(backbone, batch_negatives=batch_negatives)
    head.enqueue(F.normalize(torch.randn(4, D, device=DEVICE), dim=1), torch.tensor([7, 3, 7, 9], device=DEVICE))
    labels = torch.tensor([7, 3, 5, 7], device=DEVICE)
    mask = head.mask(labels)
    b = 4
    for i in range(b):
        for j in range(b):
            expect = i != j and (not batch_negatives or labels[i] == labels[j])
            assert bool(mask[i, j]) == expect, (i, j)
        for q in range(head.queue_size):
            assert bool(mask[i, b + q]) == (int(head.queue_labels_Q[q]) == int(labels[i]))
    assert mask[0, b:b + 4].tolist() == [True, False, True, False]
    query, keys, _ = _batch(labels.tolist())
    emb = backbone(query)
    head.set_key_images(keys)
    head(emb, labels)
    gcc = head._pending[0]  # type: ignore[index]
    cos = F.normalize(emb.float(), dim=1) @ torch.cat([gcc, head.queue_QD]).t()
    target = torch.arange(b, device=DEVICE)
    prob = torch.softmax(head.margin(cos, target).masked_fill(mask, float("-inf")), dim=1)
    assert float(prob[mask].max()) < 1e-20
    assert float(prob[~mask].min()) > 0


def test_gcc_is_the_attention_weighted_key_sum() -> None:
    """Catches attention over the wrong axis, weights from unnormalised cosines, a sum of normalised keys, or a
    missing final normalisation: one sample worked by hand, then the head's GCCs from its own key encoder."""
    q = torch.tensor([[1.0, 0.0]])
    z = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # cosines with q: 1 and 0
    gcc, attn = generative_centers(q, z)
    a1 = math.e / (math.e + 1.0)
    torch.testing.assert_close(attn, torch.tensor([[a1, 1.0 - a1]]))
    v = torch.tensor([2.0 * a1, 3.0 * (1.0 - a1)])
    torch.testing.assert_close(gcc, (v / v.norm())[None])
    _, attn_t = generative_centers(q, z, temperature=0.5)
    torch.testing.assert_close(attn_t[0, 0], torch.tensor(math.e**2 / (math.e**2 + 1.0)))

    backbone = _backbone()
    head = _head(backbone)
    query, keys, labels = _batch([1, 2, 3, 4, 5], k=3)
    emb = backbone(query)
    head.set_key_images(keys)
    head(emb, labels)
    head.key_encoder.train()
    z_BkD = head.key_encoder(keys.flatten(0, 1)).view(5, 3, D)
    e = F.normalize(emb.detach(), dim=1)
    a = torch.softmax(torch.stack([F.cosine_similarity(e, z_BkD[:, j], dim=1) for j in range(3)], dim=1), dim=1)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(5, device=DEVICE))
    by_hand = F.normalize(sum(a[:, j:j + 1] * z_BkD[:, j] for j in range(3)), dim=1)  # type: ignore[arg-type]
    torch.testing.assert_close(head._pending[0], by_hand)  # type: ignore[index]


def test_key_encoder_gets_no_gradient_and_follows_the_ema() -> None:
    """Catches gradients reaching the key encoder or the queue, an EMA with the weights swapped, an update before
    the optimizer step, or a key encoder that shares storage with the backbone."""
    backbone = _backbone()
    head = _head(backbone, key_momentum=0.9)
    for p_k, p_q in zip(head.key_encoder.parameters(), backbone.parameters(), strict=True):
        assert torch.equal(p_k, p_q) and p_k.data_ptr() != p_q.data_ptr() and not p_k.requires_grad
    opt = torch.optim.SGD(backbone.parameters(), lr=0.5)
    gaps = []
    for n in range(4):
        before = [p.detach().clone() for p in head.key_encoder.parameters()]
        query, keys, y = _batch([0, 1, 2, 3], seed=n)
        head.set_key_images(keys)
        loss = head(backbone(query), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in head.key_encoder.parameters())
        assert head.queue_QD.grad is None
        opt.step()
        head.update(0.5)
        for p_k, p_q, old in zip(head.key_encoder.parameters(), backbone.parameters(), before, strict=True):
            torch.testing.assert_close(p_k, 0.9 * old + 0.1 * p_q.detach(), rtol=0, atol=1e-6)
        gaps.append(sum(float((a - b).norm()) for a, b in zip(head.key_encoder.parameters(),
                                                              backbone.parameters(), strict=True)))
    assert gaps[-1] > 0
    opt.zero_grad()
    for _ in range(60):  # the backbone stands still: ‖θ_k − θ_q‖ decays by m each step
        head.update(0.5)
    last = sum(float((a - b).norm()) for a, b in zip(head.key_encoder.parameters(), backbone.parameters(),
                                                      strict=True))
    assert last == pytest.approx(gaps[-1] * 0.9**60, rel=1e-3, abs=1e-6)


def test_skip_neither_enqueues_nor_moves_the_key_encoder() -> None:
    """Catches a step refused by the guard that still writes its GCCs to the queue or moves the key encoder."""
    backbone = _backbone()
    head = _head(backbone)
    query, keys, y = _batch([0, 1, 2])
    head.set_key_images(keys)
    head(backbone(query), y)
    state = {k: v.clone() for k, v in head.state_dict().items() if not k.startswith("key_encoder") or
             k.endswith(("weight", "bias"))}
    head.skip()
    for k, v in state.items():
        assert torch.equal(head.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="set_key_images"):
        head(backbone(query), y)  # the keys were dropped with the step


def test_state_round_trip_gives_the_same_outputs() -> None:
    """Catches a key encoder, queue or pointer missing from the state dict, or not restored by load_state_dict."""
    backbone = _backbone()
    head = _head(backbone)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    for n in range(3):
        _step(head, backbone, opt, [n, n + 1, n + 2, 9], seed=n)
    state = head.state_dict()
    assert {"queue_QD", "queue_labels_Q", "queue_ptr"} <= set(state)
    assert any(k.startswith("key_encoder.") for k in state)
    other = _head(_backbone(seed=5))
    assert not torch.equal(other.queue_QD, head.queue_QD)
    other.load_state_dict(state)
    query, keys, y = _batch([9, 3, 4, 5], seed=11)
    emb = backbone(query).detach()
    losses = []
    for h in (head, other):
        h.set_key_images(keys)
        losses.append(h(emb, y))
        h.update(0.1)  # other's query encoder is another backbone: compare the queue, which the EMA does not touch
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert torch.equal(head.queue_QD, other.queue_QD) and torch.equal(head.queue_labels_Q, other.queue_labels_Q)
    assert int(head.queue_ptr) == int(other.queue_ptr)


def test_needs_the_backbone() -> None:
    """Catches an attfc head built without a query encoder to copy, failing later inside a step."""
    margin = build_margin(LossCfg()).to(DEVICE)
    deps = HeadDeps(margin=margin, num_classes=10, dim=D, device=DEVICE, bank=BankCfg(), cache=CacheCfg(),
                    bank_path=Path("unused"))
    with pytest.raises(ValueError, match="backbone"):
        build_head(HeadCfg(kind="attfc"), deps)


def _base(tmp_path: Path) -> list[str]:
    return [f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'runs'}",
            "synth.num_identities=24", "synth.num_holdout=8", "synth.num_pairs=40", "synth.min_images=4",
            "synth.max_images=12", "synth.mean_images=8.0", "synth.samples_per_shard=50", "data.num_workers=0",
            "train.batch_size=16", "train.log_every=2", "train.warmup_steps=0", "eval.batch_size=32"]


def test_attfc_trains_through_the_trainer_and_resumes(tmp_path: Path) -> None:
    """A real run (trainer, attention sampler, tiny data): catches attfc not selectable by config, key images not
    reaching the head, a non-finite loss, metrics missing, and the key encoder or queue not saved in the checkpoint
    and restored on resume."""
    from offloadfr.train.checkpoint import load_checkpoint
    from offloadfr.train.trainer import train

    base = [*_base(tmp_path), "data.sampler=attention", "head.kind=attfc", "train.scheduler=cosine",
            "head.queue_fraction=0.3"]
    first = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml",
                              [*base, "run.name=att", "train.max_steps=3", "eval.at_end=false"]))
    state, _ = load_checkpoint(first.checkpoint)
    head = state["head"]
    q = int(0.3 * 24)
    assert head["queue_QD"].shape == (q, 128) and int(head["queue_ptr"]) == (3 * 16) % q
    assert (head["queue_labels_Q"] >= 0).all()
    moved = [k for k, v in head.items() if k.startswith("key_encoder.") and k.endswith("weight")
             and not torch.equal(v, state["engine"]["model"][k.removeprefix("key_encoder.")])]
    assert moved, "the key encoder should trail the trained backbone"
    rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) and "attfc/queue_filled" in r and "attfc/queue_cos" in r for r in rows)

    resumed = train(load_config(REPO / "ds_configs/runs/synth_tiny.toml",
                                [*base, "run.name=att", "train.max_steps=5", "eval.at_end=true"]), resume="auto")
    assert resumed.steps == 5
    after, _ = load_checkpoint(resumed.checkpoint)
    assert int(after["head"]["queue_ptr"]) == (5 * 16) % q  # continued from the saved pointer, not from 0
    assert resumed.eval is not None and 0.0 <= resumed.eval["accuracy"] <= 1.0


@pytest.mark.parametrize(("head", "sampler"), [("attfc", "instance"), ("fc", "attention")])
def test_attfc_and_the_attention_sampler_go_together(tmp_path: Path, head: str, sampler: str) -> None:
    """Catches attfc fed plain batches (no key images) or another head fed (B, 1+k, ...) query+key batches: refused
    when the config is loaded, before any data work."""
    with pytest.raises(ConfigError, match="attention") as err:
        load_config(REPO / "ds_configs/runs/synth_tiny.toml",
                    [*_base(tmp_path), f"head.kind={head}", f"data.sampler={sampler}"])
    assert "set both or neither" in str(err.value)


def test_queue_cos_is_the_mean_over_unmasked_entries() -> None:
    """Catches the collapse metric counting masked (same-label) entries or dividing by the wrong count."""
    cos = torch.tensor([[0.9, 0.1, 0.3], [0.5, -0.5, 1.0]])
    masked = torch.tensor([[True, False, False], [False, False, True]])
    assert AttFCHead.queue_cos(cos, masked).item() == pytest.approx((0.1 + 0.3 + 0.5 - 0.5) / 4)
    assert AttFCHead.queue_cos(cos, torch.ones(2, 3, dtype=torch.bool)).item() == 0.0
