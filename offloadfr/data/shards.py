"""Identity-grouped WebDataset tar shards and their ``index.json`` (DESIGN §6).

Layout of a dataset directory::

    DIR/index.json                  format, version, num_classes, num_samples, image_size, shards[]
    DIR/shards/shard-000000.tar     samples "{id:09d}/{n:04d}" with members <key>.jpg and <key>.cls
    DIR/pairs.bin                   (optional) verification pairs, see ``offloadfr.data.pairs``

All images of one identity are contiguous and sit in a single shard (a shard never splits an identity, so it may hold
a few more than ``samples_per_shard`` samples). The identity order is whatever the writer was given; the synthetic
generator and the converters shuffle it once, by their seed, so a shard holds a random set of ids. ``index.json``
lists, per shard, its ids in shard order and the number of images of each, so a sampler or the prefetch plan knows
which ids a byte range of a shard holds without opening it.

Tars are written deterministically (mtime 0, uid/gid 0, empty user/group names, mode 0o644, USTAR headers, members
in write order): the same input gives byte-identical files. Every file is written to a temporary name and moved into
place with ``os.replace``, so a reader never sees half a shard or half an index.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from offloadfr.errors import DataError, DataNotFoundError

__all__ = [
    "INDEX_NAME",
    "SHARD_DIR",
    "FORMAT",
    "FORMAT_VERSION",
    "ShardInfo",
    "DatasetIndex",
    "ShardWriter",
    "read_index",
    "sample_key",
    "write_bytes_atomic",
]

INDEX_NAME = "index.json"
"""Name of the index file inside a dataset directory."""
SHARD_DIR = "shards"
"""Sub-directory holding the tar shards."""
FORMAT = "offloadfr-shards"
"""Value of the ``format`` field of ``index.json``."""
FORMAT_VERSION = 1
"""Version of the ``index.json`` layout; readers refuse other versions."""

_FIX_HINT = "generate one with `offloadfr synth --out DIR` or convert images with `offloadfr convert`"


def sample_key(identity: int, n: int) -> str:
    """The WebDataset key of image ``n`` of identity ``identity``: ``"{id:09d}/{n:04d}"``."""
    return f"{identity:09d}/{n:04d}"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardInfo:
    """One shard as listed in ``index.json``.

    Attributes:
        path: absolute path of the tar file.
        ids: the identities it holds, in shard order.
        counts: images of each identity, parallel to ``ids``.
        num_samples: ``sum(counts)``.
    """

    path: Path
    ids: tuple[int, ...]
    counts: tuple[int, ...]
    num_samples: int


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetIndex:
    """A dataset directory's ``index.json``, checked against the files on disk.

    Attributes:
        root: the dataset directory.
        num_classes: number of identities; labels are ``0 .. num_classes-1``.
        num_samples: images over all shards.
        image_size: side of the stored square images, in pixels.
        shards: the shards in index order.
        meta: free-form provenance written by the producer (e.g. the synth config); not interpreted.
    """

    root: Path
    num_classes: int
    num_samples: int
    image_size: int
    shards: tuple[ShardInfo, ...]
    meta: dict[str, Any]

    @property
    def pairs_path(self) -> Path:
        """Where the dataset's verification pairs live (the file may not exist for converted datasets)."""
        return self.root / "pairs.bin"


def read_index(root: str | os.PathLike[str]) -> DatasetIndex:
    """Reads and checks ``root/index.json``.

    Args:
        root: the dataset directory.

    Returns:
        The index, with absolute shard paths.

    Raises:
        DataNotFoundError: ``root``, its ``index.json`` or a shard it lists does not exist.
        DataError: the index is malformed, of another format version, or lists zero samples, or a shard is empty.
    """
    root = Path(root)
    index_path = root / INDEX_NAME
    if not root.is_dir():
        raise DataNotFoundError(f"dataset directory {root} does not exist; {_FIX_HINT}")
    if not index_path.is_file():
        raise DataNotFoundError(f"{index_path} does not exist, so {root} is not a dataset; {_FIX_HINT}")
    try:
        raw = json.loads(index_path.read_text())
        if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
            raise DataError(f"{index_path} has format {raw.get('format')!r} version {raw.get('version')!r}; "
                            f"expected {FORMAT!r} version {FORMAT_VERSION}; re-create the dataset with this version")
        shards = []
        for entry in raw["shards"]:
            ids = tuple(int(i) for i in entry["ids"])
            counts = tuple(int(c) for c in entry["counts"])
            if len(ids) != len(counts) or sum(counts) != int(entry["num_samples"]):
                raise DataError(f"{index_path}: shard {entry['path']} lists {len(ids)} ids, {len(counts)} counts "
                                f"summing to {sum(counts)} but num_samples {entry['num_samples']}; re-create it")
            shards.append(ShardInfo(path=root / entry["path"], ids=ids, counts=counts,
                                    num_samples=int(entry["num_samples"])))
        index = DatasetIndex(root=root, num_classes=int(raw["num_classes"]), num_samples=int(raw["num_samples"]),
                             image_size=int(raw["image_size"]), shards=tuple(shards), meta=dict(raw.get("meta", {})))
    except (KeyError, TypeError, ValueError) as exn:
        if isinstance(exn, DataError):
            raise
        raise DataError(f"{index_path} is malformed ({type(exn).__name__}: {exn}); re-create the dataset") from exn
    if index.num_samples <= 0 or sum(s.num_samples for s in index.shards) != index.num_samples:
        raise DataError(f"{index_path} lists {index.num_samples} samples over {len(index.shards)} shards "
                        f"(shards sum to {sum(s.num_samples for s in index.shards)}); a dataset needs at least one "
                        "sample and consistent counts; re-create it")
    for shard in index.shards:
        if not shard.path.is_file():
            raise DataNotFoundError(f"shard {shard.path} listed in {index_path} does not exist; copy it back or "
                                    "re-create the dataset")
        if shard.path.stat().st_size == 0:  # an interrupted copy: training would silently skip its samples
            raise DataError(f"shard {shard.path} is empty (0 bytes) but {index_path} lists {shard.num_samples} "
                            "samples in it; copy it again or re-create the dataset")
    return index


class ShardWriter:
    """Writes identity-grouped tar shards and, on :meth:`finish`, ``index.json``.

    Identities are written whole (:meth:`write_identity`); a new shard starts once the current one holds at least
    ``samples_per_shard`` samples. Output is byte-identical for identical input.

    Args:
        root: the dataset directory (created if missing); shards go to ``root/shards/``.
        samples_per_shard: target samples per shard (a shard holds whole identities, so it may hold a few more).

    Raises:
        DataError: ``samples_per_shard`` < 1.

    Example::

        with ShardWriter(out, samples_per_shard=2000) as writer:
            writer.write_identity(7, [jpeg_bytes_a, jpeg_bytes_b])
            index = writer.finish(num_classes=8, image_size=32)
    """

    def __init__(self, root: str | os.PathLike[str], *, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise DataError(f"samples_per_shard = {samples_per_shard}; it must be >= 1")
        self.root = Path(root)
        self.samples_per_shard = samples_per_shard
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._entries: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._ids: list[int] = []
        self._counts: list[int] = []
        self._seen: set[int] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()

    @property
    def num_samples(self) -> int:
        """Samples written so far, over all shards."""
        return sum(e["num_samples"] for e in self._entries) + sum(self._counts)

    def write_identity(self, identity: int, images: Sequence[bytes]) -> None:
        """Appends all images of one identity as samples ``{id:09d}/{n:04d}`` (n = 0, 1, ...).

        Args:
            identity: the class id, ``>= 0``; each id may be written once.
            images: encoded image bytes (JPEG), at least one.

        Raises:
            DataError: a negative or repeated id, or no images.
        """
        if identity < 0 or identity in self._seen:
            raise DataError(f"identity {identity} is negative or was already written; each id >= 0 is written once")
        if not images:
            raise DataError(f"identity {identity} has no images; write at least one")
        self._seen.add(identity)
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        cls_bytes = str(identity).encode("ascii")
        for n, data in enumerate(images):
            key = sample_key(identity, n)
            self._add_member(f"{key}.cls", cls_bytes)
            self._add_member(f"{key}.jpg", data)
        self._ids.append(identity)
        self._counts.append(len(images))
        if sum(self._counts) >= self.samples_per_shard:
            self._close_shard()

    def finish(self, *, num_classes: int, image_size: int, meta: dict[str, Any] | None = None) -> DatasetIndex:
        """Closes the last shard, writes ``index.json`` and returns the checked index.

        Args:
            num_classes: number of identities (every written id must be below it).
            image_size: side of the stored images in pixels.
            meta: provenance stored verbatim under ``meta`` (must be JSON-serialisable).

        Returns:
            The index as :func:`read_index` reads it back.

        Raises:
            DataError: an id is ``>= num_classes``, or nothing was written.
        """
        if self._tar is not None:
            self._close_shard()
        if self._seen and max(self._seen) >= num_classes:
            raise DataError(f"identity {max(self._seen)} was written but num_classes = {num_classes}; ids must be "
                            "below num_classes")
        index = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "num_classes": num_classes,
            "num_samples": self.num_samples,
            "image_size": image_size,
            "shards": self._entries,
            "meta": meta or {},
        }
        write_bytes_atomic(self.root / INDEX_NAME, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
        return read_index(self.root)

    def abort(self) -> None:
        """Closes and deletes the shard being written (already finished shards stay)."""
        if self._tar is not None:
            fileobj = self._tar.fileobj
            self._tar.close()
            if fileobj is not None:
                fileobj.close()
            self._tar = None
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
            self._tmp_path = None

    def _shard_rel(self) -> str:
        return f"{SHARD_DIR}/shard-{len(self._entries):06d}.tar"

    def _open_shard(self) -> None:
        self._tmp_path = self.root / (self._shard_rel() + ".tmp")
        # USTAR: no pax headers (which could carry times); names here are short enough.
        self._tar = tarfile.open(self._tmp_path, mode="w", format=tarfile.USTAR_FORMAT)

    def _add_member(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def _close_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None
        self._tar.close()
        rel = self._shard_rel()
        os.replace(self._tmp_path, self.root / rel)
        self._entries.append({"path": rel, "ids": self._ids, "counts": self._counts,
                              "num_samples": sum(self._counts)})
        self._tar, self._tmp_path = None, None
        self._ids, self._counts = [], []
