"""IJB-B / IJB-C template verification (offloadfr/eval/ijb.py) against a brute-force computation written here.

The fixture (tests/_ijb_fixture.py) is a small IJB layout: loose crops made from aligned faces by known random
similarity transforms, so the landmarks are known without any detector, several templates per identity, 2-3 media
per template (one media id shared by two templates), genuine and impostor template pairs.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offloadfr.cli import main
from offloadfr.data.align import align_face
from offloadfr.errors import DataError, DataNotFoundError
from offloadfr.eval.ijb import IJB_FARS, evaluate_ijb, read_ijb_meta, read_template_pairs
from offloadfr.models import build_backbone
from tests._ijb_fixture import IJBFixture, build_ijb_fixture

SIZE = 32


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> IJBFixture:
    return build_ijb_fixture(tmp_path_factory.mktemp("ijb") / "IJBC", num_identities=12)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """float64, so that batching (the evaluator's batches, the brute force's single images) changes nothing
    beyond the float32 rounding of the embeddings."""
    torch.manual_seed(0)
    return build_backbone("tiny", embedding_size=32, image_size=SIZE).double().eval()


def _brute_force(fx: IJBFixture, model: torch.nn.Module, *, flip: bool, detector_score: bool, media_pooling: bool,
                 normalize_images: bool) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Scores and TAR@FAR with plain loops: one image at a time, dicts of templates and media, every threshold."""
    feats = []
    with torch.no_grad():
        for name, lmk in zip(fx.names, fx.landmarks, strict=True):
            face = align_face(Image.open(fx.root / "loose_crop" / name), lmk, size=SIZE)
            x = torch.from_numpy(face.astype(np.float64) / 255.0 * 2.0 - 1.0).permute(2, 0, 1)[None]
            f = model(x)[0]
            if flip:
                f = f + model(x.flip(3))[0]
            if normalize_images:
                f = f / f.norm()
            feats.append(f.numpy())
    by_template: dict[int, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for i, (t, m) in enumerate(zip(fx.template, fx.media, strict=True)):
        by_template[t][m if media_pooling else i].append(feats[i] * (fx.score[i] if detector_score else 1.0))
    template_feat = {}
    for t, medias in by_template.items():
        v = sum(np.mean(images, axis=0) for images in medias.values())
        template_feat[t] = v / np.linalg.norm(v)
    scores = np.array([float(template_feat[a] @ template_feat[b]) for a, b, _ in fx.pairs])
    same = np.array([lab == 1 for _, _, lab in fx.pairs])
    gen, imp = scores[same], scores[~same]
    tar = {}
    for far in IJB_FARS:
        # the lowest threshold t (an impostor score, or -inf) with #(impostor > t) <= far * n; "same" when > t
        ok = [t for t in [-math.inf, *imp] if sum(s > t for s in imp) <= far * len(imp) + 1e-9]
        thr = min(ok)
        tar[f"1e-{round(-math.log10(far))}"] = sum(s > thr for s in gen) / len(gen)
    return scores, same, tar


OPTIONS = [
    {"flip": True, "detector_score": True, "media_pooling": True, "normalize_images": False},  # the reference's
    {"flip": False, "detector_score": False, "media_pooling": False, "normalize_images": True},
    {"flip": True, "detector_score": True, "media_pooling": False, "normalize_images": False},
]


@pytest.mark.parametrize("options", OPTIONS, ids=["reference", "plain", "no-media-pooling"])
def test_tar_at_far_matches_brute_force(fixture: IJBFixture, model: torch.nn.Module,
                                        options: dict[str, bool]) -> None:
    """Catches wrong pooling (media mean vs sum, detector weights, a media shared across templates pooled across
    them), pairs scored against the wrong template rows, and an off-by-one in the TAR@FAR threshold."""
    result = evaluate_ijb(model, fixture.root, protocol="IJBC", image_size=SIZE, batch_size=16, num_workers=2,
                          **options)
    scores, same, tar = _brute_force(fixture, model, **options)
    np.testing.assert_allclose(result.scores, scores, atol=1e-6)
    assert result.tar_at_far == tar
    assert result.num_pairs == len(fixture.pairs) and result.num_genuine == int(same.sum())
    assert result.num_images == len(fixture.names) and result.num_templates == len(fixture.identity_of_template)
    gen, imp = scores[same], scores[~same]
    auc = np.mean([(g > i) + 0.5 * (g == i) for g in gen for i in imp])
    assert result.auc == pytest.approx(auc, abs=1e-9)
    assert 0 < min(result.roc_fpr) and max(result.roc_fpr) == 1.0
    assert result.roc_tpr == sorted(result.roc_tpr)


def test_batch_size_does_not_change_the_result(fixture: IJBFixture, model: torch.nn.Module) -> None:
    """Catches a streaming bug: a last partial batch dropped or a batch's rows added to the wrong templates."""
    a = evaluate_ijb(model, fixture.root, image_size=SIZE, batch_size=7, num_workers=1)
    b = evaluate_ijb(model, fixture.root, image_size=SIZE, batch_size=1000, num_workers=3)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_pair_file_parsed_in_blocks(fixture: IJBFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a pair split across two read blocks being lost or mangled (the pair file is read 16 MiB at a time;
    here 50 bytes)."""
    meta = read_ijb_meta(fixture.root)
    path = fixture.root / "meta" / "ijbc_template_pair_label.txt"
    whole = read_template_pairs(path, meta.template_ids)
    monkeypatch.setattr("offloadfr.eval.ijb._PAIR_BLOCK", 50)
    blocks = read_template_pairs(path, meta.template_ids)
    for x, y in zip(whole, blocks, strict=True):
        np.testing.assert_array_equal(x, y)
    rows = meta.template_ids[whole[0]], meta.template_ids[whole[1]]
    assert [(int(a), int(b)) for a, b in zip(*rows, strict=True)] == [(a, b) for a, b, _ in fixture.pairs]


def _copy(fx: IJBFixture, dest: Path) -> Path:
    import shutil

    shutil.copytree(fx.root, dest)
    return dest


def test_bad_layouts(fixture: IJBFixture, model: torch.nn.Module, tmp_path: Path) -> None:
    """Catches a broken layout failing late (after embedding) or with a traceback instead of a clear error: each
    is found before the first image is embedded, and names the file and line."""
    meta = tmp_path / "missing" / "meta"
    _copy(fixture, tmp_path / "missing")
    (meta / "ijbc_face_tid_mid.txt").unlink()
    with pytest.raises(DataNotFoundError, match="ijbc_face_tid_mid.txt does not exist"):
        evaluate_ijb(model, tmp_path / "missing", image_size=SIZE)

    root = _copy(fixture, tmp_path / "fields")
    lines = (root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()
    lines[4] = " ".join(lines[4].split()[:-1])
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 5: 11 fields; expected 12"):
        evaluate_ijb(model, root, image_size=SIZE)

    root = _copy(fixture, tmp_path / "pairs")
    with open(root / "meta" / "ijbc_template_pair_label.txt", "a") as f:
        f.write("1 2\n")
    n = len(fixture.pairs) + 1
    with pytest.raises(DataError, match=rf"line {n}: '1 2'; expected three integers"):
        evaluate_ijb(model, root, image_size=SIZE)

    root = _copy(fixture, tmp_path / "unknown")
    with open(root / "meta" / "ijbc_template_pair_label.txt", "a") as f:
        f.write(f"{fixture.template[0]} 123456789 0\n")
    with pytest.raises(DataError, match=rf"line {n}: template 123456789 has no image"):
        evaluate_ijb(model, root, image_size=SIZE)

    root = _copy(fixture, tmp_path / "gone")
    (root / "loose_crop" / fixture.names[3]).unlink()
    with pytest.raises(DataNotFoundError, match=r"1 images .* are missing"):
        evaluate_ijb(model, root, image_size=SIZE)

    root = _copy(fixture, tmp_path / "corrupt")
    (root / "loose_crop" / fixture.names[-1]).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"{fixture.names[-1]} \(line {len(fixture.names)} of "
                                        r"ijbc_name_5pts_score.txt\) cannot be decoded"):
        evaluate_ijb(model, root, image_size=SIZE, batch_size=8)


def test_cli_eval_ijb_writes_eval_json_and_plots(fixture: IJBFixture, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Catches `offloadfr eval --ijb` not reaching the evaluator, an eval.json that `offloadfr plot` and
    `offloadfr inspect run` cannot read, or a run config's eval.ijb ignored at the end of training."""
    sets = []
    for kv in [f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'runs'}", "run.name=r",
               "synth.num_identities=16", "synth.num_holdout=6", "synth.num_pairs=20", "synth.min_images=3",
               "synth.max_images=8", "synth.mean_images=5.0", "synth.samples_per_shard=30", "data.num_workers=0",
               "train.batch_size=8", "train.max_steps=2", f"eval.ijb={fixture.root}", "eval.ijb_protocol=IJBC"]:
        sets += ["--set", kv]
    assert main(["train", *sets]) == 0
    assert "IJBC: TAR@FAR=1e-6" in capsys.readouterr().out
    run = tmp_path / "runs" / "r"
    packs = json.loads((run / "eval.json").read_text())["packs"]
    assert [("accuracy" in p, p.get("protocol")) for p in packs] == [(True, None), (False, "IJBC")]

    assert main(["eval", "--checkpoint", str(run), "--ijb", str(fixture.root), "--protocol", "IJBC",
                 "--no-detector-score"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row["tar_at_far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
    assert row["options"]["detector_score"] is False and row["num_pairs"] == len(fixture.pairs)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["protocol"] == "IJBC" and len(ev["roc"]["fpr"]) == len(ev["roc"]["tpr"]) > 5
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "roc.png").is_file()
    assert main(["inspect", "run", str(run)]) == 0
    assert "eval (IJBC" in capsys.readouterr().out
