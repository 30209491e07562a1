"""``fc``: the full classifier, every class center on the device (the baseline for small N).

Legend: B = batch, D = embedding width, N = num_classes.

The centers start from the bank's deterministic per-id initialiser, so ``fc`` and ``partial_fc`` (with every id
resident) start from the same rows and follow the same trajectory. Every row is in the softmax, so every row gets a
gradient each step and the sparse-momentum update equals plain SGD over the whole matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offloadfr.bank.init import initial_rows
from offloadfr.config import HeadCfg
from offloadfr.heads.base import Head, HeadDeps, register_head, sgd_rows_
from offloadfr.losses import margin_cross_entropy

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
        ids = torch.arange(deps.num_classes, dtype=torch.int64)
        w_ND = initial_rows(ids, deps.dim, seed=deps.bank.seed, std=deps.bank.init_std)
        self.weight = nn.Parameter(w_ND.to(deps.device))
        self.register_buffer("momentum_buf", torch.zeros_like(self.weight))

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Margin softmax cross-entropy of ``emb_BD`` against all centers (computed in fp32)."""
        emb_BD = F.normalize(emb_BD.float(), dim=1)
        w_ND = F.normalize(self.weight, dim=1)
        cos_BN = emb_BD @ w_ND.t()
        logits_BN = self.margin(cos_BN, labels_B)
        return margin_cross_entropy(logits_BN, labels_B)

    @torch.no_grad()
    def update(self, lr: float) -> None:
        """SGD with momentum on every row (all rows were in the softmax)."""
        if self.weight.grad is None:
            return
        sgd_rows_(self.weight.data, self.weight.grad, self.momentum_buf, lr=lr * self.cfg.lr_scale,
                  momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
        self.weight.grad = None

    @torch.no_grad()
    def skip(self) -> None:
        """Drops the gradient; no row moves."""
        self.weight.grad = None
