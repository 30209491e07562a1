"""DynamicClassContainer: victim order (LRU/FIFO), capacity, protection, exact rows, and the id <-> slot maps checked
against a plain-Python reference model over many random operations."""

from __future__ import annotations

import os
import random

import pytest
import torch

from offloadfr.cache import DynamicClassContainer
from offloadfr.config import CacheCfg
from offloadfr.errors import ConfigError

DEVICE = torch.device(os.environ.get("OFFLOADFR_TEST_DEVICE", "cpu"))
D = 8


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _rows(ids: torch.Tensor, arrays: tuple[str, ...] = ("centers",)) -> dict[str, torch.Tensor]:
    """Rows that encode their id (and array), so a row in the wrong slot is visible."""
    base = ids.to(torch.float32).reshape(-1, 1) + torch.arange(D, dtype=torch.float32) / 100
    return {name: base + 1000 * k for k, name in enumerate(arrays)}


def _full(policy: str) -> DynamicClassContainer:
    dcc = DynamicClassContainer(4, D, device=DEVICE, policy=policy)
    dcc.admit(_ids(10, 11, 12, 13), _rows(_ids(10, 11, 12, 13)))
    return dcc


def test_lru_evicts_least_recently_touched() -> None:
    """Catches an LRU that ignores touch (acts as FIFO) or evicts the most recent slot."""
    dcc = _full("lru")
    dcc.touch(dcc.slots_of(_ids(12)))
    dcc.touch(dcc.slots_of(_ids(10)))
    ids, _ = dcc.evict(3)
    assert ids.cpu().tolist() == [11, 13, 12]
    assert dcc.resident_ids().cpu().tolist() == [10]


def test_fifo_evicts_oldest_admitted_and_ignores_touch() -> None:
    """Catches FIFO re-ordered by touch, or admission order within one admit call lost."""
    dcc = _full("fifo")
    dcc.touch(dcc.slots_of(_ids(10, 11)))
    dcc.evict(1)  # 10, the first admitted
    dcc.admit(_ids(20), _rows(_ids(20)))
    ids, _ = dcc.evict(4)
    assert ids.cpu().tolist() == [11, 12, 13, 20]


def test_capacity_is_never_exceeded() -> None:
    """Catches an admit that overwrites used slots when the container is full."""
    dcc = _full("lru")
    with pytest.raises(ValueError, match="free slots"):
        dcc.admit(_ids(20), _rows(_ids(20)))
    assert dcc.num_used == 4 and dcc.num_free == 0
    assert dcc.resident_ids().cpu().tolist() == [10, 11, 12, 13]


def test_admit_rejects_resident_and_repeated_ids() -> None:
    """Catches one id occupying two slots (a stale copy that would shadow the updated one)."""
    dcc = DynamicClassContainer(4, D, device=DEVICE)
    dcc.admit(_ids(1), _rows(_ids(1)))
    with pytest.raises(ValueError, match="already resident"):
        dcc.admit(_ids(1), _rows(_ids(1)))
    with pytest.raises(ValueError, match="repeated"):
        dcc.admit(_ids(2, 2), _rows(_ids(2, 2)))
    with pytest.raises(ValueError, match="rows for"):
        dcc.admit(_ids(3), {"momentum": torch.zeros(1, D)})


def test_protect_is_honoured() -> None:
    """Catches an eviction of an id that a queued batch still needs."""
    dcc = _full("lru")
    ids, _ = dcc.evict(2, protect=_ids(10, 11, 99))
    assert ids.cpu().tolist() == [12, 13]
    with pytest.raises(ValueError, match="unprotected"):
        dcc.evict(1, protect=_ids(11, 10))
    assert dcc.resident_ids().cpu().tolist() == [10, 11]


def test_admit_evict_round_trip_is_exact() -> None:
    """Catches rows scrambled between slots or arrays, or a cast that loses bits."""
    arrays = ("centers", "momentum")
    dcc = DynamicClassContainer(6, D, arrays=arrays, device=DEVICE)
    ids = _ids(5, 3, 40, 7)
    gen = torch.Generator().manual_seed(0)
    rows = {name: torch.randn(4, D, generator=gen) for name in arrays}
    slots = dcc.admit(ids, rows)
    for name in arrays:
        assert torch.equal(dcc[name][slots].cpu(), rows[name])
    out_ids, out_rows = dcc.evict(4)
    assert out_ids.cpu().tolist() == ids.tolist()  # admission order
    for name in arrays:
        assert torch.equal(out_rows[name].cpu(), rows[name])
    assert dcc.num_used == 0


def test_slots_of_absent_ids() -> None:
    """Catches a searchsorted miss mapped to a neighbour's slot instead of -1 (ids below, between, above)."""
    dcc = DynamicClassContainer(4, D, device=DEVICE)
    assert dcc.slots_of(_ids(0, 5)).cpu().tolist() == [-1, -1]
    dcc.admit(_ids(10, 30), _rows(_ids(10, 30)))
    assert dcc.slots_of(_ids(0, 10, 20, 30, 99)).cpu().tolist() == [-1, 0, -1, 1, -1]
    assert dcc.slots_of(torch.tensor([[30, 31]])).cpu().tolist() == [[1, -1]]


def test_mask_free_hides_free_slots() -> None:
    """Catches free slots (stale rows) taking part in the softmax."""
    dcc = DynamicClassContainer(3, D, device=DEVICE)
    dcc.admit(_ids(4), _rows(_ids(4)))
    logits = dcc.mask_free(torch.zeros(2, 3, device=DEVICE))
    assert torch.isfinite(logits[:, 0]).all() and torch.isneginf(logits[:, 1:]).all()


def test_from_cfg_resolves_num_slots() -> None:
    """Catches num_slots = 0 (all classes) not resolved, or a bad policy accepted."""
    assert DynamicClassContainer.from_cfg(CacheCfg(), num_classes=37, dim=D, device=DEVICE).num_slots == 37
    assert DynamicClassContainer.from_cfg(CacheCfg(num_slots=50), num_classes=37, dim=D, device=DEVICE).num_slots == 37
    with pytest.raises(ConfigError, match="policy"):
        DynamicClassContainer(4, D, device=DEVICE, policy="lfu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_slots"):
        DynamicClassContainer(0, D, device=DEVICE)


class _Reference:
    """Plain-Python model of the container: slot -> (id, stamp); same tie rules (stamp, then slot)."""

    def __init__(self, num_slots: int, policy: str) -> None:
        self.num_slots, self.policy = num_slots, policy
        self.held: dict[int, tuple[int, int]] = {}
        self.clock = 1

    def slot_of(self, id_: int) -> int:
        return next((s for s, (i, _) in self.held.items() if i == id_), -1)

    def admit(self, ids: list[int]) -> list[int]:
        free = [s for s in range(self.num_slots) if s not in self.held][:len(ids)]
        for k, (s, i) in enumerate(zip(free, ids, strict=True)):
            self.held[s] = (i, self.clock + k)
        self.clock += len(ids)
        return free

    def touch(self, slots: list[int]) -> None:
        if self.policy == "lru":
            for s in slots:
                if s >= 0:
                    self.held[s] = (self.held[s][0], self.clock)
            self.clock += 1

    def evict(self, n: int, protect: set[int]) -> list[int]:
        order = sorted((stamp, s) for s, (i, stamp) in self.held.items() if i not in protect)
        victims = [s for _, s in order[:n]]
        ids = [self.held.pop(s)[0] for s in victims]
        return ids


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_random_operations_match_reference_model(policy: str) -> None:
    """Catches any drift between slot_ids_K, valid_K, the sorted id map, the rows and the policy's victim choice
    over 300 random admits, touches and protected evictions (a stale map after eviction, a reused slot, ...)."""
    num_classes, num_slots = 37, 9
    rng = random.Random(1234)
    dcc = DynamicClassContainer(num_slots, D, device=DEVICE, policy=policy)  # type: ignore[arg-type]
    ref = _Reference(num_slots, policy)
    for _ in range(300):
        op = rng.choice(["admit", "admit", "touch", "evict"])
        resident = [i for i, _ in ref.held.values()]
        if op == "admit":
            absent = [i for i in range(num_classes) if i not in resident]
            n = rng.randint(0, min(len(absent), num_slots - len(resident)))
            ids = rng.sample(absent, n)
            slots = dcc.admit(torch.tensor(ids, dtype=torch.int64), _rows(torch.tensor(ids, dtype=torch.int64)))
            assert slots.cpu().tolist() == ref.admit(ids)
        elif op == "touch":
            probe = rng.sample(range(num_classes), rng.randint(0, 6))
            slots = dcc.slots_of(torch.tensor(probe, dtype=torch.int64))
            assert slots.cpu().tolist() == [ref.slot_of(i) for i in probe]
            dcc.touch(slots)
            ref.touch(slots.cpu().tolist())
        else:
            protect = set(rng.sample(range(num_classes), rng.randint(0, 8)))
            n = rng.randint(0, len([i for i in resident if i not in protect]))
            ids, rows = dcc.evict(n, protect=torch.tensor(sorted(protect), dtype=torch.int64))
            assert ids.cpu().tolist() == ref.evict(n, protect)
            assert torch.equal(rows["centers"].cpu(), _rows(ids.cpu())["centers"])
        # Full consistency of both maps and the rows after every operation.
        expect_ids = [ref.held[s][0] if s in ref.held else -1 for s in range(num_slots)]
        assert dcc.slot_ids_K.cpu().tolist() == expect_ids
        assert dcc.valid_K.cpu().tolist() == [s in ref.held for s in range(num_slots)]
        assert dcc.num_used == len(ref.held) <= num_slots
        all_ids = torch.arange(num_classes)
        assert dcc.slots_of(all_ids).cpu().tolist() == [ref.slot_of(i) for i in range(num_classes)]
        assert dcc.resident_ids().cpu().tolist() == sorted(i for i, _ in ref.held.values())
        used = dcc.valid_K.nonzero().reshape(-1)
        assert torch.equal(dcc["centers"][used].cpu(), _rows(dcc.slot_ids_K[used].cpu())["centers"])
