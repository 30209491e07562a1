"""Verification packs from an image folder (``offloadfr pairs``): LFW-style ``pairs.txt`` or balanced random pairs.

The folder is ``ROOT/<identity>/*.jpg|jpeg|png``, listed as :func:`offloadfr.data.convert_folder.list_image_folder`
lists it. The pack is the InsightFace ``.bin`` that ``offloadfr eval`` reads (:func:`offloadfr.data.pairs.
write_pairs_bin`): pair ``i`` is images ``2i`` and ``2i + 1``, and the evaluator cuts the pairs, in file order, into
10 contiguous folds. A report ``OUT.json`` beside the pack lists every pair (paths relative to ``ROOT``) and every
dropped one. Formats and choices: docs/formats.md, "Verification packs from a folder".

* ``pairs.txt`` (LFW's ``pairs.txt``, ``pairsDevTest.txt``): an optional header ``FOLDS N`` (or ``N``), then one
  pair per line, ``name i j`` (same identity) or ``name1 i name2 j`` (different); ``i`` and ``j`` count from 1. An
  index is the file ``<name>_<i:04d>.<ext>`` when the identity's files are LFW-named, else the ``i``-th file in
  name order. Pairs keep the file's order (LFW: each fold is N same pairs, then N different).
* random (``num_pairs``): identities are dealt into ``num_folds`` disjoint folds (as LFW's folds are disjoint in
  people), and each fold gets ``num_pairs / (2 * num_folds)`` same pairs, then as many different pairs, drawn
  round-robin over the fold's identities (so an identity with many images is not drawn more often), without
  repeating a pair; all from ``seed``.

With ``align`` each image is aligned as by ``offloadfr convert folder --align``. An image without a face (or that
does not decode) drops its pair from a ``pairs.txt`` pack (a warning and the report say which), and is replaced by
another draw in a random pack.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from offloadfr.data.convert_align import AlignOptions, align_encoded, decode_problem
from offloadfr.data.convert_folder import list_image_folder
from offloadfr.data.detect import FaceDetector
from offloadfr.data.pairs import write_pairs_bin
from offloadfr.data.shards import write_bytes_atomic
from offloadfr.errors import DataError, DataNotFoundError

__all__ = ["PairsSummary", "make_pairs", "read_pairs_txt"]

_log = logging.getLogger(__name__)

_S_PAIRS = 0x9A17  # keeps the pair-drawing stream apart from other users of the seed
_MAX_WARNINGS = 20
_REPORT_VERSION = 1


@dataclass(frozen=True, slots=True)
class _Pair:
    """One pair: where it came from (pairs.txt line, 0 for random), the two images (relative to ROOT), the label."""

    line: int
    a: str
    b: str
    same: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class PairsSummary:
    """What :func:`make_pairs` wrote.

    Attributes:
        out: the pack.
        report: the report beside it (``OUT.json``).
        num_pairs: pairs in the pack.
        num_same: of which same-identity pairs.
        num_identities: identities the pairs use.
        num_dropped: ``pairs.txt`` pairs left out because an image has no face or does not decode.
        num_images: distinct images in the pack.
    """

    out: Path
    report: Path
    num_pairs: int
    num_same: int
    num_identities: int
    num_dropped: int
    num_images: int

    def __str__(self) -> str:
        dropped = f", {self.num_dropped} dropped (see {self.report.name})" if self.num_dropped else ""
        return (f"wrote {self.out}: {self.num_pairs} pairs ({self.num_same} same, {self.num_pairs - self.num_same} "
                f"different) over {self.num_identities} identities and {self.num_images} images{dropped}")


def make_pairs(root: str | os.PathLike[str], out: str | os.PathLike[str], *,
               pairs_txt: str | os.PathLike[str] | None = None, num_pairs: int | None = None, num_folds: int = 10,
               seed: int = 0, align: AlignOptions | None = None, num_workers: int = 0,
               progress: bool = True) -> PairsSummary:
    """Builds a verification pack from ``root`` (see the module docstring).

    Args:
        root: the image folder, ``ROOT/<identity>/*.jpg|jpeg|png``.
        out: the ``.bin`` pack to write (its report goes to the same name with ``.json``).
        pairs_txt: an LFW-style pairs file; exactly one of ``pairs_txt`` and ``num_pairs``.
        num_pairs: draw this many balanced random pairs (a multiple of ``2 * num_folds``).
        num_folds: folds of the random pairs (the evaluator always uses 10).
        seed: seed of the random pairs.
        align: align each face (:class:`~offloadfr.data.convert_align.AlignOptions`); None: copy the bytes.
        num_workers: processes preparing images in parallel (0 or 1: in this process); the pack is the same. They
            are spawned, so a calling script needs an ``if __name__ == "__main__":`` guard.
        progress: show a tqdm bar on a terminal.

    Returns:
        The summary; ``print(summary)`` gives one line.

    Raises:
        DataNotFoundError: ``root`` or ``pairs_txt`` does not exist.
        DataError: a malformed ``pairs.txt`` line or an unknown name in it, too few identities or images for the
            pairs asked for, no usable pair, or a bad option.
        DetectorNotInstalledError: ``align`` is given and the face detector is not installed.
    """
    if (pairs_txt is None) == (num_pairs is None):
        raise DataError("give either a pairs file (--pairs-txt PAIRS.txt) or a number of random pairs "
                        "(--num-pairs N), not both or neither")
    if num_workers < 0:
        raise DataError(f"num_workers = {num_workers}; it must be >= 0 (0: prepare images in this process)")
    out = Path(out)
    if out.suffix == ".json":
        raise DataError(f"pack {out} ends in .json, the name of its report; name the pack e.g. {out.stem}.bin")
    report_path = out.with_suffix(".json")
    detector = None
    if align is not None:
        align.check()
        detector = align.detector()  # fails now, with the install hint, if the detector is missing
    root = Path(root).resolve()
    names, files = list_image_folder(root)
    folder = dict(zip(names, files, strict=True))
    prepared: dict[str, bytes | str] = {}  # rel path -> image bytes, or why it cannot be used
    several: list[str] = []
    prep = _Preparer(root, align, detector, num_workers, progress, prepared, several)
    dropped: list[tuple[_Pair, str]] = []
    if pairs_txt is not None:
        pairs_all = read_pairs_txt(pairs_txt, folder, root=root)
        prep.run(p for pair in pairs_all for p in (pair.a, pair.b))
        pairs = []
        for pair in pairs_all:
            bad = next((p for p in (pair.a, pair.b) if isinstance(prepared[p], str)), None)
            if bad is None:
                pairs.append(pair)
            else:
                dropped.append((pair, f"{bad}: {prepared[bad]}"))
        for pair, why in dropped[:_MAX_WARNINGS]:
            _log.warning("dropping the pair of %s line %d: %s", pairs_txt, pair.line, why)
        if dropped:
            _log.warning("dropped %d of %d pairs of %s (the evaluator's folds shift by as many pairs)", len(dropped),
                         len(pairs_all), pairs_txt)
        if not pairs:
            raise DataError(f"no pair of {pairs_txt} has two usable images (all {len(dropped)} dropped, see the "
                            "warnings)")
        source: dict[str, Any] = {"pairs_txt": str(Path(pairs_txt).resolve())}
    else:
        assert num_pairs is not None
        if num_folds < 2:
            raise DataError(f"num_folds = {num_folds}; use at least 2 (the evaluator uses 10)")
        if num_pairs < 2 * num_folds or num_pairs % (2 * num_folds):
            raise DataError(f"num_pairs = {num_pairs}; use a positive multiple of 2 * num_folds = {2 * num_folds} "
                            f"(each fold holds as many same as different pairs), e.g. "
                            f"{max(1, round(num_pairs / (2 * num_folds))) * 2 * num_folds}")
        if seed < 0:
            raise DataError(f"seed = {seed}; it must be >= 0")
        while True:  # draw, prepare what the draw needs, and draw again without the unusable images until none
            bad = {p for p, v in prepared.items() if isinstance(v, str)}
            pairs = _random_pairs(names, files, num_pairs, num_folds, seed, bad)
            todo = [p for pair in pairs for p in (pair.a, pair.b) if p not in prepared]
            if not todo:
                break
            prep.run(todo)
        bad = {p: v for p, v in prepared.items() if isinstance(v, str)}
        for p, why in list(bad.items())[:_MAX_WARNINGS]:
            _log.warning("not drawn: %s: %s", root / p, why)
        source = {"num_pairs": num_pairs, "num_folds": num_folds, "seed": seed}
    images = [prepared[p] for pair in pairs for p in (pair.a, pair.b)]
    write_pairs_bin(out, images, [pair.same for pair in pairs])  # type: ignore[arg-type]  # all bytes here
    unusable = {p: v for p, v in prepared.items() if isinstance(v, str)}
    report = {
        "format": "offloadfr-pairs-report", "version": _REPORT_VERSION, "root": str(root), **source,
        "align": None if align is None else asdict(align),
        "detector": None if detector is None else detector.version,
        "num_pairs": len(pairs), "num_same": sum(p.same for p in pairs), "num_dropped": len(dropped),
        "unusable_images": [{"path": p, "why": v} for p, v in sorted(unusable.items())],
        "several_faces": sorted(several),
        "dropped": [{"line": pair.line, "a": pair.a, "b": pair.b, "same": pair.same, "why": why}
                    for pair, why in dropped],
    }
    text = json.dumps(report, indent=1)[:-2]  # without the closing brace: the pairs follow, one per line
    text += ',\n "pairs": [\n' + ",\n".join("  " + json.dumps([p.a, p.b, p.same]) for p in pairs) + "\n ]\n}\n"
    write_bytes_atomic(report_path, text.encode())
    used = {p for pair in pairs for p in (pair.a, pair.b)}
    return PairsSummary(out=out, report=report_path, num_pairs=len(pairs), num_same=sum(p.same for p in pairs),
                        num_identities=len({p.split("/", 1)[0] for p in used}), num_dropped=len(dropped),
                        num_images=len(used))


_LFW_NAME = re.compile(r"^(?P<name>.+)_(?P<index>\d{4})$")


def _resolver(name: str, files: list[str]) -> dict[int, str] | None:
    """Index -> file of an identity whose files are LFW-named (``<name>_<i:04d>.<ext>``), else None (positional)."""
    lfw: dict[int, str] = {}
    for f in files:
        m = _LFW_NAME.match(os.path.splitext(f)[0])
        if m and m["name"] == name:
            lfw[int(m["index"])] = f
    return lfw or None


def read_pairs_txt(path: str | os.PathLike[str], folder: dict[str, list[str]], *,
                   root: Path | None = None) -> list[_Pair]:
    """Parses an LFW-style pairs file against an image folder's listing.

    Args:
        path: the pairs file.
        folder: identity name -> its sorted image file names (:func:`~offloadfr.data.convert_folder.
            list_image_folder`).
        root: the folder's path, for the messages.

    Returns:
        The pairs in file order, images as ``<name>/<file>``.

    Raises:
        DataNotFoundError: ``path`` does not exist.
        DataError: a line is malformed, names an identity that is not in the folder, or an index it does not have;
            or the header's counts do not match the lines. The message gives the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"pairs file {path} does not exist; pass an LFW-style pairs.txt")
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    resolvers: dict[str, dict[int, str] | None] = {}
    header: tuple[int, ...] | None = None
    header_line = 0
    pairs: list[_Pair] = []

    def image(lineno: int, name: str, index_text: str) -> str:
        if not index_text.isdigit() or int(index_text) < 1:
            raise DataError(f"{path}, line {lineno}: image index {index_text!r} of {name!r} is not a positive "
                            "integer; expected 'name i j' or 'name1 i name2 j' with indices counted from 1")
        index = int(index_text)
        if name not in folder:
            raise DataError(f"{path}, line {lineno}: identity {name!r} is not a sub-folder (with images) of "
                            f"{root or 'the image folder'}; check the name's spelling or the ROOT argument")
        if name not in resolvers:
            resolvers[name] = _resolver(name, folder[name])
        lfw = resolvers[name]
        if lfw is not None:
            if index not in lfw:
                raise DataError(f"{path}, line {lineno}: {name}/{name}_{index:04d}.jpg (or .jpeg/.png) does not "
                                f"exist; {name}'s files are LFW-named, so index {index} means that file")
            return f"{name}/{lfw[index]}"
        if index > len(folder[name]):
            raise DataError(f"{path}, line {lineno}: {name!r} has {len(folder[name])} images; index {index} is out "
                            "of range (indices count from 1 in file-name order)")
        return f"{name}/{folder[name][index - 1]}"

    for lineno, raw in enumerate(lines, start=1):
        fields = raw.split()
        if not fields:
            continue
        if not pairs and header is None and 1 <= len(fields) <= 2 and all(f.isdigit() for f in fields):
            header, header_line = tuple(int(f) for f in fields), lineno
            continue
        if len(fields) == 3:
            pairs.append(_Pair(lineno, image(lineno, fields[0], fields[1]), image(lineno, fields[0], fields[2]), True))
        elif len(fields) == 4:
            pairs.append(_Pair(lineno, image(lineno, fields[0], fields[1]), image(lineno, fields[2], fields[3]),
                               fields[0] == fields[2]))
        else:
            raise DataError(f"{path}, line {lineno}: {len(fields)} fields ({raw.strip()[:60]!r}); expected "
                            "'name i j' (same identity) or 'name1 i name2 j' (different identities)")
    if not pairs:
        raise DataError(f"{path} holds no pair lines; expected lines 'name i j' or 'name1 i name2 j'")
    if header is not None:
        folds, per = (1, header[0]) if len(header) == 1 else header
        if len(pairs) != 2 * folds * per:
            raise DataError(f"{path}, line {header_line}: the header '{' '.join(map(str, header))}' announces "
                            f"{folds} fold(s) of {per} same + {per} different pairs ({2 * folds * per}), but the "
                            f"file holds {len(pairs)} pairs")
        for k in range(2 * folds):
            block = pairs[k * per:(k + 1) * per]
            want = k % 2 == 0
            wrong = next((p for p in block if p.same != want), None)
            if wrong is not None:
                raise DataError(f"{path}, line {wrong.line}: a {'same' if wrong.same else 'different'}-identity pair "
                                f"where the header's layout (each fold: {per} same, then {per} different) puts "
                                f"{'same' if want else 'different'} pairs")
    return pairs


def _random_pairs(names: list[str], files: list[list[str]], num_pairs: int, num_folds: int, seed: int,
                  bad: set[str]) -> list[_Pair]:
    """Balanced random pairs (see the module docstring), without the images in ``bad``; the same for the same
    arguments."""
    rng = np.random.default_rng([seed, _S_PAIRS])
    # Deal identities into folds by all their images, so a bad image never moves an identity to another fold:
    # first those with two or more images (they give the same pairs), then the rest, round-robin.
    order = rng.permutation(len(names))
    multi = [i for i in order if len(files[i]) >= 2]
    single = [i for i in order if len(files[i]) < 2]
    folds: list[list[int]] = [[] for _ in range(num_folds)]
    for k, i in enumerate(multi + single):
        folds[k % num_folds].append(int(i))
    good = [[f"{names[i]}/{f}" for f in fs if f"{names[i]}/{f}" not in bad] for i, fs in enumerate(files)]
    per = num_pairs // (2 * num_folds)
    pairs: list[_Pair] = []
    for k, fold in enumerate(folds):
        frng = np.random.default_rng([seed, _S_PAIRS, k])
        pairs += _same_pairs(fold, good, per, frng, k)
        pairs += _different_pairs(fold, good, per, frng, k)
    return pairs


def _same_pairs(fold: list[int], good: list[list[str]], per: int, rng: np.random.Generator, k: int) -> list[_Pair]:
    ids = [i for i in fold if len(good[i]) >= 2]
    if not ids:
        raise DataError(f"fold {k} has no identity with two usable images, so it cannot hold same pairs; use fewer "
                        "folds (--num-folds) or a folder with more identities of several images")
    capacity = sum(len(good[i]) * (len(good[i]) - 1) // 2 for i in ids)
    if capacity < per:
        raise DataError(f"fold {k} can hold at most {capacity} distinct same pairs but needs {per}; ask for fewer "
                        "pairs (--num-pairs) or folds (--num-folds)")
    used: dict[int, set[tuple[int, int]]] = {i: set() for i in ids}
    out: list[_Pair] = []
    while len(out) < per:
        for i in rng.permutation(ids):  # round-robin, in a new order each round
            n = len(good[i])
            if len(used[i]) == n * (n - 1) // 2:
                continue
            while True:  # rejection: an identity is drawn at most once a round, so few tries are wasted
                a, b = sorted(int(x) for x in rng.choice(n, 2, replace=False))
                if (a, b) not in used[i]:
                    break
            used[i].add((a, b))
            out.append(_Pair(0, good[i][a], good[i][b], True))
            if len(out) == per:
                break
    return out


def _different_pairs(fold: list[int], good: list[list[str]], per: int, rng: np.random.Generator,
                     k: int) -> list[_Pair]:
    ids = [i for i in fold if good[i]]
    if len(ids) < 2:
        raise DataError(f"fold {k} has {len(ids)} identity with usable images; different pairs need two. Use fewer "
                        "folds (--num-folds) or a folder with more identities")
    capacity = sum(len(good[i]) * len(good[j]) for x, i in enumerate(ids) for j in ids[x + 1:])
    if capacity < per:
        raise DataError(f"fold {k} can hold at most {capacity} distinct different pairs but needs {per}; ask for "
                        "fewer pairs (--num-pairs) or folds (--num-folds)")
    used: set[tuple[str, str]] = set()
    out: list[_Pair] = []
    while len(out) < per:
        for pos in rng.permutation(len(ids)):
            i = ids[pos]
            for _ in range(1000):
                other = int(rng.integers(len(ids) - 1))
                j = ids[other + (other >= pos)]  # any identity of the fold but i
                a = good[i][int(rng.integers(len(good[i])))]
                b = good[j][int(rng.integers(len(good[j])))]
                key = (min(a, b), max(a, b))
                if key not in used:
                    break
            else:
                raise DataError(f"fold {k}: no new different pair found for identity {good[i][0].split('/')[0]!r} "
                                "in 1000 draws; ask for fewer pairs (--num-pairs)")
            used.add(key)
            out.append(_Pair(0, a, b, False))
            if len(out) == per:
                break
    return out


def _prepare_one(root: Path, rel: str, align: AlignOptions | None,
                 detector: FaceDetector | None) -> tuple[str, bytes | str, int]:
    """One image of the pack: its aligned JPEG (or its bytes, checked to decode), or why it is unusable; and the
    number of faces found."""
    try:
        data = (root / rel).read_bytes()
    except OSError as exn:
        return rel, f"cannot be read ({type(exn).__name__}: {exn})", 0
    if align is None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as exn:  # PIL raises many types on corrupt data
            return rel, decode_problem(exn), 0
        return rel, data, 0
    assert detector is not None
    result = align_encoded(data, detector, align)
    return rel, (result.data if result.data is not None else str(result.problem)), result.num_faces


def _prepare_chunk(root: Path, rels: list[str], align: AlignOptions | None,
                   detector: FaceDetector | None) -> list[tuple[str, bytes | str, int]]:
    return [_prepare_one(root, rel, align, detector) for rel in rels]


class _Preparer:
    """Prepares images into ``prepared`` (here or in worker processes), with a progress bar."""

    def __init__(self, root: Path, align: AlignOptions | None, detector: FaceDetector | None, num_workers: int,
                 progress: bool, prepared: dict[str, bytes | str], several: list[str]) -> None:
        self.root, self.align, self.detector = root, align, detector
        self.num_workers, self.progress = num_workers, progress
        self.prepared, self.several = prepared, several

    def run(self, rels: Iterable[str]) -> None:
        todo = list(dict.fromkeys(r for r in rels if r not in self.prepared))
        from tqdm import tqdm

        with tqdm(total=len(todo), desc="pairs: align" if self.align else "pairs: read", unit="img", leave=False,
                  disable=not (self.progress and sys.stderr.isatty())) as bar:
            def take(results: list[tuple[str, bytes | str, int]]) -> None:
                for rel, value, num_faces in results:
                    self.prepared[rel] = value
                    if num_faces > 1:
                        self.several.append(rel)
                bar.update(len(results))

            if self.num_workers > 1 and len(todo) > 1:
                chunks = [todo[s:s + 64] for s in range(0, len(todo), 64)]
                ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
                with ProcessPoolExecutor(max_workers=min(self.num_workers, len(chunks)), mp_context=ctx) as pool:
                    for results in pool.map(_prepare_chunk, [self.root] * len(chunks), chunks,
                                            [self.align] * len(chunks), [self.detector] * len(chunks)):
                        take(results)
            else:
                for rel in todo:
                    take([_prepare_one(self.root, rel, self.align, self.detector)])
