"""``attfc``: AttFC (Zheng et al., arXiv 2503.06839; seeds-spec §2): a FIFO of generative class centers, no C×D FC.

Legend: B = batch, k = key images per query, D = embedding width, Q = queue (Dynamic Class Container) size.

Batches come from the attention sampler (``data.sampler = "attention"``): each item is a query image and k key
images of the same identity. The query goes through the trained backbone (the query encoder, via the engine); the
keys go through the **key encoder**, an EMA copy of the backbone that never receives a gradient. One step, as the
authors' code does it (``dcc.py``):

1. Key features ``z_BkD`` (unnormalised) from the key encoder in train mode (batch-statistics BatchNorm), no grad.
2. Attention over the keys of each sample: ``a_bj = softmax_j(cos(e_b, z_bj) / τ)`` with ``e_b`` the detached,
   normalised query embedding (τ = 1 in the code). The **generative class center** (GCC) of sample b is
   ``c_b = normalize(Σ_j a_bj · z_bj)``.
3. Logits: the cosine of each query against the batch's GCCs and the queue. Column b of the batch block is the
   positive of row b; the other batch columns are masked (the code), or negatives except those with the query's
   label (``head.batch_negatives``). Queue entries with the query's label are masked (same-label masking). The
   configured margin (``loss``; the code: ArcFace m = 0.5, s = 64, straight-through gradient) acts on the positive,
   masked columns get −inf (probability exactly 0; the code clamps them to cos −1), then cross-entropy.
4. ``update(lr)`` (after the backbone's optimizer step): the key encoder's parameters follow
   ``θ_k ← m·θ_k + (1 − m)·θ_q`` (its BatchNorm buffers run on their own, as in MoCo), and the batch's GCCs and
   labels are enqueued: slot ``(ptr + i) mod Q`` for item i, ``ptr ← (ptr + B) mod Q``. The current batch is thus
   never its own queue negative. When B > Q only the last Q items survive, as one-at-a-time writes would leave it.

The queue starts as Q random unit vectors with label −1 (the code's random init; they act as negatives until
overwritten). Q = max(1, int(``head.queue_fraction`` × N)); the code also rounds Q down to a multiple of B, which the
wrap-around enqueue makes unnecessary. Gradients reach only the backbone, through the query embeddings.

``skip()`` (a step refused by the non-finite guard) neither moves the key encoder nor enqueues; the key encoder's
BatchNorm running statistics of that step's forward stay, as they are not read in train mode.

W processes (MoCo's queue): each rank's queries take their loss against their own batch's GCCs and the queue, and
every rank enqueues the GCCs and labels of all ranks, all-gathered in rank order in ``forward``, so the queues stay
identical; the engine averages the backbone gradient. The authors' code runs one process. In bank mode every rank
appends the same bank columns and writes the GCCs of all ranks into the bank rows it owns (``center_bank.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offloadfr.config import HeadCfg
from offloadfr.heads.base import HeadDeps, register_head
from offloadfr.heads.twin import TwinHead, ema_
from offloadfr.losses import margin_cross_entropy

__all__ = ["AttFCHead", "generative_centers", "queue_slots"]


def generative_centers(query_BD: torch.Tensor, keys_BkD: torch.Tensor, temperature: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GCC of each sample: the attention-weighted sum of its (unnormalised) key features, normalised.

    Args:
        query_BD: query embeddings (any norm; they are normalised here).
        keys_BkD: k unnormalised key features per sample.
        temperature: τ of the softmax over the keys.

    Returns:
        ``(gcc_BD, attn_Bk)``: unit-norm centers and the weights ``softmax_j(cos(q_b, z_bj) / τ)``, each row summing
        to 1.
    """
    cos_Bk = torch.einsum("bd,bkd->bk", F.normalize(query_BD, dim=1), F.normalize(keys_BkD, dim=2))
    attn_Bk = torch.softmax(cos_Bk / temperature, dim=1)
    return F.normalize(torch.einsum("bk,bkd->bd", attn_Bk, keys_BkD), dim=1), attn_Bk


def queue_slots(ptr: int, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where a FIFO of ``size`` slots with write pointer ``ptr`` puts ``count`` new items, wrapping around.

    Returns:
        ``(items, slots, new_ptr)``: the indices of the items that survive (the last ``size`` when ``count > size``,
        as writing them one at a time would leave it), their slots ``(ptr + i) mod size``, and ``(ptr + count) mod
        size``.
    """
    items = torch.arange(max(0, count - size), count)
    return items, (ptr + items) % size, (ptr + count) % size


@register_head("attfc")
class AttFCHead(TwinHead):
    """AttFC: EMA key encoder, generative class centers and their FIFO (see the module docstring).

    Args:
        cfg: the ``[head]`` section (key_momentum, queue_fraction, attention_temperature, batch_negatives).
        deps: margin, sizes, device, the backbone to copy as the key encoder, its autocast dtype, and the bank config
            whose seed initialises the queue.

    Raises:
        ValueError: ``deps.backbone`` is None (the trainer always passes it).

    Example::

        head = AttFCHead(HeadCfg(kind="attfc"), deps)      # deps.backbone = the trained backbone
        head.set_key_images(keys_Bk3SS); loss = head(backbone(query_B3SS), labels_B)
        loss.backward(); optimizer.step(); head.update(lr)
    """

    def __init__(self, cfg: HeadCfg, deps: HeadDeps) -> None:
        super().__init__(deps, kind="attfc", bank_negatives=cfg.bank_negatives)
        self.cfg = cfg
        self.key_encoder = self.make_twin()  # the query encoder is the trained backbone (self.trained_net)
        self.queue_size = max(1, int(cfg.queue_fraction * deps.num_classes))
        gen = torch.Generator().manual_seed(deps.bank.seed)
        queue_QD = F.normalize(torch.randn(self.queue_size, deps.dim, generator=gen), dim=1)
        self.register_buffer("queue_QD", queue_QD.to(deps.device))
        self.register_buffer("queue_labels_Q", torch.full((self.queue_size,), -1, dtype=torch.long,
                                                          device=deps.device))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._keys: torch.Tensor | None = None  # this step's key images, until forward
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's GCCs and labels, until update
        self._last: dict[str, torch.Tensor] = {}
        # bank mode (head.bank_negatives > 0): the GCCs of all ranks also go to the class bank, which lends extra
        # negatives (the plan streams them to the device)

    def set_key_images(self, keys_BK: torch.Tensor) -> None:
        """Keeps the key images (B, k, 3, S, S), normalised, for the next ``forward``."""
        self._keys = keys_BK

    @torch.no_grad()
    def key_features(self, keys_BK: torch.Tensor) -> torch.Tensor:
        """Unnormalised key-encoder features (B, k, D), float32, of key images (B, k, 3, S, S); train-mode BN."""
        b, k = keys_BK.shape[:2]
        self.key_encoder.train()
        with self._autocast(keys_BK.device):
            z = self.key_encoder(keys_BK.flatten(0, 1))
        return z.float().view(b, k, -1)

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Margin softmax CE of the queries against the batch's GCCs (positive: own) and the queue, masked."""
        if self._keys is None:
            raise RuntimeError("attfc: set_key_images() must come before each forward (data.sampler = 'attention')")
        keys, self._keys = self._keys, None
        if keys.shape[0] != emb_BD.shape[0]:
            raise ValueError(f"attfc: {keys.shape[0]} key groups for {emb_BD.shape[0]} queries")
        z_BkD = self.key_features(keys)
        e_BD = F.normalize(emb_BD.float(), dim=1)
        gcc_BD, attn_Bk = generative_centers(e_BD.detach(), z_BkD, self.cfg.attention_temperature)
        b = emb_BD.shape[0]
        cos_BC = e_BD @ torch.cat([gcc_BD, self.queue_QD]).t()  # (B, B + Q); GCCs and queue carry no gradient
        mask_BC = self.mask(labels_B)
        if self.center_bank is not None:  # bank mode: extra negative columns from the class bank, own id masked
            cos_BC, mask_BC = self.center_bank.extend(e_BD, labels_B, cos_BC, mask_BC)
        target_B = torch.arange(b, device=emb_BD.device)
        logits_BC = self.margin(cos_BC, target_B).masked_fill(mask_BC, float("-inf"))
        self._pending = self.from_all_ranks(gcc_BD.detach(), labels_B.detach())  # what update enqueues
        self._last = {"attfc/masked_queue": mask_BC[:, b:].sum() / b,  # tensors: read (synced) only when logged
                      "attfc/queue_filled": (self.queue_labels_Q >= 0).sum(),
                      "attfc/attention_max": attn_Bk.max(dim=1).values.mean(),
                      "attfc/positive_cos": cos_BC.diagonal().detach().mean(),
                      "attfc/queue_cos": self.queue_cos(cos_BC[:, b:].detach(), mask_BC[:, b:])}
        return margin_cross_entropy(logits_BC, target_B)

    @staticmethod
    def queue_cos(cos_BQ: torch.Tensor, masked_BQ: torch.Tensor) -> torch.Tensor:
        """Mean cosine of the queries to their negatives in the queue (masked entries left out). Near
        ``attfc/positive_cos``, it says that positives and negatives alike moved toward one shared direction
        (collapse), not that the queries learned their identities (docs/methods.md)."""
        keep_BQ = ~masked_BQ
        return (cos_BQ * keep_BQ).sum() / keep_BQ.sum().clamp(min=1)

    def mask(self, labels_B: torch.Tensor) -> torch.Tensor:
        """The (B, B + Q) columns left out of each row's softmax: the batch block's other columns (all of them, or
        only those of the row's label with ``batch_negatives``) and the queue entries of the row's label."""
        b = labels_B.numel()
        same_BB = labels_B[:, None] == labels_B[None, :]
        off_diag_BB = ~torch.eye(b, dtype=torch.bool, device=labels_B.device)
        batch_BB = (same_BB & off_diag_BB) if self.cfg.batch_negatives else off_diag_BB
        return torch.cat([batch_BB, labels_B[:, None] == self.queue_labels_Q[None, :]], dim=1)

    @torch.no_grad()
    def update(self, lr: float) -> None:
        """After the backbone's step: the key encoder's EMA, then this step's GCCs enter the queue."""
        ema_(self.key_encoder, self.trained_net, self.cfg.key_momentum)
        if self._pending is not None:
            self.enqueue(*self._pending)
        if self.center_bank is not None and self._pending is not None:  # bank mode: the GCCs reach the bank
            self.center_bank.write(self._pending[1], self._pending[0])
        self._pending = None

    @torch.no_grad()
    def enqueue(self, gcc_BD: torch.Tensor, labels_B: torch.Tensor) -> None:
        """Writes GCCs and their labels at the queue pointer, wrapping around; advances the pointer."""
        items, slots, new_ptr = queue_slots(int(self.queue_ptr), labels_B.numel(), self.queue_size)
        items, slots = items.to(gcc_BD.device), slots.to(self.queue_QD.device)
        self.queue_QD.index_copy_(0, slots, gcc_BD.index_select(0, items).to(self.queue_QD.dtype))
        self.queue_labels_Q.index_copy_(0, slots, labels_B.index_select(0, items).to(self.queue_labels_Q.device))
        self.queue_ptr.fill_(new_ptr)

    @torch.no_grad()
    def skip(self) -> None:
        """Drops this step's GCCs; the key encoder does not move and nothing reaches the bank."""
        self._pending = None
        self._keys = None
        self.skip_bank_step()

    def metrics(self) -> dict[str, float]:
        """Masked queue entries per query, filled queue slots, mean top attention weight, mean positive cosine, mean
        cosine to the unmasked queue entries; in bank mode also the bank's traffic."""
        return self.with_bank_metrics(self._last)

    def __repr__(self) -> str:
        return (f"AttFCHead(queue_size={self.queue_size}, dim={self.queue_QD.shape[1]}, "
                f"key_momentum={self.cfg.key_momentum}, margin={self.margin})")
