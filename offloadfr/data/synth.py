"""The embedded synthetic face dataset (``offloadfr synth``, DESIGN §6).

Every identity is a latent vector (face shape, feature positions and sizes, skin/hair/eye/lip colours, glasses, and
the coefficients of a smooth skin texture over a fixed random basis) rendered by a frozen, seeded generator into a
canonical face on a shared mean-face layout, so all identities look alike and differ in structure a CNN can learn.
Each image then adds nuisance that does not carry identity: a pose-like warp (rotation, scale, shift, shear, a yaw
that slides the inner features against the outline, and a smooth elastic field), lighting (gradient, brightness,
contrast, colour cast), a random background, an occluder, sensor noise, low resolution and a random horizontal flip.

Images per training identity follow a lognormal long tail clipped to ``[min_images, max_images]`` whose mean is
``mean_images``. ``num_holdout`` further identities, with their own latent streams (never in the training shards),
render the ``num_pairs`` verification pairs of ``pairs.bin`` (half same identity, half different, interleaved so
that each of the 10 folds is balanced).

Determinism: every random draw comes from ``numpy.random.default_rng([seed, stream, index])`` streams and all math
is element-wise numpy (no BLAS reductions, whose results can depend on the thread count), so the same config gives
byte-identical shards, ``index.json`` and ``pairs.bin`` whatever ``OMP_NUM_THREADS`` is. The dataset is written to
``.<name>.partial`` beside the output and renamed at the end: an interrupted run never leaves a dataset that looks
complete.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from offloadfr.config import SynthCfg, check_synth
from offloadfr.data.pairs import write_pairs_bin
from offloadfr.data.shards import DatasetIndex, ShardWriter, read_index
from offloadfr.errors import DataError

__all__ = ["generate_synthetic", "images_per_identity", "GENERATOR_VERSION"]

GENERATOR_VERSION = 1
"""Bumped whenever the rendered pixels change for a given config; stored in ``index.json`` ``meta``."""

# Random streams: default_rng([seed, stream, index]).
_S_COUNTS, _S_TRAIN_ID, _S_TRAIN_IMG, _S_HOLD_ID, _S_ORDER, _S_PAIRS, _S_PAIR_IMG, _S_BASIS = range(8)

_JPEG_QUALITY = 90
_CANVAS = 1.4  # the canonical face is drawn on [-_CANVAS, _CANVAS]^2; the image crop is [-1, 1]^2 before the warp
_CHUNK_IDS = 64  # identities rendered per vectorised chunk
_TEX_FREQS = 3  # skin texture basis: products of cosines of frequencies 0.._TEX_FREQS-1 per axis (8 fields)
_ELASTIC_BASIS = 6  # per-image elastic warp: random smooth displacement fields
_NUM_SHAPE = 30  # latents of the face layout and colours; the skin-texture coefficients follow


@dataclass(frozen=True, slots=True)
class _Difficulty:
    """Amplitudes of identity variation and of per-image nuisance.

    Calibrated on the default [synth] config with the ``tiny`` backbone (D = 128), ArcFace s = 32, m = 0.3, SGD
    lr 0.1 (100 warmup steps, linear decay), momentum 0.9, wd 5e-4, batch 128: after 2500 steps (8 epochs) the
    flip-test 10-fold accuracy on ``pairs.bin`` is 0.908 (0.66 after 500, 0.81 after 1000, 0.87 after 1500). With
    ``geometry = color = 0.6, texture = 0.1`` the same run reached 0.964 (and 0.92 after 600 steps at 1.0, 1.0, 0.1):
    the identity-variation amplitudes are the difficulty knob.
    """

    geometry: float = 0.35  # scale of the identity's feature-layout variation
    color: float = 0.35  # scale of the identity's skin, hair, iris and lip colour variation
    texture: float = 0.06  # amplitude of the identity's skin texture
    rot_deg: float = 12.0  # image rotation std (degrees)
    scale: float = 0.08  # log-scale std
    shift: float = 0.07  # translation std (face units; the crop half-width is 1)
    shear: float = 0.06
    yaw: float = 0.35  # inner features slide sideways by up to this x 0.2
    elastic: float = 0.035
    light_grad: float = 0.45  # std of the log-brightness gradient across the crop
    brightness: float = 0.25  # log-brightness std
    contrast: float = 0.2  # log-contrast std
    color_cast: float = 0.07  # per-channel gain std
    occlude_p: float = 0.35
    noise_max: float = 0.05  # per-image noise std drawn from U(0, noise_max) (0..1 intensity scale)
    lowres_p: float = 0.35  # probability of a down/up-sampling blur


_DIFF = _Difficulty()


def images_per_identity(cfg: SynthCfg) -> np.ndarray:
    """The number of images of each training identity: lognormal, clipped to ``[min_images, max_images]``.

    The lognormal's location is solved (bisection on the actual draws) so the clipped mean is ``mean_images``.

    Returns:
        int64 array of length ``num_identities``.
    """
    z = np.random.default_rng([cfg.seed, _S_COUNTS]).standard_normal(cfg.num_identities)
    sigma = 0.9

    def counts(mu: float) -> np.ndarray:
        return np.clip(np.rint(np.exp(mu + sigma * z)), cfg.min_images, cfg.max_images).astype(np.int64)

    lo, hi = -5.0, 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if counts(mid).mean() < cfg.mean_images:
            lo = mid
        else:
            hi = mid
    return counts(hi)


def _smooth_mask(d2: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-mask of an implicit shape: 1 where ``d2 << 1``, 0 where ``d2 >> 1``."""
    return 1.0 / (1.0 + np.exp(np.clip((d2 - 1.0) / edge, -30.0, 30.0)))


def _blend(canvas: np.ndarray, color_N3: np.ndarray, alpha: np.ndarray) -> None:
    """canvas (N, R, R, 3) <- alpha-over of a flat colour per identity, in place."""
    a = alpha[..., None]
    canvas *= 1.0 - a
    canvas += a * color_N3[:, None, None, :]


def _texture_basis(seed: int, res: int) -> np.ndarray:
    """Fixed random smooth fields (T, R, R) on the canvas: products of low-frequency cosines, random phases."""
    rng = np.random.default_rng([seed, _S_BASIS])
    c = (np.arange(res, dtype=np.float64) + 0.5) / res * 2.0 - 1.0
    fields = []
    for fy in range(_TEX_FREQS):
        for fx in range(_TEX_FREQS):
            if fx == fy == 0:
                continue
            py, px = rng.uniform(0, 2 * np.pi, size=2)
            fields.append(np.cos(np.pi * fy * c[:, None] * 1.3 + py) * np.cos(np.pi * fx * c[None, :] * 1.3 + px))
    return np.stack(fields).astype(np.float32)


def _draw_identity_latents(seed: int, stream: int, ids: np.ndarray, num_tex: int) -> np.ndarray:
    """One latent row per identity from its own stream ``[seed, stream, id]`` (so ids are independent)."""
    return np.stack([np.random.default_rng([seed, stream, int(i)]).standard_normal(_NUM_SHAPE + 3 * num_tex)
                     for i in ids]).astype(np.float64)


def _render_identities(z: np.ndarray, res: int, tex_basis: np.ndarray) -> np.ndarray:
    """Renders canonical faces (RGB and alpha) from identity latents.

    Args:
        z: (N, _NUM_SHAPE + 3T) latents: standard normal.
        res: side of the canonical canvas in pixels (it spans ``[-_CANVAS, _CANVAS]``).
        tex_basis: (T, res, res) fixed texture fields.

    Returns:
        float32 (N, res, res, 4) in [0, 1]: RGB and face alpha.
    """
    g = _DIFF.geometry
    cs = _DIFF.color
    n = z.shape[0]
    c = ((np.arange(res, dtype=np.float32) + 0.5) / res * 2.0 - 1.0) * _CANVAS
    y = np.broadcast_to(c[None, :, None], (n, res, res))
    x = np.broadcast_to(c[None, None, :], (n, res, res))

    def col(k: int) -> np.ndarray:  # (N, 1, 1) view of latent k
        return z[:, k, None, None].astype(np.float32)

    def rgb(base: tuple[float, float, float], k: int, spread: float) -> np.ndarray:
        # A colour per identity: base + spread * latents k..k+2 (a random direction in RGB).
        return np.clip(np.asarray(base, np.float32)[None, :] + spread * z[:, k:k + 3].astype(np.float32), 0, 1)

    # Head: an ellipse whose half-axes, centre and chin width vary by identity.
    fa = 0.60 * (1 + 0.07 * g * col(0))
    fb = 0.80 * (1 + 0.05 * g * col(1))
    fy0 = 0.05 + 0.03 * g * col(2)
    taper = 0.15 * (1 + 0.6 * g * col(3))  # narrower chin
    xs = x / (fa * (1 - taper * np.clip((y - fy0) / fb, 0, 1)))
    head_d2 = xs ** 2 + ((y - fy0) / fb) ** 2
    alpha = _smooth_mask(head_d2, 0.06)
    skin = rgb((0.80, 0.62, 0.52), 4, 0.07 * cs)
    canvas = np.empty((n, res, res, 3), np.float32)
    canvas[:] = skin[:, None, None, :]
    # Skin texture: smooth identity-specific shading from the fixed basis, one mix per channel.
    nt = tex_basis.shape[0]
    tex = np.zeros((n, res, res, 3), np.float32)
    for t in range(nt):  # fixed order: deterministic whatever the thread count
        for ch in range(3):
            tex[..., ch] += z[:, _NUM_SHAPE + ch * nt + t, None, None].astype(np.float32) * tex_basis[t]
    canvas += (_DIFF.texture / np.sqrt(nt)) * tex
    # Hair: top of the head above a hairline whose height and curvature vary.
    hair_y = fy0 - fb * (0.55 + 0.12 * g * col(7)) + (0.25 + 0.2 * g * col(8)) * x ** 2
    hair_mask = _smooth_mask(((x / (fa * 1.08)) ** 2 + ((y - fy0 + 0.04) / (fb * 1.06)) ** 2), 0.06)
    hair_mask = hair_mask * (1.0 / (1.0 + np.exp(np.clip((y - hair_y) / 0.04, -30, 30))))
    hair_col = np.clip(np.asarray([0.25, 0.18, 0.12], np.float32)[None, :] * (1 + 0.8 * cs * z[:, 9:10])
                       + 0.05 * cs * z[:, 10:13], 0, 1).astype(np.float32)
    _blend(canvas, hair_col, hair_mask)
    alpha = np.maximum(alpha, hair_mask)
    # Eyes: sclera, iris; spacing, height, size and iris colour vary.
    ex = 0.24 * (1 + 0.10 * g * col(13))
    ey = fy0 - 0.18 + 0.05 * g * col(14)
    er = 0.085 * (1 + 0.12 * g * col(15))
    iris_col = rgb((0.30, 0.22, 0.15), 16, 0.12 * cs)
    brow_dy = 0.11 * (1 + 0.15 * g * col(19))
    brow_tilt = 0.15 * g * col(20)
    for side in (-1.0, 1.0):
        dx, dy = x - side * ex, y - ey
        _blend(canvas, np.full((n, 3), 0.92, np.float32), _smooth_mask((dx / (er * 1.5)) ** 2 + (dy / er) ** 2, 0.12))
        _blend(canvas, iris_col, _smooth_mask((dx ** 2 + dy ** 2) / (0.6 * er) ** 2, 0.15))
        # Brow: a thin slanted bar above the eye, in the hair colour.
        by = y - (ey - brow_dy) - side * brow_tilt * dx
        _blend(canvas, hair_col * 0.8, 0.9 * _smooth_mask((dx / (er * 1.9)) ** 2 + (by / (er * 0.38)) ** 2, 0.15))
    # Glasses (about one identity in five): dark rings around the eyes.
    glasses = (z[:, 21] > 0.85).astype(np.float32)[:, None, None]
    for side in (-1.0, 1.0):
        d = np.sqrt((x - side * ex) ** 2 + (y - ey) ** 2) / (er * 2.1)
        _blend(canvas, np.full((n, 3), 0.08, np.float32), glasses * np.exp(-(((d - 1.0) / 0.12) ** 2)))
    # Nose: a shaded vertical ridge and two nostrils; length and width vary.
    ny = fy0 + 0.10 * (1 + 0.25 * g * col(22))
    nw = 0.06 * (1 + 0.2 * g * col(23))
    shade = 0.75 * _smooth_mask((x / nw) ** 2 + ((y - (ey + ny) / 2) / ((ny - ey) * 0.6)) ** 2, 0.2)
    canvas *= (1.0 - 0.18 * shade)[..., None]
    for side in (-1.0, 1.0):
        _blend(canvas, skin * 0.45, 0.8 * _smooth_mask(((x - side * nw) / (nw * 0.6)) ** 2
                                                       + ((y - ny) / (nw * 0.45)) ** 2, 0.2))
    # Mouth: an ellipse whose position, height, width and lip colour vary.
    my = ny + 0.17 * (1 + 0.2 * g * col(24))
    mw = 0.16 * (1 + 0.15 * g * col(25))
    mh = 0.040 * (1 + 0.25 * g * col(26))
    lip = rgb((0.70, 0.35, 0.35), 27, 0.08 * cs)
    _blend(canvas, lip, _smooth_mask((x / mw) ** 2 + ((y - my) / mh) ** 2, 0.12))
    out = np.empty((n, res, res, 4), np.float32)
    out[..., :3] = np.clip(canvas, 0, 1)
    out[..., 3] = alpha
    return out


def _pair_planes(canon: np.ndarray) -> np.ndarray:
    """(M, R, R, 4) faces -> (4, M*R*R) complex64 planes holding (pixel, right neighbour) as (real, imag).

    One gather then fetches both horizontal neighbours of a bilinear tap (4x faster than gathering RGBA rows).
    """
    planes = canon.reshape(-1, 4).T
    pairs = np.zeros((4, planes.shape[1], 2), np.float32)
    pairs[..., 0] = planes
    pairs[:, :-1, 1] = planes[:, 1:]
    return pairs.view(np.complex64)[..., 0]


def _bilinear(pairs: np.ndarray, res: int, owner: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Samples the faces of ``owner`` at canvas pixel coords (py, px), each (n, S, S); returns (4, n, S, S)."""
    py = np.clip(py, 0.0, res - 1.001)
    px = np.clip(px, 0.0, res - 1.001)
    y0 = py.astype(np.int64)
    x0 = px.astype(np.int64)
    wy = py - y0
    wx = px - x0
    i00 = owner[:, None, None] * (res * res) + y0 * res + x0
    out = np.empty((4, *py.shape), np.float32)
    for c in range(4):
        top = np.take(pairs[c], i00)
        bot = np.take(pairs[c], i00 + res)
        t = top.real + (top.imag - top.real) * wx
        b = bot.real + (bot.imag - bot.real) * wx
        out[c] = t + (b - t) * wy
    return out


def _render_images(canon: np.ndarray, owner: np.ndarray, rng: np.random.Generator, size: int,
                   elastic_basis: np.ndarray) -> np.ndarray:
    """Renders one image per entry of ``owner`` (index into ``canon``) with fresh nuisance from ``rng``.

    Works channel-first, (C, n, S, S) float32, so per-image parameters broadcast over contiguous pixels.

    Returns:
        uint8 (n, size, size, 3).
    """
    d = _DIFF
    f32 = np.float32
    n = owner.shape[0]
    res = canon.shape[1]
    # Per-image nuisance parameters, drawn in a fixed order.
    rot = np.deg2rad(d.rot_deg) * np.clip(rng.standard_normal(n), -2.5, 2.5)
    scale = np.exp(d.scale * np.clip(rng.standard_normal(n), -2.5, 2.5))
    aniso = np.exp(0.5 * d.scale * rng.standard_normal(n))
    shear = d.shear * rng.standard_normal(n)
    shift = d.shift * np.clip(rng.standard_normal((2, n)), -2.5, 2.5)
    yaw = d.yaw * rng.uniform(-1.0, 1.0, n)
    ecoef = d.elastic * rng.standard_normal((elastic_basis.shape[0], 2, n))
    grad = d.light_grad * rng.standard_normal((2, n))
    bright = d.brightness * rng.standard_normal(n)
    contrast = np.exp(d.contrast * rng.standard_normal(n))
    gains = 1.0 + d.color_cast * rng.standard_normal((3, n))
    bg_corners = rng.uniform(0.0, 1.0, (3, 4, n))
    occ = rng.uniform(0.0, 1.0, n) < d.occlude_p
    occ_c = rng.uniform(-1.0, 1.0, (2, n))
    occ_h = rng.uniform(0.15, 0.6, (2, n))
    occ_col = rng.uniform(0.0, 1.0, (3, n))
    noise_std = d.noise_max * rng.uniform(0.0, 1.0, n)
    noise = rng.standard_normal((3, n, size, size), dtype=f32)

    def b(a: np.ndarray) -> np.ndarray:  # per-image vector (n,) -> (n, 1, 1) float32
        return a.astype(f32)[:, None, None]

    # Output pixel centres in face units u in [-1, 1].
    u1 = ((np.arange(size, dtype=f32) + 0.5) / size * 2.0 - 1.0)
    uy, ux = u1[:, None], u1[None, :]
    # Inverse warp: canvas point p of output pixel u is p = A^-1 (u - t) + elastic(u), then yaw.
    cr, sr = b(np.cos(rot)), b(np.sin(rot))
    vx = ux - b(shift[0])
    vy = uy - b(shift[1])
    rx = (cr * vx + sr * vy) / b(scale * aniso)
    ry = (cr * vy - sr * vx) / b(scale)
    rx = rx + b(shear) * ry
    ne = elastic_basis.shape[0]
    for k in range(ne):
        rx += b(ecoef[k, 0]) * elastic_basis[k]
        ry += b(ecoef[k, 1]) * elastic_basis[(k + 1) % ne]
    # Yaw: slide the centre of the face sideways more than its rim (a crude out-of-plane turn).
    rx -= f32(0.2) * b(yaw) * np.clip(1.0 - rx * rx - ry * ry, 0.0, 1.0)
    to_px = f32(res / (2.0 * _CANVAS))
    face = _bilinear(_pair_planes(canon), res, owner, (ry + f32(_CANVAS)) * to_px - f32(0.5),
                     (rx + f32(_CANVAS)) * to_px - f32(0.5))
    # Background: bilinear blend of four random corner colours; composite the face over it.
    ty, tx = (uy + 1) / 2, (ux + 1) / 2
    bc = bg_corners.astype(f32)[..., None, None]  # (3, 4, n, 1, 1)
    bg = (1 - ty) * ((1 - tx) * bc[:, 0] + tx * bc[:, 1]) + ty * ((1 - tx) * bc[:, 2] + tx * bc[:, 3])
    a = face[3]
    img = face[:3] * a + bg * (1 - a)  # (3, n, S, S)
    # Occluder: a flat rectangle (hand, scarf, sunglasses band) over part of the crop.
    inside = ((np.abs(ux - b(occ_c[0])) < b(occ_h[0]) / 2) & (np.abs(uy - b(occ_c[1])) < b(occ_h[1]) / 2)
              & occ[:, None, None])
    img = np.where(inside, occ_col.astype(f32)[:, :, None, None], img)
    # Lighting: log-linear gradient and brightness, contrast about the image mean, colour cast, then noise.
    img *= np.exp(b(grad[0]) * ux + b(grad[1]) * uy + b(bright))
    mean = img.mean(axis=(0, 2, 3), dtype=np.float64).astype(f32)[:, None, None]
    img = (img - mean) * b(contrast) + mean
    img *= gains.astype(f32)[:, :, None, None]
    img += noise * b(noise_std)
    out = np.clip(np.rint(img * f32(255.0)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(1, 2, 3, 0))


def _elastic_basis(seed: int, size: int) -> np.ndarray:
    """Fixed smooth displacement fields (E, S, S) on the output grid, unit amplitude."""
    rng = np.random.default_rng([seed, _S_BASIS, 1])
    u1 = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    uy, ux = np.meshgrid(u1, u1, indexing="ij")
    fields = []
    for _ in range(_ELASTIC_BASIS):
        f = rng.uniform(0.5, 1.5, 2) * np.pi * rng.choice([-1.0, 1.0], 2)
        fields.append(np.cos(f[0] * ux + f[1] * uy + rng.uniform(0, 2 * np.pi)))
    return np.stack(fields).astype(np.float32)


def _encode(img_u8: np.ndarray, rng: np.random.Generator) -> list[bytes]:
    """Low-resolution blur and horizontal flip (per image), then JPEG encoding."""
    size = img_u8.shape[1]
    n = img_u8.shape[0]
    lowres = rng.uniform(0.0, 1.0, n) < _DIFF.lowres_p
    factor = rng.uniform(0.35, 0.75, n)
    flip = rng.uniform(0.0, 1.0, n) < 0.5
    out = []
    for i in range(n):
        im = Image.fromarray(img_u8[i][:, ::-1] if flip[i] else img_u8[i])
        if lowres[i]:
            small = max(4, int(round(size * factor[i])))
            im = im.resize((small, small), Image.Resampling.BILINEAR).resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=_JPEG_QUALITY)
        out.append(buf.getvalue())
    return out


def _progress(total: int, enabled: bool, desc: str) -> tqdm:  # type: ignore[type-arg]
    return tqdm(total=total, desc=desc, unit="img", disable=not (enabled and sys.stderr.isatty()), leave=False)


class _Renderer:
    """The frozen generator of one seed and image size."""

    def __init__(self, seed: int, size: int) -> None:
        self.seed = seed
        self.size = size
        self.res = int(np.ceil(size * _CANVAS))
        self.tex_basis = _texture_basis(seed, self.res)
        self.elastic_basis = _elastic_basis(seed, size)

    def canonical(self, stream: int, ids: np.ndarray) -> np.ndarray:
        z = _draw_identity_latents(self.seed, stream, ids, self.tex_basis.shape[0])
        return _render_identities(z, self.res, self.tex_basis)

    def images(self, canon: np.ndarray, owner: np.ndarray, rng: np.random.Generator) -> list[bytes]:
        return _encode(_render_images(canon, owner, rng, self.size, self.elastic_basis), rng)


def _training_chunks(cfg: SynthCfg, r: _Renderer, order: np.ndarray, counts: np.ndarray
                     ) -> Iterator[list[tuple[int, list[bytes]]]]:
    for start in range(0, len(order), _CHUNK_IDS):
        ids = order[start:start + _CHUNK_IDS]
        canon = r.canonical(_S_TRAIN_ID, ids)
        chunk = []
        for j, identity in enumerate(ids):
            rng = np.random.default_rng([cfg.seed, _S_TRAIN_IMG, int(identity)])
            chunk.append((int(identity), r.images(canon, np.full(int(counts[identity]), j), rng)))
        yield chunk


def _pairs(cfg: SynthCfg, r: _Renderer) -> tuple[list[bytes], list[bool]]:
    """Renders the verification pairs: images [a0, b0, a1, b1, ...] and issame per pair."""
    rng = np.random.default_rng([cfg.seed, _S_PAIRS])
    num_same = cfg.num_pairs // 2
    # Interleave same and different pairs evenly so every contiguous fold is balanced.
    issame = np.zeros(cfg.num_pairs, dtype=bool)
    issame[np.floor(np.arange(num_same) * (cfg.num_pairs / max(num_same, 1))).astype(np.int64)] = True
    first = rng.integers(0, cfg.num_holdout, cfg.num_pairs)
    other = (first + rng.integers(1, cfg.num_holdout, cfg.num_pairs)) % cfg.num_holdout
    second = np.where(issame, first, other)
    canon = r.canonical(_S_HOLD_ID, np.arange(cfg.num_holdout))
    owner = np.stack([first, second], axis=1).reshape(-1)
    images: list[bytes] = []
    for start in range(0, len(owner), 1024):
        img_rng = np.random.default_rng([cfg.seed, _S_PAIR_IMG, start])
        images += r.images(canon, owner[start:start + 1024], img_rng)
    return images, [bool(s) for s in issame]


def generate_synthetic(out_dir: str | os.PathLike[str], cfg: SynthCfg, *, progress: bool = True) -> DatasetIndex:
    """Writes the synthetic face dataset: ``shards/*.tar``, ``index.json`` and ``pairs.bin``.

    Args:
        out_dir: the dataset directory to create; it must not exist or be empty.
        cfg: sizes and seed ([synth] section).
        progress: show a tqdm bar on a terminal.

    Returns:
        The index of the written dataset.

    Raises:
        ConfigError: inconsistent image counts (``min_images <= mean_images <= max_images`` is required).
        DataError: ``out_dir`` exists and is not empty.
    """
    check_synth(cfg)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty directory; delete it or choose another output "
                        "directory")
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an interrupted run of ours
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        r = _Renderer(cfg.seed, cfg.image_size)
        counts = images_per_identity(cfg)
        order = np.random.default_rng([cfg.seed, _S_ORDER]).permutation(cfg.num_identities)
        total = int(counts.sum()) + 2 * cfg.num_pairs
        with _progress(total, progress, "synth") as bar, \
                ShardWriter(tmp, samples_per_shard=cfg.samples_per_shard) as writer:
            for chunk in _training_chunks(cfg, r, order, counts):
                for identity, images in chunk:
                    writer.write_identity(identity, images)
                    bar.update(len(images))
            pair_images, issame = _pairs(cfg, r)
            write_pairs_bin(tmp / "pairs.bin", pair_images, issame)
            bar.update(len(pair_images))
            meta = {"source": "synth", "generator_version": GENERATOR_VERSION, "synth": dataclasses.asdict(cfg)}
            writer.finish(num_classes=cfg.num_identities, image_size=cfg.image_size, meta=meta)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_index(out)
