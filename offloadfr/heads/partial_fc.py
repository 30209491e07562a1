"""``partial_fc``: Partial FC made offloadable. All N centers (and their momentum) live in a Zarr bank off the device;
K of them are resident in a Dynamic Class Container (DCC) on the device; a prefetcher streams rows between the two.

Legend: B = batch, D = embedding width, N = num_classes, K = num_slots, A = active slots of a step.

Per step (DESIGN §5):

1. ``plan(labels_B)`` (called ``cache.lookahead`` batches ahead) submits the ids the step will need: the batch's
   positives plus a rotating quota of negatives, the next ids of a per-epoch random permutation (tier ``ram``) or of
   a random order of whole blocks (tier ``nvme``, so bank reads stay sequential). Every id passes through the DCC
   once per pass of that stream. The quota is ``K // (L + 1) - (positives)``, since the plans of the L + 1 queued
   steps must fit in K together. When K ≥ N the first plan takes every id, so all rows are resident from step 0.
2. ``forward`` waits for the step's rows (``prefetch/stall(%)``), then computes logits against every used slot
   (``sample_rate = 1``), or against the positives plus a random subset of the other used slots.
3. ``update(lr)`` applies SGD with momentum and weight decay to the active rows only — the rows that received a
   gradient ("sparse momentum", as PFC v1, PLSC and TorchRec do). arcface_torch PartialFC_V2 (``pfc_dense``) instead
   decays and moves every one of its N rows every step, including rows that were not sampled.

With K ≥ N and ``sample_rate = 1`` this head computes exactly what ``fc`` computes (tests/test_partial_fc.py).

With ``bank.dtype = "bfloat16"`` the bank stores and moves centers and momentum in bfloat16; the DCC holds them in
float32 (the update is float32), and the prefetcher rounds each evicted row once, by ``WRITE_BACK_ROUNDING``
(docs/bank.md has the measurements behind the choice).

With W processes (docs/distributed.md): the ids are split into W contiguous ranges whose boundaries fall on bank
blocks (``ClassPartition(align=chunk_rows)``), each rank has its own DCC, negative stream and prefetcher over its
range, and all ranks share ONE global bank on disk, each writing only the chunks of its own range (one writer per
chunk). The embeddings and labels of the global batch are all-gathered (also in ``plan``, so each rank prefetches the
positives it owns from every rank's batch) and the cross-entropy is sharded. Because the bank is global, a run saved
on W processes resumes on any other number.
"""

from __future__ import annotations

from typing import Any

import torch

from offloadfr.cache import DynamicClassContainer, Prefetcher
from offloadfr.config import HeadCfg
from offloadfr.distributed import all_gather_labels, all_gather_objects
from offloadfr.errors import CheckpointError
from offloadfr.heads.base import Head, HeadDeps, gather_global_batch, partitioned_loss, register_head
from offloadfr.heads.shared_bank import (
    WRITE_BACK_ROUNDING,
    BlockCounts,
    check_bank_step,
    commit_once,
    open_shared_bank,
    prepare_in_turn,
    saved_bank_step,
)
from offloadfr.kernels import check_kernel, cosine_logits, margin_softmax_cross_entropy, update_rows_

__all__ = ["PartialFCHead"]

_ARRAYS = ("centers", "momentum")

class _NegativeStream:
    """An endless stream of ids: a random permutation of all ids per pass (of whole blocks when ``block_rows > 1``)."""

    def __init__(self, num_classes: int, block_rows: int, seed: int, first_id: int = 0) -> None:
        self.num_classes = num_classes
        self.first_id = first_id  # the stream covers [first_id, first_id + num_classes): a rank's id range
        self.block_rows = max(1, block_rows)
        self.gen = torch.Generator().manual_seed(seed)
        self.buffer = torch.empty(0, dtype=torch.int64)
        self.passes = 0

    def _refill(self) -> None:
        num_blocks = -(-self.num_classes // self.block_rows)
        order = torch.randperm(num_blocks, generator=self.gen)
        ids = (order[:, None] * self.block_rows + torch.arange(self.block_rows)[None, :]).reshape(-1)
        self.buffer = torch.cat([self.buffer, ids[ids < self.num_classes]])
        self.passes += 1

    def take(self, n: int) -> torch.Tensor:
        while self.buffer.numel() < n:
            self._refill()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out + self.first_id

    def state(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "buffer": self.buffer.clone(), "passes": self.passes}

    def load(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.buffer, self.passes = state["buffer"], state["passes"]


@register_head("partial_fc")
class PartialFCHead(Head):
    """Partial FC over a Zarr bank and a device DCC (see the module docstring).

    Args:
        cfg: the ``[head]`` section (sample_rate, momentum, weight decay, lr scale).
        deps: margin, sizes, device, the ``[bank]`` and ``[cache]`` configs and the bank's path.

    Example::

        head = PartialFCHead(HeadCfg(kind="partial_fc"), deps)
        head.plan(labels_B)                 # L batches ahead, by the trainer
        loss = head(emb_BD, labels_B); loss.backward(); head.update(lr)
        head.flush(step)                    # at a checkpoint: the bank then holds every row as of ``step``
    """

    def __init__(self, cfg: HeadCfg, deps: HeadDeps) -> None:
        super().__init__()
        self.cfg = cfg
        self.margin = deps.margin
        self.kernel = check_kernel(cfg.kernel, deps.margin, deps.device, deps.world_size)
        self.num_classes = deps.num_classes
        self.lookahead = deps.cache.lookahead
        self.device = deps.device
        self.world_size = deps.world_size
        # One global bank, opened rank by rank; this rank's block-aligned id range (and only its rows with ram tier)
        self.bank, self.partition = open_shared_bank(deps, arrays=_ARRAYS, head_kind="partial_fc")
        num_local = self.partition.num_local
        num_slots = min(deps.cache.num_slots or num_local, num_local)
        self.dcc = DynamicClassContainer(num_slots, deps.dim, arrays=_ARRAYS, device=deps.device,
                                         policy=deps.cache.policy)
        self.prefetcher = Prefetcher(self.bank, self.dcc, arrays=_ARRAYS, device=deps.device,
                                     rounding=WRITE_BACK_ROUNDING, seed=deps.bank.seed + deps.rank)
        block_rows = self.bank.chunk_rows if deps.bank.tier == "nvme" else 1
        self._stream_args = (num_local, block_rows, deps.bank.seed + deps.rank, self.partition.class_start)
        self.negatives = _NegativeStream(*self._stream_args)
        self.all_resident = num_slots >= num_local
        self._admitted_all = False  # all_resident: the first plan (after a start or a resume) takes every id
        self.num_planned = 0
        self.num_steps = 0
        self._active_slots: torch.Tensor | None = None
        self._w_AD: torch.Tensor | None = None
        self._every_slot = False  # this step's active slots are all K slots (w_AD is then the DCC's own rows)
        self._blocks = BlockCounts()

    # ------------------------------------------------------------------------------------------------ the plan
    def plan(self, labels_B: torch.Tensor) -> None:
        """Submits the positives of a coming batch plus this step's quota of negatives to the prefetcher."""
        labels_B = labels_B.detach().to(torch.int64)
        if self.world_size > 1:  # every rank's batch: this rank fetches the positives it owns (a collective)
            labels_B = all_gather_labels(labels_B.to(self.device))
        positives = torch.unique(labels_B.cpu())
        positives = positives[(positives >= self.partition.class_start) & (positives < self.partition.class_end)]
        if self.all_resident:
            ids = positives if self._admitted_all else torch.arange(self.partition.class_start,
                                                                    self.partition.class_end)
            self._admitted_all = True
        else:
            quota = max(0, self.dcc.num_slots // (self.lookahead + 1) - positives.numel())
            ids = torch.cat([positives, self.negatives.take(quota)])
        self.prefetcher.submit(ids, self.num_planned)
        self.num_planned += 1

    # --------------------------------------------------------------------------------------------- the step
    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        if self.num_planned == self.num_steps:  # called without the trainer's lookahead (tests, benchmarks)
            self.plan(labels_B)
        self.prefetcher.ready(self.num_steps)
        emb_ND, labels_N = gather_global_batch(emb_BD, labels_B)
        pos_slots_N = self.dcc.slots_of(labels_N)  # -1 for the ids other ranks own
        used_K = self.dcc.valid_K
        if self.cfg.sample_rate >= 1.0:
            active_A = torch.nonzero(used_K).reshape(-1)
        else:
            active_A = self._sample(pos_slots_N[pos_slots_N >= 0], used_K)
        # position of each positive in active_A (active_A is sorted, and contains every positive of this rank)
        target_N = torch.where(pos_slots_N >= 0, torch.searchsorted(active_A, pos_slots_N), -1)
        # active_A is sorted and unique, so A = K means every slot in order: the rows themselves, not a copy (the DCC
        # changes only in ``ready`` and ``update``, never between this forward and its backward)
        self._every_slot = active_A.numel() == self.dcc.num_slots
        if self._every_slot:
            w_AD = self.dcc["centers"].detach().requires_grad_(True)
        else:
            w_AD = self.dcc["centers"].index_select(0, active_A).requires_grad_(True)
        self._active_slots, self._w_AD = active_A, w_AD
        cos_NA = cosine_logits(emb_ND, w_AD, self.cfg.gemm_precision, kernel=self.kernel)
        if self.kernel == "triton":  # one process only (check_kernel); writes the gradient into cos_NA's buffer
            return margin_softmax_cross_entropy(cos_NA, target_N, self.margin, kernel="triton")
        return partitioned_loss(self.margin(cos_NA, target_N), target_N)

    def _sample(self, pos_slots_B: torch.Tensor, used_K: torch.Tensor) -> torch.Tensor:
        """Sorted slots: every positive plus random other used slots, ``sample_rate`` × used slots in all."""
        num_used = int(used_K.sum())
        num_active = max(int(self.cfg.sample_rate * num_used), int(torch.unique(pos_slots_B).numel()))
        score_K = torch.rand(used_K.shape[0], device=used_K.device)
        score_K[~used_K] = -1.0
        score_K[pos_slots_B] = 2.0
        return torch.sort(torch.topk(score_K, k=num_active).indices).values

    @torch.no_grad()
    def update(self, lr: float) -> None:
        """Sparse-momentum SGD on the active rows (those that were in the softmax), in place in the DCC: gathered,
        updated and scattered back (``head.kernel = "torch"``), or in one fused pass (``"triton"``)."""
        if self._w_AD is None:
            return
        if self._w_AD.grad is not None:  # sorted and unique slots; None: every slot in order, no gather
            slots_A = None if self._every_slot else self._active_slots
            update_rows_(self.dcc["centers"], self.dcc["momentum"], self._w_AD.grad, slots_A,
                         lr=lr * self.cfg.lr_scale, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay,
                         kernel=self.kernel)
        self._active_slots, self._w_AD = None, None
        self.num_steps += 1

    @torch.no_grad()
    def skip(self) -> None:
        """Drops this step's gradient; no row moves, but the step (and its plan) is consumed."""
        self._active_slots, self._w_AD = None, None
        self.num_steps += 1

    # ---------------------------------------------------------------------------------- state and metrics
    def metrics(self) -> dict[str, float]:
        """The prefetcher's traffic and stall, the DCC's used slots, and the Zarr block reads (``bank/blocks_read``:
        blocks loaded from the store, what the nvme tier pays for) and journal writes (``bank/blocks_staged``),
        all since the previous call."""
        used = {"cache/used_slots": float(self.dcc.num_used)}
        return {**self.prefetcher.metrics(), **self._blocks.since(self.bank), **used}

    def prepare(self, step: int) -> None:
        """Writes every resident row back and prepares the bank's flush of ``step`` (``ClassBank.prepare``).

        With W processes the ranks prepare one after the other (each stages only the chunks of its own id range, and
        the bank's attributes are rewritten by one rank at a time).
        """
        self.prefetcher.write_back_all()
        prepare_in_turn(self.bank, self.partition, step)

    def commit(self, step: int) -> None:
        """Commits the bank's flush of ``step``: its recorded step becomes ``step``.

        With W processes rank 0 commits the whole journal (every rank's chunks: one commit point), then the other
        ranks take note of it.
        """
        commit_once(self.bank, self.partition, step)

    def get_extra_state(self) -> dict[str, Any]:
        bank_step = saved_bank_step(self.bank)
        mine = {"negatives": self.negatives.state(), "bank_step": bank_step}
        # Every rank's stream (a collective), so that a resume on the same number of processes continues each one.
        return {"num_steps": self.num_steps, "bank_step": bank_step, "ranks": all_gather_objects(mine)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restores the negative stream and the step count of a checkpoint (the rows come from the bank).

        Raises:
            CheckpointError: the bank's recorded step differs from the checkpoint's (a crash between the bank
                flush and the checkpoint, or a bank that trained on): resuming would mix rows of two steps.
        """
        check_bank_step(self.bank, state["bank_step"])
        if self.num_planned:
            raise CheckpointError("load a partial_fc checkpoint before the first plan() of the run")
        ranks = state.get("ranks", [{"negatives": state.get("negatives")}])
        if len(ranks) == self.world_size:
            self.negatives.load(ranks[self.partition.rank]["negatives"])
        else:  # saved on another number of processes: the ranges differ, so each rank starts a fresh stream
            self.negatives = _NegativeStream(*self._stream_args)
        self.num_steps = self.num_planned = state["num_steps"]

    def close(self) -> None:
        self.prefetcher.close()
        self.bank.close()

    def __repr__(self) -> str:
        return (f"PartialFCHead(num_classes={self.num_classes}, num_slots={self.dcc.num_slots}, "
                f"tier={self.bank.tier}, sample_rate={self.cfg.sample_rate})")
