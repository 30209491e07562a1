"""Converters (image folder, InsightFace RecordIO) and the pure-Python RecordIO reader/writer they rely on."""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from PIL import Image

from offloadfr.config import DataCfg, load_config
from offloadfr.data.convert_folder import IDENTITIES_NAME, convert_folder
from offloadfr.data.convert_rec import convert_rec
from offloadfr.data.convert_writer import CONVERT_NAME, ConvertSummary
from offloadfr.data.loader import build_train_loader
from offloadfr.data.recordio import (
    MAGIC,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    frame,
    header_size,
    pack,
    unpack,
    write_face_rec,
    write_property,
)
from offloadfr.data.shards import read_index
from offloadfr.errors import DataError, DataNotFoundError
from offloadfr.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
Folder = tuple[Path, dict[str, list[bytes]]]
Converted = tuple[Path, ConvertSummary]
M = struct.pack("<I", MAGIC)


def _image(rng: np.random.Generator, fmt: str = "JPEG", size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _jpeg_with_magic(rng: np.random.Generator) -> bytes:
    """A valid JPEG whose COM segment holds the RecordIO magic 8 bytes in, 4-aligned inside a record whose
    header is 24 or 32 bytes: the writer must split that record into parts."""
    jpeg = _image(rng)
    comment = b"xx" + M + b"yy"
    return jpeg[:2] + b"\xff\xfe" + (2 + len(comment)).to_bytes(2, "big") + comment + jpeg[2:]


def _stored(out: Path) -> dict[int, list[bytes]]:
    """id -> the image bytes of its samples in key order, checking keys and cls members on the way."""
    found: dict[int, list[bytes]] = {}
    for shard in read_index(out).shards:
        with tarfile.open(shard.path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        for name, data in members.items():
            if name.endswith(".jpg"):
                identity, n = int(name[:9]), int(name[10:14])
                assert members[name[:-4] + ".cls"] == str(identity).encode()
                assert n == len(found.setdefault(identity, []))  # keys 0, 1, ... in member order
                found[identity].append(data)
    return found


def _one_epoch_labels(out: Path, image_size: int = 16) -> tuple[Counter[int], int]:
    cfg = DataCfg(path=str(out), generate_if_missing=False, num_workers=0, shuffle_buffer=8, sampler="instance")
    loader = build_train_loader(cfg, image_size=image_size, batch_size=1, seed=0, epoch=0)
    labels: Counter[int] = Counter()
    for images_u8, lab in loader:
        assert images_u8.shape == (1, 3, image_size, image_size)
        labels[int(lab[0])] += 1
    return labels, loader.num_skipped


# ------------------------------------------------------------------------------------------------ image folders


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Folder:
    """ROOT with alice (3 jpg), bob (2 jpg + 1 png), carol (2 jpg, 1 garbage, 1 truncated), dave (4 jpg), an empty
    folder, erin (only a garbage file), plus files that must be ignored. Returns ROOT and name -> good images."""
    root = tmp_path_factory.mktemp("folder") / "faces"
    rng = np.random.default_rng(0)
    good: dict[str, list[bytes]] = {}
    files = {
        "alice": {"a0.jpg": _image(rng), "a1.jpg": _image(rng), "a2.jpeg": _image(rng)},
        "bob": {"b0.jpg": _image(rng), "b1.png": _image(rng, "PNG"), "b2.JPG": _image(rng)},
        "carol": {"c0.jpg": _image(rng), "c1.jpg": _image(rng), "c2_broken.jpg": b"this is not an image",
                  "c3_trunc.jpg": _image(rng)[:-60]},
        "dave": {f"d{i}.jpg": _image(rng) for i in range(4)},
        "empty": {"notes.txt": b"no images here"},
        "erin": {"bad.png": b"\x89PNG garbage"},
        ".hidden": {"h.jpg": _image(rng)},
    }
    for name, entries in files.items():
        (root / name).mkdir(parents=True)
        for fname, data in entries.items():
            (root / name / fname).write_bytes(data)
        good[name] = [entries[f] for f in sorted(entries) if not any(t in f for t in ("broken", "trunc", "bad"))
                      and f.lower().endswith((".jpg", ".jpeg", ".png"))]
    (root / "readme.txt").write_text("ignored")
    (root / "alice" / "nested").mkdir()
    (root / "alice" / "nested" / "x.jpg").write_bytes(_image(rng))
    return root, good


@pytest.fixture(scope="module")
def folder_ds(folder: Folder, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    out = tmp_path_factory.mktemp("folder_ds") / "ds"
    return out, convert_folder(folder[0], out, samples_per_shard=4, progress=False)


def test_folder_ids_counts_and_bytes(folder: Folder, folder_ds: Converted) -> None:
    """Catches ids not following sorted folder names, empty or hidden folders getting ids, re-encoded images (a PNG
    turned into JPEG), corrupt images stored or not counted, and a wrong summary."""
    root, good = folder
    out, summary = folder_ds
    mapping = json.loads((out / IDENTITIES_NAME).read_text())
    assert mapping == {"alice": 0, "bob": 1, "carol": 2, "dave": 3, "erin": 4}
    assert (summary.num_classes, summary.num_identities, summary.num_images, summary.num_skipped) == (5, 4, 12, 3)
    index = read_index(out)
    assert index.num_classes == 5 and index.num_samples == 12 and index.image_size == 16
    assert summary.num_shards == len(index.shards) >= 2 and summary.num_reused == 0
    stored = _stored(out)
    assert stored == {mapping[name]: good[name] for name in ("alice", "bob", "carol", "dave")}
    assert stored[1][1].startswith(b"\x89PNG")  # copied, not re-encoded
    assert "4 identities" in str(summary) and "3 skipped" in str(summary)
    assert json.loads((out / CONVERT_NAME).read_text())["source"] == "folder"


def test_header_check_keeps_what_only_decoding_rejects(folder: Folder, tmp_path: Path) -> None:
    """Catches the check modes being swapped or ignored: 'header' passes a truncated JPEG that 'decode' rejects."""
    summary = convert_folder(folder[0], tmp_path / "ds", samples_per_shard=4, check="header", progress=False)
    assert (summary.num_images, summary.num_skipped) == (13, 2)


def test_loader_reads_converted_folder(folder_ds: Converted) -> None:
    """Catches converted shards the training loader cannot read (PNG bytes under the jpg member, keys, cls):
    one epoch yields every image once with its label and no decode failure."""
    out, _ = folder_ds
    labels, num_skipped = _one_epoch_labels(out)
    assert labels == Counter({0: 3, 1: 3, 2: 2, 3: 4}) and num_skipped == 0


def test_resume_rewrites_only_the_missing_shard(folder: Folder, tmp_path: Path) -> None:
    """Catches a re-run that rewrites finished shards, misses the deleted one, writes it differently, leaves the
    scratch of an interrupted run behind, or writes another index.json."""
    out = tmp_path / "ds"
    first = convert_folder(folder[0], out, samples_per_shard=4, progress=False)
    shards = sorted((out / "shards").glob("*.tar"))
    before = {p.name: p.stat() for p in shards}
    victim = shards[1]
    victim_bytes = victim.read_bytes()
    index_bytes = (out / "index.json").read_bytes()
    victim.unlink()
    (out / "index.json").unlink()
    (out / ".convert-work" / "shard-000001").mkdir(parents=True)  # an interrupted run's scratch
    (out / ".convert-work" / "shard-000001" / "junk.tmp").write_bytes(b"x")

    again = convert_folder(folder[0], out, samples_per_shard=4, progress=False)
    assert again.num_reused == first.num_shards - 1
    for p in shards:
        if p != victim:
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == (before[p.name].st_ino, before[p.name].st_mtime_ns)
    assert victim.read_bytes() == victim_bytes
    assert (out / "index.json").read_bytes() == index_bytes
    assert not (out / ".convert-work").exists()
    assert (again.num_images, again.num_skipped) == (first.num_images, first.num_skipped)


def test_worker_processes_write_the_same_bytes(folder: Folder, folder_ds: Converted, tmp_path: Path) -> None:
    """Catches output that depends on the number of worker processes (shard content, order, index.json), and
    sources that do not survive pickling into spawned workers."""
    out, summary = folder_ds
    par = convert_folder(folder[0], tmp_path / "ds", samples_per_shard=4, num_workers=2, progress=False)
    assert (par.num_images, par.num_skipped, par.num_shards) == (summary.num_images, summary.num_skipped,
                                                                 summary.num_shards)
    for name in ["index.json", *(f"shards/{p.name}" for p in (out / "shards").glob("*.tar"))]:
        assert (tmp_path / "ds" / name).read_bytes() == (out / name).read_bytes(), name


def test_refuses_foreign_or_mismatched_output(folder: Folder, folder_ds: Converted, tmp_path: Path) -> None:
    """Catches a resume that mixes shards of two different conversions, or writing into an unrelated directory."""
    out, _ = folder_ds
    with pytest.raises(DataError, match="other input or options"):
        convert_folder(folder[0], out, samples_per_shard=4, seed=1, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        convert_folder(folder[0], tmp_path / "busy", progress=False)
    with pytest.raises(DataNotFoundError):
        convert_folder(tmp_path / "missing", tmp_path / "o1", progress=False)
    (tmp_path / "noimg" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no identity"):
        convert_folder(tmp_path / "noimg", tmp_path / "o2", progress=False)


def test_train_on_converted_folder(folder_ds: Converted, tmp_path: Path) -> None:
    """Catches a converted dataset the trainer cannot use end to end (index, num_classes, loader, checkpoint)."""
    out, _ = folder_ds
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={out}", "data.generate_if_missing=false", "data.num_workers=0", f"run.output_dir={tmp_path}",
        "run.name=conv", "model.backbone=tiny", "model.image_size=32", "train.epochs=2", "train.batch_size=4",
        "train.warmup_steps=0", "train.log_every=1", "eval.at_end=false",
    ])
    result = train(cfg)
    assert result.steps == 2 * (12 // 4)
    assert (result.checkpoint / "state.pt").is_file()


# --------------------------------------------------------------------------------------------------- RecordIO


def _part(cflag: int, data: bytes) -> bytes:
    return M + struct.pack("<I", cflag << 29 | len(data)) + data + b"\0" * (-len(data) % 4)


def test_frame_matches_dmlc_writer() -> None:
    """Catches framing that differs from dmlc's RecordIOWriter (byte order, padding, cflag, where records split):
    expected bytes are written out by hand from recordio.h."""
    assert frame(b"abcde") == _part(0, b"abcde")
    assert frame(b"AAAA" + M + b"BB") == _part(1, b"AAAA") + _part(3, b"BB")
    assert frame(M + b"xy") == _part(1, b"") + _part(3, b"xy")
    assert frame(b"AAAA" + M + b"BBBB" + M + b"C") == _part(1, b"AAAA") + _part(2, b"BBBB") + _part(3, b"C")
    assert frame(b"A" + M + b"xyz") == _part(0, b"A" + M + b"xyz")  # unaligned magic stays inside
    assert frame(b"ABCDE" + M) == _part(0, b"ABCDE" + M)  # magic at byte 5: unaligned, not split
    assert frame(b"ABCD" + M) == _part(1, b"ABCD") + _part(3, b"")


def test_reader_joins_parts_and_finds_keys(tmp_path: Path) -> None:
    """Catches a reader that loses the magic between parts, mis-skips padding, or maps keys to wrong offsets."""
    records = {5: b"abcde", 9: b"AAAA" + M + b"BBBB" + M + b"C", 2: M, 7: b""}
    with RecordIOWriter(tmp_path / "t.rec", tmp_path / "t.idx") as w:
        for key, rec in records.items():
            w.write(key, rec)
    with RecordIOReader(tmp_path / "t.rec", tmp_path / "t.idx") as r:
        assert {k: r.read(k) for k in records} == records
        assert [rec for _, rec in r] == list(records.values())
        assert r.lookup(np.array([9, 3, 5])).tolist()[1] == -1 and not r.has_key(3)
        head, length = r.read_head(r.offset_of(9), 6)
        assert (head, length) == ((b"AAAA" + M)[:6], len(records[9]))
    assert (tmp_path / "t.idx").read_text().splitlines()[0] == "5\t0"


def test_reader_errors(tmp_path: Path) -> None:
    """Catches silent garbage on a corrupt .rec (bad magic, truncation) and unclear errors on missing files."""
    (tmp_path / "a.rec").write_bytes(frame(b"hello world"))
    with RecordIOReader(tmp_path / "a.rec") as r:
        with pytest.raises(DataError, match="bad magic"):
            r.read_at(4)
    (tmp_path / "b.rec").write_bytes(frame(b"hello world")[:10])
    with RecordIOReader(tmp_path / "b.rec") as r, pytest.raises(DataError, match="truncated"):
        r.read_at(0)
    with pytest.raises(DataNotFoundError):
        RecordIOReader(tmp_path / "a.rec", tmp_path / "missing.idx")
    (tmp_path / "bad.idx").write_text("0 zero\n")
    with pytest.raises(DataError, match="key<TAB>offset"):
        RecordIOReader(tmp_path / "a.rec", tmp_path / "bad.idx")


def test_pack_unpack_match_mxnet_struct() -> None:
    """Catches a header layout that differs from mxnet's native struct (IfQQ / IdQQ with padding) or lost labels."""
    assert header_size("float32") == struct.calcsize("IfQQ") == 24
    assert header_size("float64") == struct.calcsize("IdQQ") == 32
    rec = pack(IRHeader(0, 7.0, 3, 0), b"img")
    assert rec == struct.pack("IfQQ", 0, 7.0, 3, 0) + b"img"
    assert unpack(rec) == (IRHeader(0, 7.0, 3, 0), b"img")
    multi = pack(IRHeader(0, (4.0, 0.25), 1, 0), b"img")
    assert multi == struct.pack("IfQQ", 2, 0.0, 1, 0) + struct.pack("<ff", 4.0, 0.25) + b"img"
    header, payload = unpack(multi)
    assert header.class_label == 4.0 and header.flag == 2 and payload == b"img"
    wide = pack(IRHeader(0, (2.0**30 + 1, 5.0), 1, 0), b"", label_dtype="float64")
    assert wide[:32] == struct.pack("IdQQ", 2, 0.0, 1, 0)
    assert unpack(wide, label_dtype="float64")[0].label == (2.0**30 + 1, 5.0)
    with pytest.raises(DataError):
        unpack(b"short")


def _rec_samples(rng: np.random.Generator) -> list[tuple[int | tuple[float, ...], bytes]]:
    """5 identities with 3, 1, 4, 2, 3 images: one record must be split (magic in a JPEG comment), one is a
    corrupt image, one has a multi-label header."""
    samples: list[tuple[int | tuple[float, ...], bytes]] = []
    for identity, count in enumerate([3, 1, 4, 2, 3]):
        for n in range(count):
            if (identity, n) == (2, 1):
                samples.append((identity, _jpeg_with_magic(rng)))
            elif (identity, n) == (3, 0):
                samples.append((identity, b"\xff\xd8\xff\xe0" + b"\0" * 20))  # JPEG magic, then garbage
            elif (identity, n) == (4, 2):
                samples.append(((4.0, 0.5), _image(rng)))
            else:
                samples.append((identity, _image(rng)))
    return samples


@pytest.mark.parametrize(("layout", "label_dtype"), [("ranges", "float32"), ("labels", "float32"),
                                                     ("labels", "float64")])
def test_convert_rec(layout: Literal["ranges", "labels"], label_dtype: Literal["float32", "float64"],
                     tmp_path: Path) -> None:
    """Catches wrong layout detection, wrong ids, images grouped or ordered wrongly, multi-part or multi-label
    records mangled, corrupt images not skipped or counted, bytes re-encoded, a completed output not reused on a
    re-run, and converted shards the loader cannot read."""
    rng = np.random.default_rng(1)
    samples = _rec_samples(rng)
    if layout == "labels":  # records in a shuffled order: the converter has to group them
        samples = [samples[i] for i in rng.permutation(len(samples))]
    pack_dir = write_face_rec(tmp_path / "pack", samples, layout=layout, image_size=(16, 16), label_dtype=label_dtype)
    raw = (pack_dir / "train.rec").read_bytes()
    num_records = len((pack_dir / "train.idx").read_text().splitlines())
    assert raw.count(M) > num_records  # the fixture really holds a split record

    path = pack_dir if layout == "ranges" else pack_dir / "train.rec"
    out = tmp_path / "ds"
    summary = convert_rec(path, out, samples_per_shard=4, label_dtype=label_dtype, progress=False)
    assert read_index(out).meta["layout"] == layout
    assert (summary.num_classes, summary.num_identities, summary.num_images, summary.num_skipped) == (5, 5, 12, 1)
    expected: dict[int, list[bytes]] = {}
    for label, img in samples:
        if not img.endswith(b"\0" * 20):
            expected.setdefault(label if isinstance(label, int) else int(label[0]), []).append(img)
    assert _stored(out) == expected
    labels, num_skipped = _one_epoch_labels(out)
    assert labels == Counter({0: 3, 1: 1, 2: 4, 3: 1, 4: 3}) and num_skipped == 0

    index_bytes = (out / "index.json").read_bytes()
    again = convert_rec(path, out, samples_per_shard=4, label_dtype=label_dtype, progress=False)
    assert again.num_reused == summary.num_shards and (out / "index.json").read_bytes() == index_bytes


def test_rec_ranges_label_mismatch_and_property_checks(tmp_path: Path) -> None:
    """Catches identity ranges silently overriding contradicting image labels, labels beyond the property class
    count accepted, and a pack without property file not handled (num_classes from labels, size probed)."""
    rng = np.random.default_rng(2)
    a, b = _image(rng), _image(rng)
    pack_dir = tmp_path / "pack"
    pack_dir.mkdir()
    with RecordIOWriter(pack_dir / "train.rec", pack_dir / "train.idx") as w:
        w.write(0, pack(IRHeader(0, (3.0, 4.0), 0, 0), b""))  # header: identity records at keys 3..3
        w.write(1, pack(IRHeader(0, 0.0, 1, 0), a))
        w.write(2, pack(IRHeader(0, 7.0, 2, 0), b))  # in identity 0's range, but labelled 7
        w.write(3, pack(IRHeader(0, (1.0, 3.0), 3, 0), b""))
    with pytest.raises(DataError, match="layout 'labels'"):
        convert_rec(pack_dir, tmp_path / "o1", progress=False)
    summary = convert_rec(pack_dir, tmp_path / "o2", layout="labels", progress=False)
    assert (summary.num_classes, summary.num_identities, summary.num_images) == (8, 2, 2)
    assert _stored(tmp_path / "o2") == {0: [a], 7: [b]} and read_index(tmp_path / "o2").image_size == 16
    write_property(pack_dir / "property", 5, 16, 16)
    with pytest.raises(DataError, match="property"):
        convert_rec(pack_dir, tmp_path / "o3", layout="labels", progress=False)


def test_train_on_converted_rec(tmp_path: Path) -> None:
    """Catches a dataset converted from RecordIO that the trainer cannot use end to end (ids from the pack's labels,
    num_classes from `property`, loader, checkpoint), with the P×K identity sampler on top."""
    samples = _rec_samples(np.random.default_rng(2))
    pack_dir = write_face_rec(tmp_path / "pack", samples, layout="ranges", image_size=(16, 16))
    out = tmp_path / "ds"
    summary = convert_rec(pack_dir, out, samples_per_shard=4, progress=False)
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={out}", "data.generate_if_missing=false", "data.num_workers=0", "data.sampler='identity'",
        "data.images_per_identity=2", f"run.output_dir={tmp_path}", "run.name=rec", "model.image_size=16",
        "train.epochs=2", "train.batch_size=4", "train.warmup_steps=0", "train.log_every=1", "eval.at_end=false",
    ])
    result = train(cfg)
    assert result.steps == 2 * (summary.num_identities // 2)  # identity epochs: 2 identities per batch
    assert (result.checkpoint / "state.pt").is_file()
