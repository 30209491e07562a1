"""``TwinHead``: what the generated-center heads (``attfc``, ``dcp``) share.

Both make their class centers with a **twin** of the trained backbone: a deep copy that never receives a gradient and
follows the backbone's parameters by an EMA after each optimizer step (AttFC's key encoder, F2C's gallery net). Both
have the same bank mode (``head.bank_negatives > 0``, :class:`~offloadfr.heads.center_bank.CenterBank`), which takes
part in the two-phase checkpoint and adds its traffic to the head's metrics. On W processes both are data parallel:
every rank keeps the same whole pool or queue, written with the generated centers of every rank in rank order
(:meth:`TwinHead.from_all_ranks`), as MoCo's queue and F2C's code do. In bank mode the ids are partitioned over
the ranks' center banks, over one global bank (``center_bank.py``), and the trainer's ``plan`` reaches the bank's
prefetcher.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn

from offloadfr.distributed import all_gather_labels, all_gather_rows
from offloadfr.heads.base import Head, HeadDeps
from offloadfr.heads.center_bank import CenterBank

__all__ = ["TwinHead", "ema_"]


@torch.no_grad()
def ema_(twin: nn.Module, source: nn.Module, momentum: float) -> None:
    """θ_twin ← m·θ_twin + (1 − m)·θ_source, parameters only (BatchNorm statistics stay the twin's own)."""
    for p_t, p_s in zip(twin.parameters(), source.parameters(), strict=True):
        p_t.mul_(momentum).add_(p_s.detach().to(p_t.dtype), alpha=1.0 - momentum)


class TwinHead(Head):
    """Base of ``attfc`` and ``dcp``: the trained backbone, its twin, the margin and the optional center bank.

    Args:
        deps: must carry ``backbone`` (the trained network the twin copies).
        kind: ``head.kind``, for messages and the bank.
        bank_negatives: ``head.bank_negatives``; 0 is no bank.

    Attributes:
        margin: the run's margin.
        precision: the backbone's autocast dtype, under which the twin runs too.
        center_bank: the bank mode's :class:`CenterBank`, or None.
    """

    def __init__(self, deps: HeadDeps, *, kind: str, bank_negatives: int) -> None:
        super().__init__()
        if deps.backbone is None:
            raise ValueError(f"{kind} needs HeadDeps.backbone, the trained backbone its twin network copies")
        self.margin = deps.margin
        self.precision = deps.precision
        self.__dict__["trained_net"] = deps.backbone  # a reference, not a submodule: not in this head's state
        self.center_bank = CenterBank(deps, head_kind=kind, num_negatives=bank_negatives) if bank_negatives else None

    @property
    def trained_net(self) -> nn.Module:
        """The backbone the engine trains (not a submodule of the head)."""
        return self.__dict__["trained_net"]

    def plan(self, labels_B: torch.Tensor) -> None:
        """Bank mode: the coming batch's identities and negatives go to the center bank's prefetcher (on W > 1 a
        collective); nothing with the bank off."""
        if self.center_bank is not None:
            self.center_bank.plan(labels_B)

    def skip_bank_step(self) -> None:
        """Bank mode: the step ends with nothing written (``skip``); nothing with the bank off."""
        if self.center_bank is not None:
            self.center_bank.skip()

    def make_twin(self) -> nn.Module:
        """A float32 copy of the trained backbone that takes no gradient."""
        return copy.deepcopy(self.trained_net).float().requires_grad_(False)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The backbone's autocast (``precision``) for the twin's forward; none in float32."""
        if self.precision == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.precision)

    def from_all_ranks(self, centers_nD: torch.Tensor, labels_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated centers and their labels of every rank, in rank order (no gradient); on one process this rank's
        own (the collectives' plain path). Every rank calls it at the same point of each step. Ranks have equal
        batches (the loader's drop_last), so their parts have equal sizes."""
        return all_gather_rows(centers_nD.detach().contiguous()), all_gather_labels(labels_n.contiguous())

    def with_bank_metrics(self, last: dict[str, torch.Tensor]) -> dict[str, float]:
        """The head's own per-step values as floats, plus the bank's traffic in bank mode."""
        bank = self.center_bank.metrics() if self.center_bank is not None else {}
        return {**{name: float(value) for name, value in last.items()}, **bank}

    def prepare(self, step: int) -> None:
        if self.center_bank is not None:
            self.center_bank.prepare(step)

    def commit(self, step: int) -> None:
        if self.center_bank is not None:
            self.center_bank.commit(step)

    def close(self) -> None:
        if self.center_bank is not None:
            self.center_bank.close()
