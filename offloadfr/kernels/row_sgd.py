"""Sparse-momentum SGD of the head's rows in one Triton pass, in place (``head.kernel = "triton"``).

Legend: K = rows of the centers and momentum tensors (container slots), D = row width, A = rows updated this step.

For each updated row ``a`` (container row ``slots_A[a]``, or row ``a`` when no slots are given) it computes exactly
what the plain path does (:func:`offloadfr.kernels.update_rows_` with ``kernel = "torch"``: ``index_select`` of the
rows, :func:`offloadfr.kernels.sgd_rows_`, ``index_copy_`` back), which is ``torch.optim.SGD`` with dampening 0, no
nesterov, and momentum buffers that start at zero::

    d = g + weight_decay · w        (d = g when weight_decay = 0)
    m = momentum · m + d
    w = w − lr · m

It reads ``w[slot]``, ``m[slot]`` and ``g[a]`` once and writes ``w[slot]`` and ``m[slot]`` once: 5 passes over A×D
float32, where the plain path makes 19 (the two gathers, the weight decay, the momentum and the step as
separate element-wise kernels, the two scatters). Rows not in ``slots_A`` are neither read nor written.

Precondition: the slots are **strictly increasing** (so unique and each row is written by one program). The heads
pass ``torch.nonzero`` or a sorted ``topk``, which are; :func:`fused_row_sgd_` checks it with one small device-side
assertion (``torch._assert_async``: no host synchronisation) and checks shapes, dtypes and layout on the host.

Results equal the plain path to a float32 rounding step per operation (a compiled kernel may contract ``a·b + c``
into one fused multiply-add, which torch's separate kernels round twice); tests/test_kernels.py compares them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_row_sgd_"]


@triton.jit
def _row_sgd_kernel(w_ptr, m_ptr, g_ptr, slots_ptr, num_rows, dim, lr, momentum, weight_decay,
                    INDEXED: tl.constexpr, DECAY: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program i: rows [i·ROWS, (i+1)·ROWS) ∩ [0, A) of ``g``, i.e. container rows ``slots[a]`` (``a`` unindexed),
    in column tiles of BLOCK_D."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    if INDEXED:
        slots = tl.load(slots_ptr + rows, mask=row_ok, other=0)
    else:
        slots = rows
    for first in range(0, dim, BLOCK_D):
        cols = first + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < dim)
        w_offsets = slots[:, None] * dim + cols[None, :]
        w = tl.load(w_ptr + w_offsets, mask=mask, other=0.0)
        m = tl.load(m_ptr + w_offsets, mask=mask, other=0.0)
        d = tl.load(g_ptr + rows[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if DECAY:
            d = d + weight_decay * w
        m = m * momentum + d
        w = w - lr * m
        tl.store(m_ptr + w_offsets, m, mask=mask)
        tl.store(w_ptr + w_offsets, w, mask=mask)


def _launch(num_rows: int, dim: int) -> tuple[tuple[int], int, int]:
    block_d = min(triton.next_power_of_2(dim), 1024)
    rows = max(1, min(16, 4096 // block_d))
    return (triton.cdiv(num_rows, rows),), rows, block_d


@torch.no_grad()
def fused_row_sgd_(w_KD: torch.Tensor, m_KD: torch.Tensor, grad_AD: torch.Tensor, slots_A: torch.Tensor | None, *,
                   lr: float, momentum: float, weight_decay: float) -> None:
    """SGD with momentum and weight decay of the rows ``slots_A`` of ``w_KD`` and ``m_KD``, in place, in one pass.

    Args:
        w_KD: the rows (container ``centers``), float32, contiguous; updated in place.
        m_KD: their momentum buffers, same shape, dtype and device, contiguous; updated in place.
        grad_AD: the gradient of the updated rows, row ``a`` for container row ``slots_A[a]`` (float32).
        slots_A: int64 container rows, strictly increasing (unique), in ``[0, K)``; None updates every row in order
            (then ``grad_AD`` has K rows: ``fc``, or ``partial_fc`` with every slot active).
        lr: the learning rate.
        momentum: the momentum factor (0: the buffer just holds ``d``, as ``mom.mul_(0).add_(d)`` does).
        weight_decay: L2 factor added to the gradient (0: none).

    Raises:
        ValueError: mismatched shapes, dtypes other than float32, or a non-contiguous ``w_KD`` / ``m_KD``.
        RuntimeError: the slots are not strictly increasing or out of range (a device-side assertion; on CUDA it
            surfaces at a later synchronisation).
    """
    if w_KD.dim() != 2 or m_KD.shape != w_KD.shape or grad_AD.dim() != 2 or grad_AD.shape[1] != w_KD.shape[1]:
        raise ValueError(f"fused_row_sgd_ takes w_KD and m_KD of one shape (K, D) and grad_AD (A, D); got "
                         f"{tuple(w_KD.shape)}, {tuple(m_KD.shape)}, {tuple(grad_AD.shape)}")
    if {w_KD.dtype, m_KD.dtype, grad_AD.dtype} != {torch.float32}:
        raise ValueError(f"fused_row_sgd_ takes float32 tensors, got {w_KD.dtype}, {m_KD.dtype}, {grad_AD.dtype}")
    if not (w_KD.is_contiguous() and m_KD.is_contiguous()):
        raise ValueError("fused_row_sgd_ updates w_KD and m_KD in place: both must be contiguous")
    num_rows, dim = grad_AD.shape
    if slots_A is None:
        if num_rows != w_KD.shape[0]:
            raise ValueError(f"without slots grad_AD must have the K = {w_KD.shape[0]} rows of w_KD, got {num_rows}")
    elif slots_A.shape != (num_rows,) or slots_A.dtype != torch.int64:
        raise ValueError(f"slots_A must be int64 of shape ({num_rows},), got {slots_A.dtype} {tuple(slots_A.shape)}")
    if num_rows == 0:
        return
    if slots_A is not None:
        ordered = (slots_A[1:] > slots_A[:-1]).all() & (slots_A[0] >= 0) & (slots_A[-1] < w_KD.shape[0])
        torch._assert_async(ordered, "fused_row_sgd_: slots_A must be strictly increasing and in [0, K)")
    grad_AD = grad_AD.contiguous()
    grid, rows, block_d = _launch(num_rows, dim)
    _row_sgd_kernel[grid](w_KD, m_KD, grad_AD, grad_AD if slots_A is None else slots_A, num_rows, dim, float(lr),
                          float(momentum), float(weight_decay), INDEXED=slots_A is not None,
                          DECAY=weight_decay != 0, ROWS=rows, BLOCK_D=block_d)
