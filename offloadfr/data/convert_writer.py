"""The shard writer every converter shares (``offloadfr convert``, DESIGN §6): a source lists identities, this writes.

A converter (:mod:`offloadfr.data.convert_folder`, :mod:`offloadfr.data.convert_rec`) does two things: it lists
the input's identities as :class:`IdentityImages` (an id and where its images are: file names, record offsets, ...)
from file listings or record headers only, and it provides an :class:`ImageSource` that reads one image's encoded
bytes given such a reference. :func:`convert_identities` does everything else: it plans the shards, checks and
copies the images (in this process or in worker processes), and writes ``index.json`` and the provenance.

The encoded image bytes are copied unchanged (a PNG stays a PNG: it is stored under the ``.jpg`` member, which every
reader decodes with PIL, and PIL recognises the format from the bytes, not from the name). An image that cannot be
read or decoded is skipped, counted and logged (the first few); never fatal.

The output is a dataset directory as :mod:`offloadfr.data.shards` defines it, plus provenance::

    OUT/convert.json       what was converted and with which options, and a digest of the shard plan
    OUT/...                a converter's extra files (e.g. identities.json of a folder conversion)

**Resumable.** The whole plan (which identity goes to which shard, the identity order being shuffled once by
``seed``) is computed before anything is written. Shard ``k`` of the plan is always ``shards/shard-{k:06d}.tar``,
written in a scratch directory and moved into place with ``os.replace``, so a shard whose final file exists is
finished. A re-run with the same input and options keeps the finished shards and writes only the missing ones;
``index.json`` is written last, so a directory with an ``index.json`` is complete. A re-run with other input or
options into the same directory is refused (the plan digest in ``convert.json`` differs). The same input and options
give byte-identical shards and ``index.json``, interrupted or not.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from offloadfr.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    SHARD_DIR,
    ShardWriter,
    read_index,
    write_bytes_atomic,
)
from offloadfr.errors import DataError

__all__ = [
    "CheckMode",
    "CONVERT_NAME",
    "MAX_WARNINGS",
    "ConvertSummary",
    "IdentityImages",
    "ImageSource",
    "SkippedImage",
    "check_options",
    "convert_identities",
    "image_side",
]

_log = logging.getLogger(__name__)

CheckMode = Literal["decode", "header"]
"""How images are checked before they are copied: ``decode`` (magic bytes, ``PIL.Image.verify`` and a full decode;
catches truncated files) or ``header`` (magic bytes only; faster)."""
CONVERT_NAME = "convert.json"
"""Provenance and plan digest of a conversion, written first; marks a directory as a converter's output."""
MAX_WARNINGS = 20
"""How many skipped images (or records) a conversion lists in the log; the rest are only counted."""

_CONVERTER_VERSION = 1
_WORK_DIR = ".convert-work"
_S_ORDER = 0x1D0C  # keeps the identity-order stream apart from other users of the seed
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


class SkippedImage(Exception):
    """One image cannot be read; the message says why. :meth:`ImageSource.read` raises it, the writer counts it."""


@dataclass(frozen=True, slots=True)
class IdentityImages:
    """One identity of the plan: its id and where its images are (file names, or record offsets; -1: missing).

    Attributes:
        identity: the id, in ``[0, num_classes)``.
        sources: one reference per image, in the order the images are written; what a reference is is up to the
            :class:`ImageSource` (a sequence of ``str`` or an integer ``np.ndarray``, so the plan digest covers it).
    """

    identity: int
    sources: Sequence[Any]


class ImageSource(Protocol):
    """Reads the images a converter listed; picklable, so that worker processes can each hold a copy.

    Attributes:
        kind: the source's name in ``convert.json``, ``index.json`` and the summary (``folder``, ``recordio``).
    """

    kind: str

    def read(self, identity: int, ref: Any) -> bytes:
        """The encoded bytes of one image of ``identity``.

        Args:
            identity: the image's id.
            ref: the image's reference in :attr:`IdentityImages.sources`.

        Returns:
            The image file's bytes, unchanged.

        Raises:
            SkippedImage: the image cannot be read (it is skipped and counted).
        """
        ...

    def describe(self, identity: int, ref: Any) -> str:
        """Where the image is, for the log line of a skipped image.

        Args:
            identity: the image's id.
            ref: the image's reference in :attr:`IdentityImages.sources`.

        Returns:
            A path, or a file and byte offset.
        """
        ...

    def close(self) -> None:
        """Releases what :meth:`read` opened (called once the source's shards are written, in every process)."""
        ...


def check_options(samples_per_shard: int, seed: int, check: str, num_workers: int) -> None:
    """Checks the options every converter takes.

    Args:
        samples_per_shard: target images per shard.
        seed: seed of the identity order.
        check: how images are checked (:data:`CheckMode`).
        num_workers: processes writing shards in parallel.

    Raises:
        DataError: an option is out of range, naming it and what is allowed.
    """
    if num_workers < 0:
        raise DataError(f"num_workers = {num_workers}; it must be >= 0 (0: write shards in this process)")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard = {samples_per_shard}; it must be >= 1 (e.g. 2000)")
    if seed < 0:
        raise DataError(f"seed = {seed}; it must be >= 0")
    if check not in ("decode", "header"):
        raise DataError(f"check = {check!r}; choose 'decode' (full decode, catches truncated images) or 'header' "
                        "(magic bytes only, faster)")


def image_side(size: tuple[int, int], what: str) -> int:
    """The ``image_size`` to record for a probed image of ``size``; warns if it is not square.

    Args:
        size: the image's ``(width, height)``.
        what: where the image is, for the warning.

    Returns:
        The longer side.
    """
    w, h = size
    if w != h:
        _log.warning("%s is %dx%d, not square; index.json records %d and the loader resizes images to squares",
                     what, w, h, max(w, h))
    return max(w, h)


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


def _plan(identities: list[IdentityImages], samples_per_shard: int, seed: int) -> list[list[IdentityImages]]:
    """Shuffles the identity order once and cuts it into shards as ShardWriter would (close at >= target)."""
    order = np.random.default_rng([seed, _S_ORDER]).permutation(len(identities))
    shards: list[list[IdentityImages]] = []
    cur: list[IdentityImages] = []
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


def _digest(params: dict[str, Any], plan: list[list[IdentityImages]]) -> str:
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


def _matches_plan(ids: list[int], counts: list[int], shard: list[IdentityImages]) -> bool:
    planned = {it.identity: len(it.sources) for it in shard}
    where = {it.identity: p for p, it in enumerate(shard)}
    pos = [where.get(i, -1) for i in ids]
    return (bool(ids) and all(p >= 0 for p in pos) and pos == sorted(set(pos))
            and all(c <= planned[i] for i, c in zip(ids, counts, strict=True)))


def _progress(total: int, enabled: bool, desc: str):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not (enabled and sys.stderr.isatty()), leave=False)


def _write_shard(out: Path, k: int, shard: list[IdentityImages], source: ImageSource, check: CheckMode,
                 num_classes: int, image_size: int) -> tuple[list[int], list[int], list[str]]:
    """Writes planned shard ``k`` (in a worker process or in this one).

    Returns:
        ``(ids, counts, problems)``: what the shard holds (empty if every image was unreadable: then no file is
        written) and one line per skipped image (at most ``MAX_WARNINGS``, then a count).
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
                except SkippedImage as exn:
                    problem = str(exn)
                if problem is None:
                    images.append(data)
                    continue
                num_bad += 1
                if num_bad <= MAX_WARNINGS:
                    problems.append(f"skipping {source.describe(it.identity, src)}: {problem}")
            if images:
                writer.write_identity(it.identity, images)
        if writer.num_samples:
            written = writer.finish(num_classes=num_classes, image_size=image_size).shards[0]
            os.replace(written.path, final)
            ids, counts = list(written.ids), list(written.counts)
    shutil.rmtree(scratch, ignore_errors=True)
    if num_bad > MAX_WARNINGS:
        problems.append(f"... and {num_bad - MAX_WARNINGS} more skipped images in shard {k}")
    return ids, counts, problems


def _write_shard_in_worker(out: Path, k: int, shard: list[IdentityImages], source: ImageSource, check: CheckMode,
                           num_classes: int, image_size: int) -> tuple[list[int], list[int], list[str]]:
    try:
        return _write_shard(out, k, shard, source, check, num_classes, image_size)
    finally:
        source.close()


def convert_identities(out: Path, *, source: ImageSource, identities: list[IdentityImages], num_classes: int,
                       image_size: int, samples_per_shard: int, seed: int, check: CheckMode, num_workers: int,
                       progress: bool, params: dict[str, Any], num_plan_skipped: int,
                       extra_files: dict[str, bytes]) -> ConvertSummary:
    """Plans, writes the missing shards (here or in ``num_workers`` processes), then ``index.json``.

    Args:
        out: the dataset directory (created; or an earlier, interrupted conversion of the same input to resume).
        source: reads the images of ``identities``.
        identities: the input's identities with at least one image reference each, in id order.
        num_classes: ``num_classes`` of the index (every id lies in ``[0, num_classes)``).
        image_size: ``image_size`` recorded in ``index.json``.
        samples_per_shard: target images per shard (shards hold whole identities).
        seed: seed of the identity order.
        check: how images are checked (:data:`CheckMode`).
        num_workers: processes writing shards in parallel (0 or 1: in this process); the output is the same. They
            are spawned, so ``source`` must be picklable and a calling script needs an ``if __name__ ==
            "__main__":`` guard.
        progress: show a tqdm bar on a terminal.
        params: the source's options, recorded in ``convert.json`` and ``index.json`` and covered by the plan digest
            (``source_path`` names the input in error messages).
        num_plan_skipped: images the source already skipped while listing (added to ``num_skipped``).
        extra_files: name -> bytes of further files to write into ``out`` (atomically, before the shards).

    Returns:
        The summary; ``print(summary)`` gives one line.

    Raises:
        DataError: every image is unreadable, or ``out`` holds something else (or a conversion of other input or
            options).
    """
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
            if num_warned < MAX_WARNINGS:
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
            source.close()
    if num_warned > MAX_WARNINGS:
        _log.warning("%d skipped images in all (the first %d are listed above)", num_warned, MAX_WARNINGS)
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
