"""One class bank shared by the ranks of a head that partitions its ids over them: ``partial_fc``, and ``dcp`` and
``attfc`` in bank mode (``center_bank.py``).

Every rank owns the ids of its ``ClassPartition(align=bank.chunk_rows)`` range, so every bank chunk has exactly one
writing rank, and all ranks use ONE Zarr store, the same as on one process, so a run resumes on any process count
(docs/distributed.md). The helpers here are that protocol: the ranks open the bank one after the other, prepare a
checkpoint's flush one after the other, rank 0 alone commits it (one commit point), a resume checks the bank's step,
and the bank's block counters become step metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from offloadfr.bank.zarr_bank import ZarrBank, open_bank
from offloadfr.distributed import ClassPartition, barrier
from offloadfr.errors import CheckpointError

if TYPE_CHECKING:
    from offloadfr.heads.base import HeadDeps

__all__ = ["WRITE_BACK_ROUNDING", "BlockCounts", "check_bank_step", "commit_once", "open_shared_bank",
           "prepare_in_turn", "saved_bank_step"]

WRITE_BACK_ROUNDING = "nearest"
"""How rows are rounded to a bfloat16 bank at write-back (``Prefetcher(rounding=...)``); no effect on float32.
Nearest: stochastic rounding kept no more of the updates and added rounding noise
(docs/benchmarks/bank_dtype_cpu-2core_202612.md). Every head over a shared bank uses it."""



def open_shared_bank(deps: HeadDeps, *, arrays: tuple[str, ...], head_kind: str) -> tuple[ZarrBank, ClassPartition]:
    """Opens (rank 0: creates) the run's bank rank by rank, and partitions the ids on its blocks.

    Opening read-write clears a stale journal, which must not race with another rank's open, hence the turns. With
    the ram tier each rank then holds only its own range's rows in host memory.

    Args:
        deps: the head's sizes, rank, world size and ``[bank]`` config.
        arrays: the arrays the head keeps per id.
        head_kind: the run's ``head.kind`` (recorded in the bank; another head's bank is refused).

    Returns:
        ``(bank, partition)``: the open bank and this rank's block-aligned id range.
    """
    bank: ZarrBank | None = None
    for turn in range(deps.world_size):
        if turn == deps.rank:
            bank = open_bank(deps.bank, path=str(deps.bank_path), num_classes=deps.num_classes, dim=deps.dim,
                             arrays=arrays, head_kind=head_kind, num_processes=deps.world_size,
                             processes_per_host=deps.processes_per_host)
        barrier()
    assert bank is not None
    partition = ClassPartition(deps.num_classes, deps.world_size, deps.rank, align=bank.chunk_rows)
    if deps.bank.tier == "ram":
        bank.hold_rows(partition.class_start, partition.class_end)
    return bank, partition


def prepare_in_turn(bank: ZarrBank, partition: ClassPartition, step: int) -> None:
    """Checkpoint phase 1 on every rank, one after the other: each stages only the chunks of its own range, and the
    bank's attributes are rewritten by one rank at a time."""
    for turn in range(partition.world_size):
        if turn == partition.rank:
            bank.prepare(step)
        barrier()


def commit_once(bank: ZarrBank, partition: ClassPartition, step: int) -> None:
    """Checkpoint phase 2: rank 0 commits the whole journal (every rank's chunks: one commit point), then the other
    ranks take note of it."""
    if partition.rank == 0:
        bank.commit(step)
    barrier()
    if partition.rank != 0:
        bank.follow_commit(step)


def saved_bank_step(bank: ZarrBank) -> int:
    """The step a checkpoint records for the bank: inside a checkpoint the flush is prepared, not committed yet, so
    the step it commits to."""
    pending = bank.pending_step
    return bank.step if pending is None else pending


def check_bank_step(bank: ZarrBank, saved_step: int) -> None:
    """Refuses to resume from a checkpoint whose bank step is not the bank's.

    Raises:
        CheckpointError: the bank's recorded step differs from the checkpoint's (a crash between the bank flush and
            the checkpoint, or a bank that trained on): resuming would mix rows of two steps.
    """
    if bank.step != saved_step:
        raise CheckpointError(f"bank {bank.path} is at step {bank.step} but the checkpoint is at step {saved_step}; "
                              f"resume from the checkpoint of step {bank.step}, or restore the bank directory saved "
                              "with this checkpoint")


class BlockCounts:
    """The bank's Zarr block reads (``bank/blocks_read``: blocks loaded from the store, what the nvme tier pays for)
    and journal writes (``bank/blocks_staged``) since the previous call of :meth:`since`."""

    def __init__(self) -> None:
        self._before: dict[str, int] = {}

    def since(self, bank: ZarrBank) -> dict[str, float]:
        """Returns both counters' increase since the previous call (since the start at the first call)."""
        stats = bank.stats()
        now = {"bank/blocks_read": stats["bank/blocks_loaded"], "bank/blocks_staged": stats["bank/blocks_staged"]}
        out = {name: float(value - self._before.get(name, 0)) for name, value in now.items()}
        self._before = now
        return out
