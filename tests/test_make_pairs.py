"""Verification packs from an image folder (offloadfr/data/make_pairs.py, ``offloadfr pairs``): LFW pairs.txt,
balanced random pairs, and the round trip through the evaluator."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offloadfr.cli import main
from offloadfr.data.make_pairs import make_pairs
from offloadfr.data.pairs import read_pairs_bin
from offloadfr.errors import DataError
from offloadfr.eval.verification import evaluate_pack
from offloadfr.models import build_backbone

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba-subset" / "raw"


def _lfw_folder(root: Path, num_identities: int = 8, per_identity: int = 4, seed: int = 0) -> list[str]:
    """``root/<Name>/<Name>_000i.jpg`` (LFW naming) with small random images, each identity a little apart in colour
    so a model's scores are not all alike; returns the names."""
    rng = np.random.default_rng(seed)
    names = [f"Person_{chr(65 + k)}" for k in range(num_identities)]
    for name in names:
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 256, (1, 1, 3))
        for i in range(1, per_identity + 1):
            img = np.clip(base + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i:04d}.jpg", quality=90)
    return names


def _pairs_txt(path: Path, names: list[str], folds: int, per: int, per_identity: int, seed: int = 1) -> list[tuple]:
    """An LFW-style pairs.txt (header, then per fold ``per`` same and ``per`` different pairs); returns its pairs as
    ``(name_a, i, name_b, j)``."""
    rng = np.random.default_rng(seed)
    lines, pairs = [f"{folds}\t{per}"], []
    for _ in range(folds):
        for _ in range(per):
            n = names[int(rng.integers(len(names)))]
            i, j = (int(v) + 1 for v in rng.choice(per_identity, 2, replace=False))
            lines.append(f"{n}\t{i}\t{j}")
            pairs.append((n, i, n, j))
        for _ in range(per):
            a, b = (names[int(v)] for v in rng.choice(len(names), 2, replace=False))
            i, j = (int(v) + 1 for v in rng.integers(per_identity, size=2))
            lines.append(f"{a}\t{i}\t{b}\t{j}")
            pairs.append((a, i, b, j))
    path.write_text("\n".join(lines) + "\n")
    return pairs


def test_pairs_txt_pack_evaluates_like_an_independent_pack(tmp_path: Path) -> None:
    """Catches a pack whose pairs are out of pairs.txt order, an index read as 0-based, a flipped issame, or images
    re-encoded on the way: ``eval`` must give exactly the numbers of a pack this test builds by hand."""
    root = tmp_path / "lfw"
    names = _lfw_folder(root)
    pairs = _pairs_txt(tmp_path / "pairs.txt", names, folds=10, per=2, per_identity=4)
    built = tmp_path / "built.bin"
    assert main(["pairs", str(root), str(built), "--pairs-txt", str(tmp_path / "pairs.txt"), "--quiet"]) == 0
    bins, issame = [], []
    for a, i, b, j in pairs:  # packed independently: the LFW file names, the raw bytes
        bins += [(root / a / f"{a}_{i:04d}.jpg").read_bytes(), (root / b / f"{b}_{j:04d}.jpg").read_bytes()]
        issame.append(a == b)
    by_hand = tmp_path / "by_hand.bin"
    with open(by_hand, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    assert read_pairs_bin(built) == read_pairs_bin(by_hand)
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=16, image_size=32).eval()
    got = evaluate_pack(model, built, image_size=32, batch_size=16).to_dict()
    want = evaluate_pack(model, by_hand, image_size=32, batch_size=16).to_dict()
    assert got == want
    report = json.loads(built.with_suffix(".json").read_text())
    assert report["num_pairs"] == 40 and report["num_same"] == 20 and report["num_dropped"] == 0


def test_pairs_txt_positional_index_without_lfw_names(tmp_path: Path) -> None:
    """Catches the positional rule (the i-th file in name order, from 1) being off by one when the files are not
    LFW-named."""
    root = tmp_path / "plain"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for k, stem in enumerate(("x", "y", "z")):
            Image.new("RGB", (8, 8), (k * 60, 10, 10)).save(root / name / f"{stem}.png")
    (tmp_path / "p.txt").write_text("a 1 3\nb 2 1\na 3 b 2\n")
    summary = make_pairs(root, tmp_path / "p.bin", pairs_txt=tmp_path / "p.txt", progress=False)
    assert summary.num_pairs == 3 and summary.num_same == 2
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["pairs"] == [["a/x.png", "a/z.png", True], ["b/y.png", "b/x.png", True],
                               ["a/z.png", "b/y.png", False]]


def test_random_pairs_are_balanced_disjoint_and_reproducible(tmp_path: Path) -> None:
    """Catches folds that share identities (a threshold tuned on the test fold's people), unbalanced folds, a same
    pair of two identities, a repeated pair, a drawn image that does not decode, or a draw that depends on anything
    but the seed."""
    root = tmp_path / "ids"
    names = _lfw_folder(root, num_identities=24, per_identity=3)
    (root / names[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff cut")
    a = make_pairs(root, tmp_path / "a.bin", num_pairs=80, seed=3, progress=False)
    assert a.num_pairs == 80 and a.num_same == 40
    pairs = json.loads((tmp_path / "a.json").read_text())["pairs"]
    ids_of_fold = []
    for k in range(10):
        fold = pairs[8 * k:8 * (k + 1)]
        assert [p[2] for p in fold] == [True] * 4 + [False] * 4
        for x, y, same in fold:
            assert (x.split("/")[0] == y.split("/")[0]) == same and x != y
        ids_of_fold.append({p.split("/")[0] for x, y, _ in fold for p in (x, y)})
    for k in range(10):
        for m in range(k):
            assert not ids_of_fold[k] & ids_of_fold[m]
    keys = [tuple(sorted((x, y))) for x, y, _ in pairs]
    assert len(set(keys)) == len(keys)
    assert all("broken.jpg" not in p for x, y, _ in pairs for p in (x, y))
    b = make_pairs(root, tmp_path / "b.bin", num_pairs=80, seed=3, progress=False, num_workers=2)
    assert b.num_pairs == 80
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    make_pairs(root, tmp_path / "c.bin", num_pairs=80, seed=4, progress=False)
    assert (tmp_path / "a.bin").read_bytes() != (tmp_path / "c.bin").read_bytes()


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"num_pairs": 30}, "multiple of 2 \\* num_folds = 20"),
    ({"num_pairs": 400}, "distinct same pairs"),
    ({"num_pairs": 32, "num_folds": 16}, "different pairs need two"),
])
def test_random_pairs_refuse_what_the_folder_cannot_hold(tmp_path: Path, kwargs: dict, expected: str) -> None:
    """Catches an endless draw (or silent repeats) when a fold has too few identities or images for the pairs."""
    root = tmp_path / "ids"
    _lfw_folder(root, num_identities=12, per_identity=3)
    with pytest.raises(DataError, match=expected):
        make_pairs(root, tmp_path / "x.bin", progress=False, **kwargs)


@pytest.mark.skipif(not (RAW / "identities.txt").is_file(), reason=f"no raw CelebA photos at {RAW}")
def test_aligned_pairs_drop_a_pair_without_a_face(tmp_path: Path) -> None:
    """Catches an aligned pack that stores the unaligned photo, or keeps a pair whose image has no face (it cannot
    be aligned) instead of dropping and reporting it."""
    pytest.importorskip("yuface", reason="the face detector is the optional extra: pip install 'offloadfr[align]'")
    root = tmp_path / "raw"
    (root / "p1").mkdir(parents=True)
    (root / "p2").mkdir()
    for k, name in enumerate(["001571.jpg", "002068.jpg"]):
        (root / "p1" / f"p1_{k + 1:04d}.jpg").write_bytes((RAW / name).read_bytes())
    (root / "p2" / "p2_0001.jpg").write_bytes((RAW / "004058.jpg").read_bytes())
    Image.new("RGB", (200, 200), (128, 128, 128)).save(root / "p2" / "p2_0002.jpg")  # no face
    (tmp_path / "pairs.txt").write_text("p1 1 2\np2 1 2\np1 1 p2 1\np1 2 p2 2\n")
    assert main(["pairs", str(root), str(tmp_path / "al.bin"), "--pairs-txt", str(tmp_path / "pairs.txt"),
                 "--align", "--quiet"]) == 0
    images, issame = read_pairs_bin(tmp_path / "al.bin")
    assert issame == [True, False]
    assert all(Image.open(io.BytesIO(b)).size == (112, 112) for b in images)
    report = json.loads((tmp_path / "al.json").read_text())
    assert [d["line"] for d in report["dropped"]] == [2, 4]
    assert report["unusable_images"] == [{"path": "p2/p2_0002.jpg",
                                          "why": "no face found (detector confidence >= 0.5)"}]
