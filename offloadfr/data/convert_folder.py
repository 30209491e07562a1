"""The image-folder converter (``offloadfr convert folder``, DESIGN §6): ``ROOT/<identity>/*.jpg|jpeg|png`` to shards.

Identities are the sorted names of the sub-folders that hold at least one image file, mapped to ids ``0 .. N-1``
(``OUT/identities.json`` keeps the mapping). This module only lists the folder and reads its files
(:class:`_FolderSource`); :func:`offloadfr.data.convert_writer.convert_identities` plans, checks, writes and resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from offloadfr.data.convert_writer import (
    CheckMode,
    ConvertSummary,
    IdentityImages,
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
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File extensions (any case) of the images :func:`convert_folder` picks up; other files are ignored."""
IDENTITIES_NAME = "identities.json"
"""Identity folder name -> id, written by :func:`convert_folder`."""


def convert_folder(root: str | os.PathLike[str], out: str | os.PathLike[str], *, samples_per_shard: int = 2000,
                   seed: int = 0, check: CheckMode = "decode", image_size: int | None = None,
                   num_workers: int = 0, progress: bool = True) -> ConvertSummary:
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
        image_size: ``image_size`` recorded in ``index.json``; default: the side of the first readable image.
        num_workers: processes writing shards in parallel (0 or 1: in this process); the output is the same. They
            are spawned, so a calling script needs an ``if __name__ == "__main__":`` guard.
        progress: show a tqdm bar on a terminal.

    Returns:
        The summary; ``print(summary)`` gives one line.

    Raises:
        DataNotFoundError: ``root`` does not exist.
        DataError: no identity folder holds an image, every image is unreadable, ``out`` holds something else (or a
            conversion of other input or options), or a bad option.
    """
    check_options(samples_per_shard, seed, check, num_workers)
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist; pass ROOT with one sub-folder of images per "
                                "identity")
    names, files = _list_folder(root)
    if not names:
        raise DataError(f"{root} has no identity sub-folder holding {'/'.join(IMAGE_EXTENSIONS)} files; the layout "
                        "is ROOT/<identity>/<image>.jpg")
    identities = [IdentityImages(i, [f"{name}/{f}" for f in fs])
                  for i, (name, fs) in enumerate(zip(names, files, strict=True))]
    if image_size is None:
        image_size = _probe_folder_size(root, identities)

    params = {"source_path": str(root), "samples_per_shard": samples_per_shard, "seed": seed, "check": check,
              "image_size": image_size}
    mapping = {name: i for i, name in enumerate(names)}
    return convert_identities(Path(out), source=_FolderSource(root), identities=identities, num_classes=len(names),
                              image_size=image_size, samples_per_shard=samples_per_shard, seed=seed, check=check,
                              num_workers=num_workers, progress=progress, params=params, num_plan_skipped=0,
                              extra_files={IDENTITIES_NAME: (json.dumps(mapping, indent=1) + "\n").encode()})


def _list_folder(root: Path) -> tuple[list[str], list[list[str]]]:
    """Sorted identity folder names that hold images, and each one's sorted image file names."""
    names, files = [], []
    for d in sorted(os.scandir(root), key=lambda e: e.name):
        if d.name.startswith(".") or not d.is_dir():
            continue
        fs = sorted(e.name for e in os.scandir(d.path) if not e.name.startswith(".") and e.is_file()
                    and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        if fs:
            names.append(d.name)
            files.append(fs)
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
