"""Collectives for model-parallel heads: all-gather of embeddings with gradient, and of labels (seeds-spec §1.3).

Legend: B = rows of this rank, W = world size, N = rows of the global batch (``W·B``, or ``sum(sizes)`` for uneven
batches), D = embedding width, C = the class rows a partitioned head keeps on this rank.

World size 1 is the plain path (STYLE R2): when no process group is initialised every function here returns its input
unchanged and runs no collective, so a single process never needs ``torch.distributed``.

Gradient scale convention (the same as arcface_torch's ``AllGatherFunc``)
-----------------------------------------------------------------------
The head computes one loss, ``L = mean over the N global rows``, whose value is identical on every rank (the sharded
cross-entropy all-reduces it). Rank r back-propagates only through the logit columns it owns, so the gradient that
reaches its gathered ``emb_ND`` is a partial sum ``g_r``; the true ``dL/demb`` is ``sum_r g_r``. The backward of
:func:`all_gather_with_grad` therefore sums the gradient over ranks and keeps this rank's rows (a reduce-scatter,
which equals ``all_reduce(SUM)`` followed by taking the slice, with half the traffic), and then **multiplies it by W**.

Why ×W: each rank's backbone gradient is then ``W · dL/dθ_r`` (θ_r: the backbone's contribution through this rank's
rows), and DDP and DeepSpeed *average* the backbone gradient over ranks, ``(1/W) sum_r W · dL/dθ_r = dL/dθ``, which is
exactly the gradient a single process computes on the same N-row global batch with ``F.cross_entropy`` (mean over N
rows). Class-center rows are not data-parallel (each rank owns its own), receive ``dL/dw`` exactly, and must not be
averaged. So: average the backbone gradient (the engine's default), never sum it; and with a plain (non-DDP) engine at
W > 1, all-reduce the backbone gradient with SUM and divide by W, as DDP does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from offloadfr.distributed.env import DistEnv
from offloadfr.errors import ConfigError, DataError

__all__ = [
    "process_group_size",
    "check_process_group",
    "all_gather_with_grad",
    "all_gather_labels",
    "all_gather_rows",
    "gather_rows_to_main",
    "gather_batch_sizes",
    "all_reduce_sum_",
]

# torch 2.13 deprecates the *_tensor names (FutureWarning) in favour of *_single; older torch has only the former.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

Group = Any  # torch.distributed.ProcessGroup; typed loosely because its import path moved between torch versions


def process_group_size(group: Group | None = None) -> int:
    """Number of ranks in ``group`` (default: the world), or 1 when no process group is initialised.

    Args:
        group: a process group, or None for the default one.

    Returns:
        The world size that the collectives of this module act over; 1 selects the plain path.
    """
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def check_process_group(env: DistEnv, group: Group | None = None) -> None:
    """Checks, once at start-up, that the launcher's environment and the process group agree.

    A head partitions ids by ``env`` (``RANK``/``WORLD_SIZE``) while the collectives act over the process group; if
    the trainer forgot to initialise the group, the collectives would silently take the 1-process path on W ranks.

    Args:
        env: rank and world size read from the launcher's environment.
        group: the process group the head's collectives will use (None: the default group).

    Raises:
        ConfigError: the world sizes or ranks differ.
    """
    size = process_group_size(group)
    rank = dist.get_rank(group) if size > 1 else 0
    if (size, rank) != (env.world_size, env.rank):
        raise ConfigError(
            f"the environment says rank {env.rank} of {env.world_size} but the process group is rank {rank} of {size}; "
            "initialise torch.distributed (init_process_group) before building the head, with the launcher's "
            "RANK and WORLD_SIZE"
        )


def gather_batch_sizes(num_rows: int, device: torch.device, group: Group | None = None) -> list[int]:
    """The number of rows of every rank, for batches whose size differs between ranks (e.g. a last partial batch).

    Costs one tiny all-gather and a host synchronisation; call it only when batch sizes can differ.

    Args:
        num_rows: B of this rank.
        device: where the backend communicates (the CUDA device for NCCL, the CPU for gloo).
        group: process group (None: the world).

    Returns:
        ``[B_0, ..., B_{W-1}]``; ``[num_rows]`` on the plain path.
    """
    world = process_group_size(group)
    if world == 1:
        return [num_rows]
    mine = torch.tensor([num_rows], dtype=torch.int64, device=device)
    out = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather_single(out, mine, group=group)
    return [int(v) for v in out.tolist()]


def _check_sizes(sizes: Sequence[int], num_rows: int, world: int, rank: int) -> None:
    if len(sizes) != world or sizes[rank] != num_rows:
        raise DataError(
            f"sizes = {list(sizes)} does not fit rank {rank} of {world} with {num_rows} rows; pass one entry per rank, "
            "as returned by gather_batch_sizes(num_rows, device)"
        )


def _gather(x_B_: torch.Tensor, sizes: Sequence[int] | None, group: Group | None) -> torch.Tensor:
    """All-gathers along dim 0 (no autograd): (B, ...) -> (N, ...), rank order."""
    world = dist.get_world_size(group)
    x_B_ = x_B_.contiguous()
    if sizes is None:
        out = x_B_.new_empty((world * x_B_.shape[0], *x_B_.shape[1:]))
        _all_gather_single(out, x_B_, group=group)
        return out
    _check_sizes(sizes, x_B_.shape[0], world, dist.get_rank(group))
    # Uneven batches: pad every rank to the largest B (collectives need equal shapes), then drop the padding.
    rows = max(sizes)
    padded = x_B_.new_zeros((rows, *x_B_.shape[1:]))
    padded[: x_B_.shape[0]] = x_B_
    out = x_B_.new_empty((world * rows, *x_B_.shape[1:]))
    _all_gather_single(out, padded, group=group)
    return torch.cat([out[i * rows : i * rows + n] for i, n in enumerate(sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather rows. Backward: sum the gradient over ranks, keep this rank's rows, multiply by W."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_BD: torch.Tensor, sizes: Sequence[int] | None, group: Group | None
    ) -> torch.Tensor:
        ctx.sizes = None if sizes is None else list(sizes)
        ctx.group = group
        ctx.num_rows = x_BD.shape[0]
        return _gather(x_BD, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad_ND: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        group, sizes = ctx.group, ctx.sizes
        world = dist.get_world_size(group)
        grad_ND = grad_ND.contiguous()
        if sizes is None:
            grad_BD = grad_ND.new_empty((ctx.num_rows, *grad_ND.shape[1:]))
            _reduce_scatter_single(grad_BD, grad_ND, op=dist.ReduceOp.SUM, group=group)
        else:
            rows = max(sizes)
            padded = grad_ND.new_zeros((world * rows, *grad_ND.shape[1:]))
            start = 0
            for i, n in enumerate(sizes):
                padded[i * rows : i * rows + n] = grad_ND[start : start + n]
                start += n
            grad_BD = grad_ND.new_empty((rows, *grad_ND.shape[1:]))
            _reduce_scatter_single(grad_BD, padded, op=dist.ReduceOp.SUM, group=group)
            grad_BD = grad_BD[: ctx.num_rows]
        # ×W so that the data-parallel *average* of the backbone gradient equals the single-process gradient of the
        # global-batch mean loss (module docstring).
        return grad_BD.mul_(world), None, None


def all_gather_with_grad(
    x_BD: torch.Tensor, sizes: Sequence[int] | None = None, group: Group | None = None
) -> torch.Tensor:
    """Concatenates every rank's rows, in rank order, keeping the autograd graph.

    The backward sums the incoming gradient over ranks, returns this rank's rows, and multiplies them by W (see the
    module docstring for why: it makes the data-parallel average of the backbone gradient exact).

    Args:
        x_BD: this rank's rows (B × ...), e.g. embeddings; same B on every rank unless ``sizes`` is given.
        sizes: the B of every rank (from :func:`gather_batch_sizes`) when they differ; None when all equal.
        group: process group (None: the world).

    Returns:
        (N × ...) rows of all ranks; on the plain path ``x_BD`` itself, with no collective.

    Raises:
        DataError: ``sizes`` does not have one entry per rank or disagrees with this rank's B.
    """
    if process_group_size(group) == 1:
        return x_BD
    return _AllGatherWithGrad.apply(x_BD, sizes, group)


def all_gather_labels(
    labels_B: torch.Tensor, sizes: Sequence[int] | None = None, group: Group | None = None
) -> torch.Tensor:
    """Concatenates every rank's labels in rank order (no gradient), matching :func:`all_gather_with_grad`'s rows.

    Args:
        labels_B: this rank's global class ids, on the device the backend communicates on (CUDA for NCCL).
        sizes: the B of every rank when they differ; None when all equal.
        group: process group (None: the world).

    Returns:
        (N,) labels of all ranks; on the plain path ``labels_B`` itself, with no collective.

    Raises:
        DataError: ``sizes`` does not have one entry per rank or disagrees with this rank's B.
    """
    if process_group_size(group) == 1:
        return labels_B
    return _gather(labels_B, sizes, group)


def all_reduce_sum_(x: torch.Tensor, group: Group | None = None) -> torch.Tensor:
    """Sums ``x`` over the ranks, in place and without gradient (e.g. a margin's per-rank statistics of the positives
    each rank holds); returns ``x``. On the plain path ``x`` is returned unchanged, with no collective."""
    if process_group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_gather_rows(x_B_: torch.Tensor, sizes: Sequence[int] | None = None, group: Group | None = None) -> torch.Tensor:
    """Concatenates every rank's rows in rank order, without gradient (e.g. the centers a twin head generated this
    step). Same contract as :func:`all_gather_labels`, for any dtype."""
    return all_gather_labels(x_B_, sizes, group)


def gather_rows_to_main(x_C_: torch.Tensor, sizes: Sequence[int], group: Group | None = None, *,
                        chunk_bytes: int = 256 << 20) -> torch.Tensor | None:
    """Every rank's rows in rank order, in the host memory of the group's first rank only, gathered a chunk at a time
    (a partitioned head's class centers for the checkpoint that rank 0 writes alone).

    Host memory: the first rank holds the ``sum(sizes)`` rows, every other rank none of them (only the chunk of its
    own rows it sends), so ``fc`` at 10M ids on 8 GPUs of one host needs one 41 GB copy of its centers and momentum,
    not 8. Device: at most one chunk of the result at a time (about ``chunk_bytes``, on the first rank; one W-th of it
    on the others), not all ``sum(sizes)`` rows (20 GB per array at 10M ids).

    Args:
        x_C_: this rank's rows (C × ...), on the device the backend communicates on (CUDA for NCCL).
        sizes: the C of every rank (they may differ).
        group: process group (None: the world); its rank 0 receives the rows.
        chunk_bytes: the most bytes of gathered rows (all ranks together) on the device at once.

    Returns:
        (sum(sizes) × ...) rows on the CPU on the group's rank 0, None on the other ranks; on the plain path ``x_C_``
        on the CPU.

    Raises:
        DataError: ``sizes`` does not have one entry per rank or disagrees with this rank's C.
    """
    world = process_group_size(group)
    if world == 1:
        return x_C_.cpu()
    rank = dist.get_rank(group)
    _check_sizes(sizes, x_C_.shape[0], world, rank)
    dst = 0 if group is None else dist.get_global_rank(group, 0)
    out = torch.empty((sum(sizes), *x_C_.shape[1:]), dtype=x_C_.dtype) if rank == 0 else None
    row_bytes = max(1, x_C_[:1].numel() * x_C_.element_size())
    step = max(1, min(max(sizes), chunk_bytes // (world * row_bytes)))
    starts = [sum(sizes[:r]) for r in range(world)]
    buffer = None if out is None else x_C_.new_empty((world * step, *x_C_.shape[1:]))  # one chunk, reused
    for first in range(0, max(sizes), step):  # every rank runs the same chunks, padded to the same shape
        count = min(step, max(sizes) - first)
        piece = x_C_[first : first + count]
        if piece.shape[0] < count:  # this rank's rows end before the chunk does
            piece = torch.cat([piece, piece.new_zeros((count - piece.shape[0], *piece.shape[1:]))])
        pieces = None if buffer is None else list(buffer[: world * count].chunk(world))
        dist.gather(piece, pieces, dst=dst, group=group)
        if out is not None and pieces is not None:
            for r, n in enumerate(sizes):
                valid = max(0, min(count, n - first))
                out[starts[r] + first : starts[r] + first + valid] = pieces[r][:valid]
    return out
