"""``pfc_dense``: arcface_torch's PartialFC_V2 on one device, the baseline the offloaded heads are measured against.

Legend: B = batch, D = embedding width, N = num_classes, S = sampled classes per step.

Every step samples S = int(sample_rate · N) classes: all positives of the batch plus uniformly random negatives
(resampled each step), and computes logits against those S centers only. The weight and its momentum are dense
N × D tensors on the device, and the SGD step runs over all N rows, as in arcface_torch where ``weight`` is one dense
Parameter: rows outside the sample get no gradient, but weight decay and momentum still move them every step. That
dense update and the 3 × N × D floats on the device are what limit it near 10M identities on an 80 GB GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offloadfr.bank.init import initial_rows
from offloadfr.config import HeadCfg
from offloadfr.heads.base import Head, HeadDeps, register_head, sgd_rows_
from offloadfr.losses import margin_cross_entropy

__all__ = ["DensePartialFCHead"]


@register_head("pfc_dense")
class DensePartialFCHead(Head):
    """PartialFC_V2 semantics (sampled softmax, dense weight and momentum) on one device.

    Args:
        cfg: the ``[head]`` section; ``sample_rate`` sets S.
        deps: margin, sizes, device, and the bank config whose seed and init_std set the initial rows.
    """

    def __init__(self, cfg: HeadCfg, deps: HeadDeps) -> None:
        super().__init__()
        self.cfg = cfg
        self.margin = deps.margin
        self.num_classes = deps.num_classes
        self.num_sample = max(1, int(cfg.sample_rate * deps.num_classes))
        ids = torch.arange(deps.num_classes, dtype=torch.int64)
        w_ND = initial_rows(ids, deps.dim, seed=deps.bank.seed, std=deps.bank.init_std).to(deps.device)
        self.register_buffer("weight", w_ND)
        self.register_buffer("momentum_buf", torch.zeros_like(w_ND))
        self._sampled: torch.Tensor | None = None
        self._w_SD: torch.Tensor | None = None

    def _sample(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Sorted ids of this step's classes: every positive, then random negatives up to S (arcface_torch rule)."""
        positive = torch.unique(labels_B)
        if self.num_sample <= positive.numel():
            return positive
        perm = torch.rand(self.num_classes, device=labels_B.device)
        perm[positive] = 2.0
        return torch.sort(torch.topk(perm, k=self.num_sample)[1])[0]

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        ids_S = self._sample(labels_B)
        target_B = torch.searchsorted(ids_S, labels_B)
        w_SD = self.weight.index_select(0, ids_S).requires_grad_(True)
        self._sampled, self._w_SD = ids_S, w_SD
        cos_BS = F.normalize(emb_BD.float(), dim=1) @ F.normalize(w_SD, dim=1).t()
        return margin_cross_entropy(self.margin(cos_BS, target_B), target_B)

    @torch.no_grad()
    def update(self, lr: float) -> None:
        """Dense SGD over all N rows; only the sampled rows have a non-zero gradient."""
        if self._w_SD is None or self._w_SD.grad is None:
            return
        grad_ND = torch.zeros_like(self.weight)
        grad_ND.index_copy_(0, self._sampled, self._w_SD.grad)
        sgd_rows_(self.weight, grad_ND, self.momentum_buf, lr=lr * self.cfg.lr_scale, momentum=self.cfg.momentum,
                  weight_decay=self.cfg.weight_decay)
        self._sampled, self._w_SD = None, None

    @torch.no_grad()
    def skip(self) -> None:
        """Drops this step's sample and gradient; no row moves."""
        self._sampled, self._w_SD = None, None
