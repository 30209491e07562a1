"""InsightFace verification packs (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ... and our ``pairs.bin``).

A pack is a pickle of ``(bins, issame_list)``: ``bins`` holds ``2 * P`` encoded images (JPEG or PNG bytes), pair ``i``
being images ``2i`` and ``2i + 1``, and ``issame_list`` holds ``P`` bools (True: same identity). Packs written by
Python 2 hold ``str`` (read back as ``bytes`` with ``encoding="bytes"``); some converters store numpy ``uint8``
arrays of the encoded buffer or ``memoryview`` objects. All of these are accepted and turned into ``bytes``.

Security: unpickling executes code chosen by whoever wrote the file. Only open packs you trust, exactly as with
insightface's own ``load_bin``.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from offloadfr.errors import DataError, DataNotFoundError

__all__ = ["write_pairs_bin", "read_pairs_bin", "decode_images"]


def _to_bytes(item: Any, index: int, where: str) -> bytes:
    """One encoded image as ``bytes``; ``where`` names the pack (or the caller) for the error message."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise DataError(f"{where}: image {index} is a {type(item).__name__}"
                    f"{f' of dtype {item.dtype}' if isinstance(item, np.ndarray) else ''}; expected encoded image "
                    "bytes (bytes, bytearray, memoryview or a uint8 numpy array); rewrite the pack with "
                    "write_pairs_bin")


def _to_bool(item: Any, index: int, where: str) -> bool:
    """One ``issame`` entry as ``bool``: bools, numpy bools and the integers 0/1 are accepted."""
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    if isinstance(item, (int, np.integer)) and int(item) in (0, 1):
        return bool(item)
    raise DataError(f"{where}: issame[{index}] is {item!r} ({type(item).__name__}); expected a bool (or 0/1)")


def _check_counts(num_images: int, num_issame: int, where: str) -> None:
    if num_images % 2:
        raise DataError(f"{where}: holds an odd number of images ({num_images}); pair i is images 2i and 2i+1, "
                        "so the count must be even")
    if num_images != 2 * num_issame:
        raise DataError(f"{where}: holds {num_images} images for {num_issame} issame labels; expected "
                        f"len(images) == 2 * len(issame) ({2 * num_issame})")
    if num_issame == 0:
        raise DataError(f"{where}: holds no pairs; a verification pack needs at least one pair")


def write_pairs_bin(path: str | os.PathLike[str], images: Sequence[Any], issame: Sequence[Any] | np.ndarray) -> None:
    """Writes a verification pack that insightface's ``load_bin`` (and :func:`read_pairs_bin`) can read.

    The file is written to ``<path>.tmp`` and moved into place with ``os.replace``, so a reader never sees a
    half-written pack. Parent directories are created.

    Args:
        path: Destination file, e.g. ``data/pairs.bin``.
        images: ``2 * P`` encoded images (bytes, bytearray, memoryview or uint8 numpy arrays); pair ``i`` is
            ``images[2i]`` and ``images[2i + 1]``.
        issame: ``P`` labels, True where the two images of the pair show the same identity.

    Raises:
        DataError: The counts do not match (odd image count, ``len(images) != 2 * len(issame)``, no pairs) or an
            entry has the wrong type.
    """
    path = Path(path)
    where = f"write_pairs_bin({path})"
    _check_counts(len(images), len(issame), where)
    bins = [_to_bytes(item, i, where) for i, item in enumerate(images)]
    labels = [_to_bool(item, i, where) for i, item in enumerate(issame)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            # Protocol 4 (Python >= 3.4): readable by insightface's py3 loader, handles > 4 GiB packs.
            pickle.dump((bins, labels), f, protocol=4)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_pairs_bin(path: str | os.PathLike[str]) -> tuple[list[bytes], list[bool]]:
    """Reads a verification pack (see the module docstring for the format).

    Only open packs you trust: unpickling runs code chosen by the file's author.

    Args:
        path: The ``.bin`` file.

    Returns:
        ``(images, issame)``: ``2 * P`` encoded images as ``bytes`` and ``P`` bools.

    Raises:
        DataNotFoundError: ``path`` does not exist (also a ``FileNotFoundError``).
        DataError: ``path`` is not a pickle of ``(images, issame)``, the counts do not match, or an entry has the
            wrong type.
    """
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"verification pack {path} does not exist; pass an existing .bin file "
                                "(e.g. the pairs.bin written by `offloadfr synth`)")
    if path.is_dir():
        raise DataError(f"verification pack {path} is a directory; expected a .bin file such as {path / 'pairs.bin'}")
    try:
        with open(path, "rb") as f:
            # encoding="bytes": Python 2 packs store images as str, which must come back as raw bytes.
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # unpickling garbage raises many types (UnpicklingError, EOFError, KeyError, ...)
        raise DataError(f"verification pack {path} is not a readable pickle ({type(e).__name__}: {e}); "
                        "expected an InsightFace .bin pack") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        desc = f"a {type(obj).__name__}" + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        raise DataError(f"verification pack {path} holds {desc}; expected a pair (images, issame)")
    raw_images, raw_issame = obj
    where = f"verification pack {path}"
    for name, seq in (("images", raw_images), ("issame", raw_issame)):
        if not isinstance(seq, (list, tuple, np.ndarray)):
            raise DataError(f"{where}: {name} is a {type(seq).__name__}; expected a list")
    _check_counts(len(raw_images), len(raw_issame), where)
    images = [_to_bytes(item, i, where) for i, item in enumerate(raw_images)]
    issame = [_to_bool(item, i, where) for i, item in enumerate(raw_issame)]
    return images, issame


def decode_images(images: Sequence[bytes], image_size: int) -> torch.Tensor:
    """Decodes encoded images into one RGB ``uint8`` tensor.

    Args:
        images: Encoded images (JPEG, PNG or anything PIL opens).
        image_size: Output side ``S``; an image of another size is resized to ``S x S`` with bilinear filtering.

    Returns:
        ``uint8`` tensor of shape ``(N, 3, S, S)``, RGB channel order.

    Raises:
        DataError: ``image_size`` is not positive, or an image cannot be decoded (the message gives its index).
    """
    if image_size < 1:
        raise DataError(f"image_size={image_size} is not allowed; use a positive size such as 112")
    out_NCSS = torch.empty((len(images), 3, image_size, image_size), dtype=torch.uint8)
    for i, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as img:
                rgb = img.convert("RGB")
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on corrupt data
            raise DataError(f"image {i} (pair {i // 2}) cannot be decoded ({type(e).__name__}: {e}); "
                            "the pack is corrupt") from e
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        out_NCSS[i] = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out_NCSS
