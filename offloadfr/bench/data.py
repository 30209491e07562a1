"""Data-pipeline throughput: our training loader against a plain ``webdataset.WebDataset`` pipeline, side by side.

Both pipelines read the same shards with the same number of DataLoader workers, decode every JPEG to RGB uint8 with
PIL, resize it when its side differs from ``image_size``, flip it at random, and return uint8 batches of shape
``(B, 3, S, S)`` with int64 labels. The plain pipeline is what a webdataset user would write::

    wds.WebDataset(shards, shardshuffle=len(shards)).shuffle(buffer).decode("rgb8").to_tuple("jpg", "cls")
       .map(resize_flip_chw).batched(B)   # through wds.WebLoader(..., batch_size=None, num_workers=W)

Rounds alternate (ours, plain, ours, plain, ...) after one warm-up pass of each, so that both see the same page
cache and the same background load; each round times ``num_batches`` batches from the creation of the iterator
(worker start-up included, as in training, where a loader is built every epoch).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from offloadfr.config import DataCfg
from offloadfr.data.loader import build_train_loader
from offloadfr.data.shards import read_index

__all__ = ["measure_data_pipelines", "measure_resume", "measure_loader_cores"]


class _ResizeFlipCHW:
    """The plain pipeline's augmentation: resize to ``size`` when needed, random flip, HWC -> CHW."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rng = random.Random(0)

    def __call__(self, sample: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
        img, label = sample
        if img.shape[0] != self.size or img.shape[1] != self.size:
            img = np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.Resampling.BILINEAR))
        if self.rng.random() < 0.5:
            img = img[:, ::-1]
        return np.ascontiguousarray(img.transpose(2, 0, 1)), int(label)


def _plain_loader(urls: list[str], *, image_size: int, batch_size: int, num_workers: int,
                  shuffle_buffer: int) -> Iterable[Any]:
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
               .shuffle(shuffle_buffer).decode("rgb8").to_tuple("jpg", "cls").map(_ResizeFlipCHW(image_size))
               .batched(batch_size, partial=False))
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers,
                         prefetch_factor=4 if num_workers > 0 else None)


def _time(batches: Iterable[Any], num_batches: int) -> tuple[float, int]:
    """Seconds to draw up to ``num_batches`` batches, and the images they held."""
    t0 = time.perf_counter()
    images = 0
    for i, (x, _) in enumerate(batches):
        assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4, type(x)
        images += x.shape[0]
        if i + 1 == num_batches:
            break
    return time.perf_counter() - t0, images


def measure_data_pipelines(cfg: DataCfg, *, image_size: int, batch_size: int, num_batches: int,
                           rounds: int = 3) -> dict[str, Any]:
    """Decoded, augmented images per second of ``build_train_loader`` and of a plain WebDataset pipeline.

    Args:
        cfg: the [data] section (path, ``num_workers``, ``shuffle_buffer``, ``sampler``) used by both pipelines.
        image_size: side of the returned images.
        batch_size: images per batch.
        num_batches: batches timed per round (at most one epoch of ours).
        rounds: timed rounds of each pipeline, alternating.

    Returns:
        A row: ``ours_img_per_s`` and ``plain_img_per_s`` (medians over rounds), each round's value, and
        ``ratio`` = ours / plain.
    """
    index = read_index(cfg.path)
    urls = [str(s.path) for s in index.shards]

    def ours() -> Iterable[Any]:
        return build_train_loader(cfg, image_size=image_size, batch_size=batch_size, seed=0, epoch=0,
                                  block_rows=max(1, cfg.block_rows), block_window=max(1, cfg.block_window))

    def plain() -> Iterable[Any]:
        return _plain_loader(urls, image_size=image_size, batch_size=batch_size, num_workers=cfg.num_workers,
                             shuffle_buffer=cfg.shuffle_buffer)

    num_batches = min(num_batches, len(build_train_loader(cfg, image_size=image_size, batch_size=batch_size,
                                                          seed=0, epoch=0, block_rows=max(1, cfg.block_rows),
                                                          block_window=max(1, cfg.block_window))))
    _time(ours(), num_batches)  # warm-up: page cache, imports, PIL
    _time(plain(), num_batches)
    rates: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(rounds):
        for name, make in (("ours", ours), ("plain", plain)):
            seconds, images = _time(make(), num_batches)
            rates[name].append(images / seconds)
    ours_rate, plain_rate = statistics.median(rates["ours"]), statistics.median(rates["plain"])
    return {
        "bench": "data", "dataset": str(index.root), "num_samples": index.num_samples,
        "stored_image_size": index.image_size, "image_size": image_size, "batch_size": batch_size,
        "num_workers": cfg.num_workers, "shuffle_buffer": cfg.shuffle_buffer, "sampler": cfg.sampler,
        "num_batches": num_batches, "rounds": rounds,
        "ours_img_per_s": ours_rate, "plain_img_per_s": plain_rate, "ratio": ours_rate / plain_rate,
        "ours_rounds": rates["ours"], "plain_rounds": rates["plain"],
    }


def measure_resume(cfg: DataCfg, *, image_size: int, batch_size: int, at: float = 0.9,
                   rounds: int = 3) -> dict[str, Any]:
    """Seconds from building a resumed run's loader to its first batch, at fraction ``at`` of an epoch: the loader
    started at that step (``start_batch``, what the trainer does) against iterating the epoch's loader from its start
    and discarding the batches before it (what it did before), and against a loader at step 0 (the floor).

    Rounds alternate the three after a warm-up of each, so all see the same page cache. Returns a row with the median
    seconds of each, their rounds, and ``speedup`` = discard / started.
    """
    def loader(start: int) -> Any:
        return build_train_loader(cfg, image_size=image_size, batch_size=batch_size, seed=0, epoch=0,
                                  block_rows=max(1, cfg.block_rows), block_window=max(1, cfg.block_window),
                                  start_batch=start)

    steps = loader(0).steps_per_epoch
    start = min(steps - 1, int(at * steps))

    def first_batch(first: int) -> float:
        t0 = time.perf_counter()
        next(iter(loader(first)))
        return time.perf_counter() - t0

    def discard() -> float:
        t0 = time.perf_counter()
        for i, _ in enumerate(loader(0)):
            if i == start:
                break
        return time.perf_counter() - t0

    ways = {"started": lambda: first_batch(start), "discard": discard, "epoch_start": lambda: first_batch(0)}
    for way in ways.values():  # warm-up
        way()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            seconds[name].append(way())
    med = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "bench": "data_resume", "dataset": str(cfg.path), "sampler": cfg.sampler, "image_size": image_size,
        "batch_size": batch_size, "num_workers": cfg.num_workers, "steps_per_epoch": steps, "resume_step": start,
        "first_batch_s_started": med["started"], "first_batch_s_discard": med["discard"],
        "first_batch_s_epoch_start": med["epoch_start"], "speedup": med["discard"] / med["started"],
        "rounds": seconds,
    }


def measure_loader_cores(cfg: DataCfg, *, samplers: list[str], decoders: list[str], image_size: int,
                         batch_size: int, num_batches: int, rounds: int = 3,
                         target_img_per_s: float = 4500.0) -> list[dict[str, Any]]:
    """CPU per image of the training loader, by sampler and JPEG decoder: what one core loads per second, and the
    cores ``target_img_per_s`` needs (4,500 img/s: iresnet50 at B = 256 on an H100).

    Each measurement runs the loader in this process (``num_workers = 0``: read, shuffle or plan, decode, flip,
    batch, all on one core) and divides the images of ``num_batches`` batches (every decoded image: an attention
    batch's keys too), after the first, by the CPU time
    (``time.process_time``) they took; the settings alternate within each round, so the machine's load hits them alike.
    A second figure checks it with the workers of ``cfg.num_workers``: images per second of wall time and the CPU
    time of the training process and its workers (joined, ``RUSAGE_CHILDREN``) per image, worker start-up included.

    Returns:
        One row per (sampler, decoder): ``img_per_core_s`` (median over the rounds), ``cpu_us_per_image``,
        ``cores_for_target``, the rounds, and ``workers_img_per_s`` / ``workers_cpu_us_per_image``.
    """
    import dataclasses
    import resource

    def loader(sampler: str, decoder: str, workers: int) -> Any:
        return build_train_loader(dataclasses.replace(cfg, sampler=sampler, decoder=decoder, num_workers=workers),
                                  image_size=image_size, batch_size=batch_size, seed=0, epoch=0,
                                  block_rows=max(1, cfg.block_rows), block_window=max(1, cfg.block_window))

    def count(x: torch.Tensor) -> int:  # images in a batch: (B, 3, S, S), or (B, 1 + keys, 3, S, S) for attention
        return x.numel() // (3 * image_size * image_size)

    def in_process(sampler: str, decoder: str) -> float:
        """CPU seconds per image of batches 2 .. num_batches + 1, loaded in this process."""
        batches = iter(loader(sampler, decoder, 0))
        next(batches)  # the plan, the first shard opened
        cpu, images = time.process_time(), 0
        for _, (x, _) in zip(range(num_batches), batches, strict=False):
            images += count(x)
        return (time.process_time() - cpu) / images

    def with_workers(sampler: str, decoder: str) -> tuple[float, float]:
        """(images per wall second, CPU seconds per image of this process and its workers)."""
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        t0, images = time.perf_counter(), 0
        batches = iter(loader(sampler, decoder, cfg.num_workers))
        for _, (x, _) in zip(range(num_batches), batches, strict=False):
            images += count(x)
        wall = time.perf_counter() - t0
        del batches  # joins the workers, so that their CPU time is counted
        after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, usage, strict=True))
        return images / wall, cpu / images

    settings = [(sampler, decoder) for sampler in samplers for decoder in decoders]
    for sampler, decoder in settings:  # warm-up: page cache, imports
        in_process(sampler, decoder)
    per_image: dict[tuple[str, str], list[float]] = {key: [] for key in settings}
    for _ in range(rounds):
        for key in settings:
            per_image[key].append(in_process(*key))
    rows = []
    for sampler, decoder in settings:
        cpu_s = statistics.median(per_image[(sampler, decoder)])
        wall_rate, workers_cpu_s = with_workers(sampler, decoder)
        rows.append({
            "bench": "loader_cores", "dataset": str(cfg.path), "sampler": sampler, "decoder": decoder,
            "image_size": image_size, "batch_size": batch_size, "num_batches": num_batches, "rounds": rounds,
            "cpu_us_per_image": 1e6 * cpu_s, "img_per_core_s": 1.0 / cpu_s,
            "target_img_per_s": target_img_per_s, "cores_for_target": target_img_per_s * cpu_s,
            "rounds_cpu_us_per_image": [1e6 * v for v in per_image[(sampler, decoder)]],
            "num_workers": cfg.num_workers, "workers_img_per_s": wall_rate,
            "workers_cpu_us_per_image": 1e6 * workers_cpu_s,
        })
    return rows


def replay_bank_traffic(label_batches: list[torch.Tensor], *, num_classes: int, dim: int, chunk_rows: int,
                        cache_blocks: int, num_slots: int, lookahead: int, bank_dir: str) -> dict[str, float]:
    """Bank traffic of a ``partial_fc`` head on the nvme tier fed with ``label_batches`` (random embeddings).

    The head plans ``lookahead`` batches ahead as the trainer does; only the ids matter for the traffic, so the
    embeddings are random and no backbone runs. After each step the prefetcher is flushed, so that evicted rows
    reach the bank before the next fetches, as in training (where a step takes far longer than a write-back);
    without it, rows evicted a step ago are served from the write-behind queue and the bank sees fewer reads than
    in training, by an amount that depends on timing.

    Returns:
        Per step: ``bank/rows_read`` and ``bank/bytes_read`` (the head's metrics: rows fetched from the bank into
        the device container), ``prefetch/rows_from_pending`` (fetched rows served by the write-behind queue
        instead; the split between the two depends on timing, their sum does not) and ``bank/block_reads`` (blocks
        the nvme tier read from Zarr or generated on first touch, from the bank's counters).
    """
    from pathlib import Path

    from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg
    from offloadfr.heads import HeadDeps, build_head
    from offloadfr.losses import build_margin

    device = torch.device("cpu")
    cache = CacheCfg(num_slots=num_slots, lookahead=lookahead)
    deps = HeadDeps(margin=build_margin(LossCfg(kind="arcface", s=32.0, arcface_m=0.3)), num_classes=num_classes,
                    dim=dim, device=device, bank=BankCfg(tier="nvme", chunk_rows=chunk_rows, cache_blocks=cache_blocks),
                    cache=cache, bank_path=Path(bank_dir))
    head = build_head(HeadCfg(kind="partial_fc"), deps)
    gen = torch.Generator().manual_seed(0)
    moved = {"bank/rows_read": 0.0, "bank/bytes_read": 0.0, "prefetch/rows_from_pending": 0.0}
    try:
        for labels in label_batches[:lookahead]:
            head.plan(labels)
        for step, labels in enumerate(label_batches):
            if step + lookahead < len(label_batches):
                head.plan(label_batches[step + lookahead])
            emb = torch.randn(labels.numel(), dim, generator=gen).requires_grad_(True)
            head(emb, labels).backward()
            head.update(0.1)
            head.prefetcher.flush()  # type: ignore[attr-defined]  # as in training: write-backs land within a step
            m = head.metrics()
            for k in moved:
                moved[k] += float(m[k])
        stats = head.bank.stats()  # type: ignore[attr-defined]
    finally:
        head.close()
    steps = max(1, len(label_batches))
    blocks = stats["bank/blocks_loaded"] + stats["bank/blocks_initialised"]
    return {**{f"{k}_per_step": v / steps for k, v in moved.items()}, "bank/block_reads_per_step": blocks / steps}


def _bank_order_main(argv: list[str]) -> None:
    """``python -m offloadfr.bench.data bank-order DATA``: one epoch of instance vs block order through the nvme tier
    of ds_configs/runs/synth_tiny_pfc_nvme.toml (128 ids per block, 8 blocks in RAM, 1024 slots, D = 128)."""
    import json
    import tempfile

    from offloadfr.data.loader import sampler_spec
    from offloadfr.data.samplers import plan_epoch

    path = argv[0] if argv else "data/synth_tiny"
    index = read_index(path)
    rows, dim, batch = 128, 128, 128
    orders: dict[str, list[torch.Tensor]] = {
        "instance": [y for _, y in build_train_loader(DataCfg(path=path, num_workers=2, sampler="instance"),
                                                       image_size=8, batch_size=batch, seed=0, epoch=0)]}
    for window in (4, 8, 16):
        spec = sampler_spec(DataCfg(path=path, sampler="block", block_rows=rows, block_window=window),
                            batch_size=batch)
        plan = plan_epoch(index, spec, seed=0, epoch=0, rank=0, world_size=1)
        orders[f"block(window={window})"] = [torch.from_numpy(y) for y in plan.labels]
    for name, labels in orders.items():
        with tempfile.TemporaryDirectory() as tmp:
            row = replay_bank_traffic(labels, num_classes=index.num_classes, dim=dim, chunk_rows=rows,
                                      cache_blocks=8, num_slots=1024, lookahead=2, bank_dir=f"{tmp}/bank")
        blocks = [len(torch.unique(y // rows)) for y in labels]
        print(json.dumps({"bench": "bank_order", "order": name, "steps": len(labels),
                          "blocks_per_batch": sum(blocks) / len(blocks), **row}))


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["bank-order"]:
        _bank_order_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m offloadfr.bench.data bank-order [DATA]")
