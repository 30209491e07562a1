"""Pair verification metrics: 10-fold accuracy, TAR@FAR and the ROC curve (DESIGN §3, eval/).

Shapes: ``N = 2P`` embeddings, ``P`` pairs, ``D`` embedding size, ``F`` folds, ``T`` candidate thresholds.

Protocol (insightface ``verification.py`` ``calculate_roc``, on cosine similarity instead of squared distance):

* pair ``i`` is rows ``2i`` and ``2i + 1`` of the embeddings; its score is their cosine similarity, and a pair is
  predicted "same" when ``score > threshold``;
* the pairs are split into ``num_folds`` contiguous folds (``KFold(shuffle=False)``: the first ``P % F`` folds get one
  extra pair); for each fold the threshold with the best accuracy on the other folds is chosen, and accuracy is
  measured on the held-out fold;
* candidate thresholds (differs from insightface's fixed grid ``np.arange(0, 4, 0.01)`` on distances): the midpoints
  between consecutive distinct training scores, plus one just below the lowest and one just above the highest. Every
  distinct split of the training scores is tried, so the training optimum is exact, and the threshold sits halfway
  between two training scores rather than on one. When several thresholds tie, the lowest wins;
* ``accuracy`` is the mean held-out accuracy, ``accuracy_std`` its population std over folds (``np.std``, as
  insightface), ``threshold`` the mean of the chosen thresholds.

TAR@FAR is computed once on all pairs (not per fold): for each FAR the threshold is the lowest one whose
false-accept rate on the different-identity pairs is ``<= FAR``, and TAR is the fraction of same-identity pairs
above it. With ``n_diff`` different pairs, FARs below ``1 / n_diff`` all mean "no false accept at all".
``tar_at_far`` keys are :func:`far_key` strings: ``1e-3 -> "1e-3"``, ``0.1 -> "1e-1"``, ``5e-4 -> "5e-4"``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from offloadfr.data.pairs import decode_images, read_pairs_bin
from offloadfr.errors import DataError
from offloadfr.eval.features import extract_embeddings

__all__ = ["VerificationResult", "evaluate_pairs", "evaluate_pack", "far_key", "tar_at_far"]

_END_EPS = 1e-6
"""Offset of the two end thresholds (all pairs "same" / all "different") from the extreme training scores."""

_DECODE_CHUNK = 2048
"""Images decoded at once by evaluate_pack (112x112 RGB: 77 MB), so a pack is never held decoded in full."""


def far_key(far: float) -> str:
    """The ``tar_at_far`` key of a FAR: shortest mantissa and an unpadded exponent (``1e-3``, ``2.5e-4``, ``1e-1``).

    Args:
        far: A false-accept rate.

    Returns:
        The key string.
    """
    mantissa, exponent = f"{far:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


@dataclass(frozen=True, kw_only=True, slots=True)
class VerificationResult:
    """Verification metrics of one set of pairs.

    Example::

        result = evaluate_pairs(emb_ND, issame)
        print(result.accuracy, result.tar_at_far["1e-3"])
        json.dumps(result.to_dict())
    """

    accuracy: float
    """Mean held-out accuracy over the folds, in [0, 1]."""
    accuracy_std: float
    """Population standard deviation of the per-fold accuracies."""
    threshold: float
    """Mean over folds of the chosen cosine-similarity threshold (a pair is "same" when its score is above it)."""
    tar_at_far: dict[str, float]
    """True-accept rate at each false-accept rate, keyed by :func:`far_key` (``"1e-3"``), over all pairs."""
    num_pairs: int
    """Number of pairs evaluated."""
    roc_fpr: list[float] = field(default_factory=list, repr=False)
    """ROC false-positive rates, from 0 to 1, one point per distinct score (predict "same" when score >= it)."""
    roc_tpr: list[float] = field(default_factory=list, repr=False)
    """ROC true-positive rates matching ``roc_fpr``."""

    def to_dict(self, include_roc: bool = False) -> dict[str, Any]:
        """The JSON form: ``accuracy``, ``accuracy_std``, ``threshold``, ``tar_at_far``, ``num_pairs``.

        Args:
            include_roc: Also add ``roc: {"fpr": [...], "tpr": [...]}``.

        Returns:
            A dict of plain Python values, ready for ``json.dumps``.
        """
        out: dict[str, Any] = {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold": self.threshold,
            "tar_at_far": dict(self.tar_at_far),
            "num_pairs": self.num_pairs,
        }
        if include_roc:
            out["roc"] = {"fpr": list(self.roc_fpr), "tpr": list(self.roc_tpr)}
        return out


def _pair_scores(emb_ND: torch.Tensor | np.ndarray) -> np.ndarray:
    """Cosine similarity of rows 2i and 2i+1, shape (P,), as float64.

    The products run in the embeddings' own precision (float32 or float64; half types are upcast to float32):
    casting a 6000-pair pack to float64 first roughly doubled the time of the whole evaluation.
    """
    emb_ND = torch.as_tensor(emb_ND).detach().cpu()
    if not emb_ND.is_floating_point() or emb_ND.dtype in (torch.float16, torch.bfloat16):
        emb_ND = emb_ND.float()
    if emb_ND.ndim != 2 or emb_ND.shape[0] % 2:
        raise DataError(f"embeddings have shape {tuple(emb_ND.shape)}; expected (2 * num_pairs, D) with pair i in "
                        "rows 2i and 2i+1")
    emb_ND = F.normalize(emb_ND, dim=1)
    cos_P = (emb_ND[0::2] * emb_ND[1::2]).sum(dim=1).numpy().astype(np.float64)
    # A NaN or Inf anywhere in a pair's two rows makes its score NaN; checking P scores is cheaper than N*D values.
    bad_P = ~np.isfinite(cos_P)
    if bad_P.any():
        raise DataError(f"{int(bad_P.sum())} of {cos_P.size} pairs have a NaN or Inf embedding (first: pair "
                        f"{int(np.flatnonzero(bad_P)[0])}); the model diverged or the checkpoint is broken")
    return np.clip(cos_P, -1.0, 1.0)


def _best_threshold(score_P: np.ndarray, same_P: np.ndarray) -> float:
    """The training-optimal threshold: the lowest of the candidates with the most correct ``score > t`` decisions."""
    uniq = np.unique(score_P)
    thr_T = np.concatenate(([uniq[0] - _END_EPS], (uniq[:-1] + uniq[1:]) / 2, [uniq[-1] + _END_EPS]))
    same_sorted = np.sort(score_P[same_P])
    diff_sorted = np.sort(score_P[~same_P])
    true_acc_T = same_sorted.size - np.searchsorted(same_sorted, thr_T, side="right")  # same pairs with score > t
    true_rej_T = np.searchsorted(diff_sorted, thr_T, side="right")  # different pairs with score <= t
    return float(thr_T[np.argmax(true_acc_T + true_rej_T)])


def tar_at_far(score_P: np.ndarray, same_P: np.ndarray, fars: Sequence[float]) -> dict[str, float]:
    """TAR at each FAR over all pairs, by the rule of the module docstring (the lowest threshold whose FAR is
    ``<= far``; "same" when ``score > threshold``).

    Each class of scores is sorted once, so this also serves IJB-C's 15.7M template pairs (:mod:`.ijb`).

    Args:
        score_P: ``(P,)`` pair scores (higher: more alike).
        same_P: ``(P,)`` bools, True for same-identity pairs; both classes must be present.
        fars: False-accept rates in ``(0, 1]``.

    Returns:
        ``{far_key(far): tar}`` for each FAR.
    """
    diff_desc = np.sort(score_P[~same_P])[::-1]
    same_sorted = np.sort(score_P[same_P])
    out = {}
    for far in fars:
        # At most k false accepts; the 1e-9 keeps e.g. 0.1 * 30 = 3.0000000000000004 or 2.9999999999999996 at 3.
        k = math.floor(far * diff_desc.size + 1e-9)
        if k >= diff_desc.size:
            out[far_key(far)] = 1.0
            continue
        # Exactly the k highest different-pair scores lie above diff_desc[k] (fewer on ties): FAR <= k / n_diff.
        num_above = same_sorted.size - np.searchsorted(same_sorted, diff_desc[k], side="right")
        out[far_key(far)] = float(num_above / same_sorted.size)
    return out


def _roc(score_P: np.ndarray, same_P: np.ndarray) -> tuple[list[float], list[float]]:
    order = np.argsort(-score_P, kind="stable")
    score_sorted, same_sorted = score_P[order], same_P[order]
    # The last position of each run of equal scores: thresholds at the distinct scores, "same" when score >= t.
    ends = np.r_[np.flatnonzero(np.diff(score_sorted)), score_sorted.size - 1]
    tp = np.cumsum(same_sorted)[ends]
    fp = np.cumsum(~same_sorted)[ends]
    fpr = np.r_[0.0, fp / max(int((~same_P).sum()), 1)]
    tpr = np.r_[0.0, tp / max(int(same_P.sum()), 1)]
    return fpr.tolist(), tpr.tolist()


def evaluate_pairs(emb_ND: torch.Tensor | np.ndarray, issame: Sequence[bool] | torch.Tensor | np.ndarray, *,
                   num_folds: int = 10, fars: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> VerificationResult:
    """Verification accuracy (k-fold), TAR@FAR and ROC of pairs of embeddings (see the module docstring).

    Args:
        emb_ND: ``(2P, D)`` embeddings, pair ``i`` in rows ``2i`` and ``2i + 1``; need not be normalised.
        issame: ``P`` labels, True for same-identity pairs.
        num_folds: Number of contiguous folds (insightface uses 10).
        fars: False-accept rates for ``tar_at_far``, each in ``(0, 1]``.

    Returns:
        The metrics, with the ROC arrays.

    Raises:
        DataError: The shapes disagree, an embedding is not finite, ``num_folds < 2``, there are fewer pairs than
            folds, only one class is present, or a FAR is outside ``(0, 1]``.
    """
    same_P = (issame.detach().cpu().numpy() if isinstance(issame, torch.Tensor) else np.asarray(issame)).astype(bool)
    score_P = _pair_scores(emb_ND)
    num_pairs = same_P.size
    if same_P.ndim != 1 or score_P.size != num_pairs:
        raise DataError(f"{2 * score_P.size} embeddings ({score_P.size} pairs) but {num_pairs} issame labels; "
                        "expected 2 embeddings per label")
    if num_folds < 2:
        raise DataError(f"num_folds={num_folds} is not allowed; use at least 2 (insightface uses 10)")
    if num_pairs < num_folds:
        raise DataError(f"{num_pairs} pairs cannot be split into num_folds={num_folds} folds; use more pairs or "
                        "fewer folds")
    num_same = int(same_P.sum())
    if num_same == 0 or num_same == num_pairs:
        raise DataError(f"the {num_pairs} pairs hold {num_same} same-identity and {num_pairs - num_same} "
                        "different-identity pairs; verification needs both")
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise DataError(f"far={far} is not allowed; FARs must lie in (0, 1], e.g. 1e-3")

    fold_acc_F, fold_thr_F = [], []
    for test_idx in np.array_split(np.arange(num_pairs), num_folds):  # = sklearn KFold(n_splits, shuffle=False)
        train_mask = np.ones(num_pairs, dtype=bool)
        train_mask[test_idx] = False
        thr = _best_threshold(score_P[train_mask], same_P[train_mask])
        fold_thr_F.append(thr)
        fold_acc_F.append(float(np.mean((score_P[test_idx] > thr) == same_P[test_idx])))

    fpr, tpr = _roc(score_P, same_P)
    return VerificationResult(
        accuracy=float(np.mean(fold_acc_F)),
        accuracy_std=float(np.std(fold_acc_F)),
        threshold=float(np.mean(fold_thr_F)),
        tar_at_far=tar_at_far(score_P, same_P, fars),
        num_pairs=num_pairs,
        roc_fpr=fpr,
        roc_tpr=tpr,
    )


def evaluate_pack(model: torch.nn.Module, pairs_path: str | os.PathLike[str], *, image_size: int,
                  batch_size: int = 256, flip: bool = True, device: torch.device | None = None, num_folds: int = 10,
                  fars: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> VerificationResult:
    """Reads a verification pack, embeds its images with ``model`` and evaluates the pairs.

    Images are decoded a few thousand at a time, so a pack is never held decoded in full. Only open packs you trust
    (see :mod:`offloadfr.data.pairs`).

    Args:
        model: Backbone mapping ``(B, 3, S, S)`` images in ``[-1, 1]`` to ``(B, D)`` embeddings.
        pairs_path: The ``.bin`` pack.
        image_size: Model input side ``S``; stored images of another size are resized (bilinear).
        batch_size: Images per forward pass.
        flip: Flip test (sum of the embeddings of the image and its mirror).
        device: Where the forward runs; defaults to the model's device.
        num_folds: Folds of the accuracy protocol.
        fars: FARs for ``tar_at_far``.

    Returns:
        The metrics of the pack.

    Raises:
        DataNotFoundError: The pack does not exist.
        DataError: The pack is malformed, an image cannot be decoded, or the pairs cannot be evaluated.
    """
    images, issame = read_pairs_bin(pairs_path)
    chunk = max(_DECODE_CHUNK, batch_size)
    parts = []
    bar = tqdm(total=len(images), desc="eval", unit="img", leave=False, disable=not sys.stderr.isatty())
    with bar:  # a bar with rate and ETA on a terminal, nothing elsewhere
        for start in range(0, len(images), chunk):
            try:
                images_u8 = decode_images(images[start:start + chunk], image_size)
            except DataError as e:
                raise DataError(f"verification pack {pairs_path}, in the chunk starting at image {start}: {e}") from e
            parts.append(extract_embeddings(model, images_u8, batch_size=batch_size, flip=flip, device=device))
            bar.update(len(images_u8))
    return evaluate_pairs(torch.cat(parts), issame, num_folds=num_folds, fars=fars)
