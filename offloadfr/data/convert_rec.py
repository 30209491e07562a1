"""The InsightFace RecordIO converter (``offloadfr convert rec``, DESIGN §6): ``train.rec``/``.idx`` to shards.

The pack (``train.rec`` + ``train.idx`` + ``property``) is read by :mod:`offloadfr.data.recordio` without mxnet, in
either of InsightFace's layouts (identity ranges from a header record, or one label per record). Ids are the pack's
class ids. This module only plans the identities from record headers and reads image records by offset
(:class:`_RecSource`); :func:`offloadfr.data.convert_writer.convert_identities` checks, writes and resumes.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from offloadfr.data.convert_writer import (
    MAX_WARNINGS,
    CheckMode,
    ConvertSummary,
    IdentityImages,
    SkippedImage,
    check_options,
    convert_identities,
    image_side,
)
from offloadfr.data.recordio import LabelDType, RecordIOReader, header_size, read_property, unpack
from offloadfr.errors import DataError, DataNotFoundError

__all__ = ["convert_rec"]

_log = logging.getLogger(__name__)


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
        check: how images are checked (:data:`~offloadfr.data.convert_writer.CheckMode`).
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
    check_options(samples_per_shard, seed, check, num_workers)
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
    return convert_identities(Path(out), source=source, identities=identities, num_classes=num_classes,
                              image_size=image_size, samples_per_shard=samples_per_shard, seed=seed, check=check,
                              num_workers=num_workers, progress=progress, params=params,
                              num_plan_skipped=num_plan_skipped, extra_files={})


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


def _plan_ranges(reader: RecordIOReader, header0: tuple[int, int], label_dtype: LabelDType) -> list[IdentityImages]:
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
        identities.append(IdentityImages(j, reader.lookup(np.arange(int(label[0]), int(label[1]), dtype=np.int64))))
    return identities


def _plan_labels(reader: RecordIOReader, label_dtype: LabelDType) -> tuple[list[IdentityImages], int]:
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
            if warned < MAX_WARNINGS:
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
    identities = [IdentityImages(int(ident), reader.offsets[by_label[bounds[k]:bounds[k + 1]]])
                  for k, ident in enumerate(ids)]
    return identities, skipped


def _probe_rec_size(reader: RecordIOReader, identities: list[IdentityImages], label_dtype: LabelDType) -> int:
    for it in identities:
        for offset in it.sources:
            try:
                _, payload = unpack(reader.read_at(int(offset)), label_dtype=label_dtype)
                with Image.open(io.BytesIO(payload)) as im:
                    return image_side(im.size, f"{reader.rec_path} byte {offset}")
            except Exception:  # unreadable ones are skipped later; keep probing
                continue
    return 0


class _RecSource:
    """Reads image records of a ``.rec`` by offset (picklable: each process opens its own file handle): the pack's
    :class:`~offloadfr.data.convert_writer.ImageSource`."""

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
            raise SkippedImage("its key is not in the .idx")
        if self._reader is None:
            self._reader = RecordIOReader(self.rec_path)  # offsets come from the plan: no .idx needed
        try:
            header, payload = unpack(self._reader.read_at(int(offset)), label_dtype=self.label_dtype)
            label = header.class_label
        except DataError as exn:
            raise SkippedImage(str(exn)) from exn
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
