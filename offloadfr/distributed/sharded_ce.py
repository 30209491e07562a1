"""Softmax cross-entropy over class columns sharded across ranks (arcface_torch's DistCrossEntropy, seeds-spec §1.3).

Legend: B = rows of the global batch (every rank holds the same B rows, e.g. all-gathered embeddings), C = this rank's
local columns (its ``ClassPartition.num_local`` ids, or a sampled subset of them), W = world size.

Each rank holds ``logits_BC`` for its own columns (already margin-applied and scaled) and ``target_B``: the local column
of the row's positive, or ``-1`` when the positive lives on another rank. Per row, with ``M`` the global max:

    loss_b = log(sum over all ranks and columns of exp(x - M)) - (x_pos - M)

computed with two all-reduces: MAX of the row maxima, then one SUM of (sum-exp, shifted positive logit, number of
positives) stacked together. The loss is the mean over the B rows, identical on every rank. The backward is
``(softmax - onehot) · grad_out / B`` on the local columns: exactly this rank's columns of the gradient of the
single-process loss, so class-center rows need no further reduction (the embedding gradient is summed over ranks by
:func:`offloadfr.distributed.all_gather_with_grad`).

World size 1 (no process group) is ``F.cross_entropy(logits_BC, target_B)`` verbatim, with no collective (STYLE R2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from offloadfr.distributed.collectives import Group, process_group_size
from offloadfr.errors import DataError

__all__ = ["sharded_softmax_cross_entropy"]


def _check_one_positive(count_B: torch.Tensor, allow_none: bool) -> None:
    """Every row must have its positive on exactly one rank (or on none, with ``allow_none``); fails on every rank
    alike (the counts are all-reduced)."""
    msg = (
        "a row of the global batch has its positive on {} ranks instead of exactly 1: its label is outside "
        "[0, num_classes) or the ranks disagree on the class partition; check the dataset's labels against "
        "num_classes and that every rank builds ClassPartition with the same num_classes and world_size"
    )
    ok = (count_B <= 1).all() if allow_none else (count_B == 1).all()
    if count_B.device.type == "cpu":
        if not bool(ok):
            bad = int(((count_B > 1) if allow_none else (count_B != 1)).nonzero()[0, 0])
            raise DataError(f"row {bad}: " + msg.format(int(count_B[bad])))
    else:
        # No host synchronisation on accelerators: the check fails at the next synchronising call.
        torch._assert_async(ok, msg.format("0 or several"))


class _ShardedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits_BC: torch.Tensor, target_B: torch.Tensor, group: Group | None, allow_unlabelled: bool
    ) -> torch.Tensor:
        # float32 at least (margins already produce float32; float64 stays float64 for gradient checks).
        dtype = torch.promote_types(logits_BC.dtype, torch.float32)
        x_BC = logits_BC.detach().to(dtype)
        num_rows = x_BC.shape[0]

        max_B = x_BC.amax(dim=1)
        dist.all_reduce(max_B, op=dist.ReduceOp.MAX, group=group)
        # exp_BC is a new tensor, reused in place as the softmax and then as the gradient (one B × C buffer).
        exp_BC = torch.exp(x_BC - max_B[:, None])

        has_pos_B = target_B >= 0
        col_B1 = target_B.clamp_min(0).unsqueeze(1)
        pos_B = torch.where(has_pos_B, x_BC.gather(1, col_B1).squeeze(1) - max_B, torch.zeros_like(max_B))
        stats_3B = torch.stack([exp_BC.sum(dim=1), pos_B, has_pos_B.to(dtype)])
        dist.all_reduce(stats_3B, op=dist.ReduceOp.SUM, group=group)
        sum_exp_B, pos_B, count_B = stats_3B.unbind(0)
        _check_one_positive(count_B, allow_unlabelled)

        prob_BC = exp_BC.div_(sum_exp_B[:, None])
        divisor: int | torch.Tensor = num_rows  # the rows the loss is the mean over
        if allow_unlabelled:  # rows whose positive is on no rank take no part: the mean over the labelled rows
            labelled_B = (count_B > 0).to(dtype)
            divisor = labelled_B.sum().clamp(min=1)  # a device scalar: no host synchronisation
            loss = ((sum_exp_B.log() - pos_B) * labelled_B).sum() / divisor
            prob_BC.mul_(labelled_B[:, None])
        else:
            loss = (sum_exp_B.log() - pos_B).mean()
        ctx.save_for_backward(prob_BC, col_B1, has_pos_B)
        ctx.divisor = divisor
        ctx.in_dtype = logits_BC.dtype
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        if ctx.used:
            # The softmax buffer is turned into the gradient in place; a second backward would read garbage.
            raise RuntimeError("sharded_softmax_cross_entropy does not support a second backward (retain_graph=True)")
        ctx.used = True
        prob_BC, col_B1, has_pos_B = ctx.saved_tensors
        grad_BC = prob_BC.scatter_add_(1, col_B1, -has_pos_B.to(prob_BC.dtype).unsqueeze(1))  # softmax - onehot
        grad_BC.mul_(grad_out / ctx.divisor)
        return grad_BC.to(ctx.in_dtype), None, None, None


def sharded_softmax_cross_entropy(
    logits_BC: torch.Tensor, target_B: torch.Tensor, group: Group | None = None, *, allow_unlabelled: bool = False
) -> torch.Tensor:
    """Mean softmax cross-entropy over the global batch when each rank holds only some class columns.

    Args:
        logits_BC: this rank's logits (B global rows × its C local columns), margin-applied and scaled; every rank
            must hold the same B rows in the same order.
        target_B: int64, per row the local column of the positive in ``[0, C)``, or ``-1`` if another rank owns it
            (``ClassPartition.to_local`` of the gathered labels, or a sampled remapping of it).
        group: process group the columns are sharded over (None: the world).
        allow_unlabelled: rows whose positive is on no rank take no part, and the loss is the mean over the rows
            with one (``margin_cross_entropy``'s rule for target -1; ``vfc``'s ignored identities). False: such a
            row is an error (a label outside the partition).

    Returns:
        The scalar loss, identical on every rank: float32 (float64 for float64 logits) on the sharded path; on the
        plain path exactly ``F.cross_entropy(logits_BC, target_B)``.

    Raises:
        DataError: (CPU tensors, W > 1) a row's positive is on several ranks, or on none without
            ``allow_unlabelled``; on an accelerator the same check
            runs asynchronously and fails at the next synchronising call. On the plain path ``F.cross_entropy``
            rejects a ``-1`` target itself.
    """
    if process_group_size(group) == 1:
        return F.cross_entropy(logits_BC, target_B)
    return _ShardedSoftmaxCE.apply(logits_BC, target_B, group, allow_unlabelled)
