"""MXNet indexed RecordIO (InsightFace ``train.rec`` + ``train.idx`` + ``property``) in pure Python, without mxnet.

mxnet 1.9.1, the last release, needs ``numpy<2``, which clashes with zarr 3, so offloadfr reads the format itself.
The format (dmlc-core ``recordio.h``, mxnet ``recordio.py``):

- ``.rec``: a sequence of *parts*. Each part is the magic ``0xced7230a`` (uint32, little-endian), then
  ``lrec = cflag << 29 | length`` (uint32), then ``length`` bytes, zero-padded to a multiple of 4. ``cflag`` 0 is a
  whole record. The writer splits a record wherever its payload holds the magic at a 4-aligned position: the record
  becomes parts with ``cflag`` 1 (first), 2 (middle), 3 (last), and the reader joins them, putting the magic back
  between them.
- ``.idx``: text, one ``key<TAB>offset`` line per record; ``offset`` is the byte position of the record's first part.
- A record is an image record: ``IRHeader`` = struct ``IfQQ`` (flag uint32, label float32, id uint64, id2 uint64;
  24 bytes), then, if ``flag > 0``, ``flag`` float32 labels (the ``label`` field is then 0), then the encoded image.
  Some third-party packs use ``IdQQ`` (float64 label, 32 bytes with alignment) and float64 labels
  (``label_dtype="float64"`` here), so that ids above 2**24 stay exact.
- ``property``: text ``"num_classes,height,width"``.

InsightFace packs come in two layouts, both read by :mod:`offloadfr.data.convert_rec`:

- ``ranges`` (MS1MV2, MS1MV3, Glint360K, ...): record 0 is a header record, ``flag = 2``, ``label = (id_start,
  id_end)``, no payload. Image records are keys ``1 .. id_start-1``; records ``id_start .. id_end-1`` are identity
  records whose label ``(first, end)`` is the key range of that identity's images; identity ``j`` is the record at key
  ``id_start + j``.
- ``labels`` (``RecBuilder``, ``im2rec``): keys ``0 .. n-1`` are image records whose (first) label is the class id.

:class:`RecordIOWriter` and :func:`write_face_rec` write the same format. They exist so that tests can build
``.rec``/``.idx`` fixtures without mxnet, and they follow the format bit for bit (record splitting included), but
they are not meant for packing large datasets.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np

from offloadfr.errors import DataError, DataNotFoundError

__all__ = [
    "MAGIC",
    "LabelDType",
    "IRHeader",
    "header_size",
    "pack",
    "unpack",
    "frame",
    "RecordIOReader",
    "RecordIOWriter",
    "read_property",
    "write_property",
    "write_face_rec",
]

MAGIC = 0xCED7230A
"""The dmlc RecordIO magic number that starts every part."""
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FLAG_SHIFT = 29
_LEN_MASK = (1 << _FLAG_SHIFT) - 1
_PART = struct.Struct("<II")  # magic, lrec

LabelDType = Literal["float32", "float64"]
"""Float type of the header label and of the extra labels: ``float32`` (mxnet) or ``float64`` (some packs)."""
# Explicit little-endian layouts equal to mxnet's native ``IfQQ`` / ``IdQQ`` on x86 and ARM (note the padding
# before the double).
_HEADERS = {"float32": struct.Struct("<IfQQ"), "float64": struct.Struct("<I4xdQQ")}
_LABEL_NP = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


def _check_dtype(label_dtype: str) -> None:
    if label_dtype not in _HEADERS:
        raise DataError(f"label_dtype = {label_dtype!r}; choose 'float32' (mxnet packs) or 'float64'")


def header_size(label_dtype: LabelDType = "float32") -> int:
    """Bytes of the ``IRHeader`` struct: 24 for float32 labels, 32 for float64."""
    _check_dtype(label_dtype)
    return _HEADERS[label_dtype].size


@dataclass(frozen=True, slots=True)
class IRHeader:
    """The header of an image record (mxnet ``recordio.IRHeader``).

    Attributes:
        flag: number of extra labels after the header (0: the label is ``label``).
        label: the class id as a float, or the tuple of extra labels when ``flag > 0``.
        id: record id (InsightFace: the image's key).
        id2: second id (unused by InsightFace, 0).
    """

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int

    @property
    def class_label(self) -> float:
        """The class id: ``label``, or its first element for a multi-label header (as InsightFace reads it)."""
        if isinstance(self.label, tuple):
            if not self.label:
                raise DataError("a record header has flag > 0 but no labels; the record is malformed")
            return self.label[0]
        return self.label


def pack(header: IRHeader, payload: bytes, *, label_dtype: LabelDType = "float32") -> bytes:
    """Header + extra labels + payload, as mxnet ``recordio.pack``.

    A numeric ``header.label`` is stored in the header with ``flag = 0``; a tuple is stored after the header with
    ``flag = len(label)`` and 0 in the header's label field (``header.flag`` is ignored, as in mxnet).

    Args:
        header: the header to write.
        payload: the encoded image (or nothing, for InsightFace's header and identity records).
        label_dtype: float type of the labels.

    Returns:
        The record bytes (not yet framed; see :func:`frame`).
    """
    _check_dtype(label_dtype)
    st = _HEADERS[label_dtype]
    if isinstance(header.label, tuple):
        labels = np.asarray(header.label, dtype=_LABEL_NP[label_dtype]).tobytes()
        return st.pack(len(header.label), 0.0, header.id, header.id2) + labels + payload
    return st.pack(0, float(header.label), header.id, header.id2) + payload


def unpack(record: bytes, *, label_dtype: LabelDType = "float32") -> tuple[IRHeader, bytes]:
    """Splits a record into its header and payload, as mxnet ``recordio.unpack``.

    Args:
        record: the record bytes (parts already joined).
        label_dtype: float type of the labels.

    Returns:
        ``(header, payload)``; ``header.label`` is a tuple when ``flag > 0``.

    Raises:
        DataError: the record is shorter than its header and labels.
    """
    _check_dtype(label_dtype)
    st = _HEADERS[label_dtype]
    if len(record) < st.size:
        raise DataError(f"a record of {len(record)} bytes is shorter than the {st.size}-byte IRHeader; the .rec is "
                        f"corrupt or was written with other labels (label_dtype = {label_dtype!r})")
    flag, label, rid, rid2 = st.unpack_from(record, 0)
    if flag == 0:
        return IRHeader(0, float(label), rid, rid2), record[st.size:]
    item = _LABEL_NP[label_dtype].itemsize
    end = st.size + flag * item
    if len(record) < end:
        raise DataError(f"a record header announces {flag} labels but the record has {len(record)} bytes; the .rec "
                        f"is corrupt or was written with other labels (label_dtype = {label_dtype!r})")
    labels = np.frombuffer(record, dtype=_LABEL_NP[label_dtype], count=flag, offset=st.size)
    return IRHeader(flag, tuple(float(x) for x in labels), rid, rid2), record[end:]


def frame(record: bytes) -> bytes:
    """The bytes dmlc's ``RecordIOWriter::WriteRecord`` writes for one record (its parts, padded).

    Raises:
        DataError: the record is 2**29 bytes or longer (the format's limit).
    """
    size = len(record)
    if size > _LEN_MASK:
        raise DataError(f"a record of {size} bytes exceeds the RecordIO limit of {_LEN_MASK} bytes")
    lower_align = size & ~3
    out = bytearray()
    start = 0  # start of the current part
    pos = record.find(_MAGIC_BYTES)
    while 0 <= pos and pos + 4 <= lower_align:
        if pos % 4 == 0 and pos >= start:
            # The magic at an aligned position is cut out: it ends a part, and the reader puts it back.
            out += _PART.pack(MAGIC, ((1 if start == 0 else 2) << _FLAG_SHIFT) | (pos - start))
            out += record[start:pos]
            start = pos + 4
        pos = record.find(_MAGIC_BYTES, pos + 1)
    out += _PART.pack(MAGIC, ((3 if start else 0) << _FLAG_SHIFT) | (size - start))
    out += record[start:]
    out += b"\0" * (-size % 4)
    return bytes(out)


class RecordIOReader:
    """Random and sequential access to a ``.rec`` file, by key through its ``.idx``.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its ``.idx`` file; without it only :meth:`read_at` and iteration work.

    Raises:
        DataNotFoundError: a file does not exist.
        DataError: the ``.idx`` has a malformed line.

    Example::

        with RecordIOReader("train.rec", "train.idx") as rec:
            header, jpeg = unpack(rec.read(1))
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None) -> None:
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise DataNotFoundError(f"RecordIO file {self.rec_path} does not exist; pass the .rec of the pack")
        self.keys: np.ndarray = np.empty(0, np.int64)
        """Keys in ``.idx`` order (int64)."""
        self.offsets: np.ndarray = np.empty(0, np.int64)
        """Byte offset of each key's record, parallel to :attr:`keys`."""
        if idx_path is not None:
            self.keys, self.offsets = _read_idx(Path(idx_path))
        self._dense = bool(len(self.keys)) and bool(np.array_equal(self.keys, np.arange(len(self.keys))))
        self._sorter = None if self._dense else np.argsort(self.keys, kind="stable")
        self._file = open(self.rec_path, "rb")  # closed by close()
        self.size = os.fstat(self._file.fileno()).st_size
        """Bytes in the ``.rec`` file."""

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the ``.rec`` file."""
        self._file.close()

    def has_key(self, key: int) -> bool:
        """Whether the ``.idx`` lists ``key``."""
        return self._position(key) is not None

    def offset_of(self, key: int) -> int:
        """Byte offset of ``key``'s record.

        Raises:
            DataError: the ``.idx`` does not list ``key``.
        """
        pos = self._position(key)
        if pos is None:
            raise DataError(f"key {key} is not in the .idx of {self.rec_path}; the pack is incomplete or its .idx "
                            "belongs to another .rec")
        return int(self.offsets[pos])

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Offsets of many keys at once (int64 array shaped like ``keys``), -1 where the ``.idx`` lacks a key."""
        keys = np.asarray(keys, np.int64)
        out = np.full(keys.shape, -1, np.int64)
        n = len(self.keys)
        if n == 0:
            return out
        if self._dense:
            ok = (keys >= 0) & (keys < n)
            out[ok] = self.offsets[keys[ok]]
            return out
        assert self._sorter is not None
        cand = self._sorter[np.minimum(np.searchsorted(self.keys, keys, sorter=self._sorter), n - 1)]
        ok = self.keys[cand] == keys
        out[ok] = self.offsets[cand[ok]]
        return out

    def read(self, key: int) -> bytes:
        """The record of ``key`` (parts joined)."""
        return self.read_at(self.offset_of(key))

    def read_at(self, offset: int) -> bytes:
        """The record whose first part starts at byte ``offset`` (parts joined, padding dropped).

        Raises:
            DataError: no valid part starts there, a continuation part is missing, or the file ends early.
        """
        out = bytearray()
        pos = offset
        first = True
        while True:
            cflag, length = self._part_header(pos)
            if first and cflag not in (0, 1):
                raise DataError(f"{self.rec_path}: the part at byte {offset} continues another record (cflag "
                                f"{cflag}); the .idx offset is wrong")
            if not first and cflag not in (2, 3):
                raise DataError(f"{self.rec_path}: the record at byte {offset} is cut short (part at byte {pos} "
                                f"has cflag {cflag}, expected 2 or 3)")
            data = self._file.read(length)
            if len(data) != length:
                raise DataError(f"{self.rec_path}: the record at byte {offset} runs past the end of the file; the "
                                ".rec is truncated")
            out += data
            pos += _PART.size + length + (-length % 4)
            if cflag in (0, 3):
                return bytes(out)
            out += _MAGIC_BYTES
            first = False

    def read_head(self, offset: int, num_bytes: int) -> tuple[bytes, int]:
        """The first ``num_bytes`` of the record at ``offset`` and the record's length, reading little more.

        Used to read headers (labels) without reading images.

        Raises:
            DataError: as :meth:`read_at`.
        """
        cflag, length = self._part_header(offset)
        if cflag == 0:
            return self._file.read(min(length, num_bytes)), length
        record = self.read_at(offset)  # a split record: rare, read it whole
        return record[:num_bytes], len(record)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """``(offset, record)`` for every record of the file, in file order (the ``.idx`` is not needed)."""
        offset = 0
        while offset < self.size:
            record = self.read_at(offset)
            yield offset, record
            # Recompute where the next record starts from the parts just read.
            pos = offset
            while True:
                cflag, length = self._part_header(pos)
                pos += _PART.size + length + (-length % 4)
                if cflag in (0, 3):
                    break
            offset = pos

    def _part_header(self, pos: int) -> tuple[int, int]:
        self._file.seek(pos)
        raw = self._file.read(_PART.size)
        if len(raw) != _PART.size:
            raise DataError(f"{self.rec_path}: no record at byte {pos} (file has {self.size} bytes); the .rec is "
                            "truncated or the .idx belongs to another .rec")
        magic, lrec = _PART.unpack(raw)
        if magic != MAGIC:
            raise DataError(f"{self.rec_path}: bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x}); the "
                            ".rec is corrupt there or the .idx belongs to another .rec")
        return lrec >> _FLAG_SHIFT, lrec & _LEN_MASK

    def _position(self, key: int) -> int | None:
        n = len(self.keys)
        if self._dense:
            return key if 0 <= key < n else None
        if n == 0 or self._sorter is None:
            return None
        i = int(np.searchsorted(self.keys, key, sorter=self._sorter))
        if i < n and int(self.keys[self._sorter[i]]) == key:
            return int(self._sorter[i])
        return None


def _read_idx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parses a ``.idx`` file into (keys, offsets) int64 arrays, in file order."""
    if not path.is_file():
        raise DataNotFoundError(f"RecordIO index {path} does not exist; the .idx must sit next to the .rec (mxnet's "
                                "tools/im2rec.py or InsightFace's packers write it)")
    keys, offsets = array("q"), array("q")
    with open(path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                key, offset = line.split("\t")
                keys.append(int(key))
                offsets.append(int(offset))
            except ValueError as exn:
                raise DataError(f"{path}:{lineno}: {line.strip()!r} is not 'key<TAB>offset' with integers; the .idx "
                                "is corrupt or not an mxnet RecordIO index") from exn
    return np.frombuffer(keys, np.int64).copy(), np.frombuffer(offsets, np.int64).copy()


class RecordIOWriter:
    """Writes a ``.rec`` and its ``.idx`` as mxnet ``MXIndexedRecordIO(idx, rec, "w").write_idx`` does.

    For test fixtures and small packs.

    Args:
        rec_path: the ``.rec`` to create.
        idx_path: the ``.idx`` to create.

    Example::

        with RecordIOWriter("train.rec", "train.idx") as w:
            w.write(0, pack(IRHeader(0, 3.0, 0, 0), jpeg))
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]) -> None:
        self._rec = open(rec_path, "wb")  # closed by close()
        self._idx = open(idx_path, "w", encoding="ascii")
        self._pos = 0

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def write(self, key: int, record: bytes) -> None:
        """Appends ``record`` (framed by :func:`frame`) and its ``key<TAB>offset`` index line."""
        data = frame(record)
        self._rec.write(data)
        self._idx.write(f"{key}\t{self._pos}\n")
        self._pos += len(data)

    def close(self) -> None:
        """Flushes and closes both files."""
        self._rec.close()
        self._idx.close()


def read_property(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """Reads an InsightFace ``property`` file: ``(num_classes, height, width)``.

    Raises:
        DataError: the file is not three comma-separated positive integers.
    """
    text = Path(path).read_text().strip()
    try:
        num_classes, height, width = (int(x) for x in text.split(","))
    except ValueError as exn:
        raise DataError(f"{path} holds {text[:60]!r}; an InsightFace property file is 'num_classes,height,width' "
                        "(e.g. '85742,112,112'); fix or delete it") from exn
    if min(num_classes, height, width) < 1:
        raise DataError(f"{path} holds {text!r}; all three numbers must be >= 1; fix or delete it")
    return num_classes, height, width


def write_property(path: str | os.PathLike[str], num_classes: int, height: int, width: int) -> None:
    """Writes an InsightFace ``property`` file (``"%d,%d,%d\\n"``)."""
    Path(path).write_text(f"{num_classes},{height},{width}\n")


def write_face_rec(directory: str | os.PathLike[str], samples: Sequence[tuple[int | Sequence[float], bytes]], *,
                   layout: Literal["ranges", "labels"], num_classes: int | None = None,
                   image_size: tuple[int, int] = (112, 112), label_dtype: LabelDType = "float32") -> Path:
    """Writes ``train.rec``, ``train.idx`` and ``property`` in one of InsightFace's layouts (for test fixtures).

    Args:
        directory: where to write (created if missing).
        samples: ``(label, encoded_image)`` in record order. A label is a class id, or a sequence of floats whose
            first element is the class id (a multi-label header). For ``ranges`` the samples must be grouped by
            class, classes ``0, 1, ...`` in increasing order, each at least once.
        layout: ``ranges`` (header record 0, images, then identity records) or ``labels`` (keys 0..n-1, images).
        num_classes: written to ``property``; default: largest class id + 1.
        image_size: ``(height, width)`` written to ``property``.
        label_dtype: float type of the labels.

    Returns:
        ``directory``.

    Raises:
        DataError: ``ranges`` samples not grouped by increasing class ids 0, 1, ..., or an unknown layout.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    classes = [int(lab if isinstance(lab, int) else lab[0]) for lab, _ in samples]
    with RecordIOWriter(directory / "train.rec", directory / "train.idx") as w:
        if layout == "labels":
            for key, (lab, img) in enumerate(samples):
                label = float(lab) if isinstance(lab, int) else tuple(float(x) for x in lab)
                w.write(key, pack(IRHeader(0, label, key, 0), img, label_dtype=label_dtype))
        elif layout == "ranges":
            num_ids = max(classes) + 1 if classes else 0
            starts = [classes.index(c) for c in range(num_ids)] if set(classes) == set(range(num_ids)) else []
            if not starts or classes != sorted(classes):
                raise DataError("layout 'ranges' needs samples grouped by class, classes 0, 1, ... in increasing "
                                "order, each at least once; sort the samples by class")
            id_start = len(samples) + 1
            # Record 0: (id_start, id_end), no payload; then images at keys 1..n; then one record per identity.
            w.write(0, pack(IRHeader(0, (float(id_start), float(id_start + num_ids)), 0, 0), b"",
                            label_dtype=label_dtype))
            for i, (lab, img) in enumerate(samples):
                label = float(lab) if isinstance(lab, int) else tuple(float(x) for x in lab)
                w.write(i + 1, pack(IRHeader(0, label, i + 1, 0), img, label_dtype=label_dtype))
            ends = starts[1:] + [len(samples)]
            for j, (a, b) in enumerate(zip(starts, ends, strict=True)):
                w.write(id_start + j, pack(IRHeader(0, (float(a + 1), float(b + 1)), id_start + j, 0), b"",
                                           label_dtype=label_dtype))
        else:
            raise DataError(f"layout = {layout!r}; choose 'ranges' or 'labels'")
    if num_classes is None:
        num_classes = max(classes) + 1 if classes else 0
    write_property(directory / "property", num_classes, *image_size)
    return directory
