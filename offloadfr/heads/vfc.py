"""``vfc``: Virtual FC (Li, Wang, Zhang, CVPR 2021; seeds-spec §4): M anchors instead of N class centers.

Legend: B = batch, D = embedding width, M = num_anchors, U = distinct identities of the batch.

Identities are split into M groups, identity ``i`` in group ``i mod M`` (the code's ``label_dict``); each group
owns one anchor, a row of the M×D matrix W. One step, as the authors' code does it (``DictArcMarginProduct``):

1. Each identity of the batch claims its group's anchor, and the anchor is overwritten with the **sum of that
   identity's detached features** in the batch (the weight-estimation function with all weights 1; direction = the
   mean feature). Identities are visited in increasing id order, so of two identities of one group in a batch the
   smaller id keeps the group's anchor.
2. Re-grouping: every other identity of an already claimed group borrows a **free anchor** (one no identity of the
   batch claimed), the lowest-numbered first; the borrowed row is saved and overwritten like a claimed one. When no
   free anchor is left the identity is **ignored**: its rows get target -1 and add nothing to the loss (the paper's
   rule; the authors' code asserts instead).
3. Logits are cosines of the (normalised) embeddings against all M (normalised) anchors, through the configured
   margin (``loss``; the code uses ArcFace m = 0.5, s = 32), then cross-entropy over the rows with an anchor.
4. ``update(lr)``: SGD with momentum and weight decay on all M rows (every anchor is in the softmax and gets a
   gradient, as the code's optimizer does), then the borrowed rows get their saved values back, so their group's
   anchor is restored before the next step (their SGD update is discarded, as in the code). Rows of groups absent
   from the batch keep their last value and act as negatives.

As in the code, the momentum of a row survives its overwrite (seeds-spec §4.6 pitfall 2), anchors are built from the
current backbone's unnormalised features (no EMA twin), and W starts from xavier_uniform (seeded by ``bank.seed``).
Not implemented: the code's ``NoiseWeighting`` MLP for the weights (it receives no gradient in the code and stays at
its random initialisation) and its joint CASIA-FC + Virtual FC training.

Batches: the head works with any batch, but the method is meant for a P×K identity sampler (the code: 70 identities
× 10 images), where each anchor is a sum of K features; with uniform instance batches most anchors are one feature.
A batch with more than M distinct identities ignores the excess (``vfc/ignored_ids``).

W processes (the authors' code runs one GPU): the anchors are partitioned like ``fc``'s class centers (contiguous
ranges of the M anchors, ``distributed.ClassPartition``). The embeddings are all-gathered with gradient, every rank
makes the same anchor assignment from the global batch's labels and overwrites the anchors it owns with the global
batch's feature sums, and the softmax cross-entropy is sharded, with the ignored identities' rows left out
(``allow_unlabelled``). A 2-rank step is the 1-process step of the global batch (tests/test_dist_train.py), and the
checkpoint holds all M anchors on any process count (gathered to rank 0 alone, like ``fc``'s rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offloadfr.config import HeadCfg
from offloadfr.distributed import ClassPartition
from offloadfr.heads.base import (
    Head,
    HeadDeps,
    gather_global_batch,
    keep_global_rows_in_state,
    partitioned_loss,
    register_head,
    sgd_rows_,
)

__all__ = ["VirtualFCHead", "assign_anchors", "resolve_num_anchors", "DEFAULT_NUM_ANCHORS"]


DEFAULT_NUM_ANCHORS = 1000
"""M of the Virtual FC code, what ``head.num_anchors = 0`` means when the identities are at least twice as many."""


def resolve_num_anchors(num_anchors: int, num_classes: int) -> int:
    """``head.num_anchors``, with 0 resolved to ``min(1000, max(2, N // 2))``: the code's M, but fewer anchors than
    identities, so that anchors are shared as the method intends (M ≪ N)."""
    return num_anchors or min(DEFAULT_NUM_ANCHORS, max(2, num_classes // 2))


def assign_anchors(ids_U: torch.Tensor, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor of each distinct identity of a batch, with re-grouping of in-batch conflicts.

    Args:
        ids_U: the batch's distinct identities, sorted ascending (``torch.unique`` order), int64.
        num_anchors: M.

    Returns:
        ``(anchor_U, borrowed)``: ``anchor_U[u]`` is the anchor of ``ids_U[u]`` (its group ``id mod M``, a borrowed
        free anchor, or -1 when ignored); ``borrowed`` lists the borrowed anchors, ascending.
    """
    num_ids = ids_U.numel()
    group_U = ids_U % num_anchors
    order_U = torch.argsort(group_U, stable=True)  # within a group, ids stay ascending
    sorted_U = group_U[order_U]
    first_sorted_U = torch.ones(num_ids, dtype=torch.bool, device=ids_U.device)
    first_sorted_U[1:] = sorted_U[1:] != sorted_U[:-1]
    owner_U = torch.empty_like(first_sorted_U)
    owner_U[order_U] = first_sorted_U  # the smallest id of each group in the batch owns the group's anchor
    claimed_M = torch.zeros(num_anchors, dtype=torch.bool, device=ids_U.device)
    claimed_M[group_U[owner_U]] = True
    free_F = torch.nonzero(~claimed_M).reshape(-1)  # ascending
    movers = torch.nonzero(~owner_U).reshape(-1)  # ascending ids
    num_moved = min(free_F.numel(), movers.numel())
    anchor_U = torch.where(owner_U, group_U, torch.full_like(group_U, -1))
    borrowed = free_F[:num_moved]
    anchor_U[movers[:num_moved]] = borrowed
    return anchor_U, borrowed


@register_head("vfc")
class VirtualFCHead(Head):
    """Virtual FC: M anchors rebuilt from each batch's detached features (see the module docstring).

    Args:
        cfg: the ``[head]`` section (num_anchors, momentum, weight decay, lr scale).
        deps: margin, sizes, device, and the bank config whose seed initialises the anchors.

    Example::

        head = VirtualFCHead(HeadCfg(kind="vfc"), deps)  # M = min(1000, N // 2)
        loss = head(emb_BD, labels_B); loss.backward(); head.update(lr=0.01)
    """

    def __init__(self, cfg: HeadCfg, deps: HeadDeps) -> None:
        super().__init__()
        self.cfg = cfg
        self.margin = deps.margin
        self.num_anchors = resolve_num_anchors(cfg.num_anchors, deps.num_classes)
        self.partition = ClassPartition(self.num_anchors, deps.world_size, deps.rank)  # anchors, like fc's ids
        w_MD = torch.empty(self.num_anchors, deps.dim)
        nn.init.xavier_uniform_(w_MD, generator=torch.Generator().manual_seed(deps.bank.seed))
        self.weight = nn.Parameter(w_MD[self.partition.local_slice].clone().to(deps.device))  # this rank's anchors
        self.register_buffer("momentum_buf", torch.zeros_like(self.weight))
        if deps.world_size > 1:
            keep_global_rows_in_state(self)
        self._borrowed: torch.Tensor | None = None  # anchors lent this step ...
        self._saved_KD: torch.Tensor | None = None  # ... and their rows before the loan
        self._last = {"vfc/borrowed_anchors": 0.0, "vfc/ignored_ids": 0.0, "vfc/ids_per_batch": 0.0}

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Rebuilds the (global) batch's anchors from its embeddings (detached), then margin softmax CE against all M
        anchors (this rank's columns of it on W processes)."""
        self._restore_borrowed()  # forward twice without update (tests): the previous loan ends here
        emb_ND, labels_N = gather_global_batch(emb_BD, labels_B)
        ids_U, inv_N = torch.unique(labels_N, sorted=True, return_inverse=True)
        anchor_U, borrowed = assign_anchors(ids_U, self.num_anchors)  # global anchors, the same on every rank
        feat_ND = emb_ND.detach().float()
        sums_UD = torch.zeros(ids_U.numel(), feat_ND.shape[1], dtype=feat_ND.dtype, device=feat_ND.device)
        sums_UD.index_add_(0, inv_N, feat_ND)
        local_U = self.partition.to_local(anchor_U)  # -1: another rank's anchor, or an ignored identity
        mine_U = local_U >= 0
        borrowed_local = self.partition.to_local(borrowed)
        borrowed_local = borrowed_local[borrowed_local >= 0]
        with torch.no_grad():
            self._borrowed, self._saved_KD = borrowed_local, self.weight.index_select(0, borrowed_local)
            self.weight.index_copy_(0, local_U[mine_U], sums_UD[mine_U])
        target_N = local_U[inv_N]
        cos_NM = F.normalize(emb_ND.float(), dim=1) @ F.normalize(self.weight, dim=1).t()
        self._last = {"vfc/borrowed_anchors": float(borrowed.numel()), "vfc/ignored_ids": float((anchor_U < 0).sum()),
                      "vfc/ids_per_batch": float(ids_U.numel())}
        return partitioned_loss(self.margin(cos_NM, target_N), target_N, allow_unlabelled=True)

    @torch.no_grad()
    def _restore_borrowed(self) -> None:
        if self._borrowed is not None:
            self.weight.index_copy_(0, self._borrowed, self._saved_KD)
        self._borrowed, self._saved_KD = None, None

    @torch.no_grad()
    def update(self, lr: float) -> None:
        """SGD with momentum on all M anchors, then the borrowed anchors get their own rows back."""
        if self.weight.grad is not None:
            sgd_rows_(self.weight.data, self.weight.grad, self.momentum_buf, lr=lr * self.cfg.lr_scale,
                      momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
            self.weight.grad = None
        self._restore_borrowed()

    @torch.no_grad()
    def skip(self) -> None:
        """Drops the gradient and ends the loan; the anchors rebuilt this step keep their new values."""
        self.weight.grad = None
        self._restore_borrowed()

    def metrics(self) -> dict[str, float]:
        """Borrowed anchors, ignored identities and distinct identities of the last step."""
        return dict(self._last)

    def __repr__(self) -> str:
        return f"VirtualFCHead(num_anchors={self.num_anchors}, dim={self.weight.shape[1]}, margin={self.margin})"
