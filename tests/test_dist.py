"""``offloadfr.distributed``: class partition, all-gather with gradient, sharded softmax cross-entropy (STYLE R10).

Partition properties are checked for C = 37 over W = 1..5; the world-size-1 paths are checked against the plain torch
ops in-process (no process group, so any collective would raise); the sharded math runs in 2 real gloo processes
(tests/_dist_worker.py) and is compared with a single-process ``F.cross_entropy`` reference on the same global batch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from offloadfr.distributed import (
    ClassPartition,
    DistEnv,
    all_gather_labels,
    all_gather_with_grad,
    check_process_group,
    gather_batch_sizes,
    process_group_size,
    sharded_softmax_cross_entropy,
)
from offloadfr.errors import ConfigError

from ._dist_worker import NUM_CLASSES, SCENARIOS, make_problem, rank_step, reference_step
from ._ranks import run_ranks
from .conftest import DEVICE

ROOT = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------------------------------------- partition
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_partition_disjoint_cover_uneven(world: int) -> None:
    """Catches overlapping or missing id ranges, and the extra ids of C % W going to the wrong ranks."""
    parts = [ClassPartition(NUM_CLASSES, world, r) for r in range(world)]
    ranges = [list(range(p.class_start, p.class_end)) for p in parts]
    assert sum(ranges, []) == list(range(NUM_CLASSES))  # contiguous, in rank order, disjoint, covering
    base, extra = divmod(NUM_CLASSES, world)
    assert [p.num_local for p in parts] == [base + 1] * extra + [base] * (world - extra)
    assert all(p.local_slice == slice(p.class_start, p.class_end) for p in parts)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_partition_to_local_and_owner_of(world: int) -> None:
    """Catches an off-by-one at a range boundary in to_local/owner_of, or ids mapped on two ranks (or none)."""
    ids = torch.arange(-2, NUM_CLASSES + 2, device=DEVICE)
    parts = [ClassPartition(NUM_CLASSES, world, r) for r in range(world)]
    local = torch.stack([p.to_local(ids) for p in parts])  # (W, len(ids))
    owner = parts[0].owner_of(ids)
    valid = (ids >= 0) & (ids < NUM_CLASSES)
    assert torch.equal((local >= 0).sum(0), valid.long())  # exactly one owner per valid id, none for invalid ids
    for r, p in enumerate(parts):
        mine = local[r] >= 0
        assert torch.equal(mine, owner == r)
        assert torch.equal(local[r][mine] + p.class_start, ids[mine])
        assert torch.equal(p.owner_of(ids), owner)  # every rank agrees on the owners
    assert torch.equal(owner[~valid], torch.full_like(owner[~valid], -1))
    if world == 1:
        assert torch.equal(parts[0].to_local(ids[valid]), ids[valid])  # everything local


def test_partition_matches_arcface_torch_formula_and_rejects_bad_args() -> None:
    """Catches a partition that differs from arcface_torch's (checkpoints would not be interchangeable), and bad
    world/rank values accepted silently."""
    p = ClassPartition(37, 2, 1)
    assert (p.num_local, p.class_start, p.class_end) == (18, 19, 37)
    p = ClassPartition(37, 5, 3)  # 37 = 5*7 + 2: ranks 0, 1 hold 8 ids, ranks 2-4 hold 7
    assert (p.num_local, p.class_start) == (7, 7 * 3 + 2)
    env = DistEnv(rank=1, world_size=3, local_rank=1, device=torch.device("cpu"))
    assert ClassPartition.for_env(37, env) == ClassPartition(37, 3, 1)
    for args in [(37, 0, 0), (37, 2, 2), (37, 2, -1), (3, 4, 0)]:
        with pytest.raises(ConfigError):
            ClassPartition(*args)


def test_dist_env_counts_the_processes_on_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a DistEnv that ignores LOCAL_WORLD_SIZE (2 nodes x 4 GPUs: 4 ranks share a host's memory, not 8), or
    that assumes one process per host when a single-machine launcher does not set it."""
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert DistEnv.from_env("cpu").local_world_size == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert DistEnv.from_env("cpu").local_world_size == 8


# ------------------------------------------------------------------------------------------------ world size 1 paths
def test_world_size_one_is_the_plain_path() -> None:
    """Catches a collective (or a ×W gradient scale) on the 1-process path: no process group exists here, so any
    collective would raise; the gradient must pass through all_gather unchanged."""
    assert process_group_size() == 1
    x_BD = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    out = all_gather_with_grad(x_BD)
    assert out is x_BD
    (out * 3.0).sum().backward()
    assert x_BD.grad is not None and torch.equal(x_BD.grad, torch.full_like(x_BD, 3.0))
    labels = torch.arange(6, device=DEVICE)
    assert all_gather_labels(labels) is labels
    assert gather_batch_sizes(6, DEVICE) == [6]
    check_process_group(DistEnv(rank=0, world_size=1, local_rank=0, device=DEVICE))


def test_world_size_one_cross_entropy_is_f_cross_entropy() -> None:
    """Catches a 1-process sharded CE that is not exactly F.cross_entropy (other reduction, scale or dtype)."""
    g = torch.Generator().manual_seed(0)
    logits_BC = (torch.randn(6, 37, generator=g) * 16).to(DEVICE)
    target_B = torch.tensor([0, 36, 18, 19, 5, 5], device=DEVICE)
    a = logits_BC.clone().requires_grad_()
    b = logits_BC.clone().requires_grad_()
    loss_a = sharded_softmax_cross_entropy(a, target_B)
    loss_b = F.cross_entropy(b, target_B)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad)


def test_world_size_one_head_step_equals_reference() -> None:
    """Catches the model-parallel recipe (gather, partition, sharded CE) diverging from plain training in 1 process."""
    problem = make_problem(12)
    got, ref = rank_step(problem, [12], 0), reference_step(problem)
    for key in ("loss", "grad_w", "grad_centers"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)


def test_check_process_group_refuses_a_missing_group() -> None:
    """Catches a run launched with WORLD_SIZE=2 whose trainer never initialised the process group: the collectives
    would silently take the 1-process path on each rank."""
    with pytest.raises(ConfigError, match="init_process_group"):
        check_process_group(DistEnv(rank=1, world_size=2, local_rank=1, device=torch.device("cpu")))


# ------------------------------------------------------------------------------------------------- 2 real gloo ranks
@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Runs tests/_dist_worker.py as 2 gloo ranks; a hang past WORKER_TIMEOUT_S kills both and fails the test."""
    out_dir = tmp_path_factory.mktemp("gloo")
    run_ranks([sys.executable, "-m", "tests._dist_worker", str(out_dir)], 2, timeout_s=WORKER_TIMEOUT_S,
              what="2-process gloo workers")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within 1e-5 relative to the reference's largest entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_gloo_ranks_match_single_process(gloo_results: list[dict[str, Any]], scenario: str) -> None:
    """2 gloo ranks (C = 37 split 19/18, B = 6 rows per rank, or 4 and 6 for "uneven") vs one process with
    F.cross_entropy on the whole global batch and all 37 centers. Backbone grads are averaged over ranks as DDP does
    (all-reduce SUM, divide by W); center grads are compared per rank with the reference's rows of that rank.

    Catches: max or sum-exp not all-reduced (wrong loss), the positive logit taken only on one rank, the loss divided by
    the local instead of the global rows (center grads ×W off), the embedding gradient not summed over ranks in the
    all-gather backward or a missing/extra ×W (backbone grads off by a factor), a partition off-by-one at the boundary
    ids 18/19, and rows gathered in the wrong order or with the padding of uneven batches left in.
    """
    sizes = SCENARIOS[scenario]
    problem = make_problem(sum(sizes))
    ref = reference_step(problem)
    for rank, results in enumerate(gloo_results):
        got = results[scenario]
        part = ClassPartition(NUM_CLASSES, 2, rank)
        assert got["batch_sizes"].tolist() == sizes
        assert torch.equal(got["labels"], problem["labels_N"])
        _close(got["loss"], ref["loss"])
        _close(got["grad_w"], ref["grad_w"])
        assert got["grad_centers"].shape == (part.num_local, 8)
        _close(got["grad_centers"], ref["grad_centers"][part.local_slice])


def test_two_gloo_ranks_reject_a_label_no_rank_owns(gloo_results: list[dict[str, Any]]) -> None:
    """Catches a label outside [0, num_classes) being silently trained as a row without positive (or one rank raising
    while the other waits in a collective: both ranks must raise the same DataError)."""
    for results in gloo_results:
        assert "row 3" in results["bad_label"] and "on 0 ranks" in results["bad_label"]
