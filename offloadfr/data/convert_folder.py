"""The image-folder converter (``offloadfr convert folder``, DESIGN §6): ``ROOT/<identity>/*.jpg|jpeg|png`` to shards.

Identities are the sorted names of the sub-folders that hold at least one image file, mapped to ids ``0 .. N-1``
(``OUT/identities.json`` keeps the mapping). This module only lists the folder and reads its files
(:class:`_FolderSource`); :func:`offloadfr.data.convert_writer.convert_identities` plans, checks, writes and resumes.
With ``align``, :class:`~offloadfr.data.convert_align.AligningSource` wraps the folder source: each image is stored
as its face aligned onto ArcFace's template, and ``OUT/align_report.json`` lists the images without a face.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from offloadfr.data.convert_align import AligningSource, AlignOptions, write_align_report
from offloadfr.data.convert_writer import (
    CheckMode,
    ConvertSummary,
    IdentityImages,
    ImageSource,
    SkippedImage,
    check_options,
    convert_identities,
    image_side,
)
from offloadfr.errors import DataError, DataNotFoundError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IDENTITIES_NAME",
    "convert_folder",
    "list_image_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File extensions (any case) of the images :func:`convert_folder` picks up; other files are ignored."""
IDENTITIES_NAME = "identities.json"
"""Identity folder name -> id, written by :func:`convert_folder`."""


def convert_folder(root: str | os.PathLike[str], out: str | os.PathLike[str], *, samples_per_shard: int = 2000,
                   seed: int = 0, check: CheckMode = "decode", image_size: int | None = None,
                   num_workers: int = 0, progress: bool = True, align: AlignOptions | None = None) -> ConvertSummary:
    """Converts ``ROOT/<identity>/*.jpg|jpeg|png`` into identity-grouped shards in ``out``.

    Identities are the sub-folders of ``root`` holding at least one file with an extension in
    :data:`IMAGE_EXTENSIONS`, sorted by name and numbered ``0 .. N-1``; other files, hidden entries and nested
    folders are ignored. An identity's images are its files sorted by name; unreadable ones are skipped.

    Args:
        root: the image folder.
        out: the dataset directory (created; or an earlier, interrupted conversion of the same input to resume).
        samples_per_shard: target images per shard (shards hold whole identities).
        seed: seed of the identity order.
        check: how images are checked (:data:`~offloadfr.data.convert_writer.CheckMode`).
        image_size: ``image_size`` recorded in ``index.json``; default: the side of the first readable image (with
            ``align``: the aligned crop's side, ``align.image_size``).
        num_workers: processes writing shards in parallel (0 or 1: in this process); the output is the same. They
            are spawned, so a calling script needs an ``if __name__ == "__main__":`` guard.
        progress: show a tqdm bar on a terminal.
        align: detect, align and re-encode each face (:class:`~offloadfr.data.convert_align.AlignOptions`); images
            without a face are skipped and listed in ``OUT/align_report.json``. None: copy the bytes unchanged.

    Returns:
        The summary; ``print(summary)`` gives one line.

    Raises:
        DataNotFoundError: ``root`` does not exist.
        DataError: no identity folder holds an image, every image is unreadable, ``out`` holds something else (or a
            conversion of other input or options), or a bad option.
        DetectorNotInstalledError: ``align`` is given and the face detector is not installed.
    """
    check_options(samples_per_shard, seed, check, num_workers)
    if align is not None:
        align.check()
        if image_size is not None and image_size != align.image_size:
            raise DataError(f"image_size = {image_size} but align.image_size = {align.image_size}; an aligned "
                            "conversion records the crop's side, so give one size")
        detector = align.detector()  # fails now, with the install hint, if the detector is missing
    root = Path(root).resolve()
    names, files = list_image_folder(root)
    identities = [IdentityImages(i, [f"{name}/{f}" for f in fs])
                  for i, (name, fs) in enumerate(zip(names, files, strict=True))]
    if align is not None:
        image_size = align.image_size
    elif image_size is None:
        image_size = _probe_folder_size(root, identities)

    params: dict[str, object] = {"source_path": str(root), "samples_per_shard": samples_per_shard, "seed": seed,
                                 "check": check, "image_size": image_size}
    source: ImageSource = _FolderSource(root)
    if align is not None:  # the detector's version is part of the plan: another version aligns differently
        params["align"] = {**asdict(align), "detector": detector.version}
        source = AligningSource(source, align, Path(out))
    mapping = {name: i for i, name in enumerate(names)}
    summary = convert_identities(Path(out), source=source, identities=identities, num_classes=len(names),
                                 image_size=image_size, samples_per_shard=samples_per_shard, seed=seed, check=check,
                                 num_workers=num_workers, progress=progress, params=params, num_plan_skipped=0,
                                 extra_files={IDENTITIES_NAME: (json.dumps(mapping, indent=1) + "\n").encode()})
    if align is not None:
        write_align_report(Path(out), summary, align, detector.version)
    return summary


def list_image_folder(root: Path) -> tuple[list[str], list[list[str]]]:
    """Lists an image folder as :func:`convert_folder` (and ``offloadfr pairs``) sees it.

    Args:
        root: the folder, ``ROOT/<identity>/*.jpg|jpeg|png``.

    Returns:
        ``(names, files)``: the sorted names of the identity folders that hold images, and each one's sorted image
        file names (hidden entries, other files and nested folders left out).

    Raises:
        DataNotFoundError: ``root`` does not exist.
        DataError: no sub-folder of ``root`` holds an image.
    """
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist; pass ROOT with one sub-folder of images per "
                                "identity")
    names, files = [], []
    for d in sorted(os.scandir(root), key=lambda e: e.name):
        if d.name.startswith(".") or not d.is_dir():
            continue
        fs = sorted(e.name for e in os.scandir(d.path) if not e.name.startswith(".") and e.is_file()
                    and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        if fs:
            names.append(d.name)
            files.append(fs)
    if not names:
        raise DataError(f"{root} has no identity sub-folder holding {'/'.join(IMAGE_EXTENSIONS)} files; the layout "
                        "is ROOT/<identity>/<image>.jpg")
    return names, files


def _probe_folder_size(root: Path, identities: list[IdentityImages]) -> int:
    for it in identities:
        for rel in it.sources:
            try:
                with Image.open(root / rel) as im:
                    return image_side(im.size, str(root / rel))
            except Exception:  # an unreadable image is skipped later; keep probing
                continue
    return 0  # nothing readable: the conversion fails later with a clear message


class _FolderSource:
    """Reads images of an image folder (picklable, for worker processes): the folder's
    :class:`~offloadfr.data.convert_writer.ImageSource`."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, identity: int, rel: str) -> bytes:
        try:
            return (self.root / rel).read_bytes()
        except OSError as exn:
            raise SkippedImage(f"{type(exn).__name__}: {exn}") from exn

    def describe(self, identity: int, rel: str) -> str:
        return str(self.root / rel)

    def close(self) -> None:
        """Nothing to release: each read opens and closes its file."""
