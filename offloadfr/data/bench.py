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

__all__ = ["measure_data_pipelines"]


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
                                  block_rows=max(1, cfg.block_rows))

    def plain() -> Iterable[Any]:
        return _plain_loader(urls, image_size=image_size, batch_size=batch_size, num_workers=cfg.num_workers,
                             shuffle_buffer=cfg.shuffle_buffer)

    num_batches = min(num_batches, len(build_train_loader(cfg, image_size=image_size, batch_size=batch_size,
                                                          seed=0, epoch=0, block_rows=max(1, cfg.block_rows))))
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
