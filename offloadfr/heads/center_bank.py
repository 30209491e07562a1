"""Bank mode of the generated-center heads (``dcp``, ``attfc``): their latest centers kept in the class bank, and
some of them read back as extra negatives (``head.bank_negatives``; DESIGN §5).

Legend: B = probe rows, C = logit columns before the bank's, n = ``head.bank_negatives``, N = identities, D = width.

The two heads make a center for an identity from the features of an EMA network (F2C's gallery features, AttFC's
generative class centers) and keep only a small device pool or queue of them. With the bank off they behave as the
authors' code does. With the bank on (n > 0):

1. ``write(ids, centers)``, after each accepted step: the latest center of every identity of the step is written to
   the bank (a ``ClassBank`` with one array, ``centers``, no momentum: the run's ``[bank]`` tier and path), and the
   identity is marked in the **seen** bitmap.
2. ``extend(e_BD, labels_B, cos_BC, mask_BC)`` (``read`` then ``append``), in each forward: n seen identities are
   read from the bank and appended as logit columns with no positive; a column of a row's own identity is masked (an
   older center of the positive must not act as a negative). Identities are taken in id order from a **rotation
   pointer**, wrapping around, so over successive steps every seen identity takes its turn; consecutive ids also
   keep the nvme tier's reads within few blocks. Rows never written (the bank's lazy initial values) are never read.
3. ``prepare``/``commit``: the bank's two-phase flush, driven by the checkpoint; the bitmap (packed, N/8 bytes), the
   pointer and the bank's step are in the head's ``state_dict`` (``get_extra_state``), and a resume refuses a bank
   whose step is not the checkpoint's.

Fewer than n seen identities: all of them are used. Single process only (both heads refuse bank mode on W > 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from offloadfr.bank.zarr_bank import open_bank
from offloadfr.errors import CheckpointError

__all__ = ["CenterBank"]

_SCAN = 1 << 16  # ids scanned at a time when looking for the next seen ones


class CenterBank(nn.Module):
    """The class bank of a generated-center head, its seen bitmap and its rotation pointer (module docstring).

    A submodule of the head, so its state travels in the head's ``state_dict``.

    Args:
        deps: the head's dependencies (bank config and path, N, D, device); typed ``Any`` to keep this module free of
            the heads' base module.
        head_kind: the owning head's ``head.kind`` (recorded in the bank; another head's bank is refused).
        num_negatives: n, bank columns per step, >= 1.

    Example::

        bank = CenterBank(deps, head_kind="dcp", num_negatives=64)
        cos_BC, mask_BC = bank.extend(e_BD, labels_B, cos_BC, mask_BC)   # n more columns, same-label masked
        bank.write(ids_n, centers_nD)                                      # after the optimizer step
    """

    def __init__(self, deps: Any, *, head_kind: str, num_negatives: int) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"num_negatives = {num_negatives} must be >= 1 (0 means bank off: build no CenterBank)")
        self.num_negatives = num_negatives
        self.num_classes = deps.num_classes
        self.device = deps.device
        self.bank = open_bank(deps.bank, path=str(deps.bank_path), num_classes=deps.num_classes, dim=deps.dim,
                              arrays=("centers",), head_kind=head_kind)
        self.seen = np.zeros(deps.num_classes, dtype=bool)
        """True for every id whose center was written at least once."""
        self.num_seen = 0
        """Ids marked in ``seen``."""
        self.pointer = 0
        """The id the next scan for seen ids starts at."""
        self.last_ids = torch.empty(0, dtype=torch.int64)
        """The ids read by the last ``extend`` (for tests and metrics)."""

    def next_ids(self) -> torch.Tensor:
        """The next n seen ids in id order from the pointer, wrapping around (all of them when fewer than n are
        seen, each once); moves the pointer past the last one taken."""
        want = min(self.num_negatives, self.num_seen)
        found: list[np.ndarray] = []
        got, pos = 0, self.pointer
        while got < want:  # at most one lap: want <= num_seen
            stop = min(pos + _SCAN, self.num_classes)
            hits = pos + np.flatnonzero(self.seen[pos:stop])[: want - got]
            found.append(hits)
            got += len(hits)
            pos = int(hits[-1]) + 1 if got == want else stop
            if pos >= self.num_classes:
                pos = 0
        self.pointer = pos
        return torch.from_numpy(np.concatenate(found).astype(np.int64)) if found else torch.empty(0, dtype=torch.int64)

    def read(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's bank negatives: ``(ids_n, rows_nD)``, the next seen ids (``next_ids``) and their centers as
        float32 on ``device``."""
        ids = self.next_ids()
        self.last_ids = ids
        return ids.to(device), self.bank.read_rows(ids).to(device)

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
        ids_n, rows_nD = self.read(e_BD.device)
        return self.append(e_BD, labels_B, cos_BC, mask_BC, ids_n, rows_nD)

    @torch.no_grad()
    def write(self, ids_B: torch.Tensor, centers_BD: torch.Tensor) -> None:
        """Writes the latest center of each id (the last occurrence when an id repeats) and marks it seen."""
        ids = ids_B.detach().cpu().to(torch.int64)
        rev = torch.flip(ids, [0])
        uniq, first_in_rev = np.unique(rev.numpy(), return_index=True)
        last = torch.from_numpy(len(ids) - 1 - first_in_rev)
        self.bank.write_rows(torch.from_numpy(uniq), centers_BD.detach().float().cpu().index_select(0, last))
        self.num_seen += int((~self.seen[uniq]).sum())
        self.seen[uniq] = True

    def prepare(self, step: int) -> None:
        """Checkpoint phase 1: the bank's ``prepare``."""
        self.bank.prepare(step)

    def commit(self, step: int) -> None:
        """Checkpoint phase 2: the bank's ``commit``."""
        self.bank.commit(step)

    def metrics(self) -> dict[str, float]:
        """Seen identities and the bank's traffic counters."""
        return {"bank/seen": float(self.num_seen), **{k: float(v) for k, v in self.bank.stats().items()}}

    def get_extra_state(self) -> dict[str, Any]:
        # Inside a checkpoint the bank's flush is prepared, not committed yet: record the step it commits to.
        pending = self.bank.pending_step
        return {"seen": torch.from_numpy(np.packbits(self.seen)), "pointer": self.pointer,
                "bank_step": self.bank.step if pending is None else pending}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restores the bitmap and the pointer.

        Raises:
            CheckpointError: the bank's recorded step is not the checkpoint's (the rows would belong to another step).
        """
        if self.bank.step != state["bank_step"]:
            raise CheckpointError(f"bank {self.bank.path} is at step {self.bank.step} but the checkpoint is at step "
                                  f"{state['bank_step']}; resume from the checkpoint of step {self.bank.step}, or "
                                  "restore the bank directory saved with this checkpoint")
        self.seen = np.unpackbits(state["seen"].numpy(), count=self.num_classes).astype(bool)
        self.num_seen = int(np.count_nonzero(self.seen))
        self.pointer = int(state["pointer"])

    def close(self) -> None:
        """Closes the bank."""
        self.bank.close()

    def extra_repr(self) -> str:
        return f"num_negatives={self.num_negatives}, tier={self.bank.tier}, path={self.bank.path}"
