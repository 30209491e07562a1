"""Planned samplers: ``identity`` (P×K), ``attention`` (query + k keys), ``dual`` (instance + identity) and ``block``
(every image once, identities from a sliding window of bank blocks). ``instance`` lives in ``loader.py``.

A planned sampler decides the whole epoch from ``index.json`` alone, before any image is read: which stored samples
form each batch (a list of sample numbers per batch) and so which ids every batch needs. The plan is a function of
``(seed, epoch)``, the dataset and the sampler's parameters only (not of the number of ranks or workers, apart from
which batches are dropped at the end): global batch ``t`` goes to rank ``t % world_size`` as its step
``t // world_size``, and a rank's step ``s`` is loaded by its DataLoader worker ``(s - start) % num_workers``, where
``start`` is the first step loaded (0, or a resumed run's place in the epoch: the steps before it are not read). The
DataLoader returns worker outputs in round-robin order, so each rank sees its steps in order, every rank takes the
same number of steps, and no two (rank, worker) readers load the same batch.

Mixing without random I/O over the whole dataset: items are put in order by a *sliding-window key*, the position of
the item's shard (or bank block) in an epoch-random order plus a uniform offset in ``[0, window)``. Sorting by that
key shuffles items only among ``window`` neighbouring shards (blocks) at a time, so readers move forward through a
window of shards. A worker reads a batch's samples by byte offset: a shard's member table (offset and size of every
tar member) is built once per process from the tar headers, and consecutive samples of one identity (contiguous in
identity-grouped shards) come with one read.

Batch layouts (``images_u8`` uint8, RGB, randomly flipped; ``labels`` int64 ids, always every id the batch needs, so
``head.plan(labels)`` works unchanged):

- ``identity``: ``(P*K, 3, S, S)`` and ``(P*K,)``; rows ``p*K .. p*K+K-1`` are identity ``p``. Each epoch every
  identity appears exactly once (in one group of K), except the identities that do not fill a last global batch.
  K distinct images are drawn when the identity has at least K; otherwise all of them, then random repeats.
- ``attention``: ``(B, 1+k, 3, S, S)`` and ``(B,)``; item ``b`` holds the query (index 0) and k keys (1..k) of
  identity ``labels[b]``. Every stored image is a query exactly once per epoch (drop_last aside); keys are drawn with
  replacement from the identity's other images (the query itself only when it is the identity's only image), or,
  with ``keys_include_query``, from all its images, the query included (AttFC's loader).
- ``dual``: ``(B + P*K, 3, S, S)`` and ``(B + P*K,)``; rows ``[0, B)`` are an instance batch (every image once per
  epoch, as ``attention``'s queries), rows ``B + p*K .. B + p*K+K-1`` identity ``p`` of an identity batch. The
  identity stream cycles: inside one cycle no identity repeats; a new cycle starts when it runs out (F2C's loaders).
- ``block``: ``(B, 3, S, S)`` and ``(B,)``; every image once per epoch. The bank blocks (``block_rows`` consecutive
  ids) are put in a random order, and images are ordered by their block's place in it plus a uniform offset in
  ``[0, block_window)``: a batch's ids come from about ``block_window`` neighbouring blocks, and each block enters
  and leaves that window once per epoch, so the nvme tier loads each bank block about once per epoch.

Corrupt samples (a member missing from a truncated tar, an undecodable JPEG, a ``cls`` that disagrees with
``index.json``) are replaced by a copy of a good image of the same batch, of the same identity when there is one,
and counted.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from offloadfr.data.decode import decode_face
from offloadfr.data.shards import DatasetIndex, sample_key
from offloadfr.errors import ConfigError, DataError

__all__ = ["SAMPLERS", "PLANNED_SAMPLERS", "SamplerSpec", "EpochPlan", "plan_epoch", "PlannedDataset",
           "cached_member_table"]

SAMPLERS = ("instance", "identity", "attention", "dual", "block")
"""Every value of ``data.sampler``."""
PLANNED_SAMPLERS = ("identity", "attention", "dual", "block")
"""The samplers this module plans (``instance`` streams shards in ``loader.py``)."""

_STREAM_PLAN = 0x5A3B1  # keeps the plan's random stream apart from the other users of (seed, epoch)
_STREAM_FLIP = 0xF11B
_MAX_OPEN = 16  # open shard files per worker


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplerSpec:
    """A sampler and its resolved parameters.

    Attributes:
        kind: one of :data:`PLANNED_SAMPLERS`.
        batch_size: B, images per batch (``identity``: P*K; ``attention``: items; ``dual``: the instance part).
        images_per_identity: K (``identity``, and the identity part of ``dual``).
        num_identities: P, identities per identity batch (``identity``, ``dual``).
        num_keys: k, key images per query (``attention``).
        keys_include_query: ``attention``: keys drawn from all the identity's images, the query included.
        window: ``block``: width of the block window, in blocks; others: width of the shard window, in shards.
        block_rows: ``block``: ids per bank block.
    """

    kind: str
    batch_size: int
    images_per_identity: int = 1
    num_identities: int = 0
    num_keys: int = 0
    keys_include_query: bool = False
    window: int = 1
    block_rows: int = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class EpochPlan:
    """One epoch of one rank.

    Attributes:
        steps: batches of every rank in this epoch.
        refs: per step, the global sample numbers of the batch's images in layout order (see the module docstring).
        labels: per step, the id of each image in ``refs``.
        global_batches: per step, the global batch number (seeds that batch's flips).
    """

    steps: int
    refs: list[np.ndarray]
    labels: list[np.ndarray]
    global_batches: list[int]


class _Identities:
    """The identities of an index as flat arrays, in index order (shard by shard)."""

    def __init__(self, index: DatasetIndex) -> None:
        shard, label, count = [], [], []
        for s, info in enumerate(index.shards):
            shard += [s] * len(info.ids)
            label += list(info.ids)
            count += list(info.counts)
        self.shard = np.asarray(shard, np.int64)
        self.label = np.asarray(label, np.int64)
        self.count = np.asarray(count, np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int64)  # global sample number
        # per sample: its identity (row in these arrays)
        self.of_sample = np.repeat(np.arange(len(self.label)), self.count)


def _window_order(rng: np.random.Generator, group_of_item: np.ndarray, num_groups: int, window: int) -> np.ndarray:
    """Items sorted by (place of their group in a random order of groups) + U(0, window): a sliding-window shuffle."""
    place = np.empty(num_groups, np.float64)
    place[rng.permutation(num_groups)] = np.arange(num_groups)
    key = place[group_of_item] + rng.uniform(0.0, window, size=len(group_of_item))
    return np.argsort(key, kind="stable")


def _groups_of_k(rng: np.random.Generator, ids: _Identities, rows: np.ndarray, k: int) -> np.ndarray:
    """For each identity row, K of its sample numbers: distinct when it has K, else all then random repeats."""
    out = np.empty((len(rows), k), np.int64)
    for i, j in enumerate(rows):
        n = int(ids.count[j])
        if n >= k:
            pick = rng.choice(n, size=k, replace=False)
        else:
            pick = np.concatenate([rng.permutation(n), rng.integers(0, n, size=k - n)])
        out[i] = ids.first[j] + pick
    return out


def _identity_batches(rng: np.random.Generator, ids: _Identities, spec: SamplerSpec, num_shards: int
                      ) -> np.ndarray:
    """(T, P*K) sample numbers: each identity in one group of K, P groups per batch, T = num_identities // P."""
    p, k = spec.num_identities, spec.images_per_identity
    order = _window_order(rng, ids.shard, num_shards, spec.window)
    num_batches = len(order) // p
    rows = order[: num_batches * p]
    return _groups_of_k(rng, ids, rows, k).reshape(num_batches, p * k)


def _sample_order(rng: np.random.Generator, ids: _Identities, spec: SamplerSpec, num_shards: int) -> np.ndarray:
    """Every sample number once, window-shuffled over shards."""
    return _window_order(rng, ids.shard[ids.of_sample], num_shards, spec.window)


def plan_epoch(index: DatasetIndex, spec: SamplerSpec, *, seed: int, epoch: int, rank: int,
               world_size: int) -> EpochPlan:
    """Plans rank ``rank``'s batches of epoch ``epoch`` (see the module docstring for each layout).

    Args:
        index: the dataset.
        spec: the sampler.
        seed: data-order seed.
        epoch: epoch number; each epoch has its own order.
        rank: this process's rank.
        world_size: number of ranks.

    Returns:
        The plan; ``steps`` is the same on every rank.

    Raises:
        ConfigError: the dataset is too small for one batch per rank.
    """
    ids = _Identities(index)
    rng = np.random.default_rng([seed, epoch, _STREAM_PLAN])
    num_shards = len(index.shards)
    b = spec.batch_size
    if spec.kind == "identity":
        batches = _identity_batches(rng, ids, spec, num_shards)
        unit = f"{spec.num_identities} identities"
    elif spec.kind in ("attention", "dual"):
        queries = _sample_order(rng, ids, spec, num_shards)
        num_batches = len(queries) // b
        queries = queries[: num_batches * b]
        if spec.kind == "attention":
            k = spec.num_keys
            row = ids.of_sample[queries]
            n = ids.count[row]
            offset = queries - ids.first[row]
            if spec.keys_include_query:  # uniform over all the identity's images, with replacement (AttFC's code)
                key_offset = rng.integers(0, n[:, None], size=(len(queries), k))
            else:  # uniform over the identity's other images, with replacement (the query itself when n == 1)
                draw = rng.integers(0, np.maximum(n - 1, 1)[:, None], size=(len(queries), k))
                key_offset = np.where(n[:, None] > 1, draw + (draw >= offset[:, None]), 0)
            items = np.concatenate([queries[:, None], ids.first[row][:, None] + key_offset], axis=1)
            batches = items.reshape(num_batches, b * (1 + k))
        else:
            batches = _dual(ids, spec, num_shards, queries.reshape(num_batches, b), seed, epoch,
                            num_needed=(num_batches // world_size) * world_size)
        unit = f"{b} images"
    elif spec.kind == "block":
        num_blocks = -(-index.num_classes // spec.block_rows)
        block_of_sample = ids.label[ids.of_sample] // spec.block_rows
        order = _window_order(rng, block_of_sample, num_blocks, spec.window)
        num_batches = len(order) // b
        batches = order[: num_batches * b].reshape(num_batches, b)
        unit = f"{b} images"
    else:
        raise AssertionError(f"not a planned sampler: {spec.kind}")
    steps = len(batches) // world_size
    if steps == 0:
        raise ConfigError(f"data.sampler = {spec.kind!r}: {index.root} has too few samples for one batch of {unit} "
                          f"on each of {world_size} ranks; lower train.batch_size (or the sampler's sizes)")
    mine = [rank + s * world_size for s in range(steps)]
    refs = [batches[t] for t in mine]
    if spec.kind == "attention":
        labels = [ids.label[ids.of_sample[r[:: 1 + spec.num_keys]]] for r in refs]
    else:
        labels = [ids.label[ids.of_sample[r]] for r in refs]
    return EpochPlan(steps=steps, refs=refs, labels=labels, global_batches=mine)


def _dual(ids: _Identities, spec: SamplerSpec, num_shards: int, instance: np.ndarray,
          seed: int, epoch: int, *, num_needed: int) -> np.ndarray:
    """Instance batches (T, B) joined with identity batches drawn from cycles of the identity sampler."""
    parts: list[np.ndarray] = []
    cycle = 0
    while sum(len(p) for p in parts) < num_needed:
        cycle_rng = np.random.default_rng([seed, epoch, _STREAM_PLAN, 1 + cycle])
        got = _identity_batches(cycle_rng, ids, spec, num_shards)
        if len(got) == 0:
            raise ConfigError(f"data.sampler = 'dual': the dataset has {len(ids.label)} identities, fewer than the "
                              f"{spec.num_identities} of one identity batch; lower data.dual_identities")
        parts.append(got)
        cycle += 1
    id_batches = np.concatenate(parts)[: len(instance)] if parts else np.empty((0, 0), np.int64)
    if len(id_batches) < len(instance):  # only batches beyond num_needed (dropped at the end) lack one
        instance = instance[: len(id_batches)]
    return np.concatenate([instance, id_batches], axis=1) if len(instance) else instance


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True, slots=True)
class _Member:
    """A stored sample's place in its tar: the bytes ``[lo, hi)`` hold all its members."""

    lo: int
    hi: int
    data: dict[str, tuple[int, int]]  # extension -> (offset of the data, size)


def member_table(path: Path) -> dict[str, _Member]:
    """Sample key -> where its members lie in the tar, from the tar headers (a truncated tail is left out).

    Reads only the 512-byte headers (a seek past each member's data). USTAR headers, as :class:`ShardWriter` writes
    them, are parsed here directly; a tar with other header types (pax, GNU long names) is read with ``tarfile``.
    """
    size = path.stat().st_size
    entries: list[tuple[str, int, int, int]] = []  # name, header offset, data offset, data size
    try:
        with open(path, "rb") as f:
            pos = 0
            while pos + 512 <= size:
                f.seek(pos)
                header = f.read(512)
                if header == b"\0" * 512 or len(header) < 512:
                    break
                kind = header[156:157]
                if kind not in (b"0", b"\0"):
                    if kind in (b"x", b"g", b"L", b"K"):
                        return _member_table_tarfile(path, size)
                name = header[:100].rstrip(b"\0").decode("utf-8")
                prefix = header[345:500].rstrip(b"\0").decode("utf-8") if header[257:262] == b"ustar" else ""
                n = int(header[124:136].rstrip(b"\0 ").decode("ascii") or "0", 8)
                if kind in (b"0", b"\0"):
                    entries.append((f"{prefix}/{name}" if prefix else name, pos, pos + 512, n))
                pos += 512 + -(-n // 512) * 512
    except (OSError, ValueError, UnicodeDecodeError):
        pass  # garbled: what was read so far stands; the rest is reported as corrupt when read
    return _group_members(entries, size)


def _member_table_tarfile(path: Path, size: int) -> dict[str, _Member]:
    entries = []
    try:
        with tarfile.open(path, "r:") as tar:
            entries = [(info.name, info.offset, info.offset_data, info.size) for info in tar if info.isfile()]
    except (tarfile.TarError, OSError, EOFError):
        pass
    return _group_members(entries, size)


def _group_members(entries: list[tuple[str, int, int, int]], size: int) -> dict[str, _Member]:
    """Members grouped into samples by key (the name up to the first dot of its last part, as webdataset does)."""
    table: dict[str, _Member] = {}
    for name, offset, offset_data, n in entries:
        if offset_data + n > size:  # cut off by truncation
            continue
        head, slash, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        key = head + slash + stem
        end = offset_data + n
        old = table.get(key)
        if old is None:
            table[key] = _Member(offset, end, {ext: (offset_data, n)})
        else:
            old.data[ext] = (offset_data, n)
            table[key] = _Member(old.lo, max(old.hi, end), old.data)
    return table


_TABLES: dict[tuple[str, int, int], dict[str, _Member]] = {}


def cached_member_table(path: Path) -> dict[str, _Member]:
    """:func:`member_table` of ``path``, built once per process (and per size and mtime of the file); its entries are
    in tar order, so the n-th is the shard's n-th sample."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _TABLES:
        _TABLES[key] = member_table(path)
    return _TABLES[key]


class PlannedDataset(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """One rank's planned epoch; each worker yields ``(images_u8, labels, num_bad, note)`` for its steps.

    Args:
        index: the dataset.
        spec: the sampler.
        plan: this rank's plan.
        image_size: side of the returned images.
        seed: flip seed.
        epoch: epoch number.
        start_step: the first step to load (a resumed run's place in the epoch); the steps before it are not read.
            The steps after it are those of the whole epoch: a batch depends only on the plan and its global batch
            number (which seeds its flips), not on the worker that loads it.
        decoder: the JPEG decoder, resolved (``data.decode.resolve_decoder``).
    """

    def __init__(self, index: DatasetIndex, spec: SamplerSpec, plan: EpochPlan, *, image_size: int, seed: int,
                 epoch: int, start_step: int = 0, decoder: str = "pil") -> None:
        super().__init__()
        self.decoder = decoder
        assert 0 <= start_step <= plan.steps, f"start step {start_step} outside the plan's {plan.steps} steps"
        self.spec = spec
        self.plan = plan
        self.start_step = start_step
        self.image_size = image_size
        self.seed = seed
        self.epoch = epoch
        self.paths = [s.path for s in index.shards]
        self.starts = np.concatenate([[0], np.cumsum([s.num_samples for s in index.shards])]).astype(np.int64)
        self.ids = _Identities(index)
        self._files: dict[int, BinaryIO] = {}

    def prepare(self) -> None:
        """Builds the member tables of the shards this plan reads, in this process (forked workers inherit them)."""
        refs = self.plan.refs[self.start_step:]
        used = np.unique(np.searchsorted(self.starts, np.concatenate(refs), side="right") - 1) if refs else []
        for s in used:
            cached_member_table(self.paths[int(s)])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, str]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        num_workers = info.num_workers if info is not None else 1
        try:
            # worker 0 takes the first step, as the DataLoader's round robin returns worker 0's output first
            for step in range(self.start_step + worker, self.plan.steps, num_workers):
                yield self._load(step)
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def _key(self, g: int) -> str:
        """The tar key of global sample number ``g``."""
        row = int(self.ids.of_sample[g])
        return sample_key(int(self.ids.label[row]), g - int(self.ids.first[row]))

    def _file(self, shard: int) -> BinaryIO:
        if shard not in self._files:
            if len(self._files) >= _MAX_OPEN:
                self._files.pop(next(iter(self._files))).close()
            self._files[shard] = open(self.paths[shard], "rb")  # noqa: SIM115 (closed in __iter__)
        return self._files[shard]

    def _read(self, refs: np.ndarray) -> dict[int, dict[str, bytes] | str]:
        """Sample number -> its members, or a reason why it cannot be read; one read per run of samples."""
        out: dict[int, dict[str, bytes] | str] = {}
        unique = np.unique(refs)
        shards = np.searchsorted(self.starts, unique, side="right") - 1
        i = 0
        while i < len(unique):  # a run: consecutive sample numbers in one shard, all in the member table
            s = int(shards[i])
            table = cached_member_table(self.paths[s])
            j = i
            members = []
            while j < len(unique) and int(shards[j]) == s and (j == i or unique[j] == unique[j - 1] + 1):
                key = self._key(int(unique[j]))
                m = table.get(key)
                if m is None:
                    if j == i:
                        out[int(unique[j])] = f"sample {key} missing from {self.paths[s]} (truncated or garbled tar)"
                        j += 1
                    break
                members.append((int(unique[j]), m))
                j += 1
            if members:
                lo, hi = members[0][1].lo, members[-1][1].hi
                try:
                    f = self._file(s)
                    f.seek(lo)
                    buf = f.read(hi - lo)
                except OSError as exn:
                    buf = b""
                    for g, _ in members:
                        out[g] = f"{self.paths[s]}: {type(exn).__name__}: {exn}"
                for g, m in members:
                    if g in out:
                        continue
                    out[g] = {ext: buf[off - lo: off - lo + n] for ext, (off, n) in m.data.items()}
            i = max(j, i + 1)
        return out

    def _decode(self, sample: dict[str, bytes] | str, label: int) -> np.ndarray:
        if isinstance(sample, str):
            raise DataError(sample)
        if int(sample["cls"].decode("ascii").strip()) != label:
            raise DataError(f"cls {sample['cls']!r} disagrees with index.json's id {label}")
        return decode_face(sample["jpg"], self.image_size, self.decoder)

    def _load(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int, str]:
        refs, labels = self.plan.refs[step], self.plan.labels[step]
        per_image_labels = labels if self.spec.kind != "attention" else np.repeat(labels, 1 + self.spec.num_keys)
        rng = np.random.default_rng([self.seed, self.epoch, self.plan.global_batches[step], _STREAM_FLIP])
        flips = rng.random(len(refs)) < 0.5
        samples = self._read(refs)
        size = self.image_size
        images = np.empty((len(refs), size, size, 3), np.uint8)
        good = np.zeros(len(refs), bool)
        num_bad, note = 0, ""
        for i, (g, label) in enumerate(zip(refs.tolist(), per_image_labels.tolist(), strict=True)):
            try:
                img = self._decode(samples[g], label)
            except Exception as exn:  # PIL raises many types on corrupt data; never fatal
                num_bad += 1
                if not note:
                    note = f"sample #{g} ({type(exn).__name__}: {exn})"
                continue
            images[i] = img[:, ::-1] if flips[i] else img
            good[i] = True
        if num_bad:
            if not good.any():
                raise DataError(f"every image of batch {step} of epoch {self.epoch} is unreadable ({note}); the "
                                "dataset is corrupt: re-create or re-convert it")
            for i in np.nonzero(~good)[0]:  # a good image of the same id, else any good image (with its id)
                same = np.nonzero(good & (per_image_labels == per_image_labels[i]))[0]
                donor = int(same[0]) if len(same) else int(np.nonzero(good)[0][0])
                images[i] = images[donor][:, ::-1]
                per_image_labels = per_image_labels.copy()
                per_image_labels[i] = per_image_labels[donor]
            if self.spec.kind == "attention":
                labels = per_image_labels[:: 1 + self.spec.num_keys]
            else:
                labels = per_image_labels
        images_u8 = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        if self.spec.kind == "attention":
            images_u8 = images_u8.reshape(len(labels), 1 + self.spec.num_keys, 3, size, size)
        return images_u8, torch.from_numpy(np.asarray(labels, np.int64).copy()), num_bad, note
