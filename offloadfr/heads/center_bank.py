"""Bank mode of the generated-center heads (``dcp``, ``attfc``): their latest centers kept in the class bank, and
some of them read back as extra negatives (``head.bank_negatives``; DESIGN §5), streamed to the device by the
prefetcher.

Legend: B = probe rows, C = logit columns before the bank's, n = ``head.bank_negatives``, N = identities, D = width,
K = ``cache.num_slots``, L = ``cache.lookahead``, W = processes.

The two heads make a center for an identity from the features of an EMA network (F2C's gallery features, AttFC's
generative class centers) and keep only a small device pool or queue of them. With the bank off they behave as the
authors' code does. With the bank on (n > 0) a :class:`CenterBank` keeps every identity's latest center in the run's
``[bank]`` (a ``ClassBank`` with one array, ``centers``, no momentum), a Dynamic Class Container of K of them on the
device, and a ``Prefetcher`` between the two, as ``partial_fc`` does (DESIGN §5). Per step:

1. ``plan(labels_B)``, L batches ahead (the trainer's lookahead): submits to the prefetcher the batch's identities
   (their centers are written after the step, into the container, so they must be resident) plus the step's
   negatives: the next n **seen** ids (ids whose center was written at least once) in id order from a **rotation
   pointer** that wraps around, so every seen identity takes its turn and the nvme tier's reads stay within few
   blocks. The pointer moves at plan time, so the step's bank reads are known L steps ahead and happen in the
   prefetcher's thread. Rows never written (the bank's lazy initial values) are never negatives.
2. ``read`` (in the head's forward): ``prefetcher.ready(step)`` (its wait is ``prefetch/stall(%)``), then the
   negatives' rows are gathered from the container; ``append`` adds them as logit columns with no positive, a column
   of a row's own identity masked (an older center of the positive must not act as a negative).
3. ``write(ids, centers)``, after the accepted step: each identity's latest center (the last occurrence when one
   repeats) goes into its container row, never to the bank directly; an evicted row goes back to the bank through
   the prefetcher's write-behind queue, and a later fetch sees it (read-your-writes). The ids are marked in the seen
   bitmap here.
4. ``prepare``/``commit``: every resident row is written back, then the bank's two-phase flush, driven by the
   checkpoint. The bitmap (packed, N/8 bytes), each rank's pointer and the negatives of the plans already submitted,
   and the bank's step are in the head's ``state_dict`` (``get_extra_state``); a resume refuses a bank whose step is
   not the checkpoint's, and replays those negatives, so a resumed run reads what the uninterrupted one reads.

**The lag.** An id first written at step t joins the rotation at step t + L + 1 (the plans of steps up to t + L were
submitted before step t's write), where reading the bank synchronously in ``forward`` would take it from step t + 1.
Only which ids are negatives changes; their rows are the newest ones either way (tests/test_center_bank.py compares
both with a synchronous reference). A step that was not planned (``forward`` called without the trainer's lookahead)
plans itself and has no lag. After the first epoch every identity is seen and the lag changes nothing.

**Sizes.** K = ``cache.num_slots`` (0: every id of the rank's range) rows of D float32 on the device, at most the
rank's range. The L + 1 queued plans must fit in K together, at most (L + 1)·(ids of a global batch + ⌈n/W⌉)
rows; the prefetcher refuses a smaller K (``ConfigError``: raise ``cache.num_slots`` or lower ``cache.lookahead``).
The attributes ``bank``, ``dcc``, ``prefetcher``, ``num_steps``, ``plan`` and ``skip`` are those of ``partial_fc``,
so a benchmark drives either the same way.

**W processes** (docs/distributed.md): the ids are partitioned over the ranks on bank blocks
(``ClassPartition(align=bank.chunk_rows)``), ONE global bank is shared (each rank writes only its own chunks), and
every rank keeps the whole seen bitmap (it marks every written id of the global batch). Each rank has its own
container, prefetcher and pointer over its own range and takes its share of the n negatives (n // W, one more for
the first n % W ranks); ``read`` all-gathers the (id, row) pairs, so every rank appends the same n columns in rank
order. ``plan`` all-gathers the labels (every rank fetches the identities it owns from every rank's batch), and the
heads write the centers of the global batch (``TwinHead.from_all_ranks``). The bank being global, a checkpoint
resumes on any process count: on another count each rank's pointer starts at its range's first id.

Fewer than n seen identities (on a rank: fewer than its share in its range): all of them are used.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
from torch import nn

from offloadfr.cache import DynamicClassContainer, Prefetcher
from offloadfr.distributed import all_gather_labels, all_gather_objects, all_gather_rows
from offloadfr.errors import CheckpointError
from offloadfr.heads import shared_bank

__all__ = ["CenterBank"]

_SCAN = 1 << 16  # ids scanned at a time when looking for the next seen ones
_ARRAYS = ("centers",)


class CenterBank(nn.Module):
    """The class bank of a generated-center head, its device container and prefetcher, the seen bitmap and the
    rotation pointer (module docstring).

    A submodule of the head, so its state travels in the head's ``state_dict``.

    Args:
        deps: the head's dependencies (bank and cache configs, bank path, N, D, device, rank, world size); typed
            ``Any`` to keep this module free of the heads' base module.
        head_kind: the owning head's ``head.kind`` (recorded in the bank; another head's bank is refused).
        num_negatives: n, bank columns per step (over all ranks), >= 1.

    Raises:
        ValueError: ``num_negatives < 1``.

    Example::

        bank = CenterBank(deps, head_kind="dcp", num_negatives=64)
        bank.plan(labels_B)                                                # L batches ahead, by the trainer
        cos_BC, mask_BC = bank.extend(e_BD, labels_B, cos_BC, mask_BC)   # n more columns, same-label masked
        bank.write(ids_B, centers_BD)                                      # after the optimizer step
    """

    def __init__(self, deps: Any, *, head_kind: str, num_negatives: int) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"num_negatives = {num_negatives} must be >= 1 (0 means bank off: build no CenterBank)")
        self.num_negatives = num_negatives
        self.num_classes = deps.num_classes
        self.device = deps.device
        self.world_size = deps.world_size
        self.bank, self.partition = shared_bank.open_shared_bank(deps, arrays=_ARRAYS, head_kind=head_kind)
        num_local = self.partition.num_local
        self.dcc = DynamicClassContainer(min(deps.cache.num_slots or num_local, num_local), deps.dim, arrays=_ARRAYS,
                                         device=deps.device, policy=deps.cache.policy)
        self.prefetcher = Prefetcher(self.bank, self.dcc, arrays=_ARRAYS, device=deps.device,
                                     rounding=shared_bank.WRITE_BACK_ROUNDING, seed=deps.bank.seed + deps.rank)
        w, r = deps.world_size, deps.rank
        self.share = num_negatives // w + (r < num_negatives % w)
        """This rank's part of the n negatives of a step."""
        self.seen = np.zeros(deps.num_classes, dtype=bool)
        """True for every id whose center was written at least once (every id, on every rank)."""
        self.num_seen = 0
        """Ids marked in ``seen`` (a benchmark may set ``seen[:] = True`` and ``num_seen = N``: the steady state)."""
        self.pointer = self.partition.class_start
        """The id the next scan of this rank's range for seen ids starts at."""
        self.num_planned = 0
        """Steps planned (submitted to the prefetcher)."""
        self.num_steps = 0
        """Steps done (written or skipped)."""
        self.last_ids = torch.empty(0, dtype=torch.int64)
        """The ids read by the last ``read``, of every rank, in column order (for tests and metrics)."""
        self._queued: deque[torch.Tensor] = deque()  # this rank's negatives of each planned step not yet read
        self._replay: deque[torch.Tensor] = deque()  # negatives of a checkpoint's queued plans, planned again first
        self._open = False  # the step num_steps has been read (made ready), and not yet written or skipped
        self._in_range = (0, -1)  # (seen ids in this rank's range, num_seen when counted)
        self._blocks = shared_bank.BlockCounts()

    # ------------------------------------------------------------------------------------------ the rotation
    def _seen_in_range(self) -> int:
        if self.world_size == 1:
            return self.num_seen
        count, at = self._in_range
        if at != self.num_seen:  # ``seen`` was changed from outside (a benchmark): count again
            p = self.partition
            count = int(np.count_nonzero(self.seen[p.class_start:p.class_end]))
            self._in_range = (count, self.num_seen)
        return count

    def mark_seen(self, ids: np.ndarray) -> None:
        """Marks ``ids`` (global, unique) in the seen bitmap: they join the rotation of the plans made after it."""
        in_range = self._seen_in_range()
        new = ids[~self.seen[ids]]
        self.seen[new] = True
        self.num_seen += len(new)
        p = self.partition
        self._in_range = (in_range + int(((new >= p.class_start) & (new < p.class_end)).sum()), self.num_seen)

    def next_ids(self) -> torch.Tensor:
        """This rank's next ``share`` seen ids in id order from the pointer, wrapping around within the rank's range
        (all of them when fewer are seen there, each once); moves the pointer past the last one taken."""
        lo, hi = self.partition.class_start, self.partition.class_end
        want = min(self.share, self._seen_in_range())
        found: list[np.ndarray] = []
        got, pos = 0, self.pointer
        while got < want:  # at most one lap: want <= the seen ids of the range
            stop = min(pos + _SCAN, hi)
            hits = pos + np.flatnonzero(self.seen[pos:stop])[: want - got]
            found.append(hits)
            got += len(hits)
            pos = int(hits[-1]) + 1 if got == want else stop
            if pos >= hi:
                pos = lo
        self.pointer = pos
        return torch.from_numpy(np.concatenate(found).astype(np.int64)) if found else torch.empty(0, dtype=torch.int64)

    # ------------------------------------------------------------------------------------------------ the plan
    def plan(self, labels_B: torch.Tensor) -> None:
        """Submits the ids a coming step needs: the batch's identities this rank owns (every rank's batch on W > 1:
        a collective) and this rank's share of the step's negatives, taken from the rotation now."""
        labels = labels_B.detach().to(torch.int64)
        if self.world_size > 1:
            labels = all_gather_labels(labels.to(self.device))
        ids = torch.unique(labels.cpu())
        p = self.partition
        positives = ids[(ids >= p.class_start) & (ids < p.class_end)]
        negatives = self._replay.popleft() if self._replay else self.next_ids()
        self._queued.append(negatives)
        self.prefetcher.submit(torch.cat([positives, negatives]), self.num_planned)
        self.num_planned += 1

    def _begin_step(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Makes the current step's rows resident (planning it first when nobody did) and returns its negatives."""
        if self.num_planned == self.num_steps:  # called without the trainer's lookahead (tests): no lag
            self.plan(labels_B)
        self.prefetcher.ready(self.num_steps)
        self._open = True
        return self._queued.popleft()

    # --------------------------------------------------------------------------------------------- the step
    def read(self, labels_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's bank negatives, of every rank: ``(ids_n, rows_nD)`` on the device, rows float32.

        Args:
            labels_B: the ids this step writes (they plan the step if the trainer did not; on W > 1 this rank's).

        Returns:
            The negatives' ids and their newest centers, the same on every rank (rank order).
        """
        ids = self._begin_step(labels_B)
        rows = self.dcc["centers"].index_select(0, self.dcc.slots_of(ids))  # a copy: later writes do not alter it
        ids = ids.to(self.device)
        if self.world_size > 1:  # every rank's share, padded to the largest (collectives need equal shapes)
            pad = -(-self.num_negatives // self.world_size)
            ids_p = torch.full((pad,), -1, dtype=torch.int64, device=self.device)
            rows_p = rows.new_zeros((pad, rows.shape[1]))
            ids_p[: ids.numel()], rows_p[: ids.numel()] = ids, rows
            ids_p, rows_p = all_gather_labels(ids_p), all_gather_rows(rows_p)
            keep = ids_p >= 0
            ids, rows = ids_p[keep], rows_p[keep]
        self.last_ids = ids.cpu()
        return ids, rows

    @staticmethod
    def append(e_BD: torch.Tensor, labels_B: torch.Tensor, cos_BC: torch.Tensor, mask_BC: torch.Tensor | None,
               ids_n: torch.Tensor, rows_nD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the cosines of the normalised embeddings ``e_BD`` against the bank rows ``rows_nD`` of ``ids_n``.

        Args:
            e_BD: normalised float32 embeddings (with gradient).
            labels_B: each row's global id.
            cos_BC: the head's cosines so far.
            mask_BC: the head's masked columns so far (None: none masked).
            ids_n: the bank rows' ids.
            rows_nD: their centers (no gradient).

        Returns:
            ``(cos, mask)`` of shape (B, C + n); the bank's columns of a row's own id are masked.
        """
        cos_Bn = e_BD @ rows_nD.to(e_BD.dtype).t()
        mask_Bn = labels_B[:, None] == ids_n[None, :]
        if mask_BC is None:
            mask_BC = torch.zeros_like(cos_BC, dtype=torch.bool)
        return torch.cat([cos_BC, cos_Bn.to(cos_BC.dtype)], dim=1), torch.cat([mask_BC, mask_Bn], dim=1)

    def extend(self, e_BD: torch.Tensor, labels_B: torch.Tensor, cos_BC: torch.Tensor, mask_BC: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``read`` then ``append``: the logits of a step with n more columns from the bank, same-label masked."""
        ids_n, rows_nD = self.read(labels_B)
        return self.append(e_BD, labels_B, cos_BC, mask_BC, ids_n, rows_nD)

    @torch.no_grad()
    def write(self, ids_B: torch.Tensor, centers_BD: torch.Tensor) -> None:
        """Ends the step: writes the latest center of each id (the last occurrence when an id repeats) into the
        container rows of the ids this rank owns, and marks every id seen.

        Args:
            ids_B: global ids, of the global batch on W > 1 (the same on every rank).
            centers_BD: their centers.

        Raises:
            RuntimeError: an id this rank owns is not resident (the step's plan did not include it).
        """
        ids = ids_B.detach().cpu().to(torch.int64)
        if not self._open:  # a step that was never read: make its rows resident first
            self._begin_step(ids)
        rev = torch.flip(ids, [0])
        uniq, first_in_rev = np.unique(rev.numpy(), return_index=True)
        last = torch.from_numpy(len(ids) - 1 - first_in_rev)
        self.mark_seen(uniq)
        p = self.partition
        mine = torch.from_numpy((uniq >= p.class_start) & (uniq < p.class_end))
        slots = self.dcc.slots_of(torch.from_numpy(uniq)[mine])
        if bool((slots < 0).any()):
            missing = torch.from_numpy(uniq)[mine][(slots < 0).cpu()]
            raise RuntimeError(f"center bank: ids {missing[:8].tolist()} written at step {self.num_steps} were not in "
                               "its plan; plan() must get every id the step writes (the whole batch's labels)")
        rows = centers_BD.detach().index_select(0, last[mine].to(centers_BD.device))
        self.dcc["centers"].index_copy_(0, slots, rows.to(self.dcc["centers"]))
        self._end_step()

    def skip(self) -> None:
        """Ends the step without writing (a step refused by the non-finite guard). A step that was not read only
        drops its negatives: making its rows ready is then the caller's (``prefetcher.ready``, as for
        ``partial_fc``)."""
        if not self._open and self.num_planned > self.num_steps:
            self._queued.popleft()
        self._end_step()

    def _end_step(self) -> None:
        self._open = False
        self.num_steps += 1
        self.num_planned = max(self.num_planned, self.num_steps)

    # ---------------------------------------------------------------------------------- state and metrics
    def prepare(self, step: int) -> None:
        """Checkpoint phase 1: every resident row back to the bank, then the bank's ``prepare`` (rank by rank)."""
        self.prefetcher.write_back_all()
        shared_bank.prepare_in_turn(self.bank, self.partition, step)

    def commit(self, step: int) -> None:
        """Checkpoint phase 2: the bank's ``commit`` (rank 0's, followed by the others)."""
        shared_bank.commit_once(self.bank, self.partition, step)

    def metrics(self) -> dict[str, float]:
        """Seen identities, the bank columns of the last step (``bank/negatives``), the prefetcher's traffic and stall
        (``prefetch/stall(%)``, ``bank/rows_read``, ...), the bank's block reads and journal writes since the previous
        call, and the container's used slots."""
        used = {"bank/seen": float(self.num_seen), "bank/negatives": float(self.last_ids.numel()),
                "cache/used_slots": float(self.dcc.num_used)}
        return {**self.prefetcher.metrics(), **self._blocks.since(self.bank), **used}

    def get_extra_state(self) -> dict[str, Any]:
        # Every rank's pointer and queued negatives (a collective), so a resume on as many processes continues each.
        mine = {"pointer": self.pointer, "queued": [ids.clone() for ids in self._queued]}
        return {"seen": torch.from_numpy(np.packbits(self.seen)), "num_steps": self.num_steps,
                "bank_step": shared_bank.saved_bank_step(self.bank), "ranks": all_gather_objects(mine)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restores the bitmap, this rank's pointer and the negatives of the plans the checkpoint had submitted (on
        as many processes as saved it; on another count each pointer starts at its range's first id).

        Raises:
            CheckpointError: the bank's recorded step is not the checkpoint's (the rows would belong to another
                step), or the state comes after the first ``plan``.
        """
        shared_bank.check_bank_step(self.bank, state["bank_step"])
        if self.num_planned:
            raise CheckpointError("load a bank-mode checkpoint before the first plan() of the run")
        self.seen = np.unpackbits(state["seen"].numpy(), count=self.num_classes).astype(bool)
        self.num_seen = int(np.count_nonzero(self.seen))
        ranks = state.get("ranks", [{"pointer": state.get("pointer", 0), "queued": []}])  # saved before the prefetcher
        if len(ranks) == self.world_size:
            mine = ranks[self.partition.rank]
            self.pointer, self._replay = int(mine["pointer"]), deque(mine["queued"])
        else:
            self.pointer, self._replay = self.partition.class_start, deque()
        self.num_steps = self.num_planned = int(state.get("num_steps", 0))

    def close(self) -> None:
        """Stops the prefetcher (resident rows are not written back: ``prepare`` does that) and closes the bank."""
        self.prefetcher.close()
        self.bank.close()

    def extra_repr(self) -> str:
        return (f"num_negatives={self.num_negatives}, num_slots={self.dcc.num_slots}, tier={self.bank.tier}, "
                f"path={self.bank.path}")
