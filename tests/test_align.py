"""Five-point alignment (offloadfr/data/align.py), checked against this file's own numpy warp and known transforms."""

from __future__ import annotations

import numpy as np
import pytest

from offloadfr.data.align import ARCFACE_TEMPLATE_112, align_face, arcface_template, estimate_similarity
from offloadfr.errors import DataError
from tests._ijb_fixture import TEMPLATE_112, _identity_faces, similarity, warp_bilinear


def test_template_is_arcface() -> None:
    """Catches a typo in the template constants or in their scaling for other crop sizes."""
    np.testing.assert_array_equal(ARCFACE_TEMPLATE_112, TEMPLATE_112)
    np.testing.assert_allclose(arcface_template(56), TEMPLATE_112 / 2)


@pytest.mark.parametrize("mirror", [False, True])
def test_umeyama_recovers_a_known_similarity(mirror: bool) -> None:
    """Catches a wrong scale (variance of src vs dst), a transposed rotation, or a reflection for mirrored points
    (the reference's similarity never reflects: the best rotation wins)."""
    rng = np.random.default_rng(1)
    m = similarity(1.7, 0.4, 3.0, -4.0)
    src = rng.normal(size=(5, 2)) * 20 + 50
    dst = src @ m[:, :2].T + m[:, 2]
    if not mirror:
        np.testing.assert_allclose(estimate_similarity(src, dst), m, atol=1e-9)
        return
    est = estimate_similarity(src, dst * [-1, 1])
    assert np.linalg.det(est[:, :2]) > 0


def test_landmark_pixel_lands_on_its_template_point() -> None:
    """Catches Pillow's +0.5 pixel-centre offset left unconverted (a half-pixel shift of every aligned face)."""
    img = np.zeros((150, 150, 3), dtype=np.uint8)
    img[56, 48] = 255  # pixel (x, y) = (48, 56)
    out = align_face(img, TEMPLATE_112 + [10, 5])  # a shift by whole pixels: (48, 56) must land on (38, 51) alone
    assert out[51, 38, 0] >= 250
    assert np.count_nonzero(out[..., 0]) == 1


def test_align_matches_an_independent_numpy_warp() -> None:
    """Catches a wrong direction of the affine map, a wrong inverse, or a different sampling convention: the
    Pillow warp must equal a plain numpy bilinear warp of the same loose crop (to JPEG-free rounding)."""
    rng = np.random.default_rng(2)
    face = _identity_faces(rng, 1)[0][0]
    fwd = similarity(1.3, np.deg2rad(20), 30.0, 10.0)
    loose = warp_bilinear(face, np.linalg.inv(np.vstack([fwd, [0, 0, 1]]))[:2], (180, 180))
    lmk = TEMPLATE_112 @ fwd[:, :2].T + fwd[:, 2]
    got = align_face(loose, lmk).astype(np.int16)
    want = warp_bilinear(loose, fwd, (112, 112)).astype(np.int16)  # aligned -> loose is exactly fwd here
    # Within a pixel of the loose crop's own border Pillow fills or repeats the edge where OpenCV blends with black:
    # compare where the sample point lies at least a pixel inside.
    ys, xs = np.mgrid[0:112, 0:112]
    sx, sy = fwd[0, 0] * xs + fwd[0, 1] * ys + fwd[0, 2], fwd[1, 0] * xs + fwd[1, 1] * ys + fwd[1, 2]
    inside = (sx >= 1) & (sx <= 178) & (sy >= 1) & (sy <= 178)
    assert inside.mean() > 0.8
    diff = np.abs(got - want)[inside]
    assert diff.max() <= 1 and diff.mean() < 0.75, (diff.max(), diff.mean())  # Pillow rounds its 8-bit result down
    # and the round trip recovers the original face (two resamplings blur it a little)
    inner = np.s_[10:102, 10:102]
    assert np.abs(got[inner] - face[inner].astype(np.int16)).mean() < 6


def test_align_other_size_scales_the_template() -> None:
    """Catches a crop of another size that is not the 112 crop resized (model.image_size != 112)."""
    rng = np.random.default_rng(3)
    face = _identity_faces(rng, 1)[0][0]
    small = align_face(face, TEMPLATE_112, size=56).astype(np.int16)
    # the template scales in pixel-index coordinates (as insightface's norm_crop does): input = 2 * output
    want = warp_bilinear(face, np.array([[2.0, 0, 0], [0, 2.0, 0]]), (56, 56)).astype(np.int16)
    assert np.abs(small - want).max() <= 2


@pytest.mark.parametrize(("lmk", "expected"), [
    (np.zeros((4, 2)), r"expected \(5, 2\)"),
    (np.full((5, 2), 7.0), "all lie at"),
    (np.array([[np.nan, 1]] * 5), "NaN or Inf"),
])
def test_bad_landmarks(lmk: np.ndarray, expected: str) -> None:
    """Catches degenerate landmarks producing a NaN warp instead of a clear error."""
    with pytest.raises(DataError, match=expected):
        align_face(np.zeros((20, 20, 3), dtype=np.uint8), lmk)
