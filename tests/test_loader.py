"""The training loader: exact batch counts, disjoint ranks, reproducible order, flips, errors, corrupt samples."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offloadfr.config import DataCfg, SynthCfg
from offloadfr.data.loader import build_train_loader
from offloadfr.data.shards import read_index
from offloadfr.data.synth import generate_synthetic
from offloadfr.errors import ConfigError, DataNotFoundError

# 37 identities (uneven over 2 ranks), about 5 images each, about 6 shards.
CFG = SynthCfg(num_identities=37, num_holdout=4, image_size=16, seed=1, min_images=2, max_images=12,
               mean_images=5.0, num_pairs=20, samples_per_shard=30)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loader") / "ds"
    generate_synthetic(out, CFG, progress=False)
    return out


def _cfg(path: Path, *, num_workers: int = 2, shuffle_buffer: int = 64) -> DataCfg:
    return DataCfg(path=str(path), generate_if_missing=False, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                   sampler="instance")


def _stored_images(path: Path) -> dict[bytes, tuple[str, int]]:
    """Decoded pixels of every stored sample -> (key, label)."""
    out = {}
    for shard in read_index(path).shards:
        with tarfile.open(shard.path) as tar:
            for info in tar.getmembers():
                if info.name.endswith(".jpg"):
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    with Image.open(io.BytesIO(data)) as im:
                        out[np.asarray(im.convert("RGB")).tobytes()] = (info.name[:-4], int(info.name[:9]))
    return out


def _sample_keys(images_u8: torch.Tensor, labels: torch.Tensor, stored: dict[bytes, tuple[str, int]]
                 ) -> list[tuple[str, bool]]:
    """Maps each loaded image back to its stored sample key, and whether it came flipped."""
    out = []
    for img, label in zip(images_u8.permute(0, 2, 3, 1).numpy(), labels.tolist(), strict=True):
        if img.tobytes() in stored:
            key, flipped = stored[img.tobytes()][0], False
        else:
            key, flipped = stored[np.ascontiguousarray(img[:, ::-1]).tobytes()][0], True
        assert int(key[:9]) == label
        out.append((key, flipped))
    return out


def test_exact_steps_per_epoch_and_batch_shapes(dataset: Path) -> None:
    """Catches ragged last batches, a step count that is not num_samples // (B * world), or wrong dtypes/shapes."""
    num_samples = read_index(dataset).num_samples
    for batch_size, num_workers in ((8, 2), (7, 0), (num_samples, 2)):
        loader = build_train_loader(_cfg(dataset, num_workers=num_workers), image_size=16, batch_size=batch_size,
                                    seed=0, epoch=0)
        batches = list(loader)
        assert len(loader) == len(batches) == num_samples // batch_size
        assert loader.num_classes == CFG.num_identities
        for images_u8, labels in batches:
            assert images_u8.shape == (batch_size, 3, 16, 16) and images_u8.dtype == torch.uint8
            assert labels.shape == (batch_size,) and labels.dtype == torch.int64
            assert 0 <= int(labels.min()) and int(labels.max()) < CFG.num_identities


def test_two_ranks_two_workers_read_disjoint_samples(dataset: Path) -> None:
    """Catches ranks or workers reading the same sample, a rank with fewer batches (a hang in DDP), or a sample
    read twice within an epoch."""
    stored = _stored_images(dataset)
    num_samples = read_index(dataset).num_samples
    batch_size, world_size = 6, 2
    keys_per_rank = []
    for rank in range(world_size):
        loader = build_train_loader(_cfg(dataset), image_size=16, batch_size=batch_size, seed=5, epoch=0, rank=rank,
                                    world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader) == num_samples // (batch_size * world_size)
        keys_per_rank.append([k for images_u8, labels in batches for k, _ in _sample_keys(images_u8, labels, stored)])
    k0, k1 = (set(k) for k in keys_per_rank)
    assert len(k0) == len(keys_per_rank[0]) and len(k1) == len(keys_per_rank[1])  # no repeats within a rank
    assert not k0 & k1
    assert len(k0 | k1) > num_samples - batch_size * world_size  # drop_last leaves out fewer than B * world


def test_same_seed_and_epoch_replay_other_epoch_reorders(dataset: Path) -> None:
    """Catches unseeded shuffling or flipping, and an epoch argument that does not change the order."""
    def run(seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        loader = build_train_loader(_cfg(dataset), image_size=16, batch_size=8, seed=seed, epoch=epoch)
        batches = list(loader)
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    a_images, a_labels = run(0, 0)
    b_images, b_labels = run(0, 0)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    c_images, c_labels = run(0, 1)
    assert not torch.equal(a_labels, c_labels)
    d_images, d_labels = run(1, 0)
    assert not torch.equal(a_labels, d_labels)


def test_flips_applied_and_identities_mixed(dataset: Path) -> None:
    """Catches missing flip augmentation, and batches that follow the identity-grouped shard order."""
    stored = _stored_images(dataset)
    loader = build_train_loader(_cfg(dataset, num_workers=0, shuffle_buffer=1000), image_size=16, batch_size=16,
                                seed=0, epoch=0)
    flips, changes, total = [], 0, 0
    for images_u8, labels in loader:
        flips += [f for _, f in _sample_keys(images_u8, labels, stored)]
        changes += int((labels[1:] != labels[:-1]).sum())
        total += len(labels) - 1
    assert 0.3 < np.mean(flips) < 0.7
    # Grouped order would change label about once per identity (~1 in 5 samples); shuffled, almost always.
    assert changes / total > 0.8


def test_resizes_to_requested_image_size(dataset: Path) -> None:
    """Catches images passed on at the stored size when the model wants another."""
    images_u8, _ = next(iter(build_train_loader(_cfg(dataset), image_size=24, batch_size=4, seed=0, epoch=0)))
    assert images_u8.shape == (4, 3, 24, 24)


def test_missing_dataset_and_shard_errors(dataset: Path, tmp_path: Path) -> None:
    """Catches unclear failures (a bare FileNotFoundError from a worker) when the dataset or a shard is missing."""
    with pytest.raises(DataNotFoundError, match="offloadfr synth"):
        build_train_loader(_cfg(tmp_path / "nope"), image_size=16, batch_size=4, seed=0, epoch=0)
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / "shards" / "shard-000002.tar").unlink()
    with pytest.raises(DataNotFoundError, match="shard-000002.tar"):
        build_train_loader(_cfg(copy), image_size=16, batch_size=4, seed=0, epoch=0)
    with pytest.raises(ConfigError, match="rank"):
        build_train_loader(_cfg(dataset), image_size=16, batch_size=4, seed=0, epoch=0, rank=2, world_size=2)


def _rewrite_shard(path: Path, corrupt_member: str) -> None:
    """Rewrites a tar with the bytes of one member replaced by garbage."""
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == corrupt_member:
                data = b"\xff\xd8 this is not a jpeg"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_jpeg_and_truncated_shard_are_skipped(dataset: Path, tmp_path: Path) -> None:
    """Catches a crash on one bad image or a truncated tar, a lost batch, and skips that go uncounted."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    index = read_index(copy)
    first = index.shards[0]
    _rewrite_shard(first.path, f"{first.ids[0]:09d}/0001.jpg")
    last = index.shards[-1].path
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # cut mid-member: the rest of this shard is unreadable
    loader = build_train_loader(_cfg(copy), image_size=16, batch_size=5, seed=0, epoch=0)
    batches = list(loader)
    assert len(batches) == len(loader) == index.num_samples // 5
    assert all(images_u8.shape[0] == 5 for images_u8, _ in batches)
    assert loader.num_skipped >= 2  # the bad JPEG and at least one sample of the truncated shard
    assert loader.num_skipped < index.shards[-1].num_samples + 2


def test_data_bench_measures_both_pipelines(dataset: Path) -> None:
    """Catches `launch/bench.py data` timing nothing, or a plain webdataset pipeline that yields another batch layout
    than ours (the bench asserts uint8 (B, 3, S, S) tensors from both)."""
    from offloadfr.bench.data import measure_data_pipelines

    row = measure_data_pipelines(_cfg(dataset), image_size=16, batch_size=8, num_batches=4, rounds=1)
    assert row["num_batches"] == 4 and row["num_workers"] == 2
    assert row["ours_img_per_s"] > 0 and row["plain_img_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["ours_img_per_s"] / row["plain_img_per_s"])
