"""Converters from the formats users hold to identity-grouped shards (``offloadfr convert``, DESIGN §6).

- :func:`convert_folder`: ``ROOT/<identity>/*.jpg|jpeg|png``; identities are the sorted names of the sub-folders
  that hold at least one image file, mapped to ids ``0 .. N-1`` (``OUT/identities.json`` keeps the mapping).
- :func:`convert_rec`: InsightFace MXNet RecordIO (``train.rec`` + ``train.idx`` + ``property``), read by
  :mod:`offloadfr.data.recordio` without mxnet, in either of InsightFace's layouts (identity ranges from a header
  record, or one label per record). Ids are the pack's class ids.

Both copy the encoded image bytes unchanged (a PNG stays a PNG: it is stored under the ``.jpg`` member, which every
reader decodes with PIL, and PIL recognises the format from the bytes, not from the name). An image that cannot be
read or decoded is skipped, counted and logged (the first few); never fatal.

The output is a dataset directory as :mod:`offloadfr.data.shards` defines it, plus two files of provenance::

    OUT/convert.json       what was converted and with which options, and a digest of the shard plan
    OUT/identities.json    folder conversions only: identity folder name -> id

**Resumable.** The whole plan (which identity goes to which shard, the identity order being shuffled once by
``seed``) is computed before anything is written, from file listings or record headers only. Shard ``k`` of the plan
is always ``shards/shard-{k:06d}.tar``, written in a scratch directory and moved into place with ``os.replace``, so a
shard whose final file exists is finished. A re-run with the same input and options keeps the finished shards and
writes only the missing ones; ``index.json`` is written last, so a directory with an ``index.json`` is complete. A
re-run with other input or options into the same directory is refused (the plan digest in ``convert.json`` differs).
The same input and options give byte-identical shards and ``index.json``, interrupted or not.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import struct
import sys
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from offloadfr.data.recordio import LabelDType, RecordIOReader, header_size, read_property, unpack
from offloadfr.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    SHARD_DIR,
    ShardWriter,
    read_index,
    write_bytes_atomic,
)
from offloadfr.errors import DataError, DataNotFoundError

__all__ = [
    "CheckMode",
    "IMAGE_EXTENSIONS",
    "CONVERT_NAME",
    "IDENTITIES_NAME",
    "ConvertSummary",
    "convert_folder",
    "convert_rec",
]

_log = logging.getLogger(__name__)

CheckMode = Literal["decode", "header"]
"""How images are checked before they are copied: ``decode`` (magic bytes, ``PIL.Image.verify`` and a full decode;
catches truncated files) or ``header`` (magic bytes only; faster)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File extensions (any case) of the images :func:`convert_folder` picks up; other files are ignored."""
CONVERT_NAME = "convert.json"
"""Provenance and plan digest of a conversion, written first; marks a directory as a converter's output."""
IDENTITIES_NAME = "identities.json"
"""Identity folder name -> id, written by :func:`convert_folder`."""

_CONVERTER_VERSION = 1
_WORK_DIR = ".convert-work"
_S_ORDER = 0x1D0C  # keeps the identity-order stream apart from other users of the seed
_MAX_WARNINGS = 20
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, kw_only=True, slots=True)
class ConvertSummary:
    """What a conversion wrote.

    Attributes:
        out: the dataset directory.
        source: ``folder`` or ``recordio``.
        num_classes: ``num_classes`` of the index (labels lie in ``[0, num_classes)``).
        num_identities: identities with at least one image written (fewer than ``num_classes`` when an identity had
            only unreadable images, or when a pack's labels leave gaps).
        num_images: images written.
        num_skipped: images skipped because they could not be read or decoded.
        num_shards: shards in the index.
        num_reused: shards kept from an earlier, interrupted run (not rewritten).
    """

    out: Path
    source: str
    num_classes: int
    num_identities: int
    num_images: int
    num_skipped: int
    num_shards: int
    num_reused: int

    def __str__(self) -> str:
        reused = f", {self.num_reused} kept from an earlier run" if self.num_reused else ""
        plural = "" if self.num_shards == 1 else "s"
        return (f"converted {self.source} to {self.out}: {self.num_identities} identities (num_classes "
                f"{self.num_classes}), {self.num_images} images, {self.num_skipped} skipped, {self.num_shards} "
                f"shard{plural}{reused}")


class _Skip(Exception):
    """One image cannot be read; the message says why."""


@dataclass(frozen=True, slots=True)
class _Identity:
    """One identity of the plan: its id and where its images are (file names, or record offsets; -1: missing)."""

    identity: int
    sources: Sequence[Any]


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
        check: how images are checked (:data:`CheckMode`).
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
    _check_options(samples_per_shard, seed, check, num_workers)
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist; pass ROOT with one sub-folder of images per "
                                "identity")
    names, files = _list_folder(root)
    if not names:
        raise DataError(f"{root} has no identity sub-folder holding {'/'.join(IMAGE_EXTENSIONS)} files; the layout "
                        "is ROOT/<identity>/<image>.jpg")
    identities = [_Identity(i, [f"{name}/{f}" for f in fs]) for i, (name, fs) in enumerate(zip(names, files,
                                                                                                strict=True))]
    if image_size is None:
        image_size = _probe_folder_size(root, identities)

    params = {"source_path": str(root), "samples_per_shard": samples_per_shard, "seed": seed, "check": check,
              "image_size": image_size}
    mapping = {name: i for i, name in enumerate(names)}
    return _convert(Path(out), source=_FolderSource(root), identities=identities, num_classes=len(names),
                    image_size=image_size, samples_per_shard=samples_per_shard, seed=seed, check=check,
                    num_workers=num_workers, progress=progress, params=params, num_plan_skipped=0,
                    extra_files={IDENTITIES_NAME: (json.dumps(mapping, indent=1) + "\n").encode()})


def convert_rec(path: str | os.PathLike[str], out: str | os.PathLike[str], *, samples_per_shard: int = 2000,
                seed: int = 0, check: CheckMode = "decode", layout: Literal["auto", "ranges", "labels"] = "auto",
                label_dtype: LabelDType = "float32", num_workers: int = 0, progress: bool = True) -> ConvertSummary:
    """Converts an InsightFace MXNet RecordIO pack into identity-grouped shards in ``out``.

    Layouts (see :mod:`offloadfr.data.recordio`): ``ranges`` takes identity ``j``'s images from the key range in
    identity record ``id_start + j`` and checks each image's own label against ``j``; ``labels`` reads the label of
    every record from its header first (a pass over headers only), groups the records by label, then copies. ``auto``
    picks ``ranges`` when record 0 is a header record (``flag >= 2``, no payload, ``0 < id_start < id_end``), as
    InsightFace's ``MXFaceDataset`` does (it checks ``flag > 0`` only), else ``labels``. Records without payload
    (header and identity records) are never taken as images. Split records (``cflag`` 1/2/3) are joined.

    Args:
        path: the pack's directory (holding ``train.rec``, ``train.idx``, ``property``), its ``.rec`` file, or the
            path without extension (``DIR/train``); ``property`` is looked up in the same directory.
        out: the dataset directory (created; or an earlier, interrupted conversion of the same input to resume).
        samples_per_shard: target images per shard (shards hold whole identities).
        seed: seed of the identity order.
        check: how images are checked (:data:`CheckMode`).
        layout: ``auto``, ``ranges`` or ``labels``.
        label_dtype: float type of the record labels: ``float32`` (mxnet) or ``float64`` (packs written with
            ``IdQQ`` headers).
        num_workers: processes writing shards in parallel (0 or 1: in this process); the output is the same. They
            are spawned, so a calling script needs an ``if __name__ == "__main__":`` guard.
        progress: show a tqdm bar on a terminal.

    Returns:
        The summary; ``print(summary)`` gives one line.

    Raises:
        DataNotFoundError: the ``.rec`` or ``.idx`` does not exist.
        DataError: a malformed pack (bad header record, a non-integer or negative label, labels beyond the
            ``property`` class count, an image label that contradicts its identity range), no readable image, ``out``
            holding something else, or a bad option.
    """
    _check_options(samples_per_shard, seed, check, num_workers)
    if layout not in ("auto", "ranges", "labels"):
        raise DataError(f"layout = {layout!r}; choose 'auto', 'ranges' (header record 0 with identity ranges) or "
                        "'labels' (one label per record)")
    rec_path, idx_path, prop_path = _rec_paths(Path(path))
    if not rec_path.is_file():
        raise DataNotFoundError(f"{rec_path} does not exist; PATH is a pack directory holding train.rec and "
                                "train.idx, a .rec file, or a path without extension (DIR/train)")
    prop = read_property(prop_path) if prop_path.is_file() else None
    with RecordIOReader(rec_path, idx_path) as reader:
        header0 = _header_record(reader, label_dtype)
        if layout == "auto":
            layout = "ranges" if header0 is not None else "labels"
        num_plan_skipped = 0
        if layout == "ranges":
            if header0 is None:
                raise DataError(f"layout 'ranges' needs record 0 of {rec_path} to be a header record (flag >= 2, "
                                "label (id_start, id_end), no image); this pack has none: use layout 'labels'")
            identities = _plan_ranges(reader, header0, label_dtype)
            num_classes = len(identities)
            identities = [it for it in identities if len(it.sources)]
            if prop is not None and prop[0] != num_classes:
                _log.warning("%s says %d classes but %s has %d identity records; using %d", prop_path, prop[0],
                             rec_path, num_classes, num_classes)
        else:
            identities, num_plan_skipped = _plan_labels(reader, label_dtype)
            max_label = max((it.identity for it in identities), default=-1)
            num_classes = max_label + 1
            if prop is not None:
                if prop[0] <= max_label:
                    raise DataError(f"{prop_path} says {prop[0]} classes but {rec_path} has label {max_label}; fix "
                                    "the property file (num_classes,height,width) or delete it")
                num_classes = prop[0]
        if not identities:
            raise DataError(f"{rec_path} holds no image records ({num_plan_skipped} unreadable); nothing to convert")
        if prop is not None:
            if prop[1] != prop[2]:
                _log.warning("%s gives %dx%d images; the loader resizes them to squares", prop_path, prop[1], prop[2])
            image_size = max(prop[1], prop[2])
        else:
            image_size = _probe_rec_size(reader, identities, label_dtype)
        params = {"source_path": str(rec_path.resolve()), "samples_per_shard": samples_per_shard, "seed": seed,
                  "check": check, "layout": layout, "label_dtype": label_dtype, "rec_bytes": reader.size}
    source = _RecSource(rec_path, label_dtype=label_dtype, check_labels=layout == "ranges")
    return _convert(Path(out), source=source, identities=identities, num_classes=num_classes, image_size=image_size,
                    samples_per_shard=samples_per_shard, seed=seed, check=check, num_workers=num_workers,
                    progress=progress, params=params, num_plan_skipped=num_plan_skipped, extra_files={})


# ---------------------------------------------------------------------------------------------------------- sources


def _check_options(samples_per_shard: int, seed: int, check: str, num_workers: int) -> None:
    if num_workers < 0:
        raise DataError(f"num_workers = {num_workers}; it must be >= 0 (0: write shards in this process)")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard = {samples_per_shard}; it must be >= 1 (e.g. 2000)")
    if seed < 0:
        raise DataError(f"seed = {seed}; it must be >= 0")
    if check not in ("decode", "header"):
        raise DataError(f"check = {check!r}; choose 'decode' (full decode, catches truncated images) or 'header' "
                        "(magic bytes only, faster)")


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


def _probe_folder_size(root: Path, identities: list[_Identity]) -> int:
    for it in identities:
        for rel in it.sources:
            try:
                with Image.open(root / rel) as im:
                    return _side(im.size, str(root / rel))
            except Exception:  # an unreadable image is skipped later; keep probing
                continue
    return 0  # nothing readable: the conversion fails later with a clear message


def _side(size: tuple[int, int], what: str) -> int:
    w, h = size
    if w != h:
        _log.warning("%s is %dx%d, not square; index.json records %d and the loader resizes images to squares",
                     what, w, h, max(w, h))
    return max(w, h)


def _rec_paths(path: Path) -> tuple[Path, Path, Path]:
    if path.is_dir():
        return path / "train.rec", path / "train.idx", path / "property"
    if path.suffix in (".rec", ".idx"):
        return path.with_suffix(".rec"), path.with_suffix(".idx"), path.parent / "property"
    return Path(f"{path}.rec"), Path(f"{path}.idx"), path.parent / "property"


def _read_header(reader: RecordIOReader, offset: int, label_dtype: LabelDType) -> tuple[Any, int]:
    """The header of the record at ``offset`` and the length of its payload, reading only the start of it."""
    size = header_size(label_dtype)
    item = 4 if label_dtype == "float32" else 8
    head, length = reader.read_head(offset, size + 16 * item)
    flag = struct.unpack_from("<I", head)[0] if len(head) >= 4 else 0
    if flag > 16:
        head, length = reader.read_head(offset, size + flag * item)
    header, _ = unpack(head, label_dtype=label_dtype)
    return header, length - size - flag * item


def _header_record(reader: RecordIOReader, label_dtype: LabelDType) -> tuple[int, int] | None:
    """``(id_start, id_end)`` when record 0 is InsightFace's header record, else None."""
    if not reader.has_key(0):
        return None
    try:
        header, payload_len = _read_header(reader, reader.offset_of(0), label_dtype)
    except DataError:
        return None
    if header.flag < 2 or payload_len != 0 or not all(_integral(x) for x in header.label[:2]):
        return None
    id_start, id_end = int(header.label[0]), int(header.label[1])
    return (id_start, id_end) if 0 < id_start < id_end else None


def _integral(x: float) -> bool:
    return bool(np.isfinite(x)) and x == int(x)


def _plan_ranges(reader: RecordIOReader, header0: tuple[int, int], label_dtype: LabelDType) -> list[_Identity]:
    """Identity ``j`` = the key range in identity record ``id_start + j``; one entry per identity, empty ones too."""
    id_start, id_end = header0
    identities = []
    for j, key in enumerate(range(id_start, id_end)):
        try:
            header, _ = _read_header(reader, reader.offset_of(key), label_dtype)
        except DataError as exn:
            raise DataError(f"identity record {key} of {reader.rec_path} is unreadable ({exn}); the pack is "
                            "corrupt, or try layout 'labels'") from exn
        label = header.label
        if not (isinstance(label, tuple) and len(label) >= 2 and _integral(label[0]) and _integral(label[1])
                and 0 <= label[0] <= label[1]):
            raise DataError(f"identity record {key} of {reader.rec_path} has label {label}, not an image key range "
                            "(first, end); the pack is not in InsightFace's ranges layout: use layout 'labels'")
        identities.append(_Identity(j, reader.lookup(np.arange(int(label[0]), int(label[1]), dtype=np.int64))))
    return identities


def _plan_labels(reader: RecordIOReader, label_dtype: LabelDType) -> tuple[list[_Identity], int]:
    """Reads every record's label (headers only, in file order) and groups the records by label."""
    n = len(reader.keys)
    labels = np.full(n, -1, np.int64)
    skipped = warned = 0
    for i in np.argsort(reader.offsets, kind="stable"):
        offset = int(reader.offsets[i])
        try:
            header, payload_len = _read_header(reader, offset, label_dtype)
            label = header.class_label
        except DataError as exn:
            skipped += 1
            if warned < _MAX_WARNINGS:
                warned += 1
                _log.warning("skipping record %d of %s: %s", int(reader.keys[i]), reader.rec_path, exn)
            continue
        if payload_len <= 0:
            continue  # a header or identity record, not an image
        if not _integral(label) or label < 0:
            raise DataError(f"record {int(reader.keys[i])} of {reader.rec_path} has label {label}; class labels "
                            f"must be integers >= 0 (if the pack stores float64 labels, pass label_dtype float64)")
        labels[i] = int(label)
    if len(labels) and labels.max() >= 2**24 and label_dtype == "float32":
        _log.warning("%s has labels up to %d; float32 labels are exact only below 2**24: if the pack was written "
                     "with float64 labels, convert with label_dtype float64", reader.rec_path, int(labels.max()))
    images = np.flatnonzero(labels >= 0)
    by_label = images[np.argsort(labels[images], kind="stable")]  # stable: .idx order within an identity
    ids, starts = np.unique(labels[by_label], return_index=True)
    bounds = list(starts) + [len(by_label)]
    identities = [_Identity(int(ident), reader.offsets[by_label[bounds[k]:bounds[k + 1]]])
                  for k, ident in enumerate(ids)]
    return identities, skipped


def _probe_rec_size(reader: RecordIOReader, identities: list[_Identity], label_dtype: LabelDType) -> int:
    for it in identities:
        for offset in it.sources:
            try:
                _, payload = unpack(reader.read_at(int(offset)), label_dtype=label_dtype)
                with Image.open(io.BytesIO(payload)) as im:
                    return _side(im.size, f"{reader.rec_path} byte {offset}")
            except Exception:  # unreadable ones are skipped later; keep probing
                continue
    return 0


def _image_problem(data: bytes, check: CheckMode) -> str | None:
    """Why ``data`` is not a usable JPEG/PNG image, or None."""
    if not (data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC)):
        return f"not a JPEG or PNG (starts with {data[:8].hex() or 'nothing'})"
    if check == "header":
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # PNG: chunk CRCs; cheap
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode catches truncated JPEGs, which verify() lets through
    except Exception as exn:  # PIL raises many types on corrupt data
        return f"{type(exn).__name__}: {exn}"
    return None


class _FolderSource:
    """Reads images of an image folder (picklable, for worker processes)."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, identity: int, rel: str) -> bytes:
        try:
            return (self.root / rel).read_bytes()
        except OSError as exn:
            raise _Skip(f"{type(exn).__name__}: {exn}") from exn

    def describe(self, identity: int, rel: str) -> str:
        return str(self.root / rel)


class _RecSource:
    """Reads image records of a ``.rec`` by offset (picklable: each process opens its own file handle)."""

    kind = "recordio"

    def __init__(self, rec_path: Path, *, label_dtype: LabelDType, check_labels: bool) -> None:
        self.rec_path = rec_path
        self.label_dtype: LabelDType = label_dtype
        self.check_labels = check_labels
        self._reader: RecordIOReader | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def read(self, identity: int, offset: int) -> bytes:
        if offset < 0:
            raise _Skip("its key is not in the .idx")
        if self._reader is None:
            self._reader = RecordIOReader(self.rec_path)  # offsets come from the plan: no .idx needed
        try:
            header, payload = unpack(self._reader.read_at(int(offset)), label_dtype=self.label_dtype)
            label = header.class_label
        except DataError as exn:
            raise _Skip(str(exn)) from exn
        if self.check_labels and label != identity:
            raise DataError(f"{self.rec_path}: the image at byte {offset} is in the key range of identity "
                            f"{identity} but its header says label {label}; convert with layout 'labels' to trust "
                            "the image labels instead of the identity ranges")
        return payload

    def describe(self, identity: int, offset: int) -> str:
        return f"{self.rec_path} byte {offset} (identity {identity})"

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


_Source = _FolderSource | _RecSource


# ---------------------------------------------------------------------------------------------------------- writing


def _plan(identities: list[_Identity], samples_per_shard: int, seed: int) -> list[list[_Identity]]:
    """Shuffles the identity order once and cuts it into shards as ShardWriter would (close at >= target)."""
    order = np.random.default_rng([seed, _S_ORDER]).permutation(len(identities))
    shards: list[list[_Identity]] = []
    cur: list[_Identity] = []
    count = 0
    for i in order:
        cur.append(identities[i])
        count += len(identities[i].sources)
        if count >= samples_per_shard:
            shards.append(cur)
            cur, count = [], 0
    if cur:
        shards.append(cur)
    return shards


def _digest(params: dict[str, Any], plan: list[list[_Identity]]) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for k, shard in enumerate(plan):
        for it in shard:
            h.update(f"{k} {it.identity} {len(it.sources)}\n".encode())
            if isinstance(it.sources, np.ndarray):
                h.update(it.sources.astype("<i8").tobytes())
            else:
                h.update("\n".join(it.sources).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _shard_rel(k: int) -> str:
    return f"{SHARD_DIR}/shard-{k:06d}.tar"


def _prepare_out(out: Path, state: dict[str, Any]) -> None:
    """Creates ``out`` with ``convert.json``, or checks that it holds an earlier run of the same conversion."""
    marker = out / CONVERT_NAME
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a directory; choose another output directory")
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except ValueError:
            old = {}
        if old.get("plan_digest") != state["plan_digest"]:
            raise DataError(f"{out} holds a conversion of other input or options ({old.get('source')} of "
                            f"{old.get('params', {}).get('source_path')}); to resume, re-run with the same input and "
                            "options; otherwise delete it or choose another output directory")
        return
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out} is not empty and holds no {CONVERT_NAME}, so it is not a conversion to resume; "
                        "choose a new or empty output directory")
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(marker, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())


def _scan_shard(path: Path) -> tuple[list[int], list[int]] | None:
    """Ids and image counts of a finished shard, from its tar headers; None if it cannot be read."""
    ids: list[int] = []
    counts: list[int] = []
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                if info.name.endswith(".jpg"):
                    identity = int(info.name[:9])
                    if ids and ids[-1] == identity:
                        counts[-1] += 1
                    else:
                        ids.append(identity)
                        counts.append(1)
    except (tarfile.TarError, OSError, ValueError) as exn:
        _log.warning("shard %s cannot be read (%s: %s); rewriting it", path, type(exn).__name__, exn)
        return None
    return ids, counts


def _matches_plan(ids: list[int], counts: list[int], shard: list[_Identity]) -> bool:
    planned = {it.identity: len(it.sources) for it in shard}
    where = {it.identity: p for p, it in enumerate(shard)}
    pos = [where.get(i, -1) for i in ids]
    return (bool(ids) and all(p >= 0 for p in pos) and pos == sorted(set(pos))
            and all(c <= planned[i] for i, c in zip(ids, counts, strict=True)))


def _progress(total: int, enabled: bool, desc: str):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not (enabled and sys.stderr.isatty()), leave=False)


def _write_shard(out: Path, k: int, shard: list[_Identity], source: _Source, check: CheckMode, num_classes: int,
                 image_size: int) -> tuple[list[int], list[int], list[str]]:
    """Writes planned shard ``k`` (in a worker process or in this one).

    Returns:
        ``(ids, counts, problems)``: what the shard holds (empty if every image was unreadable: then no file is
        written) and one line per skipped image (at most ``_MAX_WARNINGS``, then a count).
    """
    final = out / _shard_rel(k)
    final.unlink(missing_ok=True)
    scratch = out / _WORK_DIR / f"shard-{k:06d}"
    shutil.rmtree(scratch, ignore_errors=True)
    problems: list[str] = []
    num_bad = 0
    ids: list[int] = []
    counts: list[int] = []
    # One ShardWriter per planned shard, in a scratch directory: it closes its only shard on finish(), and the tar
    # is then moved to this shard's stable name.
    with ShardWriter(scratch, samples_per_shard=sys.maxsize) as writer:
        for it in shard:
            images = []
            for src in it.sources:
                try:
                    data = source.read(it.identity, src)
                    problem = _image_problem(data, check)
                except _Skip as exn:
                    problem = str(exn)
                if problem is None:
                    images.append(data)
                    continue
                num_bad += 1
                if num_bad <= _MAX_WARNINGS:
                    problems.append(f"skipping {source.describe(it.identity, src)}: {problem}")
            if images:
                writer.write_identity(it.identity, images)
        if writer.num_samples:
            written = writer.finish(num_classes=num_classes, image_size=image_size).shards[0]
            os.replace(written.path, final)
            ids, counts = list(written.ids), list(written.counts)
    shutil.rmtree(scratch, ignore_errors=True)
    if num_bad > _MAX_WARNINGS:
        problems.append(f"... and {num_bad - _MAX_WARNINGS} more skipped images in shard {k}")
    return ids, counts, problems


def _write_shard_in_worker(out: Path, k: int, shard: list[_Identity], source: _Source, check: CheckMode,
                           num_classes: int, image_size: int) -> tuple[list[int], list[int], list[str]]:
    try:
        return _write_shard(out, k, shard, source, check, num_classes, image_size)
    finally:
        if isinstance(source, _RecSource):
            source.close()


def _convert(out: Path, *, source: _Source, identities: list[_Identity], num_classes: int, image_size: int,
             samples_per_shard: int, seed: int, check: CheckMode, num_workers: int, progress: bool,
             params: dict[str, Any], num_plan_skipped: int, extra_files: dict[str, bytes]) -> ConvertSummary:
    """Plans, writes the missing shards (here or in ``num_workers`` processes), then ``index.json``."""
    plan = _plan(identities, samples_per_shard, seed)
    state = {"format": "offloadfr-convert", "version": _CONVERTER_VERSION, "source": source.kind, "params": params,
             "num_shards_planned": len(plan), "plan_digest": _digest(params, plan)}
    _prepare_out(out, state)
    for name, data in extra_files.items():
        write_bytes_atomic(out / name, data)
    (out / SHARD_DIR).mkdir(exist_ok=True)
    work = out / _WORK_DIR
    shutil.rmtree(work, ignore_errors=True)  # scratch of an interrupted run
    if any(not (out / _shard_rel(k)).is_file() for k in range(len(plan))):
        (out / INDEX_NAME).unlink(missing_ok=True)  # a partial directory must not look complete
    results: dict[int, tuple[list[int], list[int]]] = {}
    todo: list[int] = []
    for k, shard in enumerate(plan):
        final = out / _shard_rel(k)
        found = _scan_shard(final) if final.is_file() else None
        if found is not None and not _matches_plan(*found, shard):
            _log.warning("shard %s does not hold the identities planned for it; rewriting it", final)
            found = None
        if found is None:
            todo.append(k)
        else:
            results[k] = found
    num_reused = len(results)
    num_warned = 0

    def done(k: int, result: tuple[list[int], list[int], list[str]]) -> None:
        nonlocal num_warned
        results[k] = result[0], result[1]
        for line in result[2]:
            if num_warned < _MAX_WARNINGS:
                _log.warning("%s", line)
            num_warned += 1
        bar.update(sum(len(it.sources) for it in plan[k]))

    total = sum(len(it.sources) for it in identities)
    with _progress(total, progress, f"convert {source.kind}") as bar:
        bar.update(sum(len(it.sources) for k in results for it in plan[k]))
        try:
            if num_workers > 1 and len(todo) > 1:
                ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
                with ProcessPoolExecutor(max_workers=min(num_workers, len(todo)), mp_context=ctx) as pool:
                    futures = {pool.submit(_write_shard_in_worker, out, k, plan[k], source, check, num_classes,
                                           image_size): k for k in todo}
                    for future in as_completed(futures):
                        done(futures[future], future.result())
            else:
                for k in todo:
                    done(k, _write_shard(out, k, plan[k], source, check, num_classes, image_size))
        finally:
            if isinstance(source, _RecSource):
                source.close()
    if num_warned > _MAX_WARNINGS:
        _log.warning("%d skipped images in all (the first %d are listed above)", num_warned, _MAX_WARNINGS)
    shutil.rmtree(work, ignore_errors=True)
    entries: list[dict[str, Any]] = []
    num_skipped = num_plan_skipped
    for k, shard in enumerate(plan):
        ids, counts = results[k]
        num_skipped += sum(len(it.sources) for it in shard) - sum(counts)
        if ids:  # a shard whose images were all unreadable has no file and no entry
            entries.append({"path": _shard_rel(k), "ids": ids, "counts": counts, "num_samples": sum(counts)})
    num_images = sum(e["num_samples"] for e in entries)
    if num_images == 0:
        raise DataError(f"no readable image in the {source.kind} input ({num_skipped} skipped, see the warnings); "
                        "nothing to convert")
    meta = {"source": source.kind, "converter_version": _CONVERTER_VERSION, **params, "num_skipped": num_skipped}
    index = {"format": FORMAT, "version": FORMAT_VERSION, "num_classes": num_classes, "num_samples": num_images,
             "image_size": image_size, "shards": entries, "meta": meta}
    write_bytes_atomic(out / INDEX_NAME, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
    read_index(out)  # the written dataset must read back
    num_identities = sum(len(e["ids"]) for e in entries)
    if num_identities < num_classes:
        _log.warning("%d of %d class ids have no image in %s (all their images were unreadable, or the labels leave "
                     "gaps); they stay unused classes", num_classes - num_identities, num_classes, out)
    return ConvertSummary(out=out, source=source.kind, num_classes=num_classes, num_identities=num_identities,
                          num_images=num_images, num_skipped=num_skipped, num_shards=len(entries),
                          num_reused=num_reused)
