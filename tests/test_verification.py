"""Verification packs (``data/pairs.py``), embeddings with the flip test (``eval/features.py``) and the 10-fold
accuracy / TAR@FAR / ROC metrics (``eval/verification.py``), checked against hand-computed values and slow
brute-force references."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import offloadfr.eval.verification as verification
from offloadfr.data.pairs import decode_images, read_pairs_bin, write_pairs_bin
from offloadfr.errors import DataError, DataNotFoundError
from offloadfr.eval import VerificationResult, evaluate_pack, evaluate_pairs, extract_embeddings, far_key

DEVICE = torch.device(os.environ.get("OFFLOADFR_TEST_DEVICE", "cpu"))  # as tests/conftest.py


# ----------------------------------------------------------------------------------------------------------- helpers
def _encode(arr_HWC: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr_HWC).save(buf, format=fmt)
    return buf.getvalue()


def _random_png(rng: np.random.Generator, size: int = 8) -> bytes:
    return _encode(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _emb_from_scores(scores: list[float] | np.ndarray) -> torch.Tensor:
    """2-D float64 embeddings whose pair i has cosine similarity exactly scores[i] (up to float64 rounding)."""
    s = np.asarray(scores, dtype=np.float64)
    a = np.stack([np.ones_like(s), np.zeros_like(s)], axis=1)
    b = np.stack([s, np.sqrt(1.0 - s**2)], axis=1)
    out = np.empty((2 * s.size, 2))
    out[0::2], out[1::2] = a, b
    return torch.from_numpy(out)


def _overlap_scores(num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of same pairs ~ N(0.3, 0.2), different pairs ~ N(0, 0.2), labels shuffled: overlapping classes."""
    rng = np.random.default_rng(seed)
    same = rng.random(num_pairs) < 0.5
    scores = np.where(same, rng.normal(0.3, 0.2, num_pairs), rng.normal(0.0, 0.2, num_pairs))
    return np.clip(scores, -0.99, 0.99), same


def _brute_force_kfold(scores: np.ndarray, same: np.ndarray, num_folds: int) -> tuple[float, float, float]:
    """Plain-loop reference of the documented protocol: sklearn KFold(shuffle=False) folds, thresholds at the
    midpoints of distinct training scores plus the two ends, lowest threshold on ties, accuracy of ``score > t``."""
    n = len(scores)
    sizes = [n // num_folds + (1 if f < n % num_folds else 0) for f in range(num_folds)]
    accs, thrs, start = [], [], 0
    for size in sizes:
        test = list(range(start, start + size))
        train = [i for i in range(n) if not start <= i < start + size]
        start += size
        uniq = sorted({float(scores[i]) for i in train})
        cands = [uniq[0] - 1e-6] + [(uniq[j] + uniq[j + 1]) / 2 for j in range(len(uniq) - 1)] + [uniq[-1] + 1e-6]
        best_t, best_correct = None, -1
        for t in cands:
            correct = sum((scores[i] > t) == same[i] for i in train)
            if correct > best_correct:
                best_t, best_correct = t, correct
        thrs.append(best_t)
        accs.append(sum((scores[i] > best_t) == same[i] for i in test) / len(test))
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    return mean, std, sum(thrs) / len(thrs)


def _brute_force_tar(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """The best TAR over every threshold (each score, and below all) whose FAR on different pairs is <= far."""
    diff = [s for s, y in zip(scores, same, strict=True) if not y]
    pos = [s for s, y in zip(scores, same, strict=True) if y]
    best = 0.0
    for t in [-math.inf, *scores]:
        if sum(d > t for d in diff) / len(diff) <= far + 1e-12:
            best = max(best, sum(p > t for p in pos) / len(pos))
    return best


def _insightface_accuracy(scores: np.ndarray, same: np.ndarray, num_folds: int = 10) -> float:
    """insightface verification.py calculate_roc: squared distance 2 - 2cos, thresholds arange(0, 4, 0.01),
    ``dist < t`` means same, first argmax on the training folds."""
    dist = 2.0 - 2.0 * scores
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for test in np.array_split(np.arange(len(scores)), num_folds):
        train = np.setdiff1d(np.arange(len(scores)), test)
        train_acc = [np.mean((dist[train] < t) == same[train]) for t in thresholds]
        t = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < t) == same[test]))
    return float(np.mean(accs))


class _MirrorSensitive(torch.nn.Module):
    """A backbone whose embedding changes under a horizontal flip (a linear map of the raw pixels), with a
    BatchNorm so train-mode and eval-mode outputs differ."""

    def __init__(self, size: int = 8, dim: int = 5) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3 * size * size, dim)
        self.bn = torch.nn.BatchNorm1d(dim)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x.flatten(1)))


# ------------------------------------------------------------------------------------------------------------ packs
def test_round_trip_bytes_numpy_and_memoryview_entries(tmp_path: Path) -> None:
    """Catches a writer/reader that drops, reorders or mangles entries, or rejects numpy/memoryview buffers."""
    rng = np.random.default_rng(0)
    raw = [_random_png(rng) for _ in range(6)]
    images = [raw[0], np.frombuffer(raw[1], dtype=np.uint8), memoryview(raw[2]), bytearray(raw[3]), raw[4],
              np.frombuffer(raw[5], dtype=np.uint8)]
    issame = np.array([True, False, True])  # numpy bools, as the synthetic generator passes them
    path = tmp_path / "sub" / "pairs.bin"
    write_pairs_bin(path, images, issame)
    got_images, got_issame = read_pairs_bin(path)
    assert got_images == raw and all(type(b) is bytes for b in got_images)
    assert got_issame == [True, False, True] and all(type(b) is bool for b in got_issame)
    assert not (tmp_path / "sub" / "pairs.bin.tmp").exists()


def test_reads_packs_holding_numpy_buffers(tmp_path: Path) -> None:
    """Catches a reader that only accepts bytes: some converters pickle uint8 arrays and a numpy issame array."""
    rng = np.random.default_rng(1)
    raw = [_random_png(rng) for _ in range(4)]
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps(([np.frombuffer(b, dtype=np.uint8) for b in raw], np.array([False, True]))))
    assert read_pairs_bin(path) == (raw, [False, True])


def test_reads_python2_pack(tmp_path: Path) -> None:
    """Catches loading without encoding="bytes": a Python 2 pack stores images as str, which would come back as
    text (or fail to decode for non-ASCII bytes) instead of raw bytes."""
    a, b = b"\xff\xd8\x00ab", b"\x89PNG\x01"
    # Protocol 2 as Python 2 writes it: ( [SHORT_BINSTRING a, SHORT_BINSTRING b], [True] ) as a 2-tuple.
    blob = (b"\x80\x02]q\x00(U" + bytes([len(a)]) + a + b"U" + bytes([len(b)]) + b + b"e]q\x01\x88a\x86q\x02.")
    path = tmp_path / "py2.bin"
    path.write_bytes(blob)
    assert read_pairs_bin(path) == ([a, b], [True])


@pytest.mark.parametrize(("content", "match"), [
    (pickle.dumps(([b"a", b"b", b"c"], [True])), "odd number of images"),
    (pickle.dumps(([b"a", b"b", b"c", b"d"], [True])), r"4 images for 1 issame"),
    (pickle.dumps(([b"a", b"b"], [True, False])), r"2 images for 2 issame"),
    (pickle.dumps(([], [])), "no pairs"),
    (pickle.dumps(([b"a", 7], [True])), "image 1 is a int"),
    (pickle.dumps(([b"a", np.zeros(3, np.float32)], [True])), "dtype float32"),
    (pickle.dumps(([b"a", b"b"], [2])), r"issame\[0\] is 2"),
    (pickle.dumps({"bins": [], "issame": []}), "holds a dict"),
    (pickle.dumps(([b"a", b"b"], [True], [1])), "of length 3"),
    (pickle.dumps((b"ab", [True])), "images is a bytes"),
    (b"not a pickle at all", "not a readable pickle"),
    (b"", "not a readable pickle"),
])
def test_malformed_pack_raises_data_error(tmp_path: Path, content: bytes, match: str) -> None:
    """Catches a reader that silently accepts a broken pack (pairs misaligned with labels) or crashes with an
    error that does not name the file."""
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        read_pairs_bin(path)
    assert str(path) in str(info.value)


def test_writer_rejects_mismatched_counts(tmp_path: Path) -> None:
    """Catches a writer that produces a pack the reader (or insightface) would misalign."""
    with pytest.raises(DataError, match=r"3 images for 2 issame|odd number"):
        write_pairs_bin(tmp_path / "x.bin", [b"a", b"b", b"c"], [True, False])
    assert not (tmp_path / "x.bin").exists()


def test_missing_pack_raises_data_not_found(tmp_path: Path) -> None:
    """Catches a raw pickle/open error (or a silent empty result) for a wrong path; both error types must match."""
    path = tmp_path / "nope" / "lfw.bin"
    with pytest.raises(DataNotFoundError, match="nope"):
        read_pairs_bin(path)
    with pytest.raises(FileNotFoundError):
        read_pairs_bin(path)
    with pytest.raises(DataError, match="is a directory"):
        read_pairs_bin(tmp_path)


def test_decode_images_rgb_order_resize_and_modes() -> None:
    """Catches BGR output, a missing resize, a wrong layout (HWC) or grayscale/RGBA images not made RGB."""
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    pattern = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    gray = np.full((8, 8), 77, np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 200
    rgba[..., 3] = 255
    out = decode_images([_encode(red), _encode(pattern), _encode(gray), _encode(rgba)], 8)
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 8, 8)
    assert (out[0, 0] == 255).all() and (out[0, 1:] == 0).all()
    assert torch.equal(out[1], torch.from_numpy(pattern).permute(2, 0, 1))  # PNG is lossless
    assert (out[2] == 77).all()
    assert (out[3, 2] == 200).all() and (out[3, :2] == 0).all()

    big = np.full((12, 16, 3), (10, 120, 250), np.uint8)
    resized = decode_images([_encode(big, "JPEG"), _encode(pattern)], 5)
    assert resized.shape == (2, 3, 5, 5)
    assert (resized[0].float().mean(dim=(1, 2)) - torch.tensor([10.0, 120.0, 250.0])).abs().max() < 6
    ref = np.asarray(Image.fromarray(pattern).resize((5, 5), Image.Resampling.BILINEAR))
    assert torch.equal(resized[1], torch.from_numpy(ref.copy()).permute(2, 0, 1))


def test_decode_images_corrupt_image_names_index() -> None:
    """Catches a corrupt image surfacing as a raw PIL error (or being skipped, which misaligns every later pair)."""
    good = _random_png(np.random.default_rng(3))
    with pytest.raises(DataError, match=r"image 2 \(pair 1\)"):
        decode_images([good, good, b"garbage", good], 8)


# ----------------------------------------------------------------------------------------------------------- metrics
def test_far_key_format() -> None:
    """Catches keys like "1e-03" or "0.001" that differ from the documented format consumers look up."""
    assert [far_key(f) for f in (1e-3, 1e-2, 0.1, 5e-4, 2.5e-4, 1.0, 1e-6)] == \
        ["1e-3", "1e-2", "1e-1", "5e-4", "2.5e-4", "1e0", "1e-6"]


def test_separable_pairs_give_accuracy_one_and_full_tar() -> None:
    """Catches an inverted comparison (distance vs similarity), misaligned pairs, or a threshold outside the gap."""
    num_pairs = 40
    same = np.arange(num_pairs) % 2 == 0
    scores = np.where(same, np.linspace(0.3, 0.9, num_pairs), np.linspace(-0.5, 0.2, num_pairs))
    result = evaluate_pairs(_emb_from_scores(scores), same.tolist())
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0 and result.num_pairs == num_pairs
    assert 0.2 < result.threshold < 0.3
    assert result.tar_at_far == {"1e-3": 1.0, "1e-2": 1.0, "1e-1": 1.0}
    fpr, tpr = np.array(result.roc_fpr), np.array(result.roc_tpr)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    assert ((fpr == 0) & (tpr == 1)).any()  # a perfect separation passes through (0, 1)


def test_tar_at_far_hand_computed() -> None:
    """Catches an off-by-one in the number of allowed false accepts or a threshold that lets in one too many."""
    same_scores = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
    diff_scores = [0.72, 0.52, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8]
    scores = np.array([v for pair in zip(same_scores, diff_scores, strict=True) for v in pair])
    same = np.array([True, False] * 10)
    result = evaluate_pairs(_emb_from_scores(scores), torch.from_numpy(same), fars=(1e-3, 0.1, 0.2, 1.0))
    # FAR 1e-3: no false accept -> t = 0.72 -> same above: 0.75, 0.85, 0.95.
    # FAR 0.1: one false accept (0.72) -> t = 0.52 -> 0.55 ... 0.95 = 5. FAR 0.2: t = -0.1 -> all 10.
    assert result.tar_at_far == {"1e-3": 0.3, "1e-1": 0.5, "2e-1": 1.0, "1e0": 1.0}


@pytest.mark.parametrize(("num_pairs", "seed"), [(203, 0), (60, 1)])
def test_overlapping_pairs_match_brute_force(num_pairs: int, seed: int) -> None:
    """Catches wrong fold boundaries (uneven P), tuning the threshold on the held-out fold, a non-optimal threshold
    search, ddof=1 std, and a TAR threshold that is not the best allowed one; ROC against a direct count."""
    scores, same = _overlap_scores(num_pairs, seed)
    fars = (0.01, 0.05, 0.1, 0.3)
    result = evaluate_pairs(_emb_from_scores(scores), same.tolist(), fars=fars)
    acc, std, thr = _brute_force_kfold(scores, same, 10)
    assert result.accuracy == pytest.approx(acc, abs=1e-12)
    assert result.accuracy_std == pytest.approx(std, abs=1e-12)
    assert result.threshold == pytest.approx(thr, abs=1e-9)
    assert 0.6 < result.accuracy < 0.9  # really overlapping, not trivially separable
    for far in fars:
        assert result.tar_at_far[far_key(far)] == pytest.approx(_brute_force_tar(scores, same, far), abs=1e-12)
    distinct = sorted(set(scores.tolist()), reverse=True)
    ref_fpr = [0.0] + [float(np.mean(scores[~same] >= t)) for t in distinct]
    ref_tpr = [0.0] + [float(np.mean(scores[same] >= t)) for t in distinct]
    assert result.roc_fpr == pytest.approx(ref_fpr) and result.roc_tpr == pytest.approx(ref_tpr)


def test_accuracy_close_to_insightface_protocol() -> None:
    """Catches a protocol drift from insightface calculate_roc (folds, threshold direction); the two differ only in
    the threshold grid, so the accuracies agree to within about a pair per fold."""
    scores, same = _overlap_scores(600, 5)
    result = evaluate_pairs(_emb_from_scores(scores), same)
    assert abs(result.accuracy - _insightface_accuracy(scores, same)) < 0.02


def test_random_embeddings_give_chance_accuracy() -> None:
    """Catches leakage of the held-out fold into threshold selection (which inflates accuracy on noise)."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(2 * 2000, 64, generator=gen)
    same = (torch.rand(2000, generator=gen) < 0.5).tolist()
    result = evaluate_pairs(emb, same)
    assert abs(result.accuracy - 0.5) < 0.04
    assert abs(result.tar_at_far["1e-1"] - 0.1) < 0.04


def test_six_thousand_pairs_in_well_under_a_second() -> None:
    """Catches an O(P^2) or per-threshold Python loop (an LFW-sized pack must evaluate in a fraction of a second)."""
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(12000, 512, generator=gen)
    same = (torch.arange(6000) % 2 == 0)
    emb[1::2][same] = emb[0::2][same] + 2.0 * torch.randn(int(same.sum()), 512, generator=gen)
    evaluate_pairs(emb, same)  # warm-up (imports, allocator)
    start = time.perf_counter()
    result = evaluate_pairs(emb, same)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"evaluate_pairs took {elapsed:.3f} s for 6000 pairs"
    assert result.accuracy > 0.9 and len(result.roc_fpr) == len(result.roc_tpr) > 1000


def test_to_dict_keys_and_json() -> None:
    """Catches renamed JSON keys that eval.json consumers rely on, or ROC arrays leaking into the default dict."""
    scores, same = _overlap_scores(50, 3)
    result = evaluate_pairs(_emb_from_scores(scores), same.tolist())
    d = result.to_dict()
    assert list(d) == ["accuracy", "accuracy_std", "threshold", "tar_at_far", "num_pairs"]
    assert list(d["tar_at_far"]) == ["1e-3", "1e-2", "1e-1"] and d["num_pairs"] == 50
    full = json.loads(json.dumps(result.to_dict(include_roc=True)))
    assert full["roc"] == {"fpr": result.roc_fpr, "tpr": result.roc_tpr}
    assert isinstance(result, VerificationResult) and "roc_fpr" not in repr(result)
    with pytest.raises(AttributeError):
        result.accuracy = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("emb", "issame", "kwargs", "match"), [
    (torch.randn(16, 4), [True, False] * 4, {}, r"8 pairs cannot be split into num_folds=10"),
    (torch.randn(40, 4), [True] * 20, {}, r"20 same-identity and 0 different"),
    (torch.randn(40, 4), [False] * 20, {}, r"0 same-identity and 20 different"),
    (torch.randn(41, 4), [True, False] * 10, {}, r"shape \(41, 4\)"),
    (torch.randn(40, 4), [True, False] * 11, {}, r"20 pairs\) but 22 issame"),
    (torch.randn(40), [True, False] * 10, {}, r"shape \(40,\)"),
    (torch.full((40, 4), float("nan")), [True, False] * 10, {}, "20 of 20 pairs have a NaN"),
    (torch.eye(40, 4).index_put_((torch.tensor([7]), torch.tensor([2])), torch.tensor(float("inf"))),
     [True, False] * 10, {}, r"1 of 20 pairs have a NaN or Inf embedding \(first: pair 3\)"),
    (torch.randn(40, 4), [True, False] * 10, {"num_folds": 1}, "num_folds=1"),
    (torch.randn(40, 4), [True, False] * 10, {"fars": (0.0,)}, r"far=0.0"),
    (torch.randn(40, 4), [True, False] * 10, {"fars": (1.5,)}, r"far=1.5"),
])
def test_invalid_inputs_raise_data_error(emb: torch.Tensor, issame: list[bool], kwargs: dict[str, object],
                                         match: str) -> None:
    """Catches meaningless metrics (one class, fewer pairs than folds, NaN scores) being reported as numbers."""
    with pytest.raises(DataError, match=match):
        evaluate_pairs(emb, issame, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- features
def _normalised(images_u8: torch.Tensor) -> torch.Tensor:
    return (images_u8.float() / 255.0 - 0.5) / 0.5


def test_flip_test_sums_image_and_mirror_embeddings() -> None:
    """Catches a missing or wrong flip (vertical, or the channel axis), a missing input normalisation, train-mode
    BatchNorm during extraction, and batches that drop or repeat the ragged last batch (N=7, batch 3)."""
    torch.manual_seed(0)
    model = _MirrorSensitive().to(DEVICE).eval()
    images = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    x = _normalised(images).to(DEVICE)
    with torch.no_grad():
        ref_flip = F.normalize(model(x) + model(torch.flip(x, dims=[3])), dim=1).cpu()
        ref_plain = F.normalize(model(x), dim=1).cpu()
    got_flip = extract_embeddings(model, images, batch_size=3, flip=True)
    got_plain = extract_embeddings(model, images, batch_size=3, flip=False)
    assert got_flip.dtype == torch.float32 and got_flip.shape == (7, 5) and got_flip.device.type == "cpu"
    assert not got_flip.requires_grad
    torch.testing.assert_close(got_flip, ref_flip, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_plain, ref_plain, rtol=1e-5, atol=1e-5)
    assert (got_flip - got_plain).abs().max() > 1e-2  # the mirror really changes the embedding here
    torch.testing.assert_close(got_flip.norm(dim=1), torch.ones(7))


@pytest.mark.parametrize("training", [True, False])
def test_extract_embeddings_restores_mode(training: bool) -> None:
    """Catches a model left in eval mode after evaluation mid-training (BatchNorm would stop updating), or switched
    to train mode when it was in eval mode."""
    model = _MirrorSensitive().to(DEVICE).train(training)
    running_mean = model.bn.running_mean.clone()
    extract_embeddings(model, torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
    assert model.training is training and model.bn.training is training
    assert torch.equal(model.bn.running_mean, running_mean)  # no BatchNorm statistics updated by evaluation


def test_extract_embeddings_rejects_float_images() -> None:
    """Catches float images in [0, 1] being scaled by 1/255 a second time without a word."""
    with pytest.raises(DataError, match="uint8"):
        extract_embeddings(_MirrorSensitive(), torch.rand(2, 3, 8, 8))


def test_evaluate_pack_matches_the_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches evaluate_pack decoding at the wrong size, losing or reordering images across decode chunks, or
    pairing embeddings differently from evaluate_pairs."""
    rng = np.random.default_rng(4)
    images = [_encode(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)) for _ in range(40)]
    issame = [bool(i % 2) for i in range(20)]
    path = tmp_path / "pairs.bin"
    write_pairs_bin(path, images, issame)
    torch.manual_seed(1)
    model = _MirrorSensitive(size=8).to(DEVICE)
    expected = evaluate_pairs(extract_embeddings(model, decode_images(images, 8), batch_size=5), issame)
    monkeypatch.setattr(verification, "_DECODE_CHUNK", 6)  # exercise several decode chunks, one ragged
    got = evaluate_pack(model, path, image_size=8, batch_size=5)
    # Batches differ (chunks of 6 vs all 40), so allow float noise in the scores.
    assert got.num_pairs == 20 and got.accuracy == pytest.approx(expected.accuracy, abs=1e-9)
    assert got.threshold == pytest.approx(expected.threshold, abs=1e-5)
    assert got.tar_at_far == pytest.approx(expected.tar_at_far)
    assert got.roc_fpr == pytest.approx(expected.roc_fpr) and got.roc_tpr == pytest.approx(expected.roc_tpr)
    with pytest.raises(DataNotFoundError):
        evaluate_pack(model, tmp_path / "missing.bin", image_size=8)
