"""Alignment while converting (``offloadfr convert folder --align``, ``offloadfr pairs --align``).

Each image is decoded, its faces detected (:mod:`offloadfr.data.detect`), one face chosen (the largest, or the one
nearest the centre), and the face warped onto ArcFace's five-point template at the crop size
(:func:`offloadfr.data.align.align_face`), then stored as a JPEG. An image without a face is skipped and counted, and
listed in ``OUT/align_report.json`` beside ``index.json``.

:class:`AligningSource` wraps a converter's :class:`~offloadfr.data.convert_writer.ImageSource`, so the shared shard
writer still plans, writes in parallel, shows progress and resumes. What each image came to (no face, unreadable,
several faces) is appended by whichever process read it to a log in ``OUT/.align-log/`` (one file per process) as it
is read, that is before its shard is finished; :func:`write_align_report` merges the logs (and the report of an
earlier run, for shards a resumed run kept) into the report once the shards are written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

from PIL import Image

from offloadfr.data.align import align_face
from offloadfr.data.convert_writer import ConvertSummary, ImageSource, SkippedImage
from offloadfr.data.detect import FaceChoice, FaceDetector, pick_face
from offloadfr.data.shards import write_bytes_atomic
from offloadfr.errors import DataError

__all__ = [
    "ALIGN_REPORT_NAME",
    "AlignOptions",
    "AlignedImage",
    "AligningSource",
    "align_encoded",
    "decode_problem",
    "write_align_report",
]

_log = logging.getLogger(__name__)

ALIGN_REPORT_NAME = "align_report.json"
"""The report of an aligned conversion, beside ``index.json``: counts, and the images without a face."""
_LOG_DIR = ".align-log"
_REPORT_VERSION = 1
Outcome = Literal["no_face", "unreadable", "several_faces"]


@dataclass(frozen=True, kw_only=True, slots=True)
class AlignOptions:
    """How faces are aligned.

    Attributes:
        image_size: side of the aligned crop, in pixels (the template is scaled by ``image_size / 112``).
        face: which face of an image with several (:data:`~offloadfr.data.detect.FaceChoice`).
        min_score: the detector's confidence threshold, in ``(0, 1]``.
        max_side: longest side of the image the detector sees (larger images are scaled down for detection only).
        jpeg_quality: quality of the stored JPEG (95, as insightface's packers).
    """

    image_size: int = 112
    """Side of the aligned crop, in pixels."""
    face: FaceChoice = "largest"
    """Which face of an image with several: ``largest`` or ``center``."""
    min_score: float = 0.5
    """The detector's confidence threshold."""
    max_side: int = 640
    """Longest side of the image the detector sees."""
    jpeg_quality: int = 95
    """Quality of the stored JPEG."""

    def check(self) -> None:
        """Checks the options.

        Raises:
            DataError: an option is out of range, naming it and what is allowed.
        """
        if self.image_size < 16:
            raise DataError(f"align image_size = {self.image_size}; use at least 16 pixels (ArcFace uses 112)")
        if self.face not in ("largest", "center"):
            raise DataError(f"align face = {self.face!r}; choose 'largest' or 'center'")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"align jpeg_quality = {self.jpeg_quality}; use 1..100 (e.g. 95)")

    def detector(self) -> FaceDetector:
        """The detector these options ask for.

        Returns:
            A :class:`~offloadfr.data.detect.FaceDetector`.

        Raises:
            DetectorNotInstalledError: the detector is not installed.
        """
        return FaceDetector(min_score=self.min_score, max_side=self.max_side)


@dataclass(frozen=True, kw_only=True, slots=True)
class AlignedImage:
    """One image's alignment.

    Attributes:
        data: the aligned crop as JPEG bytes; None when the image is unreadable or has no face.
        num_faces: faces the detector found.
        problem: why ``data`` is None (``no face found ...`` or the decoder's error), else None.
    """

    data: bytes | None
    num_faces: int
    problem: str | None


def decode_problem(exn: Exception) -> str:
    """Why PIL could not decode an image, in one line (``cannot be decoded (...)``) without the object address that
    PIL puts in its "cannot identify image file <_io.BytesIO ...>" message."""
    why = "not an image format PIL recognises" if "BytesIO" in str(exn) else str(exn)
    return f"cannot be decoded ({type(exn).__name__}: {why})"


def align_encoded(data: bytes, detector: FaceDetector, options: AlignOptions) -> AlignedImage:
    """Decodes, detects, aligns and re-encodes one image.

    Args:
        data: the encoded image (anything PIL opens).
        detector: the face detector.
        options: how to align.

    Returns:
        The aligned JPEG, or why there is none (never raises for a bad image).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except Exception as exn:  # PIL raises many types on corrupt data
        return AlignedImage(data=None, num_faces=0, problem=decode_problem(exn))
    faces = detector.detect(rgb)
    face = pick_face(faces, rgb.size, options.face)
    if face is None:
        return AlignedImage(data=None, num_faces=0, problem=f"no face found (detector confidence >= "
                                                             f"{options.min_score})")
    crop = align_face(rgb, face.landmarks_5x2, size=options.image_size)
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=options.jpeg_quality)
    return AlignedImage(data=buf.getvalue(), num_faces=len(faces), problem=None)


class AligningSource:
    """An :class:`~offloadfr.data.convert_writer.ImageSource` that aligns the images another source reads.

    Picklable (worker processes each hold a copy; the detector is imported again there). Every image that is not
    aligned cleanly is appended to this process's log in ``OUT/.align-log/``.

    Args:
        inner: the source whose images are aligned.
        options: how to align.
        out: the dataset directory (holds the logs).
    """

    def __init__(self, inner: ImageSource, options: AlignOptions, out: Path) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.options = options
        self.out = out
        self.detector = options.detector()
        self._log_file: IO[str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"inner": self.inner, "kind": self.kind, "options": self.options, "out": self.out,
                "detector": self.detector}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._log_file = None

    def _note(self, identity: int, ref: Any, outcome: Outcome, detail: str) -> None:
        if self._log_file is None:
            log_dir = self.out / _LOG_DIR
            log_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(log_dir / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl", "a")  # noqa: SIM115
        record = {"path": self.inner.describe(identity, ref), "outcome": outcome, "detail": detail}
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()  # on disk before the shard holding (or skipping) this image can be finished

    def read(self, identity: int, ref: Any) -> bytes:
        """The aligned crop of one image, as JPEG bytes.

        Args:
            identity: the image's id.
            ref: the image's reference in the inner source.

        Returns:
            JPEG bytes of the ``image_size`` x ``image_size`` aligned face.

        Raises:
            SkippedImage: the image cannot be read or decoded, or has no face (logged for the report).
        """
        try:
            data = self.inner.read(identity, ref)
        except SkippedImage as exn:
            self._note(identity, ref, "unreadable", str(exn))
            raise
        result = align_encoded(data, self.detector, self.options)
        if result.data is None:
            assert result.problem is not None
            outcome: Outcome = "no_face" if result.problem.startswith("no face") else "unreadable"
            self._note(identity, ref, outcome, result.problem)
            raise SkippedImage(result.problem)
        if result.num_faces > 1:
            self._note(identity, ref, "several_faces", f"{result.num_faces} faces; aligned the {self.options.face}")
        return result.data

    def describe(self, identity: int, ref: Any) -> str:
        """Where the image is (the inner source's description).

        Args:
            identity: the image's id.
            ref: the image's reference.

        Returns:
            A path, or a file and byte offset.
        """
        return self.inner.describe(identity, ref)

    def close(self) -> None:
        """Closes this process's log and the inner source."""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.inner.close()


def write_align_report(out: Path, summary: ConvertSummary, options: AlignOptions, detector: str) -> dict[str, Any]:
    """Merges the logs of an aligned conversion (and an earlier run's report) into ``OUT/align_report.json``.

    Args:
        out: the dataset directory, its shards and ``index.json`` written.
        summary: what the conversion wrote.
        options: the alignment options.
        detector: the detector's name and version.

    Returns:
        The report written.
    """
    found: dict[str, dict[str, str]] = {}  # path -> {"outcome", "detail"}; one outcome per image and kind
    seen: set[tuple[str, str]] = set()
    records: list[dict[str, str]] = []
    report_path = out / ALIGN_REPORT_NAME
    if report_path.is_file():  # an earlier run's outcomes, for the shards this run kept
        try:
            old = json.loads(report_path.read_text())
            records += [{"path": p, "outcome": "no_face", "detail": "no face found"} for p in old.get("no_face", [])]
            records += [{**r, "outcome": "unreadable"} for r in old.get("unreadable", [])]
            records += [{**r, "outcome": "several_faces"} for r in old.get("several_faces", [])]
        except (ValueError, TypeError, AttributeError):
            _log.warning("%s cannot be read; writing it anew from this run's logs", report_path)
    log_dir = out / _LOG_DIR
    for path in sorted(log_dir.glob("*.jsonl")) if log_dir.is_dir() else []:
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # the last line of a log whose process was killed mid-write
                continue
    for rec in records:
        key = (rec["path"], rec["outcome"])
        if key not in seen:
            seen.add(key)
            found[f"{rec['outcome']}\0{rec['path']}"] = {"path": rec["path"], "detail": rec.get("detail", "")}
    by: dict[str, list[dict[str, str]]] = {"no_face": [], "unreadable": [], "several_faces": []}
    for key in sorted(found):
        outcome = key.split("\0", 1)[0]
        by[outcome].append(found[key])
    num_listed = len(by["no_face"]) + len(by["unreadable"])
    if num_listed != summary.num_skipped:
        _log.warning("%s lists %d skipped images but the conversion skipped %d (a log of an earlier run is missing, "
                     "or the input changed); re-convert into an empty directory for a complete list",
                     report_path, num_listed, summary.num_skipped)
    report = {
        "format": "offloadfr-align-report", "version": _REPORT_VERSION, "detector": detector,
        "options": asdict(options),
        "num_images": summary.num_images + summary.num_skipped, "num_aligned": summary.num_images,
        "num_no_face": len(by["no_face"]), "num_unreadable": len(by["unreadable"]),
        "num_several_faces": len(by["several_faces"]),
        "no_face": [r["path"] for r in by["no_face"]],
        "unreadable": by["unreadable"],
        "several_faces": by["several_faces"],
    }
    write_bytes_atomic(report_path, (json.dumps(report, indent=1) + "\n").encode())
    shutil.rmtree(log_dir, ignore_errors=True)
    return report
