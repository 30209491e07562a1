"""One rank of the 2-process gloo test of ``offloadfr.distributed`` (run by tests/test_dist.py, not collected by
pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests._dist_worker OUT_DIR``; writes
``OUT_DIR/rank{r}.pt`` with, per scenario, the loss and the gradients this rank computed.

The problem (also used by the single-process reference in the test): a seeded linear "backbone" ``w_DI`` maps inputs
``x_NI`` to L2-normalised embeddings, cosines against seeded class centers ``centers_CD``, the real ArcFace margin
(s = 16, m = 0.5) and softmax cross-entropy, mean over the global batch. Legend: N = global rows, B = this rank's
rows, C = 37 classes (C_local of them on this rank), D = 8, I = 5 input features.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from offloadfr.config import LossCfg
from offloadfr.distributed import (
    ClassPartition,
    all_gather_labels,
    all_gather_with_grad,
    gather_batch_sizes,
    process_group_size,
    sharded_softmax_cross_entropy,
)
from offloadfr.errors import DataError
from offloadfr.losses import build_margin

__all__ = ["NUM_CLASSES", "DIM", "SCENARIOS", "make_problem", "reference_step", "rank_step"]

NUM_CLASSES, DIM, IN_DIM = 37, 8, 5
# Rows per rank for each scenario: "even" is the B = 6 case of STYLE R10; "uneven" a partial batch on rank 0, so that
# the padding of the uneven all-gather sits in the middle of the gathered rows.
SCENARIOS: dict[str, list[int]] = {"even": [6, 6], "uneven": [4, 6]}
# Global labels: both ranks' ranges (rank 0 owns [0, 19), rank 1 owns [19, 37) for C = 37, W = 2), the ids on each side
# of the boundary (18, 19), the first and last id, and repeated ids (a center that gets gradient from two rows).
LABELS = [0, 18, 19, 36, 5, 5, 23, 30, 18, 2, 19, 11]
_MARGIN = build_margin(LossCfg(kind="arcface", s=16.0, arcface_m=0.5))


def make_problem(num_rows: int, bad_label: bool = False) -> dict[str, torch.Tensor]:
    """The seeded global problem: inputs, labels, backbone weight and all class centers (float32, CPU)."""
    g = torch.Generator().manual_seed(1234)
    labels = torch.tensor(LABELS[:num_rows], dtype=torch.int64)
    if bad_label:
        labels[3] = NUM_CLASSES  # outside [0, C): no rank owns it
    return {
        "x_NI": torch.randn(num_rows, IN_DIM, generator=g),
        "labels_N": labels,
        "w_DI": torch.randn(DIM, IN_DIM, generator=g) * 0.5,
        "centers_CD": torch.randn(NUM_CLASSES, DIM, generator=g) * 0.01,
    }


def _logits(emb_ND: torch.Tensor, centers_CD: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    cos_NC = F.normalize(emb_ND) @ F.normalize(centers_CD).T
    return _MARGIN(cos_NC, target_N)


def reference_step(problem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Single process, whole global batch, all C centers, plain ``F.cross_entropy``."""
    w_DI = problem["w_DI"].clone().requires_grad_()
    centers_CD = problem["centers_CD"].clone().requires_grad_()
    labels_N = problem["labels_N"]
    emb_ND = problem["x_NI"] @ w_DI.T
    loss = F.cross_entropy(_logits(emb_ND, centers_CD, labels_N), labels_N)
    loss.backward()
    assert w_DI.grad is not None and centers_CD.grad is not None
    return {"loss": loss.detach(), "grad_w": w_DI.grad, "grad_centers": centers_CD.grad}


def rank_step(problem: dict[str, torch.Tensor], sizes: list[int], rank: int) -> dict[str, torch.Tensor]:
    """What a model-parallel head does on one rank: gather, local logits, sharded CE; backbone grads averaged (DDP).

    With no process group (world size 1) it is the plain path and must equal :func:`reference_step`.
    """
    world = process_group_size()
    part = ClassPartition(NUM_CLASSES, world, rank)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    w_DI = problem["w_DI"].clone().requires_grad_()
    centers_CD = problem["centers_CD"][part.local_slice].clone().requires_grad_()  # C_local rows

    emb_BD = problem["x_NI"][rows] @ w_DI.T
    even = len(set(sizes)) == 1
    batch_sizes = None if even else gather_batch_sizes(sizes[rank], emb_BD.device)
    emb_ND = all_gather_with_grad(emb_BD, batch_sizes)
    labels_N = all_gather_labels(problem["labels_N"][rows], batch_sizes)
    target_N = part.to_local(labels_N)
    loss = sharded_softmax_cross_entropy(_logits(emb_ND, centers_CD, target_N), target_N)
    loss.backward()
    assert w_DI.grad is not None and centers_CD.grad is not None
    grad_w = w_DI.grad
    if world > 1:
        # What DDP (and DeepSpeed) do to a data-parallel parameter: all-reduce SUM, then divide by the world size.
        dist.all_reduce(grad_w, op=dist.ReduceOp.SUM)
        grad_w /= world
    return {
        "loss": loss.detach(),
        "grad_w": grad_w,
        "grad_centers": centers_CD.grad,
        "labels": labels_N,
        "batch_sizes": torch.tensor(batch_sizes or sizes),
    }


def main(out_dir: Path) -> None:
    """Runs every scenario on this rank and saves the results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict[str, object] = {}
    for name, sizes in SCENARIOS.items():
        results[name] = rank_step(make_problem(sum(sizes)), sizes, rank)
    try:
        rank_step(make_problem(12, bad_label=True), [6, 6], rank)
        results["bad_label"] = "no error"
    except DataError as e:
        results["bad_label"] = str(e)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait in the process group's teardown after a failure
