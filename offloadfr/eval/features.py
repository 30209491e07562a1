"""Face embeddings of decoded images, with the flip test used by insightface's verification.

Shapes: ``N`` images, ``B`` images in one forward pass, ``S`` image side, ``D`` embedding size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offloadfr.errors import DataError

__all__ = ["extract_embeddings"]


def _model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter, so a bf16 model gets bf16 input (float32 otherwise)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def extract_embeddings(model: torch.nn.Module, images_u8: torch.Tensor, *, batch_size: int = 256, flip: bool = True,
                       device: torch.device | None = None, normalize: bool = True) -> torch.Tensor:
    """Embeds images with ``model`` in eval mode and returns float32 embeddings, L2-normalised by default.

    Each image is scaled to ``[-1, 1]`` as ``(x / 255 - 0.5) / 0.5`` (the arcface_torch training normalisation).
    With ``flip``, the embedding is ``f(x) + f(mirror(x))`` before normalisation (insightface's flip test). The
    model's train/eval mode is restored afterwards, also when the forward raises.

    Args:
        model: Backbone mapping ``(B, 3, S, S)`` float images to ``(B, D)`` embeddings.
        images_u8: ``uint8`` tensor ``(N, 3, S, S)``, RGB, on any device.
        batch_size: Images per forward pass (the flipped copies run in a second pass of the same size).
        flip: Add the embedding of the horizontally mirrored image.
        device: Where the forward runs; defaults to the device of the model's parameters.
        normalize: L2-normalise each row. False keeps the raw (flip-summed) feature and its norm, which IJB template
            pooling weighs images by (:mod:`offloadfr.eval.ijb`).

    Returns:
        ``float32`` tensor ``(N, D)`` on the CPU, each row of unit L2 norm when ``normalize``.

    Raises:
        DataError: ``images_u8`` is not a ``uint8`` ``(N, 3, S, S)`` tensor, or ``batch_size < 1``.
    """
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 3:
        raise DataError(f"images_u8 has dtype {images_u8.dtype} and shape {tuple(images_u8.shape)}; expected a uint8 "
                        "(N, 3, S, S) RGB tensor such as decode_images returns")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} is not allowed; use a positive batch size such as 256")
    device = _model_device(model) if device is None else device
    dtype = _input_dtype(model)
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, images_u8.shape[0], batch_size):
                x_BCSS = images_u8[start:start + batch_size].to(device=device, non_blocking=True)
                x_BCSS = ((x_BCSS.float() / 255.0 - 0.5) / 0.5).to(dtype)
                emb_BD = model(x_BCSS).float()
                if flip:
                    emb_BD = emb_BD + model(torch.flip(x_BCSS, dims=[3])).float()
                chunks.append((F.normalize(emb_BD, dim=1) if normalize else emb_BD).cpu())
    finally:
        model.train(was_training)
    if not chunks:  # N == 0: no forward ran, so D is unknown
        return torch.empty((0, 0), dtype=torch.float32)
    return torch.cat(chunks)
