"""Deterministic per-id initial rows of a bank: N(0, std) values that depend only on (seed, id, column).

Legend: N = num_classes, D = dim, n = number of ids in one call, P = ceil(D / 2) normal pairs per row.

A bank is created in O(1): no row is written until it is trained, and an untouched row reads as its initial value,
regenerated on demand. So the initialiser must be a pure function of (seed, id): the same row on every read, after
reopening, in ``MemoryBank`` and ``ZarrBank``, in any block size (``chunk_rows``) and in any batch of ids. Library
generators do not fit: numpy's and torch's streams are sequential (the value of row i depends on how many values came
before it), and neither promises stable streams across versions.

The generator here is counter-based: the 64-bit counter ``(id << 24) | j`` is hashed with SplitMix64 keyed by the
seed (the output of a SplitMix64 stream at position ``counter``); its two 32-bit halves become two uniforms, and the
Box-Muller transform turns them into the normals at columns ``2j`` and ``2j + 1`` of row ``id``. The hash uses only
integer arithmetic (bit-exact everywhere); the radius is computed in float64 and the angle's sin/cos in float32 (numpy's
SIMD kernels). Values are bit-identical on one machine, whatever the batch, order or block; between CPUs with different
SIMD kernels (AVX-512 vs AVX2) a value may differ in its last float32 bit.
Supports ids below 2**40 and D below 2**25. Rows of every array other than ``"centers"`` (e.g. ``"momentum"``)
start at zero.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

__all__ = ["RANDOM_INIT_ARRAY", "initial_rows", "initial_block", "initial_rows_np"]

RANDOM_INIT_ARRAY = "centers"
"""The one array whose initial rows are random; every other array starts at zero."""

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64 increment (golden ratio)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_COL_BITS = 24
_MAX_ID = 1 << 40
_TWO_PI_2_32 = 2.0 * np.pi / 2.0**32
_PIECE_PAIRS = 16384
"""Normal pairs generated per piece (128 KiB of uint64 counters: the scratch buffers stay in the CPU's L2 cache)."""


def _mix64(z: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """SplitMix64's finaliser, in place on a uint64 array (a bijection with full avalanche); ``scratch`` (same shape)
    holds the shifted copies, else a temporary does."""
    scratch = np.empty_like(z) if scratch is None else scratch
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        np.right_shift(z, np.uint64(shift), out=scratch)
        z ^= scratch
        if mult is not None:
            z *= mult
    return z


def _seed_key(seed: int) -> np.uint64:
    """Spreads a small seed over 64 bits so that seeds 0, 1, 2 give unrelated streams."""
    return _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GAMMA)[0]


def _normals(ids: np.ndarray, dim: int, seed: int, std: float) -> np.ndarray:
    """The (n, D) float32 initial rows of int64 ``ids`` (already validated).

    Rows are generated a piece of at most ``_PIECE_PAIRS`` pairs at a time, every step written into scratch buffers
    made once per call (``out=``). Whole-size temporaries (about ten per call) can cost more in page faults than in
    arithmetic, since a fresh multi-MiB array may come from ``mmap``: in a process with torch loaded the whole-array
    version took about 4x as long per 1024 x 512 block, and its peak memory was 4.5x its result
    (docs/benchmarks/bank_io_cpu-2core_202611.md). Each value is computed by the same element-wise operations on the
    same dtypes as in one whole-array pass, so the values do not depend on the piece size
    (``tests/test_bank_parallel.py`` checks them bit for bit against that plain pass).
    """
    n = ids.shape[0]
    num_pairs = (dim + 1) // 2
    out = np.empty((n, 2 * num_pairs), dtype=np.float32)
    rows = max(1, min(n, _PIECE_PAIRS // num_pairs))
    cols = np.arange(num_pairs, dtype=np.uint64)
    key = _seed_key(seed)
    z = np.empty((rows, num_pairs), dtype=np.uint64)
    scratch = np.empty((rows, num_pairs), dtype=np.uint64)
    u1 = np.empty((rows, num_pairs), dtype=np.float64)
    radius = np.empty((rows, num_pairs), dtype=np.float32)
    theta = np.empty((rows, num_pairs), dtype=np.float32)
    trig = np.empty((rows, num_pairs), dtype=np.float32)
    for start in range(0, n, rows):
        k = min(rows, n - start)
        z_k, scratch_k, u1_k, radius_k, theta_k, trig_k = z[:k], scratch[:k], u1[:k], radius[:k], theta[:k], trig[:k]
        # counter = (id << 24) | j for j < P; the SplitMix64 state at that position is key + counter * gamma.
        np.add((ids[start:start + k].astype(np.uint64) << np.uint64(_COL_BITS))[:, None], cols, out=z_k)
        z_k *= _GAMMA
        z_k += key
        _mix64(z_k, scratch_k)
        # u1 in (0, 1] (never 0, so log is finite), from the high half; the angle from the low half.
        # The halves are taken through a uint32 view: numpy converts uint64 to float without SIMD (15x slower).
        halves = z_k.view(np.uint32).reshape(k, num_pairs, 2)
        high, low = (halves[..., 1], halves[..., 0]) if sys.byteorder == "little" else (halves[..., 0], halves[..., 1])
        np.add(high, 1.0, out=u1_k)  # uint32 -> float64 is exact, and so are + 1 and the power-of-2 scaling
        u1_k *= 1.0 / 2.0**32
        np.log(u1_k, out=u1_k)
        u1_k *= -2.0
        np.sqrt(u1_k, out=u1_k)
        np.copyto(radius_k, u1_k, casting="same_kind")  # the radius is computed in float64, then rounded once
        radius_k *= np.float32(std)
        np.copyto(theta_k, low, casting="same_kind")
        theta_k *= np.float32(_TWO_PI_2_32)
        # float32 sin/cos use numpy's SIMD kernels (15x faster than float64 libm on this VM).
        np.multiply(radius_k, np.cos(theta_k, out=trig_k), out=out[start:start + k, 0::2])
        np.multiply(radius_k, np.sin(theta_k, out=trig_k), out=out[start:start + k, 1::2])
    return out[:, :dim] if dim % 2 else out


def _check(ids: np.ndarray, dim: int) -> None:
    if dim <= 0 or dim >= 1 << (_COL_BITS + 1):
        raise ValueError(f"dim={dim} is outside [1, {1 << (_COL_BITS + 1)}); the initialiser supports D < 2**25")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= _MAX_ID):
        raise ValueError(f"ids span [{int(ids.min())}, {int(ids.max())}]; the initialiser supports ids in [0, 2**40)")


def initial_rows_np(ids: np.ndarray, dim: int, *, seed: int, std: float) -> np.ndarray:
    """Initial ``"centers"`` rows of ``ids`` as a float32 numpy array.

    Args:
        ids: integer array of shape (n,), any order, may repeat; values in [0, 2**40).
        dim: D, the row width.
        seed: the bank's init seed.
        std: standard deviation of the N(0, std) values.

    Returns:
        A new C-contiguous float32 array of shape (n, D).

    Raises:
        ValueError: ``dim`` or an id is outside what the counter layout supports.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    _check(ids, dim)
    return np.ascontiguousarray(_normals(ids, dim, seed, std))


def initial_rows(ids: torch.Tensor, dim: int, *, seed: int, std: float) -> torch.Tensor:
    """Initial ``"centers"`` rows of ``ids``: N(0, std) values that depend only on (seed, id).

    Args:
        ids: integer tensor of shape (n,) on any device, any order, may repeat.
        dim: D, the row width.
        seed: the bank's init seed (``BankCfg.seed``).
        std: standard deviation (``BankCfg.init_std``).

    Returns:
        A float32 CPU tensor of shape (n, D).

    Raises:
        ValueError: ``dim`` or an id is outside what the counter layout supports.

    Example::

        w_ND = initial_rows(torch.arange(37), 8, seed=0, std=0.01)
        assert torch.equal(w_ND[5:6], initial_rows(torch.tensor([5]), 8, seed=0, std=0.01))
    """
    ids_np = ids.detach().to(device="cpu", dtype=torch.int64).reshape(-1).numpy()
    return torch.from_numpy(initial_rows_np(ids_np, dim, seed=seed, std=std))


def initial_block(array: str, start: int, stop: int, dim: int, *, seed: int, std: float) -> np.ndarray:
    """Initial rows ``[start, stop)`` of ``array``: random for ``"centers"``, zeros for every other array.

    Args:
        array: the bank array name.
        start: first id of the block.
        stop: one past the last id.
        dim: D, the row width.
        seed: the bank's init seed.
        std: standard deviation of the centers' N(0, std) values.

    Returns:
        A new float32 array of shape (stop - start, D).
    """
    if array != RANDOM_INIT_ARRAY:
        return np.zeros((stop - start, dim), dtype=np.float32)
    return initial_rows_np(np.arange(start, stop, dtype=np.int64), dim, seed=seed, std=std)
