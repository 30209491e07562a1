"""L2-normalised embeddings of image files, preprocessed as evaluation does.

Each file is decoded to RGB, resized to ``S x S`` (bilinear) when its size differs (the same
:func:`~offloadfr.data.pairs.decode_images` the verification packs go through), scaled to ``[-1, 1]`` and embedded
by the backbone; the embedding is L2-normalised. Images are expected to be aligned face crops, as in training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from offloadfr.data.pairs import decode_images
from offloadfr.errors import DataError, DataNotFoundError
from offloadfr.eval.features import extract_embeddings

__all__ = ["embed_files"]


def embed_files(model: torch.nn.Module, paths: Sequence[str | os.PathLike[str]], *, image_size: int,
                batch_size: int = 64, flip: bool = False) -> np.ndarray:
    """Embeds the images at ``paths``.

    Args:
        model: the backbone (see :func:`offloadfr.tools.backbone.load_backbone`).
        paths: image files (JPEG, PNG, anything PIL reads).
        image_size: S, the model's input side (``model.image_size`` of the run).
        batch_size: images per forward pass.
        flip: add the embedding of the mirrored image before normalising (the flip test of evaluation).

    Returns:
        float32 array ``(len(paths), D)``, each row of unit L2 norm, in the order of ``paths``.

    Raises:
        DataNotFoundError: a file does not exist.
        DataError: a file is not an image.
    """
    blobs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataNotFoundError(f"image {str(path)!r} does not exist; pass paths of image files")
        blobs.append(path.read_bytes())
    decoded = [torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)]
    for i, blob in enumerate(blobs):  # decoded one by one so an error names the file
        try:
            decoded.append(decode_images([blob], image_size))
        except DataError as e:
            raise DataError(f"{paths[i]} is not an image PIL can read; pass JPEG or PNG files") from e
    return extract_embeddings(model, torch.cat(decoded), batch_size=batch_size, flip=flip).numpy()
