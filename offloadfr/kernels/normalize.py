"""Row normalisation ``x / max(‖x‖, eps)`` in Triton, forward and backward, for the class centers of the fused path.

Legend: K = rows, D = row width.

``F.normalize`` on a K×D matrix costs about 3 passes over it in the forward (the norms, then the division) and about
11 in its autograd backward (the division's and the norm's gradients, then their sum). Here the forward reads each
row once and writes the normalised row once (optionally straight in bfloat16, for bf16 GEMMs, which saves the cast's
pass too), keeping only the K inverse norms; the backward reads the incoming gradient and the rows once and writes the
rows' gradient once: ``grad_x = (g − x̂·(g·x̂)) / ‖x‖``. Rows are processed whole (D up to 8192), several per program.
The result equals ``F.normalize(x, dim=1)`` and its gradient to float tolerance (tests/test_kernels.py).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["MAX_DIM", "normalize_rows"]

MAX_DIM = 8192
"""Widest row one program holds; wider rows use ``F.normalize``."""
_EPS = 1e-12  # F.normalize's default


@triton.jit
def _normalize_forward_kernel(x_ptr, out_ptr, inv_ptr, num_rows, dim, eps, ROWS: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < dim)
    offsets = rows[:, None] * dim + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    tl.store(out_ptr + offsets, (x * inv[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(inv_ptr + rows, inv, mask=rows < num_rows)


@triton.jit
def _normalize_backward_kernel(grad_out_ptr, x_ptr, inv_ptr, grad_x_ptr, num_rows, dim, eps, ROWS: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < dim)
    offsets = rows[:, None] * dim + cols[None, :]
    g = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + rows, mask=rows < num_rows, other=1.0)
    x_hat = x * inv[:, None]
    dot = tl.sum(g * x_hat, axis=1)
    # below eps the norm is the constant eps (clamp_min passes no gradient), so only g / eps remains
    clamped = inv >= 1.0 / eps
    dot = tl.where(clamped, 0.0, dot)
    grad = (g - x_hat * dot[:, None]) * inv[:, None]
    tl.store(grad_x_ptr + offsets, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _launch(num_rows: int, dim: int) -> tuple[tuple[int], int, int]:
    block_d = triton.next_power_of_2(dim)
    rows = max(1, min(16, 4096 // block_d))
    return (triton.cdiv(num_rows, rows),), rows, block_d


class _NormalizeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_KD: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x_KD = x_KD.contiguous()
        num_rows, dim = x_KD.shape
        out_KD = torch.empty(num_rows, dim, dtype=out_dtype, device=x_KD.device)
        inv_K = torch.empty(num_rows, dtype=torch.float32, device=x_KD.device)
        grid, rows, block_d = _launch(num_rows, dim)
        _normalize_forward_kernel[grid](x_KD, out_KD, inv_K, num_rows, dim, _EPS, ROWS=rows, BLOCK_D=block_d)
        ctx.save_for_backward(x_KD, inv_K)
        return out_KD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_KD: torch.Tensor) -> tuple[torch.Tensor, None]:
        x_KD, inv_K = ctx.saved_tensors
        grad_KD = grad_KD.contiguous()
        num_rows, dim = x_KD.shape
        grad_x_KD = torch.empty_like(x_KD)
        grid, rows, block_d = _launch(num_rows, dim)
        _normalize_backward_kernel[grid](grad_KD, x_KD, inv_K, grad_x_KD, num_rows, dim, _EPS, ROWS=rows,
                                         BLOCK_D=block_d)
        return grad_x_KD, None


def normalize_rows(x_KD: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``F.normalize(x_KD, dim=1)`` (float32 inside), returned in ``out_dtype``, with a fused forward and backward.

    Args:
        x_KD: a 2-D float tensor with rows of width D <= :data:`MAX_DIM`, on CUDA (or CPU in Triton's interpreter).
        out_dtype: float32, or bfloat16 to feed a bf16 GEMM without a separate cast.

    Returns:
        The normalised rows, shape (K, D), ``out_dtype``.

    Raises:
        ValueError: not 2-D, or rows wider than :data:`MAX_DIM`.
    """
    if x_KD.dim() != 2 or x_KD.shape[1] > MAX_DIM:
        raise ValueError(f"normalize_rows takes a (K, D) tensor with D <= {MAX_DIM}, got {tuple(x_KD.shape)}")
    return _NormalizeRows.apply(x_KD, out_dtype)
