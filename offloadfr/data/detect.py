"""Face detection with five landmarks, for alignment (``offloadfr convert folder --align``, ``offloadfr pairs``).

The detector is libfacedetection's CNN (Shiqi Yu's, the model OpenCV's YuNet grew from), installed from the package
registry as the ``yuface`` wheel: about 0.5 MB, its weights compiled into the wheel's library (nothing is downloaded
at run time), no dependency beyond numpy, CPU only, BSD 3-clause. It is an optional extra
(``pip install 'offloadfr[align]'``); without it :func:`load_detector` raises :class:`DetectorNotInstalledError`.
Why this one and what it measured on real photos: docs/formats.md, "Aligning faces".

Conventions: landmarks are ``(5, 2)`` ``(x, y)`` in the order of :mod:`offloadfr.data.align` (left eye, right eye,
nose tip, left mouth corner, right mouth corner, as seen in the image), in pixel-index coordinates of the image given
(pixel ``(i, j)`` has its centre at ``x = j, y = i``), boxes ``(x, y, w, h)`` in the same frame.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
from PIL import Image

from offloadfr.errors import DataError, OffloadFRError

__all__ = [
    "DETECTOR_NAME",
    "INSTALL_HINT",
    "DetectorNotInstalledError",
    "Face",
    "FaceChoice",
    "FaceDetector",
    "load_detector",
    "pick_face",
]

DETECTOR_NAME = "yuface"
"""The detector's package (libfacedetection's CNN)."""
INSTALL_HINT = "pip install 'offloadfr[align]'"
"""What installs the detector."""
FaceChoice = Literal["largest", "center"]
"""Which face of an image with several is aligned: the largest box, or the box whose centre is nearest the image's
centre (LFW-style photos: the person of interest is centred, and a larger face may stand beside them)."""


class DetectorNotInstalledError(OffloadFRError, ImportError):
    """The face detector that alignment needs is not installed; the message says how to install it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Face:
    """One detected face.

    Attributes:
        box_xywh: ``(x, y, w, h)`` of the face box.
        landmarks_5x2: ``(5, 2)`` float64 landmarks (see the module docstring for order and frame).
        score: the detector's confidence in ``[0, 1]``.
    """

    box_xywh: tuple[float, float, float, float]
    landmarks_5x2: np.ndarray
    score: float

    @property
    def area(self) -> float:
        """The box's area in square pixels."""
        return self.box_xywh[2] * self.box_xywh[3]


def _import_backend() -> ModuleType:
    try:
        return importlib.import_module(DETECTOR_NAME)
    except ImportError as exn:  # not installed, or its compiled library does not load on this platform
        raise DetectorNotInstalledError(
            f"face alignment needs the {DETECTOR_NAME} face detector, which is not installed ({exn}); install it "
            f"with: {INSTALL_HINT} (wheels for CPython <= 3.11 on Linux x86-64 and Windows)") from exn


def _openmp_runtimes(backend: ModuleType) -> list[Any]:
    """The OpenMP runtimes the detector's library may call: the process's global one (torch loads its libgomp
    globally, and the detector's OpenMP calls then resolve to it) and the detector's own bundled libgomp."""
    libs = []
    candidates: list[str | None] = [None]
    libs_dir = Path(backend.__file__ or "").resolve().parent.parent / f"{DETECTOR_NAME}.libs"
    candidates += sorted(str(p) for p in libs_dir.glob("libgomp*")) if libs_dir.is_dir() else []
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
            lib.omp_get_max_threads.restype = ctypes.c_int
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):  # no such library or symbol (another platform): nothing to limit
            continue
        libs.append(lib)
    return libs


@contextmanager
def _one_openmp_thread(libs: list[Any]) -> Iterator[None]:
    """Runs the detector on one OpenMP thread, then restores the thread count (for torch in the same process).

    With two threads it ran about 15x slower on the shared 2-core machine (its threads spin and contend);
    parallelism comes from worker processes instead. ``OMP_NUM_THREADS`` does not help: the runtime in use may
    have read it when torch was imported.
    """
    saved = [lib.omp_get_max_threads() for lib in libs]
    for lib in libs:
        lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, saved, strict=True):
            lib.omp_set_num_threads(n)


class FaceDetector:
    """libfacedetection through ``yuface``: faces with five landmarks in a PIL image.

    Images whose longer side exceeds ``max_side`` are detected on a copy scaled down to it (the network is slow on
    large images and was trained on faces of moderate size); boxes and landmarks come back in the original image's
    coordinates. Picklable (the module is imported again in each worker process).

    Args:
        min_score: keep faces whose confidence is at least this, in ``(0, 1]``.
        max_side: longest side, in pixels, of the image the detector sees.

    Raises:
        DetectorNotInstalledError: ``yuface`` is not installed.
        DataError: an option is out of range.

    Example::

        det = FaceDetector()
        faces = det.detect(Image.open("photo.jpg"))
        face = pick_face(faces, (width, height), "largest")   # None: no face
    """

    def __init__(self, *, min_score: float = 0.5, max_side: int = 640) -> None:
        if not 0.0 < min_score <= 1.0:
            raise DataError(f"min_score = {min_score}; use a detector confidence in (0, 1], e.g. 0.5")
        if max_side < 32:
            raise DataError(f"max_side = {max_side}; use at least 32 pixels (e.g. 640)")
        self.min_score = float(min_score)
        self.max_side = int(max_side)
        self._backend: ModuleType | None = _import_backend()
        self._openmp: list[Any] = _openmp_runtimes(self._backend)

    def __getstate__(self) -> dict[str, float | int]:
        return {"min_score": self.min_score, "max_side": self.max_side}

    def __setstate__(self, state: dict[str, float | int]) -> None:
        self.min_score = float(state["min_score"])
        self.max_side = int(state["max_side"])
        self._backend = None  # imported on first use in this process
        self._openmp = []

    @property
    def version(self) -> str:
        """The detector's name and package version, for provenance (``yuface 2023.5.1``)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{DETECTOR_NAME} {version(DETECTOR_NAME)}"
        except PackageNotFoundError:
            return DETECTOR_NAME

    def detect(self, image: Image.Image) -> list[Face]:
        """Detects the faces of ``image``.

        Args:
            image: any PIL image (converted to RGB).

        Returns:
            The faces with confidence at least ``min_score``, highest confidence first.
        """
        if self._backend is None:
            self._backend = _import_backend()
            self._openmp = _openmp_runtimes(self._backend)
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        scale = min(1.0, self.max_side / max(rgb.size))
        if scale < 1.0:
            rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                             Image.Resampling.BILINEAR)
        bgr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[:, :, ::-1])
        # One row per face: confidence in percent, box x, y, w, h, the five landmarks x, y, ..., one unused field;
        # int16, so cast before any arithmetic (a box area overflows int16).
        with _one_openmp_thread(self._openmp):
            rows = np.asarray(self._backend.c_detect(bgr)).astype(np.float64)
        faces = []
        for row in rows[np.argsort(-rows[:, 0], kind="stable")] if len(rows) else []:
            score = row[0] / 100.0
            if score < self.min_score:
                continue
            # to the original image's pixel-index frame: x_orig + 0.5 = (x_small + 0.5) / scale
            lmk = (row[5:15].reshape(5, 2) + 0.5) / scale - 0.5
            x, y = (row[1:3] + 0.5) / scale - 0.5
            w, h = row[3:5] / scale
            faces.append(Face(box_xywh=(float(x), float(y), float(w), float(h)), landmarks_5x2=lmk,
                              score=float(score)))
        return faces


def load_detector(*, min_score: float = 0.5, max_side: int = 640) -> FaceDetector:
    """The face detector alignment uses; fails at once, with an install hint, when it is missing.

    Args:
        min_score: see :class:`FaceDetector`.
        max_side: see :class:`FaceDetector`.

    Returns:
        A ready detector.

    Raises:
        DetectorNotInstalledError: ``yuface`` is not installed (exit code 2 from the command line).
        DataError: an option is out of range.
    """
    return FaceDetector(min_score=min_score, max_side=max_side)


def pick_face(faces: list[Face], size_wh: tuple[int, int], choose: FaceChoice) -> Face | None:
    """The face to align among ``faces``.

    Args:
        faces: what :meth:`FaceDetector.detect` found.
        size_wh: the image's ``(width, height)`` (for ``center``).
        choose: ``largest`` (box area) or ``center`` (box centre nearest the image centre); ties keep the more
            confident face.

    Returns:
        The chosen face, or None when there is none.

    Raises:
        DataError: ``choose`` is not a :data:`FaceChoice`.
    """
    if choose not in ("largest", "center"):
        raise DataError(f"face choice {choose!r}; choose 'largest' or 'center'")
    if not faces:
        return None
    if choose == "largest":
        return max(faces, key=lambda f: f.area)  # max keeps the first (most confident) of equal areas
    cx, cy = (size_wh[0] - 1) / 2.0, (size_wh[1] - 1) / 2.0

    def dist2(f: Face) -> float:
        x, y, w, h = f.box_xywh
        return (x + w / 2.0 - cx) ** 2 + (y + h / 2.0 - cy) ** 2

    return min(faces, key=dist2)
