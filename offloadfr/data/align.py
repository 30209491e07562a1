"""Five-point face alignment onto ArcFace's 112 x 112 template, with numpy and Pillow only.

Shapes: ``5 x 2`` landmarks ``(x, y)`` in the order left eye, right eye, nose tip, left mouth corner, right mouth
corner (as seen in the image), ``S`` the side of the aligned face.

Conventions (those of insightface's ``norm_crop`` and arcface_torch's ``eval_ijbc.py``, which use scikit-image's
``SimilarityTransform.estimate`` and OpenCV's ``warpAffine``):

* the transform is the least-squares similarity (rotation, uniform scale, translation; no reflection) from the
  landmarks onto the template, estimated with Umeyama's closed form;
* coordinates are pixel indices: pixel ``(i, j)`` has its centre at ``x = j, y = i`` (OpenCV's convention). Pillow
  puts pixel centres at ``+0.5``; :func:`align_face` converts, so a landmark at pixel ``(x, y)`` lands exactly on its
  template point;
* bilinear sampling, black outside the source image (``borderValue=0``). Measured against a numpy warp with
  OpenCV's rounding (tests/test_align.py): Pillow truncates its 8-bit result (0.5 grey level darker on average,
  never more than 1 off), and within one pixel of the source border it fills or repeats the edge where OpenCV
  blends with black;
* for a side other than 112 the template is scaled by ``S / 112`` (the whole face, margins included, scales with
  the crop).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from offloadfr.errors import DataError

__all__ = ["ARCFACE_TEMPLATE_112", "arcface_template", "estimate_similarity", "align_face"]

ARCFACE_TEMPLATE_112 = np.array([
    [38.2946, 51.6963],  # left eye
    [73.5318, 51.5014],  # right eye
    [56.0252, 71.7366],  # nose tip
    [41.5493, 92.3655],  # left mouth corner
    [70.7299, 92.2041],  # right mouth corner
], dtype=np.float64)
"""ArcFace's five landmark positions in a 112 x 112 crop (insightface ``arcface_dst``), pixel-index coordinates."""


def arcface_template(size: int = 112) -> np.ndarray:
    """The template for an ``size x size`` crop: :data:`ARCFACE_TEMPLATE_112` scaled by ``size / 112``.

    Args:
        size: Side of the aligned crop, in pixels.

    Returns:
        ``(5, 2)`` float64 landmark positions.

    Raises:
        DataError: ``size`` is not positive.
    """
    if size < 1:
        raise DataError(f"aligned face size {size} is not allowed; use a positive side such as 112")
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def estimate_similarity(src_5x2: np.ndarray, dst_5x2: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform mapping ``src`` points onto ``dst`` points (Umeyama, 1991).

    Args:
        src_5x2: ``(K, 2)`` source points (any ``K >= 2``; five landmarks for alignment).
        dst_5x2: ``(K, 2)`` destination points, same order.

    Returns:
        ``(2, 3)`` float64 matrix ``M`` with ``dst ~= src @ M[:, :2].T + M[:, 2]``; its 2 x 2 part is ``s * R`` with
        ``R`` a rotation (never a reflection).

    Raises:
        DataError: the shapes differ or are not ``(K, 2)`` with ``K >= 2``, a point is not finite, or the source
            points all coincide (no scale or rotation can be estimated).
    """
    src = np.asarray(src_5x2, dtype=np.float64)
    dst = np.asarray(dst_5x2, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise DataError(f"landmarks of shape {src.shape} and {dst.shape}; expected two (K, 2) arrays of the same "
                        "shape with K >= 2, e.g. five (x, y) points each")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise DataError("a landmark coordinate is NaN or Inf; expected finite pixel coordinates")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = float((src_c ** 2).sum() / src.shape[0])
    if src_var <= 1e-12:
        raise DataError(f"the {src.shape[0]} landmarks all lie at {src_mean.round(3).tolist()}; expected distinct "
                        "points (eyes, nose, mouth corners)")
    cov = dst_c.T @ src_c / src.shape[0]
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:  # the best orthogonal map would be a reflection: flip the weakest axis instead
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float(sing @ d) / src_var
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * rot @ src_mean
    return m


def align_face(image: Image.Image | np.ndarray, landmarks_5x2: np.ndarray, size: int = 112) -> np.ndarray:
    """Warps a face so that its five landmarks land on the ArcFace template of an ``size x size`` crop.

    Args:
        image: A PIL image (any mode; converted to RGB) or an ``(H, W, 3)`` ``uint8`` RGB array.
        landmarks_5x2: The five landmarks in ``image``, pixel-index coordinates (see the module docstring).
        size: Side ``S`` of the aligned crop.

    Returns:
        ``(S, S, 3)`` ``uint8`` RGB array; pixels that fall outside ``image`` are black.

    Raises:
        DataError: The landmarks are not five finite, distinct ``(x, y)`` points, or ``size`` is not positive.

    Example::

        face = align_face(Image.open("loose.jpg"), landmarks, size=112)   # (112, 112, 3) uint8
    """
    lmk = np.asarray(landmarks_5x2, dtype=np.float64)
    if lmk.shape != (5, 2):
        raise DataError(f"landmarks have shape {lmk.shape}; expected (5, 2): eyes, nose tip, mouth corners")
    m = estimate_similarity(lmk, arcface_template(size))
    # Pillow wants the inverse map (output -> input) and puts pixel centres at +0.5: in centre coordinates the map
    # x_in = A x_out + t becomes x_in = A x_out + t + (I - A) 0.5.
    a_inv = np.linalg.inv(m[:, :2])
    t_inv = -a_inv @ m[:, 2] + 0.5 * (1.0 - a_inv.sum(axis=1))
    coeffs = (a_inv[0, 0], a_inv[0, 1], t_inv[0], a_inv[1, 0], a_inv[1, 1], t_inv[1])
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image
    if img.mode != "RGB":
        img = img.convert("RGB")
    out = img.transform((size, size), Image.Transform.AFFINE, data=tuple(float(c) for c in coeffs),
                        resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out, dtype=np.uint8)
