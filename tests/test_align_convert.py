"""Alignment while converting (offloadfr/data/detect.py, convert_align.py; ``offloadfr convert folder --align``), on
the 60 raw CelebA photos of ../shared/data/celeba-subset/raw.

The eye check uses a second landmark estimate made by other code: dlib's HOG detector and 5-point shape predictor,
run once on the raw photos (tests/data/celeba_raw_dlib_eyes.json says how). Its eye centres, carried by the similarity
that our landmarks give, must land within a few pixels of the template's eyes.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("yuface", reason="the face detector is the optional extra: pip install 'offloadfr[align]'")

from offloadfr.data.align import ARCFACE_TEMPLATE_112, align_face, estimate_similarity  # noqa: E402
from offloadfr.data.convert_align import ALIGN_REPORT_NAME, AligningSource, AlignOptions  # noqa: E402
from offloadfr.data.convert_folder import convert_folder  # noqa: E402
from offloadfr.data.detect import FaceDetector, pick_face  # noqa: E402
from offloadfr.data.shards import read_index  # noqa: E402
from offloadfr.errors import DataError  # noqa: E402

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba-subset" / "raw"
DLIB_EYES = Path(__file__).resolve().parent / "data" / "celeba_raw_dlib_eyes.json"
pytestmark = pytest.mark.skipif(not (RAW / "identities.txt").is_file(), reason=f"no raw CelebA photos at {RAW}")


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def _raw_photos() -> list[Path]:
    return sorted(RAW.glob("*.jpg"))


def test_faces_found_and_eyes_match_a_second_estimate(detector: FaceDetector) -> None:
    """Catches swapped or misordered landmarks, a wrong map back from the scaled-down detection image (a shift or
    scale of every landmark), or a wrong face of a group photo (e.g. an overflowing int16 box area): dlib's eyes,
    carried into the aligned crop, would then miss the template's eyes by far more than a few pixels."""
    eyes = json.loads(DLIB_EYES.read_text())["eyes"]
    found, dist = 0, []
    for path in _raw_photos():
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        face = pick_face(detector.detect(rgb), rgb.size, "largest")
        if face is None:
            continue
        found += 1
        if path.name in eyes:
            m = estimate_similarity(face.landmarks_5x2, ARCFACE_TEMPLATE_112)
            dlib_in_crop = np.asarray(eyes[path.name]) @ m[:, :2].T + m[:, 2]
            dist.append(np.linalg.norm(dlib_in_crop - ARCFACE_TEMPLATE_112[:2], axis=1))
    assert found >= 58, f"faces found in {found} of 60 raw photos (measured: 60)"
    d = np.asarray(dist)
    assert len(d) >= 54
    # measured: median 3.4 px, 90th percentile 6.5 px, worst 12.5 px (112 x 112 crop, eye distance ~35 px); part of
    # it is the five-point fit itself, which never puts the eyes exactly on the template
    assert np.median(d) < 5.0 and np.percentile(d, 90) < 8.0 and d.max() < 16.0, (np.median(d), d.max())


def test_center_choice_picks_the_centred_face(detector: FaceDetector) -> None:
    """Catches ``--face center`` choosing by size (or ``largest`` by position): a large face off-centre and a small
    face in the centre of one canvas."""
    with Image.open(RAW / "001571.jpg") as im:
        src = im.convert("RGB")
    face = pick_face(detector.detect(src), src.size, "largest")
    assert face is not None
    x, y, w, h = (int(v) for v in face.box_xywh)
    crop = src.crop((max(0, x - w // 2), max(0, y - h // 2), x + w + w // 2, y + h + h // 2))
    canvas = Image.new("RGB", (900, 600), (90, 90, 90))
    big = crop.resize((crop.width * 2, crop.height * 2))
    canvas.paste(big, (0, 0))
    small = crop.resize((crop.width, crop.height))
    canvas.paste(small, ((900 - small.width) // 2, (600 - small.height) // 2))
    faces = detector.detect(canvas)
    assert len(faces) >= 2
    largest, centred = pick_face(faces, canvas.size, "largest"), pick_face(faces, canvas.size, "center")
    assert largest is not None and centred is not None
    assert largest.box_xywh[0] < 300 and centred.box_xywh[0] > 300
    assert largest.area > 2 * centred.area


def _folder(root: Path, num_identities: int = 5, per_identity: int = 2) -> dict[str, list[str]]:
    """``root/<id>/`` with raw photos of that identity, plus a face-less image in each identity and one file that is
    not an image; returns identity -> file names."""
    by_id: dict[str, list[str]] = {}
    for line in (RAW / "identities.txt").read_text().split("\n"):
        if line.strip():
            name, ident = line.split()
            by_id.setdefault(ident, []).append(name)
    chosen = [k for k in sorted(by_id) if len(by_id[k]) >= per_identity][:num_identities]
    out = {}
    for k, ident in enumerate(chosen):
        (root / ident).mkdir(parents=True)
        for name in by_id[ident][:per_identity]:
            shutil.copy(RAW / name, root / ident / name)
        Image.new("RGB", (160 + k, 160), (120, 120, 120)).save(root / ident / "zz_blank.jpg")  # no face
        out[ident] = sorted(by_id[ident][:per_identity]) + ["zz_blank.jpg"]
    (root / chosen[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out[chosen[0]] = sorted(out[chosen[0]] + ["broken.jpg"])
    return out


def _members(out: Path) -> dict[str, bytes]:
    found = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                f = tar.extractfile(info)
                assert f is not None
                found[info.name] = f.read()
    return found


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("rawfolder")
    listing = _folder(root)
    out = tmp_path_factory.mktemp("aligned") / "ds"
    summary = convert_folder(root, out, samples_per_shard=3, align=AlignOptions(), num_workers=2, progress=False)
    assert summary.num_skipped == len(listing) + 1  # one blank per identity and the broken file
    return root, out, listing


def test_convert_align_stores_aligned_crops(converted: tuple[Path, Path, dict[str, list[str]]],
                                            detector: FaceDetector) -> None:
    """Catches the converter copying the original bytes, aligning another face than the detector's largest, or a
    worker process aligning differently from this one: each stored image is the 112 x 112 crop that align_face
    makes from the detected landmarks."""
    root, out, listing = converted
    index = read_index(out)
    assert index.image_size == 112
    mapping = json.loads((out / "identities.json").read_text())
    members = _members(out)
    num_checked = 0
    for ident, files in listing.items():
        faces_files = [f for f in files if f not in ("zz_blank.jpg", "broken.jpg")]
        for n, name in enumerate(faces_files):
            stored = Image.open(io.BytesIO(members[f"{mapping[ident]:09d}/{n:04d}.jpg"])).convert("RGB")
            assert stored.size == (112, 112)
            with Image.open(root / ident / name) as im:
                rgb = im.convert("RGB")
            face = pick_face(detector.detect(rgb), rgb.size, "largest")
            assert face is not None
            want = align_face(rgb, face.landmarks_5x2).astype(np.int16)
            assert np.abs(np.asarray(stored, dtype=np.int16) - want).mean() < 3.0  # JPEG quality 95
            num_checked += 1
    assert num_checked == 10


def test_align_report_lists_the_faceless_images(converted: tuple[Path, Path, dict[str, list[str]]]) -> None:
    """Catches a no-face image that is skipped but not listed (a lost worker log), a report that counts the
    undecodable file as no face, or per-process logs left behind."""
    root, out, listing = converted
    report = json.loads((out / ALIGN_REPORT_NAME).read_text())
    assert report["no_face"] == sorted(str(root / ident / "zz_blank.jpg") for ident in listing)
    assert [r["path"] for r in report["unreadable"]] == [str(root / next(iter(listing)) / "broken.jpg")]
    assert report["num_images"] == sum(len(f) for f in listing.values())
    assert report["num_aligned"] == 10 and report["num_no_face"] == 5 and report["num_unreadable"] == 1
    assert report["detector"].startswith("yuface")
    assert not (out / ".align-log").exists()
    meta = read_index(out).meta
    assert meta["align"]["image_size"] == 112 and meta["num_skipped"] == 6


def test_convert_align_resumes_to_the_same_output(converted: tuple[Path, Path, dict[str, list[str]]],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a resumed aligned conversion that differs from an uninterrupted one: shards not byte-identical, or a
    report missing the no-face images of the shards kept from the interrupted run (their logs must survive)."""
    root, done, _ = converted
    out = tmp_path / "ds"
    read = AligningSource.read
    calls = {"n": 0}

    def interrupted(self: AligningSource, identity: int, ref: object) -> bytes:
        calls["n"] += 1
        if calls["n"] > 8:  # after two of the five shards (three images each)
            raise KeyboardInterrupt
        return read(self, identity, ref)

    monkeypatch.setattr(AligningSource, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_folder(root, out, samples_per_shard=3, align=AlignOptions(), progress=False)
    monkeypatch.setattr(AligningSource, "read", read)
    kept = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert kept and not (out / "index.json").exists() and not (out / ALIGN_REPORT_NAME).exists()
    summary = convert_folder(root, out, samples_per_shard=3, align=AlignOptions(), progress=False)
    assert summary.num_reused == len(kept)
    assert _members(out) == _members(done)
    assert (out / "index.json").read_bytes() == (done / "index.json").read_bytes()
    assert json.loads((out / ALIGN_REPORT_NAME).read_text()) == json.loads((done / ALIGN_REPORT_NAME).read_text())
    with pytest.raises(DataError, match="other input or options"):  # another face choice is another conversion
        convert_folder(root, out, samples_per_shard=3, align=AlignOptions(face="center"), progress=False)


def test_detection_leaves_the_thread_count_as_it_was(detector: FaceDetector) -> None:
    """Catches the detector's one-thread limit (it is much slower with more) leaking into the process: torch's
    OpenMP threads, often the same runtime, must be what they were before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Image.open(RAW / "001571.jpg") as im:
            assert detector.detect(im.convert("RGB"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cli_convert_align(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches the command line not passing --align, --face or --image-size through (or --face accepted without
    --align, where it would be ignored)."""
    from offloadfr.cli import main

    (tmp_path / "raw" / "a").mkdir(parents=True)
    shutil.copy(RAW / "000093.jpg", tmp_path / "raw" / "a" / "1.jpg")  # two faces: the larger one is off-centre
    assert main(["convert", "folder", str(tmp_path / "raw"), str(tmp_path / "out"), "--align", "--face", "center",
                 "--image-size", "96", "--quiet"]) == 0
    assert "1 images, 0 skipped" in capsys.readouterr().out
    assert read_index(tmp_path / "out").image_size == 96
    report = json.loads((tmp_path / "out" / ALIGN_REPORT_NAME).read_text())
    assert report["options"]["face"] == "center" and report["num_several_faces"] == 1
    assert main(["convert", "folder", str(tmp_path / "raw"), str(tmp_path / "out2"), "--face", "center"]) == 2
    assert "add --align" in capsys.readouterr().err
