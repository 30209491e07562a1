"""IJB-B / IJB-C 1:1 template verification: TAR at FAR 1e-6 ... 1e-1 over template pairs (docs/ijb.md).

Shapes: ``N`` image rows, ``B`` rows in one batch, ``T`` templates, ``D`` embedding size, ``P`` template pairs, ``C``
pairs in one scoring chunk.

Layout (``name`` is ``ijbc`` or ``ijbb``), as the insightface ``IJB_release`` archive ships it:

* ``ROOT/meta/<name>_name_5pts_score.txt``: one row per image: file name (under ``loose_crop/``), ten landmark
  coordinates ``x1 y1 ... x5 y5`` (eyes, nose tip, mouth corners), detector score;
* ``ROOT/meta/<name>_face_tid_mid.txt``: the same rows in the same order: file name, template id, media id;
* ``ROOT/meta/<name>_template_pair_label.txt``: template id, template id, label (1 same identity, 0 different);
* ``ROOT/loose_crop/``: the images.

Protocol (arcface_torch ``eval_ijbc.py`` with its defaults; each choice marked "option" can be turned off):

1. each image is aligned with its own five landmarks (:func:`offloadfr.data.align.align_face`: the similarity
   transform onto the ArcFace template, scaled to the model's input side) and embedded as ``f(x) + f(mirror(x))``
   (option ``flip``); the feature keeps its norm (option ``normalize_images`` L2-normalises it first) and is
   multiplied by its detector score (option ``detector_score``);
2. within a template, the images of one media (the frames of one video, or one still) are averaged, and the
   template feature is the sum of its media features (option ``media_pooling``: off, the images are summed
   directly), then L2-normalised;
3. a pair's score is the cosine of its two template features;
4. TAR@FAR uses :func:`offloadfr.eval.verification.tar_at_far`: the lowest threshold whose FAR is ``<= far``. The
   reference reads TAR at the point of scikit-learn's ROC whose FPR is nearest to the target, which can lie a
   little above it; on IJB-C's 15.6M impostor pairs the two differ by at most the TAR change between neighbouring
   ROC points (see docs/ijb.md).

Memory is bounded independently of ``N``: images stream in batches of ``B`` (decoded and aligned by a thread pool
one batch ahead of the model), each batch's features are added into ``(T, D)`` float64 template sums at once (a
media mean is a sum of features weighted by ``1 / images in the media``), and pairs are scored in chunks of ``C``.
What grows with the dataset is the metadata (IJB-C: 469,375 rows, about 0.1 GiB) and the pairs (15.7M: two int32
template rows, a label and a float32 score each, 0.2 GiB; 0.3 GiB at the peak of reading them). Measured at IJB-C
size, everything but the model and its batch peaks at 0.6 GiB (docs/ijb.md).
"""

from __future__ import annotations

import array
import io
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from offloadfr.config import EvalCfg
from offloadfr.data.align import align_face
from offloadfr.errors import DataError, DataNotFoundError
from offloadfr.eval.features import _model_device, extract_embeddings
from offloadfr.eval.verification import far_key, tar_at_far

__all__ = ["IJB_FARS", "IJBMeta", "IJBResult", "read_ijb_meta", "read_template_pairs", "evaluate_ijb",
           "evaluate_ijb_config"]

IJBProtocol = Literal["IJBC", "IJBB"]

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The false-accept rates the field reports on IJB-B and IJB-C."""

_PAIR_BLOCK = 16 << 20
"""Bytes of the pair file parsed at once (about 1M pairs)."""

_PAIR_CHUNK = 1 << 12
"""Pairs scored at once: two (C, D) gathers of 8 MiB at D = 512, which stay in cache (2.8x faster on the CPU
than 1 << 15)."""

_ROC_POINTS = 200
"""ROC points written to eval.json, log-spaced in FAR from 1 / num_impostor to 1."""


def _meta_file(root: Path, protocol: str, what: str) -> Path:
    path = root / "meta" / f"{protocol.lower()}_{what}.txt"
    if not path.is_file():
        raise DataNotFoundError(f"IJB meta file {path} does not exist; expected the {protocol} layout ROOT/meta/"
                                f"{protocol.lower()}_{{face_tid_mid,template_pair_label,name_5pts_score}}.txt and "
                                "ROOT/loose_crop/ (docs/ijb.md)")
    return path


def _rows(path: Path, num_fields: int, what: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line, one at a time (so 469k rows are never held as strings); a line
    with another number of fields, or a file without rows, is a DataError."""
    seen = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != num_fields:
                raise DataError(f"{path}, line {line_no}: {len(fields)} fields; expected {num_fields} ({what})")
            seen = True
            yield line_no, fields
    if not seen:
        raise DataError(f"{path} holds no rows; expected one row per image ({what})")


@dataclass(frozen=True, kw_only=True, slots=True)
class IJBMeta:
    """The image rows of one protocol, read and checked before any image is decoded."""

    root: Path
    """The dataset root (``meta/``, ``loose_crop/``)."""
    protocol: str
    """``"IJBC"`` or ``"IJBB"``."""
    names: list[str]
    """``N`` image file names, relative to ``loose_crop/``."""
    lines: np.ndarray
    """``(N,)`` int32: the line of each row in ``<name>_name_5pts_score.txt`` (for error messages)."""
    landmarks_N52: np.ndarray
    """``(N, 5, 2)`` float64 landmarks as written (pixel-index coordinates of the loose crop)."""
    det_score_N: np.ndarray
    """``(N,)`` float64 detector scores."""
    template_ids: np.ndarray
    """``(T,)`` int64: the distinct template ids, ascending."""
    template_row_N: np.ndarray
    """``(N,)`` int64: each image's template, as a row of ``template_ids``."""
    media_N: np.ndarray
    """``(N,)`` int64 media ids."""

    @property
    def image_dir(self) -> Path:
        """``ROOT/loose_crop``."""
        return self.root / "loose_crop"


def read_ijb_meta(root: str | os.PathLike[str], protocol: IJBProtocol = "IJBC") -> IJBMeta:
    """Reads and checks the image metadata of an IJB root: every row, and that every image file exists.

    Args:
        root: The dataset root (e.g. ``IJB_release/IJBC``).
        protocol: ``"IJBC"`` or ``"IJBB"`` (selects the ``ijbc_`` / ``ijbb_`` meta files).

    Returns:
        The rows.

    Raises:
        DataNotFoundError: The root, a meta file, ``loose_crop/`` or an image file does not exist.
        DataError: A row has the wrong number of fields or a value that is not a number, a landmark is not finite
            or the five coincide, or the two per-image files disagree.
    """
    root = Path(root)
    if protocol not in ("IJBC", "IJBB"):
        raise DataError(f"IJB protocol {protocol!r} is not known; use 'IJBC' or 'IJBB'")
    if not root.is_dir():
        raise DataNotFoundError(f"IJB root {root} does not exist; pass the directory holding meta/ and loose_crop/ "
                                "(docs/ijb.md)")
    score_path = _meta_file(root, protocol, "name_5pts_score")
    tid_path = _meta_file(root, protocol, "face_tid_mid")
    _meta_file(root, protocol, "template_pair_label")  # the pair file too, before any long work
    image_dir = root / "loose_crop"
    if not image_dir.is_dir():
        raise DataNotFoundError(f"IJB image directory {image_dir} does not exist; the images of {score_path.name} "
                                "go there (docs/ijb.md)")

    names: list[str] = []
    line_buf, value_buf = array.array("i"), array.array("d")  # 8 bytes a value, not a Python float each
    for line_no, fields in _rows(score_path, 12, "image name, x1 y1 ... x5 y5 of the five landmarks, detector score"):
        try:
            value_buf.extend([float(v) for v in fields[1:]])
        except ValueError as e:
            raise DataError(f"{score_path}, line {line_no}: {e}; expected ten landmark coordinates and a detector "
                            "score") from e
        names.append(fields[0])
        line_buf.append(line_no)
    values = np.frombuffer(value_buf, dtype=np.float64).reshape(-1, 11).copy()
    lines = np.frombuffer(line_buf, dtype=np.int32).copy()
    del value_buf, line_buf
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise DataError(f"{score_path}, line {lines[np.flatnonzero(bad)[0]]}: a landmark or the score is NaN or "
                        f"Inf ({int(bad.sum())} such rows); expected finite numbers")
    landmarks = values[:, :10].reshape(-1, 5, 2)
    spread = ((landmarks - landmarks.mean(axis=1, keepdims=True)) ** 2).sum(axis=(1, 2))
    if (spread <= 1e-6).any():
        raise DataError(f"{score_path}, line {lines[np.flatnonzero(spread <= 1e-6)[0]]}: the five landmarks "
                        "coincide; expected distinct eye, nose and mouth points")

    ids = np.empty((len(names), 2), dtype=np.int64)
    num_tid_rows = 0
    for i, (line_no, fields) in enumerate(_rows(tid_path, 3, "image name, template id, media id")):
        num_tid_rows = i + 1
        if i >= len(names):
            continue  # counted, reported below
        if fields[0] != names[i]:
            raise DataError(f"{tid_path}, line {line_no}: image {fields[0]!r}, but row {i + 1} of {score_path.name} "
                            f"is {names[i]!r}; the two files list the same images in the same order")
        try:
            ids[i] = [int(fields[1]), int(fields[2])]
        except ValueError as e:
            raise DataError(f"{tid_path}, line {line_no}: {e}; expected integer template and media ids") from e
    if num_tid_rows != len(names):
        raise DataError(f"{tid_path} has {num_tid_rows} rows but {score_path} has {len(names)}; the two files list "
                        "the same images in the same order")

    _check_images_exist(image_dir, names, score_path)
    template_ids, template_row = np.unique(ids[:, 0], return_inverse=True)
    return IJBMeta(root=root, protocol=protocol, names=names, lines=lines,
                   landmarks_N52=landmarks, det_score_N=values[:, 10].copy(),
                   template_ids=template_ids, template_row_N=template_row.reshape(-1).astype(np.int64),
                   media_N=ids[:, 1].copy())


def _check_images_exist(image_dir: Path, names: list[str], listed_in: Path) -> None:
    """Fails before embedding starts when an image is missing (a directory listing, not one stat per image)."""
    present = set(os.listdir(image_dir))
    missing = [n for n in dict.fromkeys(names)
               if n not in present and ("/" not in n or not (image_dir / n).is_file())]
    if missing:
        raise DataNotFoundError(f"{len(missing)} images of {listed_in} are missing from {image_dir} (first: "
                                f"{missing[0]!r}); copy loose_crop/ from the official release")


def read_template_pairs(path: str | os.PathLike[str], template_ids: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads a ``<name>_template_pair_label.txt`` a block at a time and maps template ids to rows.

    Args:
        path: The pair file: ``template_id template_id label`` per line.
        template_ids: ``(T,)`` ascending template ids (:attr:`IJBMeta.template_ids`).

    Returns:
        ``(row_a_P, row_b_P, same_P)``: int32 rows of ``template_ids`` and bool labels.

    Raises:
        DataNotFoundError: ``path`` does not exist.
        DataError: A line has another number of fields or a non-integer value, a label is not 0 or 1, a template
            has no image, or the pairs lack genuine or impostor pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"IJB pair file {path} does not exist (docs/ijb.md)")
    parts_a, parts_b, parts_same = [], [], []
    first_line, rest = 1, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_PAIR_BLOCK)
            data = rest + block
            if block:
                cut = data.rfind(b"\n") + 1
                data, rest = data[:cut], data[cut:]
            if data:
                tab = _parse_pair_block(data, path, first_line)
                if tab.size:
                    rows = np.searchsorted(template_ids, tab[:, :2])
                    rows = np.minimum(rows, template_ids.size - 1)
                    unknown = template_ids[rows] != tab[:, :2]
                    if unknown.any():
                        k = int(np.flatnonzero(unknown.any(axis=1))[0])
                        tid = int(tab[k, 0] if unknown[k, 0] else tab[k, 1])
                        raise DataError(f"{path}, {_where(data, first_line, k)}: template {tid} has no image in "
                                        "the face_tid_mid file; use the meta files of one release together")
                    labels = tab[:, 2]
                    if not np.isin(labels, (0, 1)).all():
                        k = int(np.flatnonzero(~np.isin(labels, (0, 1)))[0])
                        raise DataError(f"{path}, {_where(data, first_line, k)}: label {int(labels[k])}; expected 1 "
                                        "(same identity) or 0 (different)")
                    parts_a.append(rows[:, 0].astype(np.int32))
                    parts_b.append(rows[:, 1].astype(np.int32))
                    parts_same.append(labels == 1)
                first_line += data.count(b"\n")
            if not block:
                break
    same = np.concatenate(parts_same) if parts_same else np.zeros(0, dtype=bool)
    num_same = int(same.sum())
    if num_same == 0 or num_same == same.size:
        raise DataError(f"{path} holds {num_same} genuine and {same.size - num_same} impostor pairs; verification "
                        "needs both")
    return np.concatenate(parts_a), np.concatenate(parts_b), same


def _where(data: bytes, first_line: int, k: int) -> str:
    """"line L" of the ``k``-th pair of a block (its ``k``-th non-blank line)."""
    for offset, line in enumerate(data.split(b"\n")):
        if line.strip():
            if k == 0:
                return f"line {first_line + offset}"
            k -= 1
    return f"block at line {first_line}"


def _parse_pair_block(data: bytes, path: Path, first_line: int) -> np.ndarray:
    """``(n, 3)`` int64 of a block of whole lines; on a malformed line, one message naming it."""
    if not data.strip():
        return np.zeros((0, 3), dtype=np.int64)
    try:
        tab = np.loadtxt(io.BytesIO(data), dtype=np.int64, ndmin=2)
    except ValueError:
        tab = None
    if tab is not None and tab.shape[1] == 3:
        return tab
    for offset, line in enumerate(data.split(b"\n")):  # the slow path, only to name the bad line
        fields = line.split()
        if fields and (len(fields) != 3 or not all(v.lstrip(b"-").isdigit() for v in fields)):
            raise DataError(f"{path}, line {first_line + offset}: {line.decode(errors='replace').strip()!r}; "
                            "expected three integers: template id, template id, label")
    raise DataError(f"{path}, block at line {first_line}: cannot be read as three integers per line")


@dataclass(frozen=True, kw_only=True, slots=True)
class IJBResult:
    """1:1 template verification metrics of one IJB protocol.

    Example::

        result = evaluate_ijb(model, "IJB_release/IJBC", protocol="IJBC", image_size=112)
        print(result.tar_at_far["1e-4"])
        json.dumps(result.to_dict(include_roc=True))
    """

    protocol: str
    """``"IJBC"`` or ``"IJBB"``."""
    root: str
    """The dataset root."""
    pair_file: str
    """The template pair file scored."""
    tar_at_far: dict[str, float]
    """TAR at each FAR (keys as :func:`~offloadfr.eval.verification.far_key`: ``"1e-4"``)."""
    auc: float
    """Area under the ROC curve (ties count one half)."""
    num_images: int
    """Image rows embedded."""
    num_templates: int
    """Templates with at least one image."""
    num_pairs: int
    """Template pairs scored."""
    num_genuine: int
    """Same-identity pairs."""
    options: dict[str, Any]
    """The protocol choices: ``flip``, ``detector_score``, ``media_pooling``, ``normalize_images``, ``image_size``."""
    images_per_second: float
    """Throughput of the image stage (decode, align, embed, pool)."""
    seconds: dict[str, float]
    """Wall time of each stage: ``meta`` (metadata and pairs read and checked), ``embed`` (images decoded, aligned,
    embedded, pooled), ``score`` (pair cosines), ``metrics`` (TAR@FAR, ROC, AUC)."""
    peak_rss_gib: float
    """Peak resident memory of the process so far (``getrusage``), GiB."""
    roc_fpr: list[float] = field(default_factory=list, repr=False)
    """ROC false-accept rates, log-spaced from ``1 / num_impostor`` to 1."""
    roc_tpr: list[float] = field(default_factory=list, repr=False)
    """True-accept rates matching ``roc_fpr``."""
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32), repr=False)
    """``(P,)`` float32 pair scores in pair-file order (not in the JSON)."""

    def to_dict(self, include_roc: bool = False) -> dict[str, Any]:
        """The JSON form: every field but the scores (and the ROC unless asked).

        Args:
            include_roc: Also add ``roc: {"fpr": [...], "tpr": [...]}`` (6 significant digits).

        Returns:
            A dict of plain Python values, ready for ``json.dumps``.
        """
        out: dict[str, Any] = {
            "protocol": self.protocol, "ijb": self.root, "pairs": self.pair_file,
            "tar_at_far": dict(self.tar_at_far), "auc": self.auc, "num_images": self.num_images,
            "num_templates": self.num_templates, "num_pairs": self.num_pairs, "num_genuine": self.num_genuine,
            "num_impostor": self.num_pairs - self.num_genuine, "options": dict(self.options),
            "images_per_second": self.images_per_second, "seconds": dict(self.seconds),
            "peak_rss_gib": self.peak_rss_gib,
        }
        if include_roc:
            out["roc"] = {"fpr": [float(f"{v:.6g}") for v in self.roc_fpr],
                          "tpr": [float(f"{v:.6g}") for v in self.roc_tpr]}
        return out


def _load_aligned(image_dir: Path, meta: IJBMeta, i: int, size: int) -> np.ndarray:
    path = image_dir / meta.names[i]
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # decodes the whole file: a truncated JPEG fails here
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on corrupt data
        raise DataError(f"IJB image {path} (line {int(meta.lines[i])} of {meta.protocol.lower()}_name_5pts_score."
                        f"txt) cannot be decoded ({type(e).__name__}: {e}); the reference evaluation stops on it as "
                        "well: restore the file from the official release") from e
    return align_face(rgb, meta.landmarks_N52[i], size=size)


def _pool_weights(meta: IJBMeta, *, detector_score: bool, media_pooling: bool) -> np.ndarray:
    """``(N,)`` float64 weight of each image's feature in its template's sum."""
    weight = meta.det_score_N.astype(np.float64) if detector_score else np.ones(len(meta.names))
    if media_pooling:  # the mean over the images of one (template, media): a sum weighted by 1 / count
        _, inverse, counts = np.unique(np.stack([meta.template_row_N, meta.media_N], axis=1), axis=0,
                                       return_inverse=True, return_counts=True)
        weight = weight / counts[inverse.reshape(-1)]
    return weight


def _embed_templates(model: torch.nn.Module, meta: IJBMeta, weight_N: np.ndarray, *, image_size: int,
                     batch_size: int, flip: bool, normalize_images: bool, num_workers: int,
                     device: torch.device | None) -> torch.Tensor:
    """``(T, D)`` float64 weighted sums of the image features of each template, streaming the images."""
    n = len(meta.names)
    sums_TD: torch.Tensor | None = None
    image_dir = meta.image_dir

    def submit(pool: ThreadPoolExecutor, start: int) -> list[Future[np.ndarray]]:
        rows = range(start, min(start + batch_size, n))
        return [pool.submit(_load_aligned, image_dir, meta, i, image_size) for i in rows]

    bar = tqdm(total=n, desc=f"{meta.protocol} images", unit="img", leave=False, disable=not sys.stderr.isatty())
    with ThreadPoolExecutor(max_workers=num_workers) as pool, bar:
        pending = submit(pool, 0)
        try:
            for start in range(0, n, batch_size):
                futures, pending = pending, submit(pool, start + batch_size)  # decode one batch ahead
                faces = [f.result() for f in futures]
                x_BSS3 = torch.from_numpy(np.stack(faces))
                emb_BD = extract_embeddings(model, x_BSS3.permute(0, 3, 1, 2), batch_size=len(faces), flip=flip,
                                            device=device, normalize=normalize_images).double()
                finite_B = torch.isfinite(emb_BD).all(dim=1)
                if not bool(finite_B.all()):
                    i = start + int(torch.nonzero(~finite_B)[0])
                    raise DataError(f"the model's embedding of IJB image {meta.names[i]} is NaN or Inf; the model "
                                    "diverged or the checkpoint is broken")
                if sums_TD is None:
                    sums_TD = torch.zeros((meta.template_ids.size, emb_BD.shape[1]), dtype=torch.float64)
                stop = start + len(faces)
                w_B = torch.from_numpy(weight_N[start:stop])
                sums_TD.index_add_(0, torch.from_numpy(meta.template_row_N[start:stop]), emb_BD * w_B[:, None])
                bar.update(len(faces))
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    assert sums_TD is not None  # read_ijb_meta refuses a file without rows
    return sums_TD


def _score_pairs(feat_TD: torch.Tensor, row_a_P: np.ndarray, row_b_P: np.ndarray, protocol: str) -> np.ndarray:
    """``(P,)`` float32 cosine scores, ``C`` pairs at a time, on the device of ``feat_TD``."""
    num_pairs = row_a_P.size
    score_P = np.empty(num_pairs, dtype=np.float32)
    bar = tqdm(total=num_pairs, desc=f"{protocol} pairs", unit="pair", unit_scale=True, leave=False,
               disable=not sys.stderr.isatty())
    with bar, torch.no_grad():
        for start in range(0, num_pairs, _PAIR_CHUNK):
            stop = min(start + _PAIR_CHUNK, num_pairs)
            a_C = torch.from_numpy(row_a_P[start:stop]).to(feat_TD.device, torch.long)
            b_C = torch.from_numpy(row_b_P[start:stop]).to(feat_TD.device, torch.long)
            score_P[start:stop] = (feat_TD[a_C] * feat_TD[b_C]).sum(dim=1).cpu().numpy()
            bar.update(stop - start)
    return score_P


def _roc_and_auc(score_P: np.ndarray, same_P: np.ndarray) -> tuple[list[float], list[float], float]:
    """ROC points log-spaced in FAR (threshold rule of ``tar_at_far``) and the exact AUC (ties count 1/2)."""
    imp_sorted = np.sort(score_P[~same_P])
    gen_sorted = np.sort(score_P[same_P])
    num_imp, num_gen = imp_sorted.size, gen_sorted.size
    fars = np.logspace(math.log10(1.0 / num_imp), 0.0, _ROC_POINTS)
    k = np.floor(fars * num_imp + 1e-9).astype(np.int64)
    thr = np.where(k < num_imp, imp_sorted[::-1][np.minimum(k, num_imp - 1)], -np.inf)
    fpr = (num_imp - np.searchsorted(imp_sorted, thr, side="right")) / num_imp
    tpr = (num_gen - np.searchsorted(gen_sorted, thr, side="right")) / num_gen
    points = sorted(set(zip(fpr.tolist(), tpr.tolist(), strict=True)))
    below = np.searchsorted(imp_sorted, gen_sorted, side="left").astype(np.float64)
    ties = np.searchsorted(imp_sorted, gen_sorted, side="right") - below
    auc = float((below + 0.5 * ties).sum() / (num_gen * num_imp))
    return [p[0] for p in points], [p[1] for p in points], auc


def evaluate_ijb(model: torch.nn.Module, root: str | os.PathLike[str], *, protocol: IJBProtocol = "IJBC",
                 image_size: int = 112, batch_size: int = 256, flip: bool = True, detector_score: bool = True,
                 media_pooling: bool = True, normalize_images: bool = False, num_workers: int | None = None,
                 device: torch.device | None = None, fars: Sequence[float] = IJB_FARS) -> IJBResult:
    """IJB-B / IJB-C 1:1 template verification of ``model`` (see the module docstring for the protocol).

    All metadata is read and checked first (rows, field counts, landmarks, that every image exists, that every
    pair names a known template), so a broken layout fails in seconds, not after hours of embedding.

    Args:
        model: Backbone mapping ``(B, 3, S, S)`` images in ``[-1, 1]`` to ``(B, D)`` embeddings.
        root: The dataset root (``meta/``, ``loose_crop/``).
        protocol: ``"IJBC"`` or ``"IJBB"``.
        image_size: Model input side ``S``; the alignment template is scaled by ``S / 112``.
        batch_size: Images per forward pass (and per decoded batch).
        flip: Flip test (sum the raw features of the aligned image and its mirror).
        detector_score: Weight each image's feature by its detector score.
        media_pooling: Average the images of each media before summing a template's media.
        normalize_images: L2-normalise each image's feature before weighting (the reference keeps the norm).
        num_workers: Threads decoding and aligning images; default ``min(8, cpu_count)``.
        device: Where the forward and the pair scores run; defaults to the model's device.
        fars: False-accept rates for ``tar_at_far``.

    Returns:
        The metrics, the ROC, the pair scores and the measured throughput.

    Raises:
        DataNotFoundError: The root, a meta file, the image directory or an image does not exist.
        DataError: A meta row is malformed, an image does not decode, an embedding is not finite, or the pairs
            lack genuine or impostor pairs.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} is not allowed; use a positive batch size such as 256")
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise DataError(f"far={far} is not allowed; FARs must lie in (0, 1], e.g. 1e-4")
    t0 = time.perf_counter()
    meta = read_ijb_meta(root, protocol)
    pair_path = _meta_file(meta.root, protocol, "template_pair_label")
    row_a_P, row_b_P, same_P = read_template_pairs(pair_path, meta.template_ids)
    weight_N = _pool_weights(meta, detector_score=detector_score, media_pooling=media_pooling)
    device = _model_device(model) if device is None else device
    t1 = time.perf_counter()
    sums_TD = _embed_templates(model, meta, weight_N, image_size=image_size, batch_size=batch_size, flip=flip,
                               normalize_images=normalize_images,
                               num_workers=num_workers or min(8, os.cpu_count() or 1), device=device)
    t2 = time.perf_counter()
    feat_TD = F.normalize(sums_TD, dim=1).float().to(device)
    score_P = _score_pairs(feat_TD, row_a_P, row_b_P, protocol)
    t3 = time.perf_counter()
    tar = tar_at_far(score_P, same_P, fars)
    roc_fpr, roc_tpr, auc = _roc_and_auc(score_P, same_P)
    t4 = time.perf_counter()
    num_images = len(meta.names)
    return IJBResult(
        protocol=protocol, root=str(meta.root), pair_file=str(pair_path),
        tar_at_far={far_key(far): tar[far_key(far)] for far in fars}, auc=auc, num_images=num_images,
        num_templates=int(meta.template_ids.size), num_pairs=int(same_P.size), num_genuine=int(same_P.sum()),
        options={"flip": flip, "detector_score": detector_score, "media_pooling": media_pooling,
                 "normalize_images": normalize_images, "image_size": image_size},
        images_per_second=num_images / max(t2 - t1, 1e-9),
        seconds={"meta": t1 - t0, "embed": t2 - t1, "score": t3 - t2, "metrics": t4 - t3},
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        roc_fpr=roc_fpr, roc_tpr=roc_tpr, scores=score_P,
    )


def evaluate_ijb_config(model: torch.nn.Module, cfg: EvalCfg, *, image_size: int,
                        device: torch.device | None = None) -> IJBResult:
    """:func:`evaluate_ijb` with the choices of ``[eval]`` (``eval.ijb``, ``eval.ijb_protocol``, ...).

    Args:
        model: The backbone.
        cfg: The ``[eval]`` section; ``cfg.ijb`` must be set.
        image_size: Model input side.
        device: Where the forward runs; defaults to the model's device.

    Returns:
        The metrics.

    Raises:
        DataError: ``cfg.ijb`` is empty, or as :func:`evaluate_ijb`.
    """
    if not cfg.ijb:
        raise DataError("eval.ijb is empty; set it to an IJB-B/IJB-C root holding meta/ and loose_crop/")
    return evaluate_ijb(model, cfg.ijb, protocol=cfg.ijb_protocol, image_size=image_size, batch_size=cfg.batch_size,
                        flip=cfg.flip, detector_score=cfg.ijb_detector_score, media_pooling=cfg.ijb_media_pooling,
                        normalize_images=cfg.ijb_normalize_images, device=device)
