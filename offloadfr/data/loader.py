"""The training loader: batches read from identity-grouped WebDataset shards, in the order of ``data.sampler``.

This module streams the ``instance`` sampler (uniform images, below) and dispatches the other samplers to
``offloadfr.data.samplers``, which plans them from ``index.json`` (docs/data.md). Both give every rank the same number
of steps and never the same sample to two readers.

Each epoch, the shards are put in an order drawn from ``(seed, epoch)`` and their samples, so ordered, are treated as
one virtual sequence. The first ``steps_per_epoch * batch_size * world_size`` of them are cut into one contiguous
range per rank, and each rank's range into one contiguous range per DataLoader worker, a whole number of batches each
(DESIGN §6). A reader (one worker of one rank) streams the tar members of its range sequentially, through a shuffle
buffer that mixes the identity-grouped stream, then decodes, flips and batches in the worker.

Why an explicit split rather than ``wds.split_by_node`` / ``split_by_worker`` on whole shards: shards hold whole
identities, so their sizes differ, and a shard-level split would give ranks different sample counts, hence different
step counts (a collective would hang) or ragged last batches. Here every rank yields exactly
``steps_per_epoch = num_samples // (batch_size * world_size)`` full batches (drop_last semantics: up to
``batch_size * world_size - 1`` samples, different ones each epoch, are left out), ranks and workers read disjoint
samples, and the head never sees a ragged batch. Reading starts mid-shard at most once per reader, so I/O stays
sequential. Tar parsing and the shuffle buffer are webdataset's (``tar_file_expander``, ``group_by_keys``,
``shuffle``); the split is ours.

Corrupt samples (an undecodable JPEG, a bad ``cls``, a truncated tar) are skipped, counted
(``TrainLoader.num_skipped``, which the trainer logs as ``data/skipped``) and warned about once per dataset (later
ones are only counted), and their place in the batch is taken by a copy of the next good sample of the same reader
(re-flipped), so the batch count stays exact. A reader whose samples are all unreadable raises
:class:`~offloadfr.errors.DataError`.

Batches are a function of ``(seed, epoch, rank, world_size, num_workers, batch_size, shuffle_buffer)`` and the
dataset: the same values give the same batches, in the same order.

A loader started at step ``start_batch`` (a resumed run) yields exactly the steps ``start_batch ..`` of the whole
epoch without decoding the ones before. A reader's order is the shuffle buffer's output, which depends on every
sample before it, but only on their number, never on their content: the same ``wds.shuffle`` with the same seed is
run over sample positions (integers, no I/O) up to the resume point. The samples it still holds in its buffer
there are read by byte offset (the shard's member table, one seek per run of neighbouring samples), reading goes on
from the first position it has not pulled, and the flip stream is advanced by one draw per skipped sample. The
order, the flips and the substitutes of corrupt samples are therefore those of the uninterrupted epoch, and the
skipped samples cost neither a read nor a decode.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from offloadfr.config import DataCfg
from offloadfr.data.decode import decode_face, resolve_decoder
from offloadfr.data.samplers import PlannedDataset, SamplerSpec, cached_member_table, plan_epoch
from offloadfr.data.shards import DatasetIndex, read_index
from offloadfr.errors import ConfigError, DataError

__all__ = ["build_train_loader", "sampler_spec", "TrainLoader"]

_log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # datasets whose first corrupt sample was warned about (once per process)
_STREAM_ORDER = 0x0D47A  # keeps the data-order stream apart from other users of (seed, epoch)
_RUN_GAP = 32  # a resumed reader reads buffered samples this close together in one run (one seek)


@dataclass(frozen=True, slots=True)
class _Segment:
    """Samples ``[start, stop)`` (positions inside the shard) of one shard of ``num_samples`` (index.json's)."""

    path: str
    start: int
    stop: int
    num_samples: int


def _plan_readers(index: DatasetIndex, *, batch_size: int, seed: int, epoch: int, world_size: int,
                 num_workers: int) -> tuple[int, list[list[list[_Segment]]], list[list[int]]]:
    """Splits one epoch of ``index`` into per-(rank, worker) shard segments.

    Args:
        index: the dataset.
        batch_size: samples per batch on each rank.
        seed: data-order seed.
        epoch: epoch number (the shard order changes with it).
        world_size: number of ranks.
        num_workers: readers per rank (a value of 0 means one reader, in the main process).

    Returns:
        ``(steps_per_epoch, segments[rank][worker], batches[rank][worker])``: each reader's segments, in reading
        order, and its number of batches; every rank's batches sum to ``steps_per_epoch``.
    """
    readers = max(1, num_workers)
    steps = index.num_samples // (batch_size * world_size)
    order = np.random.default_rng([seed, epoch, _STREAM_ORDER]).permutation(len(index.shards))
    shards = [index.shards[i] for i in order]
    starts = np.concatenate([[0], np.cumsum([s.num_samples for s in shards])])
    segments: list[list[list[_Segment]]] = []
    batches: list[list[int]] = []
    for rank in range(world_size):
        per_worker = [steps // readers + (1 if w < steps % readers else 0) for w in range(readers)]
        pos = rank * steps * batch_size
        rank_segments = []
        for num_batches in per_worker:
            lo, hi = pos, pos + num_batches * batch_size
            pos = hi
            segs = []
            for k, shard in enumerate(shards):
                a, b = max(lo, int(starts[k])), min(hi, int(starts[k + 1]))
                if a < b:
                    segs.append(_Segment(str(shard.path), a - int(starts[k]), b - int(starts[k]),
                                         shard.num_samples))
            rank_segments.append(segs)
        segments.append(rank_segments)
        batches.append(per_worker)
    return steps, segments, batches


def _read_segment(seg: _Segment, first: int | None = None) -> Iterator[dict[str, Any]]:
    """Yields exactly ``seg.stop - first`` samples, the shard's samples ``first .. seg.stop - 1`` (``first``: by
    default ``seg.start``); those the tar cannot deliver come as ``__bad__`` stubs.

    Without ``first`` the tar is read from its start. With it, reading starts at that sample's first tar header (a
    seek, from the shard's member table), so the samples before it cost no read; a sample the table does not hold (a
    damaged tail) is reached by reading from the start instead.
    """
    begin = seg.start if first is None else first
    n = offset = 0
    if first:
        members = list(cached_member_table(Path(seg.path)).values())
        if first < len(members):
            n, offset = first, members[first].lo
    error = ""
    try:
        with open(seg.path, "rb") as stream:
            stream.seek(offset)
            files = tar_file_expander([{"url": seg.path, "stream": stream}])
            for sample in group_by_keys(files):
                if n >= seg.stop:
                    break
                if n >= begin:
                    yield sample
                n += 1
    except (tarfile.TarError, OSError, ValueError, EOFError) as exn:  # truncated or garbled tar, vanished file
        error = f"{type(exn).__name__}: {exn}"
    for k in range(max(n, begin), seg.stop):
        yield {"__key__": f"#{k}", "__url__": seg.path, "__bad__": error or "shard ended early"}


def _intact_members(seg: _Segment) -> list[tuple[str, Any]] | None:
    """The shard's ``(key, place in the tar)`` of each sample, in tar order (:func:`cached_member_table`), or None
    when the tar does not hold all ``seg.num_samples`` of them (truncated or garbled)."""
    members = list(cached_member_table(Path(seg.path)).items())
    return members if len(members) == seg.num_samples else None


def _read_direct(path: str, members: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The samples of ``members`` (neighbours in one tar), with one read of the bytes from the first to the last."""
    lo, hi = members[0][1].lo, members[-1][1].hi
    try:
        with open(path, "rb") as f:
            f.seek(lo)
            buf = f.read(hi - lo)
    except OSError as exn:
        return [{"__key__": key, "__url__": path, "__bad__": f"{type(exn).__name__}: {exn}"} for key, _ in members]
    return [{"__key__": key, "__url__": path} | {ext: buf[off - lo: off - lo + n] for ext, (off, n) in m.data.items()}
            for key, m in members]


def _decode(sample: dict[str, Any], image_size: int, decoder: str = "pil") -> tuple[np.ndarray, int]:
    """JPEG bytes and ``cls`` of one sample -> (H, W, 3) uint8 at ``image_size`` and the label (``decode_face``)."""
    if "__bad__" in sample:
        raise DataError(sample["__bad__"])
    label = int(sample["cls"].decode("ascii").strip())
    return decode_face(sample["jpg"], image_size, decoder), label


class _EpochDataset(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """One rank's epoch as an iterable of ``(images_u8 (B,3,S,S), labels (B,), num_bad, note)`` from each worker
    (``note`` describes the batch's first corrupt sample, or is empty), from step ``start_batch`` on.

    Reader ``r`` (a contiguous range of samples) loads the rank's steps ``t`` with ``t % num_readers == r``.
    DataLoader worker ``i`` plays reader ``(i + start_batch) % num_readers``: the DataLoader returns worker 0's
    output first, and that is step ``start_batch``."""

    def __init__(self, *, segments: list[list[_Segment]], batches: list[int], batch_size: int, image_size: int,
                 shuffle_buffer: int, seed: int, epoch: int, rank: int, start_batch: int = 0,
                 decoder: str = "pil") -> None:
        super().__init__()
        self.decoder = decoder  # resolved (data/decode.py)
        self.segments = segments
        self.batches = batches
        self.start_batch = start_batch
        self.batch_size = batch_size
        self.image_size = image_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.rank = rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, str]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        num_readers = info.num_workers if info is not None else 1
        assert num_readers == len(self.segments), "the reader plan was made for another number of workers"
        reader = (worker + self.start_batch) % num_readers
        skip = self.start_batch // num_readers + (1 if reader < self.start_batch % num_readers else 0)
        return self._batches(reader, skip)

    def _raw(self, worker: int, first: int = 0) -> Iterator[dict[str, Any]]:
        """The reader's samples from its position ``first`` on (its segments as one sequence)."""
        pos = 0
        for seg in self.segments[worker]:
            n = seg.stop - seg.start
            if first < pos + n:
                yield from _read_segment(seg, seg.start + first - pos) if first > pos else _read_segment(seg)
            pos += n

    def _read_positions(self, worker: int, positions: np.ndarray) -> dict[int, dict[str, Any]]:
        """The reader's samples at ``positions`` (sorted), one seek per run of samples at most ``_RUN_GAP`` apart.

        An intact shard is read by byte offset (its member table); a damaged one through the tar stream from the
        run's first sample, which delivers or loses the samples near the damage exactly as the uninterrupted
        stream does.
        """
        segs = self.segments[worker]
        seg_first = np.cumsum([0] + [s.stop - s.start for s in segs])  # reader position of each segment's start
        seg_of = np.searchsorted(seg_first, positions, side="right") - 1
        breaks = np.nonzero((np.diff(positions) > _RUN_GAP) | (np.diff(seg_of) != 0))[0] + 1
        wanted = set(positions.tolist())
        members_of: dict[int, list[tuple[str, Any]] | None] = {}  # per segment, listed once for all its runs
        out: dict[int, dict[str, Any]] = {}
        for run in np.split(np.arange(len(positions)), breaks):
            if not len(run):
                continue
            a, b, k = int(positions[run[0]]), int(positions[run[-1]]), int(seg_of[run[0]])
            seg = segs[k]
            base = int(seg_first[k]) - seg.start  # shard position = reader position - base
            if k not in members_of:
                members_of[k] = _intact_members(seg)
            members = members_of[k]
            if members is not None:
                samples: Any = _read_direct(seg.path, members[a - base: b + 1 - base])
            else:
                samples = _read_segment(_Segment(seg.path, a - base, b + 1 - base, seg.num_samples), a - base)
            for p, sample in zip(range(a, b + 1), samples, strict=True):
                if p in wanted:
                    out[p] = sample
        return out

    def _resumed(self, worker: int, shuffle_rng: random.Random, bufsize: int,
                 num_skipped: int) -> tuple[Iterator[dict[str, Any]], np.ndarray]:
        """The reader's shuffled samples after its first ``num_skipped``, and the positions of those skipped.

        The shuffle buffer's output depends only on how many samples enter it, so the same ``wds.shuffle`` run over
        positions gives the uninterrupted order. After ``num_skipped`` outputs the buffer holds the positions pulled
        but not returned: they are read by offset, and the tar is read on from the first position not pulled.
        """
        total = self.batches[worker] * self.batch_size
        pending: dict[int, dict[str, Any]] = {}
        source: Iterator[dict[str, Any]] | None = None  # the tar, once the skipped outputs are passed
        pulled = 0

        def positions() -> Iterator[int]:
            nonlocal pulled
            for p in range(total):
                if source is not None:
                    pending[p] = next(source)
                pulled = p + 1
                yield p
        order = wds.shuffle(bufsize=bufsize, initial=bufsize, rng=shuffle_rng)(positions())
        skipped = np.fromiter(itertools.islice(order, num_skipped), np.int64, num_skipped)
        returned = np.zeros(pulled, bool)
        returned[skipped] = True
        pending.update(self._read_positions(worker, np.nonzero(~returned)[0]))
        source = self._raw(worker, pulled)

        def samples() -> Iterator[dict[str, Any]]:
            for p in order:
                yield pending.pop(p)
        return samples(), skipped

    def _last_good(self, worker: int, skipped: np.ndarray) -> tuple[np.ndarray, int] | None:
        """The last good sample among the skipped ones (what an uninterrupted reader would copy last), or None."""
        for p in skipped[::-1].tolist():
            try:
                return _decode(self._read_positions(worker, np.array([p]))[p], self.image_size, self.decoder)
            except Exception:  # noqa: S112 (corrupt: try the one before)
                continue
        return None

    def _batches(self, worker: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, str]]:
        """Reader ``worker``'s batches from its ``skip``-th on."""
        total = self.batches[worker] * self.batch_size
        want = total - skip * self.batch_size
        if want == 0:
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        shuffle_rng = random.Random(int(rng.integers(2**63)))
        # initial = bufsize: the first batches are as mixed as the later ones (a stream of identity-grouped
        # samples would otherwise start with a handful of identities).
        bufsize = min(self.shuffle_buffer, total)
        skipped = np.empty(0, np.int64)
        if skip:
            rng.random(skip * self.batch_size)  # the skipped samples' flips: one draw each, as put() below takes
            mixed, skipped = self._resumed(worker, shuffle_rng, bufsize, skip * self.batch_size)
        else:
            mixed = wds.shuffle(bufsize=bufsize, initial=bufsize, rng=shuffle_rng)(iter(self._raw(worker)))
        size = self.image_size
        images = np.empty((self.batch_size, size, size, 3), np.uint8)
        labels = np.empty(self.batch_size, np.int64)
        filled = num_bad = produced = 0
        note = ""
        owed = 0  # corrupt samples waiting for a substitute
        last: tuple[np.ndarray, int] | None = None

        def put(img: np.ndarray, label: int) -> tuple[torch.Tensor, torch.Tensor, int, str] | None:
            """Places one (randomly flipped) image in the batch; returns the batch when that filled it."""
            nonlocal filled, produced, num_bad, note
            images[filled] = img[:, ::-1] if rng.random() < 0.5 else img
            labels[filled] = label
            filled += 1
            produced += 1
            if filled < self.batch_size:
                return None
            batch = self._emit(images, labels, num_bad, note)
            filled = num_bad = 0
            note = ""
            return batch
        for sample in mixed:
            try:
                item = _decode(sample, size, self.decoder)
            except Exception as exn:  # PIL raises many types on corrupt data; never fatal
                num_bad += 1
                owed += 1
                if not note:
                    note = f"{sample.get('__key__')} in {sample.get('__url__')} ({type(exn).__name__}: {exn})"
                continue
            last = item
            for _ in range(1 + owed):
                if (batch := put(*item)) is not None:
                    yield batch
            owed = 0
        if owed:
            if last is None and len(skipped):
                last = self._last_good(worker, skipped)
            if last is None:
                raise DataError(f"all {want} samples read by worker {worker} of rank {self.rank} are unreadable "
                                f"(first shard {self.segments[worker][0].path}); the dataset is corrupt: "
                                "re-create or re-convert it")
            for _ in range(owed):
                if (batch := put(*last)) is not None:
                    yield batch
        assert produced == want and filled == 0, f"reader produced {produced} of {want} samples"

    @staticmethod
    def _emit(images_BHWC: np.ndarray, labels: np.ndarray, num_bad: int,
              note: str) -> tuple[torch.Tensor, torch.Tensor, int, str]:
        images_u8 = torch.from_numpy(np.ascontiguousarray(images_BHWC.transpose(0, 3, 1, 2)))
        return images_u8, torch.from_numpy(labels.copy()), num_bad, note


class TrainLoader:
    """One rank's epoch of training batches; iterate it to get ``(images_u8, labels)``.

    For the ``instance`` and ``block`` samplers ``images_u8`` is uint8 ``(B, 3, S, S)`` (RGB, randomly flipped) and
    ``labels`` int64 ``(B,)``; the other samplers' layouts are in docs/data.md (``labels`` always holds the id of
    every image). Every rank yields exactly ``len(loader) == steps_per_epoch - start_batch`` batches: the epoch's
    steps from ``start_batch`` on. Iterating the same loader again replays the same steps.

    Attributes:
        index: the dataset index.
        steps_per_epoch: batches per epoch on every rank (the whole epoch, whatever ``start_batch``).
        start_batch: the epoch's first step this loader yields.
        batch_size: images per batch on this rank (``attention``: items of 1 + k images).
        num_skipped: corrupt samples replaced so far (summed over iterations of this loader).

    Example::

        loader = build_train_loader(cfg.data, image_size=32, batch_size=128, seed=0, epoch=0)
        for images_u8, labels in loader:
            ...
    """

    def __init__(self, dataset: torch.utils.data.IterableDataset, *, index: DatasetIndex,  # type: ignore[type-arg]
                 steps_per_epoch: int, batch_size: int, num_workers: int, pin_memory: bool,
                 start_batch: int = 0) -> None:
        self._dataset = dataset
        self.index = index
        self.steps_per_epoch = steps_per_epoch
        self.start_batch = start_batch
        self.batch_size = batch_size
        self.num_skipped = 0
        self._num_workers = num_workers
        self._pin_memory = pin_memory

    @property
    def num_classes(self) -> int:
        """Identities in the dataset (labels lie in ``[0, num_classes)``)."""
        return self.index.num_classes

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            self._dataset, batch_size=None, num_workers=self._num_workers, pin_memory=self._pin_memory,
            prefetch_factor=4 if self._num_workers > 0 else None)
        count = 0
        for images_u8, labels, num_bad, note in loader:
            if num_bad:
                self.num_skipped += int(num_bad)
                root = str(self.index.root)
                if root not in _WARNED:
                    _WARNED.add(root)
                    _log.warning("skipping corrupt sample %s; a copy of another sample takes its place. Further "
                                 "corrupt samples of %s are counted in data/skipped without a warning", note, root)
            count += 1
            yield images_u8, labels
        assert count == len(self), f"loader yielded {count} of {len(self)} batches"


def sampler_spec(cfg: DataCfg, *, batch_size: int, block_rows: int = 0, block_window: int = 0) -> SamplerSpec:
    """The resolved parameters of a planned sampler (``identity``, ``attention``, ``dual``, ``block``).

    Args:
        cfg: the [data] section.
        batch_size: ``train.batch_size``.
        block_rows: ids per bank block, used by ``block`` when ``cfg.block_rows`` is 0.
        block_window: window width in blocks, used by ``block`` when ``cfg.block_window`` is 0.

    Returns:
        The spec.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``data.images_per_identity`` (``identity``), or the block
            size is unknown (``block``).
    """
    k = cfg.images_per_identity
    if cfg.sampler == "identity":
        if batch_size % k:
            raise ConfigError(f"data.sampler = 'identity' with train.batch_size = {batch_size} and "
                              f"data.images_per_identity = {k}: the batch must be a whole number of identities; "
                              f"set train.batch_size to a multiple of {k}")
        return SamplerSpec(kind="identity", batch_size=batch_size, images_per_identity=k,
                           num_identities=batch_size // k, window=cfg.shard_window)
    if cfg.sampler == "attention":
        return SamplerSpec(kind="attention", batch_size=batch_size, num_keys=cfg.num_keys, window=cfg.shard_window,
                           keys_include_query=cfg.keys_include_query)
    if cfg.sampler == "dual":
        p = cfg.dual_identities or max(1, batch_size // k)
        return SamplerSpec(kind="dual", batch_size=batch_size, images_per_identity=k, num_identities=p,
                           window=cfg.shard_window)
    if cfg.sampler == "block":
        rows = cfg.block_rows or block_rows
        window = cfg.block_window or block_window
        if rows < 1 or window < 1:
            raise ConfigError(f"data.sampler = 'block' needs the bank's block size and window (got {rows} ids per "
                              f"block, a window of {window} blocks): set data.block_rows (e.g. to bank.chunk_rows) "
                              "and data.block_window (e.g. to bank.cache_blocks)")
        return SamplerSpec(kind="block", batch_size=batch_size, window=window, block_rows=rows)
    raise ConfigError(f"data.sampler = {cfg.sampler!r} is not a planned sampler")


def build_train_loader(cfg: DataCfg, *, image_size: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                       world_size: int = 1, pin_memory: bool = False, block_rows: int = 0,
                       block_window: int = 0, start_batch: int = 0) -> TrainLoader:
    """Builds one rank's loader for one epoch of the dataset at ``cfg.path``, in the order of ``cfg.sampler``.

    Args:
        cfg: the [data] section (path, workers, shuffle buffer, sampler and its parameters).
        image_size: side of the images returned; stored images of another size are resized (bilinear).
        batch_size: ``train.batch_size``: images per batch on this rank (``attention``: query items; ``dual``: the
            instance part).
        seed: data-order and flip seed.
        epoch: epoch number; each epoch has its own order.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of ranks; ranks read disjoint samples.
        pin_memory: pin batches in page-locked memory (for asynchronous host-to-GPU copies).
        block_rows: ids per bank block for ``sampler = "block"`` when ``cfg.block_rows`` is 0 (the trainer passes
            the bank's ``chunk_rows``).
        block_window: window width in blocks for ``sampler = "block"`` when ``cfg.block_window`` is 0 (the trainer
            passes ``bank.cache_blocks``).
        start_batch: the epoch's first step to yield (a resumed run's place in the epoch). The loader yields
            exactly the steps ``start_batch ..`` of the whole epoch's loader, and decodes none of the steps before.

    Returns:
        The loader; every rank gets the same ``len(loader)`` (``instance``: ``num_samples // (batch_size *
        world_size) - start_batch``) and the same ``loader.steps_per_epoch`` (the whole epoch's).

    Raises:
        ConfigError: ``batch_size``, ``image_size``, ``rank``, ``world_size`` or ``start_batch`` out of range, or
            sampler parameters that do not fit the batch or the dataset.
        DataNotFoundError: the dataset directory, its ``index.json`` or a shard is missing.
        DataError: the index is malformed or empty.
    """
    if batch_size < 1 or image_size < 1:
        raise ConfigError(f"batch_size = {batch_size}, image_size = {image_size}; both must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank = {rank}, world_size = {world_size}; need world_size >= 1 and 0 <= rank < "
                          "world_size")
    if cfg.sampler == "auto":  # load_config resolves it from head.kind; a DataCfg built in code must name one
        raise ConfigError("data.sampler = 'auto' reached the loader unresolved: load the config with load_config() "
                          "(it picks the head's sampler) or name a sampler, e.g. DataCfg(sampler='instance')")
    decoder = resolve_decoder(cfg.decoder)
    index = read_index(os.fspath(cfg.path))
    if cfg.sampler != "instance":
        spec = sampler_spec(cfg, batch_size=batch_size, block_rows=block_rows, block_window=block_window)
        plan = plan_epoch(index, spec, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
        _check_start(start_batch, plan.steps)
        planned = PlannedDataset(index, spec, plan, image_size=image_size, seed=seed, epoch=epoch,
                                 start_step=start_batch, decoder=decoder)
        planned.prepare()
        return TrainLoader(planned, index=index, steps_per_epoch=plan.steps, batch_size=batch_size,
                           num_workers=cfg.num_workers, pin_memory=pin_memory, start_batch=start_batch)
    steps, segments, batches = _plan_readers(index, batch_size=batch_size, seed=seed, epoch=epoch,
                                            world_size=world_size, num_workers=cfg.num_workers)
    _check_start(start_batch, steps)
    dataset = _EpochDataset(segments=segments[rank], batches=batches[rank], batch_size=batch_size,
                            image_size=image_size, shuffle_buffer=cfg.shuffle_buffer, seed=seed, epoch=epoch, rank=rank,
                            start_batch=start_batch, decoder=decoder)
    return TrainLoader(dataset, index=index, steps_per_epoch=steps, batch_size=batch_size,
                       num_workers=cfg.num_workers, pin_memory=pin_memory, start_batch=start_batch)


def _check_start(start_batch: int, steps: int) -> None:
    if not 0 <= start_batch <= steps:
        raise ConfigError(f"start_batch = {start_batch} is outside the epoch's {steps} steps; need 0 <= start_batch "
                          f"<= {steps}")
