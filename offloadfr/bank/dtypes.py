"""The dtypes a bank stores its rows in (``bank.dtype``), how they are laid out in Zarr, and the rounding to them.

Legend: n = rows in one call, D = dim.

A bank holds its rows in ``float32`` (4 bytes per value, the default) or ``bfloat16`` (2 bytes: the float32 exponent
with 8 significant bits, relative spacing 2^-7 to 2^-8). Rows are *stored and moved* in that dtype (host tensors of
the ram tier, nvme blocks, chunk files, the prefetcher's pinned buffers and its host <-> device copies); the device
container upcasts them to float32 when it admits them and the head updates them in float32, so a row is rounded once
per write-back (an eviction, or a checkpoint), not once per step.

Zarr 3.1 and numpy have no bfloat16, so a bfloat16 array is stored as ``uint16`` holding the raw bfloat16 bits
(the upper half of the float32 bit pattern, little-endian), and the array's attribute ``offloadfr_dtype`` (and the
group's ``dtype``) says so. ``to_storage`` / ``from_storage`` convert between a bank-dtype tensor and that numpy
array without a copy.

Rounding (``round_rows``): to nearest, ties to even (what ``Tensor.to`` does), or stochastic: up or down with a
probability proportional to the distance, so that the expected stored value is the exact one and an update smaller
than half a bfloat16 step is not always lost. Stochastic rounding adds uniform 16-bit noise to the low half of the
float32 bits and truncates; the noise comes from a ``torch.Generator`` the caller seeds, so it is reproducible.
"""

from __future__ import annotations

import numpy as np
import torch

from offloadfr.errors import BankError

__all__ = ["BANK_DTYPES", "ROUNDINGS", "check_dtype", "torch_dtype", "storage_dtype", "bytes_per_value",
           "to_storage", "from_storage", "round_rows"]

BANK_DTYPES = ("float32", "bfloat16")
"""The values of ``bank.dtype``."""

ROUNDINGS = ("nearest", "stochastic")
"""How float32 rows are rounded to a narrower bank dtype (``round_rows``)."""

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_STORAGE = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2")}
_LOW_HALF = 1 << 16
_HIGH_HALF_MASK = -(1 << 16)  # int32 with the low 16 bits clear


def check_dtype(name: str) -> str:
    """Returns ``name`` if it is a bank dtype.

    Raises:
        BankError: it is not one of :data:`BANK_DTYPES`.
    """
    if name not in _TORCH:
        raise BankError(f"bank dtype {name!r} is not one of {list(BANK_DTYPES)}; set bank.dtype to one of them")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of the rows of a bank of dtype ``name``."""
    return _TORCH[check_dtype(name)]


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype of the Zarr arrays (and chunk files) of a bank of dtype ``name``."""
    return _STORAGE[check_dtype(name)]


def bytes_per_value(name: str) -> int:
    """Bytes per stored value: 4 for float32, 2 for bfloat16."""
    return storage_dtype(name).itemsize


def to_storage(rows: torch.Tensor) -> np.ndarray:
    """A CPU tensor of a bank dtype as the numpy array Zarr stores (a view of the same memory when contiguous)."""
    rows = rows.contiguous()
    if rows.dtype == torch.bfloat16:
        return rows.view(torch.int16).numpy().view(np.uint16)
    assert rows.dtype == torch.float32, rows.dtype
    return rows.numpy()


def from_storage(array: np.ndarray, name: str) -> torch.Tensor:
    """The stored numpy ``array`` of a bank of dtype ``name`` as a tensor of that dtype (shares its memory)."""
    if check_dtype(name) == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def round_rows(rows: torch.Tensor, dtype: torch.dtype, *, rounding: str = "nearest",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``rows`` rounded to ``dtype``: to nearest (ties to even), or stochastically (see the module docstring).

    Args:
        rows: floating-point rows on any device.
        dtype: the bank's torch dtype; float32 rows are returned as they are.
        rounding: ``"nearest"`` or ``"stochastic"`` (bfloat16 only; float32 needs no rounding).
        generator: the noise of stochastic rounding, on the device of ``rows`` (None: torch's default generator).

    Returns:
        A tensor of ``dtype`` on the device of ``rows`` (``rows`` itself when nothing changes).

    Raises:
        ValueError: ``rounding`` is not one of :data:`ROUNDINGS`.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not one of {list(ROUNDINGS)}")
    if rows.dtype == dtype:
        return rows
    if rounding == "nearest" or dtype != torch.bfloat16:
        return rows.to(dtype)
    x = rows.to(torch.float32).contiguous()
    noise = torch.randint(0, _LOW_HALF, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # Adding to the bit pattern grows the magnitude (floats are sign-magnitude), so this rounds |x| up with
    # probability (its low 16 bits) / 2^16, for either sign; the truncated value is exact in bfloat16.
    truncated = ((x.view(torch.int32) + noise) & _HIGH_HALF_MASK).view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isfinite(x), truncated, x.to(torch.bfloat16))
