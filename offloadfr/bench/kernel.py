"""The head step benchmark behind ``python launch/bench.py kernel``: the plain head step vs the fused one (row
normalisation, margin cross-entropy and row update in Triton), and the logit GEMMs in fp32, TF32 and bf16, side by
side in one run (docs/kernels.md).

Legend: B = batch, D = embedding width, K = resident rows (slots), all of them in the softmax.

One step is what ``fc`` (and ``partial_fc`` with every slot active) does per batch: cosine logits
(:func:`offloadfr.kernels.cosine_logits`), margin and cross-entropy
(:func:`offloadfr.kernels.margin_softmax_cross_entropy`), backward to the embeddings and the K rows, and the
sparse-momentum SGD of the rows (:func:`offloadfr.kernels.update_rows_`: ``sgd_rows_`` in place on the plain variants,
the one-pass Triton kernel on the ``triton`` ones; each row's ``fused`` field lists what its variant fuses). The
variants
share one weight matrix and are timed round-robin, step by step, so a slow phase of the machine hits them all alike;
on CUDA each step is timed with CUDA events. Before timing, every variant computes the loss and the embedding gradient
from the same rows once, compared with ``torch:fp32`` (the reference), and its peak device memory is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from offloadfr.config import LossCfg
from offloadfr.errors import ConfigError
from offloadfr.kernels import check_kernel, cosine_logits, margin_softmax_cross_entropy, update_rows_
from offloadfr.losses import build_margin

__all__ = ["VARIANTS", "FUSED", "PHASES", "measure_head_step"]

VARIANTS = ("torch:fp32", "torch:tf32", "torch:bf16", "triton:fp32", "triton:tf32", "triton:bf16")
"""``kernel:gemm_precision`` pairs (``head.kernel``, ``head.gemm_precision``)."""
FUSED = {"torch": "none", "triton": "normalize+margin_ce+row_sgd"}
"""What each ``head.kernel`` computes in Triton kernels (the ``fused`` field of a row); the GEMMs are cuBLAS's."""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure_head_step(*, num_slots: int, batch_size: int, dim: int, variants: tuple[str, ...] = VARIANTS,
                      steps: int = 20, warmup: int = 3, device: torch.device | None = None,
                      seed: int = 0) -> list[dict[str, Any]]:
    """Times one head step per variant over K = ``num_slots`` rows; returns one JSON-ready row per variant.

    A variant that cannot run here (``triton`` without a GPU or Triton's interpreter) gets ``status: "skipped"`` and
    the reason; one that runs out of device memory gets ``status: "oom"``.

    Args:
        num_slots: K, the rows in the softmax.
        batch_size: B.
        dim: D.
        variants: ``kernel:gemm_precision`` names from :data:`VARIANTS`.
        steps: timed steps per variant.
        warmup: untimed steps per variant first (Triton compiles, cuBLAS picks its kernels).
        device: default CUDA when available, else the CPU.
        seed: of the rows, embeddings and labels.

    Returns:
        Rows with ``step_ms_p50``/``p90``, the median of each phase (``logits_ms_p50``, ``loss_ms_p50``,
        ``backward_ms_p50``, ``update_ms_p50``), ``peak_device_GiB`` (CUDA), ``loss``, the relative differences of
        the loss and of the embedding gradient from ``torch:fp32``, and ``update_rel_diff``: that of the variant's
        row update from the plain one on the same rows, momentum and gradient.

    Raises:
        ValueError: an unknown variant.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    margin = build_margin(LossCfg(kind="arcface"))
    gen = torch.Generator().manual_seed(seed)
    w_KD = (torch.randn(num_slots, dim, generator=gen) * 0.01).to(device)
    mom_KD = torch.zeros_like(w_KD)
    emb_BD = torch.randn(batch_size, dim, generator=gen).to(device)
    labels_B = torch.randint(0, num_slots, (batch_size,), generator=gen).to(device)
    base = {"bench": "kernel", "num_slots": num_slots, "batch_size": batch_size, "dim": dim,
            "margin": "arcface", "steps": steps, "warmup": warmup}
    rows: dict[str, dict[str, Any]] = {}
    steppers: dict[str, Callable[[bool], tuple[torch.Tensor, torch.Tensor]]] = {}
    for name in variants:
        kernel, precision = name.split(":")
        row = {**base, "variant": name, "kernel": kernel, "fused": FUSED[kernel], "gemm_precision": precision,
               "status": "ok"}
        try:
            check_kernel(kernel, margin, device)
        except ConfigError as err:
            row.update(status="skipped", reason=str(err))
        rows[name] = row
        if row["status"] == "ok":
            steppers[name] = _stepper(w_KD, mom_KD, emb_BD, labels_B, margin, kernel, precision)
    reference = None
    for name, step in list(steppers.items()):  # same rows for all: the check steps do not update
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            loss, grad_BD = step(False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                rows[name]["peak_device_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.OutOfMemoryError:
            rows[name].update(status="oom")
            del steppers[name]
            continue
        rows[name]["loss"] = loss.item()
        if name == "torch:fp32":
            reference = (loss, grad_BD)
        if reference is not None:
            rows[name]["loss_rel_diff"] = abs(loss.item() - reference[0].item()) / abs(reference[0].item())
            rows[name]["grad_emb_rel_diff"] = ((grad_BD - reference[1]).norm() / reference[1].norm()).item()
        rows[name]["update_rel_diff"] = _update_rel_diff(name.split(":")[0], dim, device, seed)
    times: dict[str, list[list[float]]] = {name: [] for name in steppers}
    for i in range(warmup + steps):
        for name, step in steppers.items():
            phases = _timed_step(step, device)
            if i >= warmup:
                times[name].append(phases)
    for name, per_step in times.items():
        totals = [sum(p) for p in per_step]
        rows[name].update(step_ms_p50=_percentile(totals, 0.5), step_ms_p90=_percentile(totals, 0.9))
        for k, phase in enumerate(PHASES):
            rows[name][f"{phase}_ms_p50"] = _percentile([p[k] for p in per_step], 0.5)
    return [rows[name] for name in variants]


def _update_rel_diff(kernel: str, dim: int, device: torch.device, seed: int, num_rows: int = 4096) -> float:
    """Relative difference (norm) of ``kernel``'s row update from the plain one, from the same ``num_rows`` rows,
    non-zero momentum and gradient (the timed steps cannot tell: each variant updates the shared rows in turn)."""
    gen = torch.Generator().manual_seed(seed + 1)
    w_KD, m_KD, grad_KD = (torch.randn(num_rows, dim, generator=gen).to(device) for _ in range(3))
    step = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    want = (w_KD.clone(), m_KD.clone())
    update_rows_(*want, grad_KD, None, **step)
    update_rows_(w_KD, m_KD, grad_KD, None, **step, kernel=kernel)
    got, ref = torch.cat([w_KD, m_KD]), torch.cat(want)
    return ((got - ref).norm() / ref.norm()).item()


PHASES = ("logits", "loss", "backward", "update")
"""The parts of a step timed separately (CUDA events between them, one synchronisation per step)."""


def _stepper(w_KD: torch.Tensor, mom_KD: torch.Tensor, emb_BD: torch.Tensor, labels_B: torch.Tensor,
             margin: torch.nn.Module, kernel: str, precision: str
             ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """One head step: logits, margin and cross-entropy, backward, and (``update``) the row SGD of ``fc`` (fused
    into one pass with ``kernel = "triton"``).
    ``mark(i)`` is called after phase ``i`` of :data:`PHASES`."""

    def step(update: bool, mark: Callable[[int], None] = lambda i: None) -> tuple[torch.Tensor, torch.Tensor]:
        w = w_KD.detach().requires_grad_(True)
        emb = emb_BD.detach().requires_grad_(True)
        cos_BK = cosine_logits(emb, w, precision, kernel=kernel)
        mark(0)
        loss = margin_softmax_cross_entropy(cos_BK, labels_B, margin, kernel=kernel)
        mark(1)
        loss.backward()
        mark(2)
        if update:
            update_rows_(w_KD, mom_KD, w.grad, None, lr=0.1, momentum=0.9, weight_decay=5e-4, kernel=kernel)
        mark(3)
        return loss.detach(), emb.grad

    return step


def _timed_step(step: Callable[..., object], device: torch.device) -> list[float]:
    """Milliseconds of each phase of one updating step: CUDA events on a GPU, the wall clock on the CPU."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)]
        events[0].record()
        step(True, lambda i: events[i + 1].record())
        events[-1].synchronize()
        return [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]
    stamps = [time.perf_counter()]
    step(True, lambda i: stamps.append(time.perf_counter()))
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:], strict=False)]
