"""The Head protocol shared by every classifier head (fc, partial_fc, dcp, attfc, vfc).

A head turns embeddings and labels into a loss, and owns the per-identity state it trains (class centers and their
momentum). The trainer drives every head the same way, once per step::

    head.plan(labels_B)             # once per batch, in order, up to cache.lookahead batches before it is used
    head.set_key_images(keys)       # attention batches only (attfc): the k key images of each query
    images, labels_B = head.take_dual_batch(images, labels_B, ...)
                                    # dual batches only: dcp keeps its gallery images and returns those the backbone
                                    # forwards; every other head gets the whole batch back
    emb_BD = engine.forward(images)
    loss = head(emb_BD, labels_B)   # logits, margin, cross-entropy
    engine.backward(loss)           # gradients reach the backbone and the head's rows
    head.update(lr)                 # the head's own optimizer step on the rows that received a gradient

The backbone optimizer (the engine) never sees head rows, so a head can keep them anywhere (device, bank, DCC).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offloadfr.config import BankCfg, CacheCfg, HeadCfg
from offloadfr.distributed import (
    ClassPartition,
    all_gather_labels,
    all_gather_with_grad,
    all_reduce_sum_,
    gather_rows_to_main,
    process_group_size,
    sharded_softmax_cross_entropy,
)
from offloadfr.kernels import sgd_rows_  # the plain row SGD lives with its fused form (kernels/); re-exported
from offloadfr.losses import Margin, margin_cross_entropy
from offloadfr.registry import Registry

__all__ = ["Head", "HeadDeps", "HEADS", "register_head", "build_head", "sgd_rows_", "gather_global_batch",
           "partitioned_loss", "gather_partitioned_rows", "keep_global_rows_in_state", "MULTI_PROCESS_HEADS"]

MULTI_PROCESS_HEADS = ("fc", "partial_fc", "dcp", "attfc", "vfc")
"""Heads that run on W > 1 processes: ``fc``, ``partial_fc`` and ``vfc`` partition their ids (``vfc``: its anchors) over
the ranks, ``dcp`` and ``attfc`` are data parallel (docs/distributed.md, which also says why ``pfc_dense`` is not)."""


@dataclass(frozen=True, kw_only=True)
class HeadDeps:
    """What a head is built from besides its own config.

    Attributes:
        margin: the margin applied to cosine logits (from ``loss``).
        num_classes: N, identities of the training set.
        dim: D, the embedding width.
        device: where the head computes.
        bank: the bank config (heads that keep rows off the device).
        cache: the DCC config (heads with a Dynamic Class Container).
        bank_path: the resolved Zarr directory of the bank.
        rank: this process's rank; the head owns a contiguous range of ids (``distributed.ClassPartition``).
        world_size: W, the number of training processes; 1 is the plain path (no collective).
        processes_per_host: the training processes on this machine, which share its host memory and cores (the ram
            tier's memory check counts all of their shares; ``bank.io_threads = 0`` divides the cores among them).
        backbone: the trained backbone (the query encoder), for heads with an EMA twin (``attfc`` copies it as its
            key encoder, ``dcp`` as its gallery net, and both read its parameters after each step); None when the
            head needs none.
        precision: the autocast dtype of the backbone's forward (float32: no autocast); twins run under it too.
    """

    margin: Margin
    num_classes: int
    dim: int
    device: torch.device
    bank: BankCfg
    cache: CacheCfg
    bank_path: Path
    rank: int = 0
    world_size: int = 1
    processes_per_host: int = 1
    backbone: nn.Module | None = None
    precision: torch.dtype = torch.float32


class Head(nn.Module):
    """Base class of classifier heads; see the module docstring for the per-step protocol."""

    def plan(self, labels_B: torch.Tensor) -> None:
        """Announces the labels (global ids, CPU int64) of a coming batch.

        The trainer calls it once for every batch, in the order the batches will reach ``forward``, up to
        ``cache.lookahead`` batches ahead. Heads with off-device rows start fetching them here. Default: nothing.
        """

    def set_key_images(self, keys_BK: torch.Tensor) -> None:
        """Hands over the key images of the coming ``forward``: normalised floats (B, k, 3, S, S) on the head's
        device, item ``b`` the k keys of query ``b`` (``data.sampler = "attention"``). Only ``attfc`` takes them."""
        raise NotImplementedError(f"{type(self).__name__} takes no key images; only head.kind = 'attfc' does")

    def take_dual_batch(self, images: torch.Tensor, labels: torch.Tensor, *, instance_rows: int,
                        images_per_identity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Receives a whole normalised ``dual`` batch (``data.sampler = "dual"``: ``instance_rows`` instance images,
        then identity groups of ``images_per_identity``) and returns the images the trained backbone forwards and
        their labels, in the order of the coming ``forward``'s embeddings. ``dcp`` keeps its gallery images here;
        every other head trains on the whole batch (the default returns it unchanged)."""
        return images, labels

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Returns the scalar training loss of embeddings ``emb_BD`` with global class ids ``labels_B``."""
        raise NotImplementedError

    @torch.no_grad()
    def update(self, lr: float) -> None:  # pragma: no cover - abstract
        """Applies the head's optimizer to the rows that received a gradient, then clears their gradients."""
        raise NotImplementedError

    @torch.no_grad()
    def skip(self) -> None:  # pragma: no cover - abstract
        """Drops this step's gradients without updating any row (a step skipped by the non-finite guard)."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Per-step metrics of the head (bank traffic, stall, cache hits); empty by default."""
        return {}

    def flush(self, step: int) -> None:
        """Persists off-device state at ``step`` in one go (``prepare`` then ``commit``), outside a checkpoint."""
        self.prepare(step)
        self.commit(step)

    def prepare(self, step: int) -> None:
        """Checkpoint phase 1: makes off-device state durable at ``step`` without publishing it (the trainer then
        writes the checkpoint, whose rename is the commit point). Default: everything is in ``state_dict``."""

    def commit(self, step: int) -> None:
        """Checkpoint phase 2, once the checkpoint of ``step`` is complete: publishes what ``prepare`` wrote."""

    def close(self) -> None:
        """Stops threads and closes files."""


HEADS: Registry = Registry("head.kind")
register_head = HEADS.register


def build_head(cfg: HeadCfg, deps: HeadDeps) -> Head:
    """Builds the head named by ``cfg.kind``.

    Raises:
        ConfigError: ``head.kind`` is not registered.
    """
    if deps.world_size > 1 and cfg.kind not in MULTI_PROCESS_HEADS:
        from offloadfr.errors import ConfigError

        raise ConfigError(f"head.kind = {cfg.kind!r} does not run on {deps.world_size} processes (WORLD_SIZE); use one "
                          f"of {', '.join(MULTI_PROCESS_HEADS)}, or launch 1 process (docs/distributed.md)")
    if deps.world_size > 1:  # each rank sees the positives of its own classes: running statistics span all ranks
        deps.margin.sum_over_processes = all_reduce_sum_
    head = HEADS.get(cfg.kind)(cfg, deps)
    assert isinstance(head, Head)
    return head


def gather_global_batch(emb_BD: torch.Tensor, labels_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a partitioned head: every rank's embeddings (with gradient) and labels, in rank order.

    On the 1-process path both are returned unchanged. Ranks must have equal batch sizes (the loader's drop_last).
    """
    if process_group_size() == 1:
        return emb_BD, labels_B
    return all_gather_with_grad(emb_BD), all_gather_labels(labels_B)


def partitioned_loss(logits_NC: torch.Tensor, target_N: torch.Tensor, *,
                     allow_unlabelled: bool = False) -> torch.Tensor:
    """Mean softmax cross-entropy over the global batch when this rank holds only its own class columns.

    ``target_N`` is the local column of each row's positive, or -1 when another rank owns it. One process:
    :func:`margin_cross_entropy` (rows with -1 are left out); W processes: the sharded cross-entropy (max and sum-exp
    all-reduced), where a row whose positive no rank owns is an error unless ``allow_unlabelled`` (then it is left
    out, as on one process).
    """
    if process_group_size() == 1:
        return margin_cross_entropy(logits_NC, target_N)
    return sharded_softmax_cross_entropy(logits_NC, target_N, allow_unlabelled=allow_unlabelled)


def gather_partitioned_rows(rows_CD: torch.Tensor, partition: ClassPartition) -> torch.Tensor | None:
    """All N rows of a tensor whose rows are partitioned by ``partition`` (a collective: every rank calls it): on
    W > 1 processes in rank 0's host memory and None on the other ranks (gathered a chunk at a time: the device never
    holds all N rows, and only one process holds them in host memory)."""
    if partition.world_size == 1:
        return rows_CD
    sizes = [end - start for start, end in map(partition.range_of, range(partition.world_size))]
    return gather_rows_to_main(rows_CD.contiguous(), sizes)


_ROWS = ("weight", "momentum_buf")


def keep_global_rows_in_state(head: Head) -> None:
    """Makes a head whose ``weight`` and ``momentum_buf`` rows are partitioned by ``head.partition`` save all of them
    (a collective in ``state_dict``) and load its own range of a state holding all of them, so a checkpoint does not
    depend on the number of processes (``fc``, ``vfc``).

    Only rank 0 writes a checkpoint, so only rank 0's ``state_dict()`` holds the N rows; on the other ranks both keys
    are left out (a strict ``load_state_dict`` of such a state fails on the missing keys), and their host memory holds
    no copy of the rows.
    """
    head.register_state_dict_post_hook(_gather_rows_hook)
    head.register_load_state_dict_pre_hook(_slice_rows_hook)


def _gather_rows_hook(module: Head, state: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict: all rows on rank 0 (a collective), none on the others."""
    for name in _ROWS:
        rows = gather_partitioned_rows(state[prefix + name].detach(), module.partition)
        if rows is None:
            del state[prefix + name]
        else:
            state[prefix + name] = rows


def _slice_rows_hook(module: Head, state: dict, prefix: str, *args: object) -> None:
    """load_state_dict: keeps this rank's rows of a state that holds all of them."""
    for name in _ROWS:
        key = prefix + name
        if key in state and state[key].shape[0] == module.partition.num_classes:
            state[key] = state[key][module.partition.local_slice]
