"""``fc``: the full classifier, every class center on the device (the baseline for small N).

Legend: B = batch, D = embedding width, N = num_classes, C = ids of this rank (N with one process).

With W processes each rank holds the C rows of its contiguous id range (``distributed.ClassPartition``), the embeddings
and labels of the global batch are all-gathered, and the cross-entropy is sharded. Checkpoints hold all N rows
(gathered at save into the host memory of rank 0 alone, which writes them; sliced at load), so a run saved on W
processes resumes on any other number.

The centers start from the bank's deterministic per-id initialiser, so ``fc`` and ``partial_fc`` (with every id
resident) start from the same rows and follow the same trajectory. Every row is in the softmax, so every row gets a
gradient each step and the sparse-momentum update equals plain SGD over the whole matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from offloadfr.bank.init import initial_rows
from offloadfr.config import HeadCfg
from offloadfr.distributed import ClassPartition
from offloadfr.heads.base import (
    Head,
    HeadDeps,
    gather_global_batch,
    keep_global_rows_in_state,
    partitioned_loss,
    register_head,
)
from offloadfr.kernels import check_kernel, cosine_logits, margin_softmax_cross_entropy, update_rows_

__all__ = ["FCHead"]


@register_head("fc")
class FCHead(Head):
    """All N class centers on the device; logits against all of them.

    Args:
        cfg: the ``[head]`` section (momentum, weight decay, lr scale).
        deps: margin, sizes, device and the bank config whose seed and init_std set the initial rows.

    Example::

        head = FCHead(HeadCfg(), deps)
        loss = head(emb_BD, labels_B); loss.backward(); head.update(lr=0.1)
    """

    def __init__(self, cfg: HeadCfg, deps: HeadDeps) -> None:
        super().__init__()
        self.cfg = cfg
        self.margin = deps.margin
        self.kernel = check_kernel(cfg.kernel, deps.margin, deps.device, deps.world_size)
        self.partition = ClassPartition(deps.num_classes, deps.world_size, deps.rank)
        ids = torch.arange(self.partition.class_start, self.partition.class_end, dtype=torch.int64)
        w_CD = initial_rows(ids, deps.dim, seed=deps.bank.seed, std=deps.bank.init_std)
        self.weight = nn.Parameter(w_CD.to(deps.device))
        self.register_buffer("momentum_buf", torch.zeros_like(self.weight))
        if deps.world_size > 1:
            keep_global_rows_in_state(self)

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Margin softmax cross-entropy of the (global) batch against all centers (fp32, or the GEMMs in
        ``head.gemm_precision``)."""
        emb_ND, labels_N = gather_global_batch(emb_BD, labels_B)
        target_N = self.partition.to_local(labels_N)
        cos_NC = cosine_logits(emb_ND, self.weight, self.cfg.gemm_precision, kernel=self.kernel)
        if self.kernel == "triton":  # one process only (check_kernel); writes the gradient into cos_NC's buffer
            return margin_softmax_cross_entropy(cos_NC, target_N, self.margin, kernel="triton")
        return partitioned_loss(self.margin(cos_NC, target_N), target_N)

    @torch.no_grad()
    def update(self, lr: float) -> None:
        """SGD with momentum on every row (all rows were in the softmax), fused into one pass with
        ``head.kernel = "triton"``."""
        if self.weight.grad is None:
            return
        update_rows_(self.weight.data, self.momentum_buf, self.weight.grad, None, lr=lr * self.cfg.lr_scale,
                     momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay, kernel=self.kernel)
        self.weight.grad = None

    @torch.no_grad()
    def skip(self) -> None:
        """Drops the gradient; no row moves."""
        self.weight.grad = None

