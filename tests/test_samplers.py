"""Samplers (data.sampler): for each, 2 ranks × 2 DataLoader workers over one epoch give no duplicate and no missing
sample (or the sampler's own invariant), the same steps on every rank, the documented layout and a replayable order;
identity and block batches train through the trainer; corrupt samples are counted into metrics.jsonl.

Ranks are simulated by ``rank``/``world_size`` (the loader does no collective); the DataLoader workers are real
processes."""

from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offloadfr.config import DataCfg, SynthCfg, load_config
from offloadfr.data.loader import TrainLoader, build_train_loader
from offloadfr.data.samplers import SAMPLERS, PlannedDataset
from offloadfr.data.shards import read_index
from offloadfr.data.synth import generate_synthetic
from offloadfr.errors import ConfigError, DataError
from offloadfr.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
# 37 identities (uneven over 2 ranks), 2-12 images each (some fewer than K = 4), about 6 shards.
CFG = SynthCfg(num_identities=37, num_holdout=4, image_size=16, seed=1, min_images=2, max_images=12,
               mean_images=5.0, num_pairs=20, samples_per_shard=30)
WORLD, WORKERS = 2, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("samplers") / "ds"
    generate_synthetic(out, CFG, progress=False)
    return out


@pytest.fixture(scope="module")
def stored(dataset: Path) -> dict[bytes, str]:
    """Decoded pixels of every stored sample (and of its mirror image) -> its key."""
    out = {}
    for shard in read_index(dataset).shards:
        with tarfile.open(shard.path) as tar:
            for info in tar.getmembers():
                if info.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tar.extractfile(info).read())) as im:  # type: ignore[union-attr]
                        rgb = np.asarray(im.convert("RGB"))
                    out[rgb.tobytes()] = out[np.ascontiguousarray(rgb[:, ::-1]).tobytes()] = info.name[:-4]
    return out


def _cfg(path: Path, sampler: str, **kw: object) -> DataCfg:
    return DataCfg(path=str(path), generate_if_missing=False, num_workers=WORKERS, sampler=sampler,  # type: ignore
                   **kw)


def _keys(images_u8: torch.Tensor, stored: dict[bytes, str]) -> list[str]:
    """The stored sample key of each image of (N, 3, S, S)."""
    return [stored[img.tobytes()] for img in images_u8.permute(0, 2, 3, 1).numpy()]


def _epoch(path: Path, sampler: str, *, batch_size: int = 6, seed: int = 0, epoch: int = 0, **kw: object
           ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Both ranks' batches of one epoch."""
    out = []
    for rank in range(WORLD):
        loader = build_train_loader(_cfg(path, sampler, **kw), image_size=16, batch_size=batch_size, seed=seed,
                                    epoch=epoch, rank=rank, world_size=WORLD, block_rows=4, block_window=3)
        batches = list(loader)
        assert len(batches) == len(loader)
        out.append(batches)
    assert len(out[0]) == len(out[1]) > 0, "every rank must take the same number of steps"
    return out


def _all_keys(path: Path) -> set[str]:
    return {f"{i:09d}/{n:04d}" for s in read_index(path).shards for i, c in zip(s.ids, s.counts, strict=True)
            for n in range(c)}


def _check_every_sample_once(keys: list[str], path: Path, per_step: int) -> None:
    everything = _all_keys(path)
    assert len(keys) == len(set(keys)), "a sample was read twice in one epoch"
    assert set(keys) <= everything
    assert len(everything - set(keys)) < per_step * WORLD, "more samples missing than drop_last allows"


@pytest.mark.parametrize("sampler", ["instance", "block"])
def test_instance_and_block_read_every_sample_once(dataset: Path, stored: dict[bytes, str], sampler: str) -> None:
    """Catches a sample read twice or never across 2 ranks × 2 workers, unequal steps per rank, or labels that are
    not the sample's identity."""
    ranks = _epoch(dataset, sampler)
    keys = []
    for batches in ranks:
        for images_u8, labels in batches:
            assert images_u8.shape == (6, 3, 16, 16) and labels.shape == (6,)
            got = _keys(images_u8, stored)
            assert [int(k[:9]) for k in got] == labels.tolist()
            keys += got
    _check_every_sample_once(keys, dataset, 6)


def test_block_batches_come_from_a_window_of_blocks(dataset: Path) -> None:
    """Catches a block order that is not block-aware: with 4 ids per block and a window of 2 blocks, a batch's ids
    must lie in at most window + 2 blocks (uniform order spreads a batch of 6 over ~5 of the 10 blocks)."""
    window = 2

    def blocks_per_batch(sampler: str) -> list[int]:
        return [len(set((labels // 4).tolist())) for batches in _epoch(dataset, sampler, block_window=window)
                for _, labels in batches]

    block = blocks_per_batch("block")
    assert max(block) <= window + 2
    assert np.mean(block) < np.mean(blocks_per_batch("instance")) - 1


def test_identity_batches_are_p_by_k_each_identity_once(dataset: Path, stored: dict[bytes, str]) -> None:
    """Catches an identity twice in an epoch, fewer than P distinct identities in a batch, a group that is not K
    consecutive rows of one identity, or a sample repeated inside a batch when its identity has K or more images."""
    counts = {i: c for s in read_index(dataset).shards for i, c in zip(s.ids, s.counts, strict=True)}
    p, k = 3, 4
    seen: list[int] = []
    for batches in _epoch(dataset, "identity", batch_size=p * k, images_per_identity=k):
        for images_u8, labels in batches:
            assert images_u8.shape == (p * k, 3, 16, 16)
            groups = labels.reshape(p, k)
            assert (groups == groups[:, :1]).all(), "a group of K rows must be one identity"
            ids = groups[:, 0].tolist()
            assert len(set(ids)) == p
            seen += ids
            keys = _keys(images_u8, stored)
            for g, identity in enumerate(ids):
                group = keys[g * k:(g + 1) * k]
                assert all(int(x[:9]) == identity for x in group)
                if counts[identity] >= k:
                    assert len(set(group)) == k, "sample repeated although the identity has K images"
                else:
                    assert len(set(group)) == counts[identity], "an identity with < K images must show all of them"
    assert len(seen) == len(set(seen)), "an identity came twice in one epoch"
    assert len(counts) - len(seen) < p * WORLD, "more identities missing than drop_last allows"


def test_attention_queries_cover_every_sample_once(dataset: Path, stored: dict[bytes, str]) -> None:
    """Catches a query read twice or never, keys of another identity, or a key equal to its query when the identity
    has other images; and checks the (B, 1+k, 3, S, S) layout."""
    b, k = 5, 2
    queries = []
    for batches in _epoch(dataset, "attention", batch_size=b, num_keys=k):
        for images_u8, labels in batches:
            assert images_u8.shape == (b, 1 + k, 3, 16, 16) and labels.shape == (b,)
            for item, label in zip(images_u8, labels.tolist(), strict=True):
                keys = _keys(item, stored)
                assert all(int(x[:9]) == label for x in keys)
                assert keys[0] not in keys[1:], "a key equal to its query (all test identities have >= 2 images)"
                queries.append(keys[0])
    _check_every_sample_once(queries, dataset, b)


def test_attention_keys_include_query_draws_from_all_images(dataset: Path, stored: dict[bytes, str]) -> None:
    """Catches ``data.keys_include_query`` being ignored (no key would ever repeat its query, as every test identity
    has >= 2 images), keys of another identity, or queries no longer covering every sample once."""
    b, k = 5, 2
    queries, repeats, others = [], 0, 0
    for batches in _epoch(dataset, "attention", batch_size=b, num_keys=k, keys_include_query=True):
        for images_u8, labels in batches:
            for item, label in zip(images_u8, labels.tolist(), strict=True):
                keys = _keys(item, stored)
                assert all(int(x[:9]) == label for x in keys)
                repeats += keys[1:].count(keys[0])
                others += sum(x != keys[0] for x in keys[1:])
                queries.append(keys[0])
    _check_every_sample_once(queries, dataset, b)
    assert repeats > 0 and others > repeats, (repeats, others)


def test_dual_instance_part_once_identity_part_cycles(dataset: Path, stored: dict[bytes, str]) -> None:
    """Catches an instance part that repeats or drops samples, an identity part that repeats an identity inside one
    cycle, or a layout other than B instance rows then P groups of K."""
    b, p, k = 6, 3, 2
    ranks = _epoch(dataset, "dual", batch_size=b, images_per_identity=k, dual_identities=p)
    instance, id_batches = [], {}
    for rank, batches in enumerate(ranks):
        for step, (images_u8, labels) in enumerate(batches):
            assert images_u8.shape == (b + p * k, 3, 16, 16) and labels.shape == (b + p * k,)
            keys = _keys(images_u8, stored)
            assert [int(x[:9]) for x in keys] == labels.tolist()
            instance += keys[:b]
            groups = labels[b:].reshape(p, k)
            assert (groups == groups[:, :1]).all()
            assert all(len(set(keys[b + g * k: b + (g + 1) * k])) == k for g in range(p))  # all have >= 2 images
            id_batches[step * WORLD + rank] = groups[:, 0].tolist()
    _check_every_sample_once(instance, dataset, b)
    per_cycle = CFG.num_identities // p  # identity batches in one pass over the identities
    ordered = [id_batches[t] for t in sorted(id_batches)]
    assert len(ordered) > per_cycle, "the test should cover a second cycle"
    for start in range(0, len(ordered), per_cycle):
        cycle = [i for batch in ordered[start:start + per_cycle] for i in batch]
        assert len(cycle) == len(set(cycle)), "an identity repeated inside one cycle"


@pytest.mark.parametrize("sampler", ["identity", "attention", "dual", "block"])
def test_reproducible_by_seed_and_epoch(dataset: Path, sampler: str) -> None:
    """Catches unseeded order or flips (same seed and epoch must replay exactly) and an order that ignores the
    epoch or the seed."""
    def labels_of(seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = _epoch(dataset, sampler, batch_size=8, seed=seed, epoch=epoch)[0]
        return torch.cat([x.reshape(-1) for x, _ in batches]), torch.cat([y for _, y in batches])

    a, b = labels_of(0, 0), labels_of(0, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], labels_of(0, 1)[1])
    assert not torch.equal(a[1], labels_of(1, 0)[1])


def _resume_cfg(path: Path, sampler: str, num_workers: int) -> DataCfg:
    # a shuffle buffer smaller than a reader's range: a resumed instance reader must re-read the samples it holds
    return DataCfg(path=str(path), generate_if_missing=False, num_workers=num_workers, sampler=sampler,  # type: ignore
                   shuffle_buffer=16)


def _loader(path: Path, sampler: str, num_workers: int, *, start_batch: int = 0, rank: int = 1) -> TrainLoader:
    return build_train_loader(_resume_cfg(path, sampler, num_workers), image_size=16, batch_size=8, seed=3, epoch=1,
                              rank=rank, world_size=WORLD, block_rows=4, block_window=3, start_batch=start_batch)


def _assert_same_batches(got: list[tuple[torch.Tensor, torch.Tensor]],
                         want: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for i, ((images_u8, labels), (want_images_u8, want_labels)) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(labels, want_labels), f"batch {i}: other labels"
        assert torch.equal(images_u8, want_images_u8), f"batch {i}: other pixels (order, sample or flip)"


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_loader_started_at_a_step_yields_the_rest_of_the_epoch(dataset: Path, sampler: str, num_workers: int) -> None:
    """Catches a resumed epoch that restarts, shifts or reorders the batches (a worker split or shuffle buffer that
    restarts at the resume point), or that draws other flips: the loader started at step s must yield exactly steps
    s.. of the whole epoch, pixels and labels, on a rank other than 0, with 0 and 2 DataLoader workers."""
    full = list(_loader(dataset, sampler, num_workers))
    steps = len(full)
    assert steps >= 8
    for start in (1, 3, (9 * steps) // 10, steps - 1, steps):
        loader = _loader(dataset, sampler, num_workers, start_batch=start)
        assert loader.steps_per_epoch == steps and len(loader) == steps - start
        _assert_same_batches(list(loader), full[start:])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_resume_at_90_percent_decodes_only_what_it_trains(dataset: Path, sampler: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a resume that reaches its place in the epoch by loading and discarding the batches before it (the
    trainer's _epochs used to): the first batch of a run resumed at 90 % of an epoch must decode only its own
    images, and the rest of the epoch only the rest."""
    from offloadfr.data import loader as loader_mod
    from offloadfr.train.trainer import _epochs

    decoded = [0]

    def counting(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            decoded[0] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(loader_mod, "_decode", counting(loader_mod._decode))
    monkeypatch.setattr(PlannedDataset, "_decode", counting(PlannedDataset._decode))
    steps = _loader(dataset, sampler, 0).steps_per_epoch
    start = (9 * steps) // 10
    batches = _epochs(lambda epoch, first: _loader(dataset, sampler, 0, start_batch=first), 2 * steps, 37,
                      start=steps + start, steps_per_epoch=steps)  # epoch 1, as the loaders here
    _, (images_u8, _) = next(batches)
    assert decoded[0] == images_u8.numel() // (3 * 16 * 16), "the first step decoded more than its own images"
    rest = sum(x.numel() // (3 * 16 * 16) for _, (x, _) in itertools.islice(batches, steps - start - 1))
    assert decoded[0] == images_u8.numel() // (3 * 16 * 16) + rest


@pytest.mark.parametrize("sampler", ["instance", "identity"])
def test_resumed_epoch_is_exact_with_corrupt_samples(dataset: Path, tmp_path: Path, sampler: str) -> None:
    """Catches a resumed reader that replaces a corrupt sample by another substitute, or loses its place after one,
    than the uninterrupted epoch did (a garbled JPEG and a truncated shard)."""
    copy, _ = _corrupt(Path(shutil.copytree(dataset, tmp_path / "copy")))
    full = list(_loader(copy, sampler, 0, rank=0))
    for start in range(len(full) + 1):
        _assert_same_batches(list(_loader(copy, sampler, 0, start_batch=start, rank=0)), full[start:])
    with pytest.raises(ConfigError, match="start_batch"):
        _loader(copy, sampler, 0, start_batch=len(full) + 1, rank=0)


def test_bad_sampler_parameters(dataset: Path) -> None:
    """Catches a P×K batch that is not a whole number of identities, a block sampler without a block size, or a
    dataset too small for one batch, passing silently."""
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_train_loader(_cfg(dataset, "identity"), image_size=16, batch_size=10, seed=0, epoch=0)
    with pytest.raises(ConfigError, match="block_rows"):
        build_train_loader(_cfg(dataset, "block"), image_size=16, batch_size=8, seed=0, epoch=0)
    with pytest.raises(ConfigError, match="too few"):
        build_train_loader(_cfg(dataset, "identity"), image_size=16, batch_size=4 * 40, seed=0, epoch=0)


def test_empty_dataset_is_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    """Catches an index with no sample being accepted (a run that would train on nothing)."""
    copy = tmp_path / "empty"
    shutil.copytree(dataset, copy)
    index = json.loads((copy / "index.json").read_text())
    index["shards"], index["num_samples"] = [], 0
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="at least one sample"):
        build_train_loader(_cfg(copy, "identity"), image_size=16, batch_size=8, seed=0, epoch=0)


def _corrupt(path: Path) -> tuple[Path, int]:
    """A copy of ``path`` with one garbled JPEG in the first shard and the last shard cut in half; returns the copy
    and the number of samples of the truncated shard."""
    index = read_index(path)
    first = index.shards[0]
    bad = f"{first.ids[0]:09d}/0001.jpg"
    with tarfile.open(first.path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(first.path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == bad:
                data = b"\xff\xd8 this is not a jpeg"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    last = index.shards[-1].path
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    return path, index.shards[-1].num_samples


@pytest.mark.parametrize("sampler", ["instance", "identity", "block"])
def test_corrupt_samples_skipped_counted_warned_once(dataset: Path, tmp_path: Path, sampler: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Catches a crash on a garbled JPEG or a truncated tar member, a lost or ragged batch, skips that go uncounted,
    or a warning per corrupt sample instead of one."""
    copy, truncated = _corrupt(Path(shutil.copytree(dataset, tmp_path / "copy")))
    caplog.set_level(logging.WARNING, logger="offloadfr.data.loader")
    loader = build_train_loader(_cfg(copy, sampler), image_size=16, batch_size=8, seed=0, epoch=0, block_rows=4,
                                block_window=3)
    batches = list(loader)
    assert len(batches) == len(loader) and all(x.shape[0] == 8 for x, _ in batches)
    assert 2 <= loader.num_skipped <= truncated + 2
    warnings = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "data/skipped" in warnings[0].getMessage()


@pytest.mark.parametrize("sampler", ["identity", "block", "dual"])
def test_training_smoke(dataset: Path, tmp_path: Path, sampler: str) -> None:
    """Catches a sampler whose batches the trainer, the lookahead plan or a bank-backed head cannot take: a few
    steps of partial_fc on the nvme tier, with data/skipped logged (dual trains as one batch of B + P*K images)."""
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={dataset}", "data.generate_if_missing=false", f"data.sampler={sampler!r}",
        f"run.output_dir={tmp_path}", "run.name=smoke", "model.image_size=16", "model.embedding_size=16",
        "head.kind='partial_fc'", "bank.tier='nvme'", "bank.chunk_rows=8", "bank.cache_blocks=2", "cache.num_slots=24",
        "data.num_workers=0", "train.batch_size=8", "train.max_steps=6", "train.log_every=2",
        "train.warmup_steps=0", "eval.at_end=false",
    ])
    result = train(cfg)
    assert result.steps == 6
    rows = [json.loads(line) for line in (tmp_path / "smoke" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["data/skipped"] == 0 for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert sum(r["bank/rows_read"] for r in rows) > 0


def test_skipped_reach_metrics_jsonl(dataset: Path, tmp_path: Path) -> None:
    """Catches data/skipped missing from metrics.jsonl or not counting the corrupt samples the loader replaced."""
    copy, _ = _corrupt(Path(shutil.copytree(dataset, tmp_path / "copy")))
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={copy}", "data.generate_if_missing=false", f"run.output_dir={tmp_path}", "run.name=bad",
        "model.image_size=16", "model.embedding_size=16", "data.num_workers=0", "train.batch_size=16",
        "train.epochs=1", "train.log_every=1", "train.warmup_steps=0", "eval.at_end=false",
    ])
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == result.steps
    assert rows[-1]["data/skipped"] >= 2
    assert Counter(r["data/skipped"] >= rows[0]["data/skipped"] for r in rows)[True] == len(rows)  # a running total


def test_resume_bench_row(dataset: Path) -> None:
    """Catches ``bench.py data --resume-at`` timing the wrong step or losing a way: the row names the step at 90 %
    of the epoch and has a positive time for each of the three ways."""
    from offloadfr.bench.data import measure_resume

    cfg = _resume_cfg(dataset, "instance", 0)
    steps = len(build_train_loader(cfg, image_size=16, batch_size=8, seed=0, epoch=0))
    row = measure_resume(cfg, image_size=16, batch_size=8, at=0.9, rounds=1)
    assert row["steps_per_epoch"] == steps and row["resume_step"] == int(0.9 * steps)
    assert min(row["first_batch_s_started"], row["first_batch_s_discard"], row["first_batch_s_epoch_start"]) > 0
    assert row["speedup"] == row["first_batch_s_discard"] / row["first_batch_s_started"]
