"""Export the backbone of a checkpoint: ONNX (dynamic batch, checked with onnxruntime), TorchScript, or a state dict.

Input of every export: ``images`` float32 ``(B, 3, S, S)`` in ``[-1, 1]`` (``x / 127.5 - 1`` of RGB uint8, the
training normalisation), ``S = model.image_size``; output ``embeddings`` float32 ``(B, D)``, not L2-normalised (as the
backbone returns them; normalise before comparing faces). Only the backbone is exported, never the head.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from offloadfr.tools import ExportError, require
from offloadfr.train.preflight import check_output

__all__ = ["export_onnx", "export_torchscript", "export_state_dict", "sample_batch", "ONNX_ATOL"]

ONNX_ATOL = 1e-4
"""Largest allowed absolute difference between the ONNX Runtime and the PyTorch embeddings of the check batch."""

_OPSET = 17


@contextlib.contextmanager
def _plain_linear() -> Iterator[None]:
    """Runs the block with torch's own ``F.linear``.

    DeepSpeed ZeRO-3 replaces ``torch.nn.functional.linear`` process-wide with a Python autograd function (its
    ``memory_efficient_linear``, which "persists unless manually reset"); a trace taken after a ZeRO-3 engine was
    built in the same process would then contain a call TorchScript cannot save.
    """
    saved = F.linear
    F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = saved


def sample_batch(image_size: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """A deterministic batch of images in ``[-1, 1]``, shape ``(batch_size, 3, S, S)``, for export checks."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, image_size, image_size, generator=gen) * 2.0 - 1.0


def export_onnx(model: torch.nn.Module, out: str | Path, *, image_size: int, atol: float = ONNX_ATOL) -> float:
    """Writes ``model`` as ONNX with a dynamic batch axis and checks it against PyTorch with ONNX Runtime.

    The export traces a batch of 2; the check runs a different batch size (3), so a batch size frozen into the graph
    fails the check too.

    Args:
        model: the backbone (put in eval mode here).
        out: the ``.onnx`` file to write.
        image_size: S.
        atol: largest allowed absolute difference of any embedding value.

    Returns:
        The largest absolute difference seen on the check batch.

    Raises:
        MissingExtraError: onnx or onnxruntime is not installed (the ``export`` extra).
        ExportError: the ONNX Runtime outputs differ from PyTorch's by more than ``atol``.
        OutputPathError: ``out`` cannot be written (checked before the export).
    """
    onnx = require("onnx", "export")
    ort = require("onnxruntime", "export")
    model = model.eval()
    out = check_output(out, "the ONNX output")
    # dynamo=False: the TorchScript-based exporter, which needs no onnxscript; it announces its deprecation
    with warnings.catch_warnings(), _plain_linear():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (sample_batch(image_size, 2),), str(out), dynamo=False, opset_version=_OPSET,
                          input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
    onnx.checker.check_model(str(out))
    x = sample_batch(image_size, 3, seed=1)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"images": x.numpy()})[0]
    if got.shape != expected.shape:
        raise ExportError(f"{out}: ONNX Runtime returned shape {got.shape} for a batch of 3, PyTorch {expected.shape}; "
                          "the batch axis is not dynamic")
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= atol:
        raise ExportError(f"{out}: ONNX Runtime and PyTorch embeddings differ by up to {diff:.3g} (> {atol:g}); "
                          "the backbone uses an operator the ONNX export does not reproduce")
    return diff


def export_torchscript(model: torch.nn.Module, out: str | Path, *, image_size: int) -> float:
    """Writes ``model`` traced to TorchScript (``torch.jit.load`` reads it without offloadfr) and checks it.

    Returns:
        The largest absolute difference between the saved module and the eager model on a check batch of 3.

    Raises:
        ExportError: the traced module does not reproduce the eager model (difference above :data:`ONNX_ATOL`).
        OutputPathError: ``out`` cannot be written (checked before the export).
    """
    model = model.eval()
    out = check_output(out, "the TorchScript output")
    with torch.no_grad(), warnings.catch_warnings(), _plain_linear():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, (sample_batch(image_size, 2),))
        torch.jit.save(traced, str(out))
        loaded = torch.jit.load(str(out))
        x = sample_batch(image_size, 3, seed=1)
        diff = float((loaded(x) - model(x)).abs().max())
    if not diff <= ONNX_ATOL:
        raise ExportError(f"{out}: the TorchScript module and the eager backbone differ by up to {diff:.3g}")
    return diff


def export_state_dict(model: torch.nn.Module, out: str | Path) -> None:
    """Writes the backbone's ``state_dict`` alone (fp32 tensors on the CPU), loadable with
    ``build_backbone(...).load_state_dict(torch.load(out))``.

    Raises:
        OutputPathError: ``out`` cannot be written.
    """
    out = check_output(out, "the state dict output")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
