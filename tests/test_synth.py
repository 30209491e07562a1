"""The synthetic face dataset and the shard format: determinism, index consistency, pairs, atomic output."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offloadfr.config import SynthCfg
from offloadfr.data import synth
from offloadfr.data.pairs import read_pairs_bin
from offloadfr.data.shards import ShardWriter, read_index
from offloadfr.data.synth import generate_synthetic, images_per_identity
from offloadfr.errors import ConfigError, DataError, DataNotFoundError

REPO = Path(__file__).resolve().parent.parent

TINY = SynthCfg(num_identities=20, num_holdout=6, image_size=16, seed=3, min_images=2, max_images=9,
                mean_images=4.0, num_pairs=40, samples_per_shard=25)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tar_samples(path: Path) -> list[tuple[str, dict[str, bytes], tarfile.TarInfo]]:
    """(key, {ext: bytes}, first member header) per sample, in tar order."""
    out: list[tuple[str, dict[str, bytes], tarfile.TarInfo]] = []
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key, ext = info.name.split(".", 1)
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            if not out or out[-1][0] != key:
                out.append((key, {}, info))
            out[-1][1][ext] = data
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_synthetic(out, TINY, progress=False)
    return out


def test_same_seed_gives_byte_identical_files(tiny: Path, tmp_path: Path) -> None:
    """Catches any unseeded randomness, time stamps in tar headers, or dict-order drift in index.json."""
    again = tmp_path / "again"
    generate_synthetic(again, TINY, progress=False)
    a, b = _files(tiny), _files(again)
    assert sorted(a) == sorted(b)
    assert {"index.json", "pairs.bin"} <= set(a) and any(k.startswith("shards/") for k in a)
    for name in a:
        assert a[name] == b[name], name


def test_other_seed_gives_other_data(tiny: Path, tmp_path: Path) -> None:
    """Catches a seed that is ignored by the renderer, the identity order or the pairs."""
    other = tmp_path / "other"
    generate_synthetic(other, dataclasses.replace(TINY, seed=4), progress=False)
    assert (other / "pairs.bin").read_bytes() != (tiny / "pairs.bin").read_bytes()
    assert (other / "shards/shard-000000.tar").read_bytes() != (tiny / "shards/shard-000000.tar").read_bytes()
    assert read_index(other).shards[0].ids != read_index(tiny).shards[0].ids


def test_output_does_not_depend_on_thread_count(tmp_path: Path) -> None:
    """Catches renderer math whose result depends on OMP_NUM_THREADS (e.g. multi-threaded BLAS reductions)."""
    cfg = dataclasses.replace(TINY, num_identities=6, num_pairs=20)
    digests = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}"
        code = ("import sys; from offloadfr.config import SynthCfg; from offloadfr.data.synth import "
                f"generate_synthetic; generate_synthetic(sys.argv[1], SynthCfg(**{dataclasses.asdict(cfg)!r}), "
                "progress=False)")
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, timeout=120)
        digests.append({k: hashlib.sha256(v).hexdigest() for k, v in _files(out).items()})
    assert digests[0] == digests[1]


def test_index_matches_shard_contents(tiny: Path) -> None:
    """Catches an index whose ids, counts or totals disagree with the tars, split identities, or bad keys."""
    index = read_index(tiny)
    assert index.num_classes == TINY.num_identities and index.image_size == TINY.image_size
    seen: list[int] = []
    for shard in index.shards:
        samples = _tar_samples(shard.path)
        assert len(samples) == shard.num_samples == sum(shard.counts)
        ids_in_order = []
        for key, members, info in samples:
            ident, n = key.split("/")
            assert len(ident) == 9 and len(n) == 4
            assert set(members) == {"jpg", "cls"}
            assert int(members["cls"].decode("ascii")) == int(ident)
            with Image.open(io.BytesIO(members["jpg"])) as im:
                assert im.format == "JPEG" and im.size == (TINY.image_size, TINY.image_size)
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)
            if not ids_in_order or ids_in_order[-1] != int(ident):
                ids_in_order.append(int(ident))
        # Identities are contiguous (each appears as one run), in the order and with the counts the index lists.
        assert ids_in_order == list(shard.ids)
        runs = [sum(1 for k, _, _ in samples if int(k.split("/")[0]) == i) for i in shard.ids]
        assert runs == list(shard.counts)
        seen += ids_in_order
    assert sorted(seen) == list(range(TINY.num_identities))  # each id once, in exactly one shard
    assert seen != sorted(seen)  # the identity order was shuffled
    assert index.num_samples == sum(images_per_identity(TINY))
    assert json.loads((tiny / "index.json").read_text())["meta"]["synth"]["seed"] == TINY.seed


def test_images_per_identity_is_long_tailed() -> None:
    """Catches counts outside [min, max], a mean off target, or a flat (not long-tailed) distribution."""
    cfg = SynthCfg(num_identities=5000, min_images=4, max_images=60, mean_images=20.0)
    counts = images_per_identity(cfg)
    assert counts.min() >= 4 and counts.max() <= 60
    assert abs(counts.mean() - 20.0) < 0.5
    assert np.median(counts) < counts.mean() - 2  # right-skewed
    assert (counts >= 50).sum() > 50 and (counts <= 8).sum() > 300


def test_pairs_are_balanced_and_from_held_out_identities(tiny: Path, tmp_path: Path) -> None:
    """Catches a wrong pair count, unbalanced labels or folds, and pair images drawn from training identities."""
    images, issame = read_pairs_bin(tiny / "pairs.bin")
    assert len(issame) == TINY.num_pairs and len(images) == 2 * TINY.num_pairs
    assert sum(issame) == TINY.num_pairs // 2
    for fold in np.array_split(np.asarray(issame), 10):  # the contiguous folds of 10-fold accuracy
        assert 0 < fold.sum() < len(fold)
    assert all(images[2 * i] != images[2 * i + 1] for i in range(len(issame)))  # a same pair is two images
    shard_jpgs = {m["jpg"] for s in read_index(tiny).shards for _, m, _ in _tar_samples(s.path)}
    assert not shard_jpgs & set(images)
    # Held-out identities have their own latents: more training identities leave pairs.bin unchanged.
    more = tmp_path / "more"
    generate_synthetic(more, dataclasses.replace(TINY, num_identities=TINY.num_identities + 5), progress=False)
    assert (more / "pairs.bin").read_bytes() == (tiny / "pairs.bin").read_bytes()


def test_interrupted_generation_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a half-written dataset that looks complete (index.json present) after an interruption."""
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "ds"
    monkeypatch.setattr(synth, "write_pairs_bin", interrupt)  # the last step before index.json and the rename
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(out, TINY, progress=False)
    assert not (out / "index.json").exists()
    assert list(tmp_path.iterdir()) == []  # no partial directory left behind
    monkeypatch.undo()
    generate_synthetic(out, TINY, progress=False)
    assert read_index(out).num_classes == TINY.num_identities


def test_refuses_non_empty_output_and_bad_counts(tiny: Path, tmp_path: Path) -> None:
    """Catches overwriting an existing dataset, and image counts whose mean lies outside [min, max]."""
    with pytest.raises(DataError, match="not an empty directory"):
        generate_synthetic(tiny, TINY, progress=False)
    with pytest.raises(ConfigError, match="mean_images"):
        generate_synthetic(tmp_path / "x", dataclasses.replace(TINY, mean_images=20.0), progress=False)
    with pytest.raises(ConfigError, match="min_images"):
        generate_synthetic(tmp_path / "x", dataclasses.replace(TINY, min_images=10, max_images=5), progress=False)


def test_shard_writer_is_deterministic_and_groups_identities(tmp_path: Path) -> None:
    """Catches non-reproducible tar bytes, identities split across shards, and a repeated id being accepted."""
    def write(root: Path) -> None:
        with ShardWriter(root, samples_per_shard=3) as writer:
            writer.write_identity(5, [b"a", b"b"])
            writer.write_identity(2, [b"c", b"d"])  # shard 0 now holds 4 >= 3 samples: a new shard starts
            writer.write_identity(0, [b"e"])
            with pytest.raises(DataError, match="already written"):
                writer.write_identity(5, [b"f"])
            writer.finish(num_classes=6, image_size=8)

    write(tmp_path / "a")
    write(tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    index = read_index(tmp_path / "a")
    assert [(s.ids, s.counts) for s in index.shards] == [((5, 2), (2, 2)), ((0,), (1,))]
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_read_index_errors(tiny: Path, tmp_path: Path) -> None:
    """Catches unclear errors for a missing directory, index or shard, and an empty dataset being accepted."""
    with pytest.raises(DataNotFoundError, match="offloadfr synth"):
        read_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="index.json"):
        read_index(tmp_path / "empty")
    with ShardWriter(tmp_path / "zero", samples_per_shard=3) as writer:
        with pytest.raises(DataError, match="samples"):
            writer.finish(num_classes=1, image_size=8)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_text((tiny / "index.json").read_text())
    with pytest.raises(DataNotFoundError, match="shard-000000.tar"):
        read_index(broken)
