"""The head's logit math between the embeddings and the loss, in a plain PyTorch form (the reference) and a fused
Triton form (``head.kernel``); docs/kernels.md.

Legend: B = batch rows, D = embedding width, K = logit columns (classes or resident slots).

* :func:`cosine_logits`: ``normalize(emb_BD) @ normalize(w_KD)ᵀ`` with the GEMMs (forward and backward) in fp32,
  TF32 or bf16 (``head.gemm_precision``), the rows normalised by ``F.normalize`` or, with ``kernel = "triton"``, by
  the fused row normalisation of :mod:`offloadfr.kernels.normalize`.
* :func:`margin_softmax_cross_entropy`: the margin and the softmax cross-entropy of those cosines, either the plain
  ``margin_cross_entropy(margin(cos_BK, target_B), target_B)`` (``kernel = "torch"``) or the fused Triton kernel
  of :mod:`offloadfr.kernels.margin_ce` (``kernel = "triton"``), which is tested against it.
* :func:`update_rows_`: the sparse-momentum SGD of the rows that were in the softmax, either the plain ``index_select``
  + :func:`sgd_rows_` + ``index_copy_`` (``kernel = "torch"``) or the one-pass Triton kernel of
  :mod:`offloadfr.kernels.row_sgd` (``kernel = "triton"``), which is tested against it.

Triton is optional (the ``triton`` extra; the GPU image bundles it with torch): it is imported only when a fused
kernel is used.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from offloadfr.errors import ConfigError
from offloadfr.losses import Margin, margin_cross_entropy

__all__ = ["KERNELS", "GEMM_PRECISIONS", "check_kernel", "cosine_logits", "margin_softmax_cross_entropy",
           "sgd_rows_", "triton_available", "update_rows_"]

_log = logging.getLogger(__name__)

KERNELS = ("torch", "triton")
"""``head.kernel`` values."""
GEMM_PRECISIONS = ("fp32", "tf32", "bf16")
"""``head.gemm_precision`` values."""


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def check_kernel(kernel: str, margin: Margin, device: torch.device, world_size: int = 1) -> str:
    """Checks that ``kernel`` can compute ``margin`` on ``device``; returns the kernel a head uses. Call it when a
    head is built.

    With ``world_size > 1`` the loss is the sharded cross-entropy of :mod:`offloadfr.distributed`, which stays plain:
    the result is then ``"torch"`` (one warning).

    Raises:
        ConfigError: an unknown kernel; ``triton`` without the triton package, with a margin that changes more than
            the positive column (adasin), or on a CPU device outside Triton's interpreter.
    """
    if kernel not in KERNELS:
        raise ConfigError(f"head.kernel = {kernel!r} is not known; choose one of: {', '.join(KERNELS)}")
    if kernel == "torch":
        return kernel
    if not triton_available():
        raise ConfigError("head.kernel = 'triton' but the triton package is not installed; pip install "
                          "'offloadfr[triton]' (a CUDA build of torch bundles it), or set head.kernel = 'torch'")
    from offloadfr.kernels.margin_ce import interpreted, supports_margin

    if not supports_margin(margin):
        raise ConfigError(f"head.kernel = 'triton' does not compute the {type(margin).__name__} margin (it changes "
                          "negatives too); set head.kernel = 'torch'")
    if device.type != "cuda" and not interpreted():
        raise ConfigError(f"head.kernel = 'triton' needs a CUDA device, not {device.type} (on the CPU Triton runs only "
                          "in its interpreter, TRITON_INTERPRET=1, for tests); set head.kernel = 'torch'")
    if world_size > 1:
        _log.warning("head.kernel = 'triton' is ignored on %d processes: the sharded cross-entropy stays plain",
                     world_size)
        return "torch"
    return kernel


def margin_softmax_cross_entropy(cos_BK: torch.Tensor, target_B: torch.Tensor, margin: Margin, *,
                                 kernel: str = "torch") -> torch.Tensor:
    """Mean margin softmax cross-entropy over the rows with a positive (``target_B >= 0``), one process.

    Args:
        cos_BK: cosine logits; with ``kernel = "triton"`` their buffer holds their gradient after ``backward``
            (it must be an intermediate such as :func:`cosine_logits`' output, read by nothing else).
        target_B: int64 positive column per row, or -1.
        margin: the margin (``loss.kind``).
        kernel: ``"torch"``, the plain reference, or ``"triton"``, the fused kernel (same value and gradients to
            float tolerance).

    Returns:
        A float32 scalar.
    """
    if kernel == "triton":
        from offloadfr.kernels.margin_ce import fused_margin_cross_entropy

        return fused_margin_cross_entropy(cos_BK, target_B, margin)
    return margin_cross_entropy(margin(cos_BK, target_B), target_B)


@contextmanager
def _tf32(device: torch.device) -> Iterator[None]:
    """fp32 matmuls on CUDA run on TF32 tensor cores inside the block (the global setting is restored after)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old_allow = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = old_allow


class _TF32MatmulNT(torch.autograd.Function):
    """``a_BD @ b_KDᵀ`` whose forward and backward GEMMs both run in TF32 (a global flag would miss the backward,
    which autograd runs after the caller's ``with`` block has closed)."""

    @staticmethod
    def forward(ctx: Any, a_BD: torch.Tensor, b_KD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a_BD, b_KD)
        with _tf32(a_BD.device):
            return a_BD @ b_KD.t()

    @staticmethod
    def backward(ctx: Any, grad_BK: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a_BD, b_KD = ctx.saved_tensors
        with _tf32(a_BD.device):
            grad_a = grad_BK @ b_KD if ctx.needs_input_grad[0] else None
            grad_b = grad_BK.t() @ a_BD if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def cosine_logits(emb_BD: torch.Tensor, w_KD: torch.Tensor, precision: str = "fp32", *,
                  kernel: str = "torch") -> torch.Tensor:
    """Cosines between the rows of ``emb_BD`` and of ``w_KD``, both normalised in float32.

    Args:
        emb_BD: embeddings (any floating dtype; normalised in float32).
        w_KD: class centers (float32).
        precision: the GEMMs' arithmetic, forward and backward: ``fp32`` (exact; the default), ``tf32`` (fp32
            tensors on TF32 tensor cores, CUDA only; ~1e-3 relative), or ``bf16`` (normalised operands rounded to
            bfloat16; the result is a bfloat16 tensor, which the margin reads in float32).
        kernel: ``"torch"`` normalises with ``F.normalize``; ``"triton"`` with the fused row normalisation of
            :mod:`offloadfr.kernels.normalize` (one read and one write of the K×D rows forward, two reads and one
            write backward; for ``bf16`` it writes the bfloat16 operand directly). Same values to float tolerance.

    Returns:
        cos_BK, float32 (bfloat16 for ``bf16``).

    Raises:
        ValueError: an unknown ``precision``.
    """
    if precision not in GEMM_PRECISIONS:
        raise ValueError(f"precision = {precision!r} is not known; choose one of: {', '.join(GEMM_PRECISIONS)}")
    operand = torch.bfloat16 if precision == "bf16" else torch.float32
    if kernel == "triton" and emb_BD.dim() == 2 and w_KD.dim() == 2:
        from offloadfr.kernels.normalize import MAX_DIM, normalize_rows

        if w_KD.shape[1] <= MAX_DIM:
            emb_BD, w_KD = normalize_rows(emb_BD, operand), normalize_rows(w_KD, operand)
            return _TF32MatmulNT.apply(emb_BD, w_KD) if precision == "tf32" else emb_BD @ w_KD.t()
    emb_BD = F.normalize(emb_BD.float(), dim=1)
    w_KD = F.normalize(w_KD, dim=1)
    if precision == "tf32":
        return _TF32MatmulNT.apply(emb_BD, w_KD)
    return emb_BD.to(operand) @ w_KD.to(operand).t()


@torch.no_grad()
def sgd_rows_(w_KD: torch.Tensor, grad_KD: torch.Tensor, mom_KD: torch.Tensor, *, lr: float, momentum: float,
              weight_decay: float) -> None:
    """SGD with momentum and weight decay on the rows given, in place (torch.optim.SGD semantics, dampening 0).

    Only the rows passed in move: rows that received no gradient keep their value and momentum ("sparse momentum",
    as PFC v1, PLSC and TorchRec do). arcface_torch PartialFC_V2 instead decays and moves every row every step.
    """
    d_KD = grad_KD.add(w_KD, alpha=weight_decay) if weight_decay else grad_KD
    mom_KD.mul_(momentum).add_(d_KD)
    w_KD.sub_(mom_KD, alpha=lr)


@torch.no_grad()
def update_rows_(w_KD: torch.Tensor, m_KD: torch.Tensor, grad_AD: torch.Tensor, slots_A: torch.Tensor | None, *,
                 lr: float, momentum: float, weight_decay: float, kernel: str = "torch") -> None:
    """Sparse-momentum SGD (:func:`sgd_rows_`) of the rows ``slots_A`` of ``w_KD`` and ``m_KD``, in place.

    Args:
        w_KD: the rows (a head's centers), float32 (K, D); updated in place.
        m_KD: their momentum buffers, same shape; updated in place.
        grad_AD: the gradient of the updated rows: row ``a`` belongs to row ``slots_A[a]`` of ``w_KD``.
        slots_A: int64 rows of ``w_KD``, unique (the triton kernel also needs them strictly increasing); None
            updates every row in order (``grad_AD`` then has K rows).
        lr: the learning rate.
        momentum: the momentum factor.
        weight_decay: L2 factor added to the gradient.
        kernel: ``"torch"``, the plain reference (gather the rows, :func:`sgd_rows_`, scatter them back: 19 passes
            over A×D; with no slots :func:`sgd_rows_` in place, 11), or ``"triton"``, one fused pass
            (:func:`offloadfr.kernels.row_sgd.fused_row_sgd_`: read w, m and g once, write w and m once).
    """
    if kernel == "triton":
        from offloadfr.kernels.row_sgd import fused_row_sgd_

        fused_row_sgd_(w_KD, m_KD, grad_AD, slots_A, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return
    if slots_A is None:
        sgd_rows_(w_KD, grad_AD, m_KD, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return
    w_AD = w_KD.index_select(0, slots_A)
    m_AD = m_KD.index_select(0, slots_A)
    sgd_rows_(w_AD, grad_AD, m_AD, lr=lr, momentum=momentum, weight_decay=weight_decay)
    w_KD.index_copy_(0, slots_A, w_AD)
    m_KD.index_copy_(0, slots_A, m_AD)
