"""Fused margin softmax cross-entropy in Triton: ``loss = mean_b CE(s · margin(cos_b·), target_b)`` and its gradient
w.r.t. the cosines, with the B×K matrix read twice and written once.

Legend: B = batch rows, K = logit columns (resident slots), S = column splits of the forward pass.

What it computes is exactly the plain path ``margin_cross_entropy(margin(cos_BK, target_B), target_B)`` of
:mod:`offloadfr.losses.margins` (the reference it is tested against), for every margin that changes only the positive
column (``Margin.forward`` not overridden: arcface, both gradient forms, cosface, combined):

* forward, one Triton kernel over a (B, S) grid: each program streams its K/S columns of one row in tiles, clamps them
  to [-1, 1], scales by s, puts ``s · t_b`` in the positive column (``t_b = margin.target_cos(cos_b,target)``) and
  keeps an online max and sum-exp; torch combines the S partial pairs into the row's log-sum-exp (B×S, tiny).
* backward, one Triton kernel over a (B, K/tile) grid: ``g_bk = c_b · s · softmax_bk`` (times 0 where the raw cosine
  was outside [-1, 1], as ``clamp``'s gradient), with ``c_b = grad_loss / (rows with a positive)`` for rows with a
  positive and 0 for rows with target -1, and the positive column set to ``dL/dt_b · dt_b/dcos_b``. That last factor
  comes from the margin's own ``target_cos`` autograd on B values, so both ArcFace gradient forms (analytic and
  straight-through) chain exactly as in the plain path. The gradient is written **in place into the cosine buffer**
  when that buffer is an intermediate (the GEMM's output): no other B×K tensor is allocated in forward or backward.

Triton runs CUDA tensors compiled, and CPU tensors only in its interpreter (``TRITON_INTERPRET=1`` set before triton
is first imported; the tests do that). Only long-stable ``tl`` operations are used, so the same source runs on the
Triton bundled with torch 2.11 (3.5) and on triton 3.9.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from offloadfr.losses import Margin

__all__ = ["fused_margin_cross_entropy", "interpreted", "supports_margin"]


@triton.jit
def _forward_kernel(cos_ptr, stride_row, target_ptr, tcos_ptr, max_ptr, sumexp_ptr, num_cols, cols_per_split,
                    num_splits, scale, BLOCK: tl.constexpr):
    """Program (b, j): online max and sum-exp of row b over columns [j·cols_per_split, (j+1)·cols_per_split) ∩ [0, K).
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    target = tl.load(target_ptr + row)
    t_logit = tl.load(tcos_ptr + row).to(tl.float32) * scale
    row_ptr = cos_ptr + row * stride_row
    start = split * cols_per_split
    running_max = -float("inf")
    running_sum = 0.0
    for first in range(start, start + cols_per_split, BLOCK):
        cols = first + tl.arange(0, BLOCK)
        inside = cols < num_cols
        c = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        z = tl.minimum(tl.maximum(c, -1.0), 1.0) * scale
        z = tl.where(cols == target, t_logit, z)
        z = tl.where(inside, z, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        # the first tile of a split always holds a column < K, so new_max is finite from the first tile on
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    tl.store(max_ptr + row * num_splits + split, running_max)
    tl.store(sumexp_ptr + row * num_splits + split, running_sum)


@triton.jit
def _backward_kernel(cos_ptr, stride_row, grad_ptr, stride_grad, target_ptr, lse_ptr, coef_ptr, grad_pos_ptr,
                     num_cols, scale, BLOCK: tl.constexpr):
    """Program (b, j): the gradient w.r.t. the cosines of row b, columns [j·BLOCK, (j+1)·BLOCK) ∩ [0, K).

    ``grad_ptr`` may equal ``cos_ptr`` (in place): each element is read before it is written, by the same program.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < num_cols
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    grad_pos = tl.load(grad_pos_ptr + row)
    c = tl.load(cos_ptr + row * stride_row + cols, mask=inside, other=0.0).to(tl.float32)
    in_range = (c >= -1.0) & (c <= 1.0)  # clamp(-1, 1) passes the gradient only there, so c needs no clamp here
    g = tl.where(in_range, coef * scale * tl.exp(c * scale - lse), 0.0)
    g = tl.where(cols == target, grad_pos, g)
    tl.store(grad_ptr + row * stride_grad + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when triton was first imported)."""
    return type(_forward_kernel).__name__ == "InterpretedFunction"


def supports_margin(margin: Margin) -> bool:
    """Whether ``margin`` changes only the positive column (then :func:`fused_margin_cross_entropy` computes it)."""
    return type(margin).forward is Margin.forward


def _launch_config(num_rows: int, num_cols: int, device: torch.device, block: int | None,
                   cols_per_split: int | None) -> tuple[int, int, int]:
    """(BLOCK, columns per forward program, S): enough forward programs to fill the GPU even for a small B."""
    if block is None:
        block = 2048 if device.type == "cuda" else 64
    if cols_per_split is None:
        tiles = triton.cdiv(num_cols, block)
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        splits = max(1, min(tiles, triton.cdiv(programs, max(1, num_rows))))
        cols_per_split = triton.cdiv(tiles, splits) * block
    if block & (block - 1) or cols_per_split % block:
        raise ValueError(f"block = {block} must be a power of two dividing cols_per_split = {cols_per_split}")
    return block, cols_per_split, triton.cdiv(num_cols, cols_per_split)


class _FusedMarginCE(torch.autograd.Function):
    """``cos_BK, target_B → loss``; see the module docstring. Not twice differentiable."""

    @staticmethod
    def forward(ctx: Any, cos_BK: torch.Tensor, target_B: torch.Tensor, margin: Margin, block: int | None,
                cols_per_split: int | None) -> torch.Tensor:
        num_rows, num_cols = cos_BK.shape
        if cos_BK.stride(1) != 1:
            cos_BK = cos_BK.contiguous()
        target_B = target_B.to(torch.int64).contiguous()
        has_pos_B = target_B >= 0
        col_B1 = target_B.clamp(min=0).unsqueeze(1)
        raw_pos_B = cos_BK.gather(1, col_B1).squeeze(1).float()
        # The positive's margin through the margin's own autograd, on B values only.
        with torch.enable_grad():
            pos_B = raw_pos_B.clamp(-1.0, 1.0).requires_grad_(True)
            tcos_B = torch.where(has_pos_B, margin.target_cos(pos_B), pos_B)
        block, cols_per_split, num_splits = _launch_config(num_rows, num_cols, cos_BK.device, block, cols_per_split)
        max_BS = torch.empty(num_rows, num_splits, dtype=torch.float32, device=cos_BK.device)
        sumexp_BS = torch.empty_like(max_BS)
        _forward_kernel[(num_rows, num_splits)](cos_BK, cos_BK.stride(0), target_B, tcos_B.detach(), max_BS, sumexp_BS,
                                                num_cols, cols_per_split, num_splits, margin.s, BLOCK=block)
        row_max_B = max_BS.max(dim=1).values
        lse_B = row_max_B + torch.log((sumexp_BS * torch.exp(max_BS - row_max_B[:, None])).sum(dim=1))
        num_pos = has_pos_B.sum().clamp(min=1).to(torch.float32)
        loss_B = torch.where(has_pos_B, lse_B - margin.s * tcos_B.detach(), 0.0)
        ctx.save_for_backward(cos_BK, target_B, lse_B, raw_pos_B)
        ctx.margin, ctx.block, ctx.num_pos = margin, block, num_pos
        ctx.pos_B, ctx.tcos_B, ctx.has_pos_B = pos_B, tcos_B, has_pos_B
        # The gradient may overwrite cos_BK only when it is an intermediate (the GEMM's output), never a caller's leaf.
        ctx.in_place = not (cos_BK.is_leaf and cos_BK.requires_grad)
        return loss_B.sum() / num_pos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos_BK, target_B, lse_B, raw_pos_B = ctx.saved_tensors
        num_rows, num_cols = cos_BK.shape
        has_pos_B = ctx.has_pos_B
        coef_B = torch.where(has_pos_B, grad_loss.float() / ctx.num_pos, 0.0)
        # dL/dt_b = c_b·s·(p_t − 1), chained through target_cos, and zero where the raw positive was clamped.
        p_pos_B = torch.exp(ctx.margin.s * ctx.tcos_B.detach() - lse_B)
        grad_t_B = coef_B * ctx.margin.s * (p_pos_B - 1.0)
        (grad_pos_B,) = torch.autograd.grad(ctx.tcos_B, ctx.pos_B, grad_t_B)
        grad_pos_B = torch.where((raw_pos_B >= -1.0) & (raw_pos_B <= 1.0) & has_pos_B, grad_pos_B, 0.0)
        grad_BK = cos_BK if ctx.in_place else torch.empty_like(cos_BK)
        block = ctx.block
        _backward_kernel[(num_rows, triton.cdiv(num_cols, block))](
            cos_BK, cos_BK.stride(0), grad_BK, grad_BK.stride(0), target_B, lse_B, coef_B.contiguous(),
            grad_pos_B.contiguous(), num_cols, ctx.margin.s, BLOCK=block)
        if ctx.in_place:  # anything else that saved cos_BK now fails loudly instead of reading the gradient
            torch.autograd.graph.increment_version(cos_BK)
        ctx.pos_B = ctx.tcos_B = None
        return grad_BK, None, None, None, None


def fused_margin_cross_entropy(cos_BK: torch.Tensor, target_B: torch.Tensor, margin: Margin, *,
                               block: int | None = None, cols_per_split: int | None = None) -> torch.Tensor:
    """Margin softmax cross-entropy of cosine logits in two Triton passes; equals the plain path to float tolerance.

    The backward **overwrites** ``cos_BK`` with its gradient when ``cos_BK`` is an intermediate of the graph (the
    GEMM output in a head): do not read it after ``backward``. A leaf ``cos_BK`` is never modified.

    Args:
        cos_BK: cosine logits (float32, bfloat16 or float16; columns contiguous), computed in float32 inside.
        target_B: int64, the positive's column per row, or -1 (the row adds nothing to the loss or the gradient).
        margin: a margin that changes only the positive column (:func:`supports_margin`).
        block: columns per tile (a power of two); default 2048 on CUDA, 64 in the interpreter.
        cols_per_split: columns per forward program (a multiple of ``block``); default fills the GPU.

    Returns:
        The mean cross-entropy over rows with a positive (0 when there is none), a float32 scalar.

    Raises:
        ValueError: bad shapes or dtype, a margin the kernel does not compute, or CPU tensors outside the interpreter.
    """
    if cos_BK.dim() != 2 or target_B.shape != cos_BK.shape[:1]:
        raise ValueError(f"expected cos_BK of shape (B, K) and target_B of shape (B,), got {tuple(cos_BK.shape)} and "
                         f"{tuple(target_B.shape)}")
    if cos_BK.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the fused margin cross-entropy takes float32, bfloat16 or float16 cosines, not "
                         f"{cos_BK.dtype}")
    if not supports_margin(margin):
        raise ValueError(f"{type(margin).__name__} changes more than the positive column; use the plain path")
    if cos_BK.device.type != "cuda" and not interpreted():
        raise ValueError(f"the Triton kernels need CUDA tensors (got {cos_BK.device}); CPU tensors run only in "
                         "Triton's interpreter, with TRITON_INTERPRET=1 set before triton is imported")
    return _FusedMarginCE.apply(cos_BK, target_B, margin, block, cols_per_split)
