"""``dcp``: F2C / FFC (Wang et al., arXiv 2105.10375, CVPR 2022; seeds-spec §3): the Dynamic Class Pool, no C×D FC.

Legend: S = pool size (slots), D = embedding width, n = gallery rows of a pass, B = probe rows of a pass.

Two networks: the **probe net** is the trained backbone (through the engine); the **gallery net** is its EMA twin,
``θ_G ← m·θ_G + (1 − m)·θ_P`` once per optimizer step (parameters only; its BatchNorm statistics come from its own
forwards in train mode, §3.6.5). The gallery net's normalised features of the gallery images fill the **Dynamic Class
Pool**: S slots of two rows each (the "dual queue", ``rows_2SD``), one slot per identity, assigned by an LRU over
identities. One pass (``impl`` of §3.4), gallery rows in order:

1. a new identity takes a free slot, or evicts the least recently used identity's slot; its feature goes to row 0
   and the slot's next row becomes 1. An identity already in the pool writes the slot's next row and toggles it
   (rows alternate 0, 1, 0, ...), and its slot joins this pass's ``ones``. Every write moves the identity to the
   LRU's most recent end; features are overwritten, never averaged. When one (row, slot) is written twice in a
   pass (an identity three times in one gallery batch), the later gallery row wins (deterministic, §3.6.3).
2. each probe row's target is its identity's slot, or −1 (an **outlier**) when the identity is not in the pool.
3. two logit sets: ``cos1 = e · rows[0]ᵀ`` and ``cos2 = e · W2ᵀ`` with ``W2`` = row 1 for the slots in ``ones``,
   row 0 elsewhere. Each gives ``L = CE(margin(s·cos), t)`` over the rows with a target (the run's ``[loss]``; the
   code: CosFace m = 0.5, s = 32) + the outlier term ``mean over outliers of mean of the k largest max(cos, 0)``
   (k = ``head.hard_negatives``, 0: the code's min(max(int(0.0002·S), 3), 10)); the pass's loss is L(cos1) + L(cos2).

Forms (``head.dcp_form``), and how a ``dual`` batch maps to §3.3's x and y (``take_dual_batch``): rows ``[0, B)``
are the instance part, split in halves A1 = ``[0, B//2)`` and A2 = ``[B//2, B)``; the identity part holds P groups of
K images, of which the first ``K//2`` of each group form u and the rest v (K = 2: one image each, the code's pairs).
``x = [u, A1]``, ``y = [v, A2]``, each with its labels. Every identity of the identity part is thus in x and in y.

- ``single`` (the paper): gallery = x → pool update, probe = y → loss; the backbone sees only y.
- ``symmetric`` (the authors' code): the backbone and the gallery net each see ``[x, y]``; pass A (probe x, gallery
  y) is computed and its pool/LRU/position changes are rolled back exactly, then pass B (probe y, gallery x) is kept;
  loss = A + B. The code forwards x and y separately (two BatchNorm batches); here each network forwards ``[x, y]`` in
  one batch.

The pool's changes of the kept pass are undone by ``skip()`` (a step refused by the non-finite guard), so a skipped
step leaves the pool as it was; ``update`` makes them final. The pool starts as random unit vectors (the code: U[0,1)
normalised) that act as negatives until overwritten; the rows are cloned before each matmul, so the in-place
rollback never touches a tensor autograd saved (§3.6.2).

W processes (the code's ``all_gather`` of §3.4): every rank keeps the whole pool, the same on every rank. Each pass
all-gathers the gallery features and labels of all ranks (no gradient; rank order, so every rank writes the same rows
in the same order), and each rank's probes take their loss against that pool; the engine averages the backbone
gradient over the ranks (data parallel). The pool starts from the same seed, the gallery net follows the same
backbone, so the pools stay identical (tested), and a checkpoint (rank 0's) resumes on any process count. In bank
mode every rank appends the same bank columns and writes the kept pass's gallery features of all ranks into the bank
rows it owns (``center_bank.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offloadfr.config import HeadCfg
from offloadfr.heads.base import HeadDeps, register_head
from offloadfr.heads.center_bank import CenterBank
from offloadfr.heads.twin import TwinHead, ema_
from offloadfr.losses import margin_cross_entropy

__all__ = ["DCPHead", "DynamicClassPool", "PoolWrite", "dual_halves", "hard_negative_count", "outlier_loss"]


def hard_negative_count(pool_size: int) -> int:
    """The code's k of the outlier term: ``min(max(int(0.0002·S), 3), 10)``."""
    return min(max(int(0.0002 * pool_size), 3), 10)


def dual_halves(num_rows: int, instance_rows: int, images_per_identity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of x = [u, A1] and y = [v, A2] in a ``dual`` batch (see the module docstring).

    Args:
        num_rows: rows of the batch, ``B + P*K``.
        instance_rows: B, the instance part.
        images_per_identity: K >= 2.

    Returns:
        ``(x_rows, y_rows)``, int64.

    Raises:
        ValueError: the identity part is not whole groups of K, or K < 2.
    """
    b, k = instance_rows, images_per_identity
    if k < 2 or num_rows < b or (num_rows - b) % k:
        raise ValueError(f"dcp: a dual batch of {num_rows} rows is not {b} instance rows plus groups of K = {k} >= 2")
    groups = torch.arange(b, num_rows).view(-1, k)
    x = torch.cat([groups[:, : k // 2].reshape(-1), torch.arange(0, b // 2)])
    y = torch.cat([groups[:, k // 2:].reshape(-1), torch.arange(b // 2, b)])
    return x, y


def outlier_loss(cos_BC: torch.Tensor, target_B: torch.Tensor, k: int) -> torch.Tensor:
    """The outlier (negative-sample) term: mean over rows with target −1 of the mean of their k largest cosines,
    each clipped at 0 (0 when there is no outlier; masked columns must hold −inf). No host synchronisation."""
    top_Bk = cos_BC.float().topk(min(k, cos_BC.shape[1]), dim=1).values.clamp(min=0)
    out_B = (target_B < 0).to(top_Bk.dtype)
    return (top_Bk.mean(dim=1) * out_B).sum() / out_B.sum().clamp(min=1)


@dataclass
class PoolWrite:
    """What one pass wrote to the pool, enough to undo it exactly (``DynamicClassPool.undo``).

    Attributes:
        rows: the dual-queue row (0 or 1) of each (row, slot) written, int64 on the device.
        slots: the slot of each.
        old: the overwritten (m, D) values.
        ones_S: the slots written as existing identities in this pass (they use row 1 in ``cos2``).
        saved: slot -> (id, stamp, next row) before the pass, for every slot the pass touched.
        clock: the LRU clock before the pass.
        num_used: the used slots before the pass.
    """

    rows: torch.Tensor
    slots: torch.Tensor
    old: torch.Tensor
    ones_S: torch.Tensor
    saved: dict[int, tuple[int, int, int]]
    clock: int
    num_used: int


class DynamicClassPool(nn.Module):
    """The Dynamic Class Pool: S slots × 2 rows of gallery features on the device, an LRU over identities on the host.

    The LRU is a stamp per slot (the clock value of its last write; the least recently used slot has the smallest
    stamp) and a dict id → slot. Slots fill in order 0, 1, ... while free (the code's LRU), then the LRU slot is
    evicted. ``write`` returns a :class:`PoolWrite` that ``undo`` reverts bit for bit (rows, ids, stamps, positions,
    clock). The offloadfr ``DynamicClassContainer`` is not used: its admit/evict work on whole batches with protected
    ids and it has no undo or saved state, whereas the pool's semantics are per gallery row in order (which row an
    identity writes, and which identity an insertion evicts, depend on the rows before it) and must be rolled back
    exactly and checkpointed.

    Args:
        size: S, slots (>= 1).
        dim: D.
        device: where the rows live.
        seed: seed of the random initial rows.
    """

    def __init__(self, size: int, dim: int, *, device: torch.device, seed: int) -> None:
        super().__init__()
        self.size = size
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("rows_2SD", F.normalize(torch.randn(2, size, dim, generator=gen), dim=2).to(device))
        self.slot_of: dict[int, int] = {}
        self.id_of = np.full(size, -1, dtype=np.int64)
        self.stamp = np.zeros(size, dtype=np.int64)
        self.next_row = np.zeros(size, dtype=np.int64)
        self.clock = 1
        self.num_used = 0

    def __len__(self) -> int:
        return len(self.slot_of)

    def slots_of(self, labels: list[int]) -> torch.Tensor:
        """Each label's slot, −1 when not in the pool (no LRU change; the code's ``view``), int64 on the device."""
        return torch.tensor([self.slot_of.get(label, -1) for label in labels], dtype=torch.int64,
                            device=self.rows_2SD.device)

    @torch.no_grad()
    def write(self, feats_nD: torch.Tensor, labels: list[int]) -> PoolWrite:
        """Writes the gallery features of one pass, row by row in order (module docstring of ``dcp``, step 1)."""
        saved: dict[int, tuple[int, int, int]] = {}
        ones: set[int] = set()
        target: dict[tuple[int, int], int] = {}  # (row, slot) -> the gallery row written there last
        clock0, used0 = self.clock, self.num_used
        candidates: list[int] | None = None  # the oldest slots when eviction starts, oldest first
        for i, label in enumerate(labels):
            slot = self.slot_of.get(label)
            if slot is None:
                if self.num_used < self.size:
                    slot = self.num_used
                    self.num_used += 1
                else:
                    if candidates is None:
                        k = min(len(labels), self.size)
                        part = np.argpartition(self.stamp, k - 1)[:k]
                        candidates = part[np.argsort(self.stamp[part])].tolist()
                    slot = self._evictee(candidates, clock0)
                saved.setdefault(slot, (int(self.id_of[slot]), int(self.stamp[slot]), int(self.next_row[slot])))
                if self.id_of[slot] >= 0:
                    del self.slot_of[int(self.id_of[slot])]
                self.slot_of[label] = slot
                self.id_of[slot] = label
                row = 0
                self.next_row[slot] = 1
            else:
                saved.setdefault(slot, (int(self.id_of[slot]), int(self.stamp[slot]), int(self.next_row[slot])))
                row = int(self.next_row[slot])
                self.next_row[slot] ^= 1
                ones.add(slot)
            self.stamp[slot] = self.clock
            self.clock += 1
            target[(row, slot)] = i
        device = self.rows_2SD.device
        rows = torch.tensor([r for r, _ in target], dtype=torch.int64, device=device)
        slots = torch.tensor([s for _, s in target], dtype=torch.int64, device=device)
        items = torch.tensor(list(target.values()), dtype=torch.int64, device=feats_nD.device)
        old = self.rows_2SD[rows, slots].clone()
        self.rows_2SD[rows, slots] = feats_nD.index_select(0, items).to(device=device, dtype=self.rows_2SD.dtype)
        ones_S = torch.zeros(self.size, dtype=torch.bool, device=device)
        ones_S[torch.tensor(sorted(ones), dtype=torch.int64, device=device)] = True
        return PoolWrite(rows=rows, slots=slots, old=old, ones_S=ones_S, saved=saved, clock=clock0, num_used=used0)

    def _evictee(self, candidates: list[int], clock0: int) -> int:
        """The least recently used slot: the oldest candidate not written in this pass (written slots have stamps
        >= ``clock0``, newer than every other); when all were, the overall oldest."""
        while candidates:
            slot = candidates.pop(0)
            if self.stamp[slot] < clock0:
                return int(slot)
        return int(np.argmin(self.stamp))

    @torch.no_grad()
    def undo(self, w: PoolWrite) -> None:
        """Restores the pool exactly as it was before the ``write`` that returned ``w`` (the last one not undone)."""
        self.rows_2SD[w.rows, w.slots] = w.old
        for slot in w.saved:
            current = int(self.id_of[slot])
            if current >= 0 and self.slot_of.get(current) == slot:
                del self.slot_of[current]
        for slot, (label, stamp, next_row) in w.saved.items():
            self.id_of[slot], self.stamp[slot], self.next_row[slot] = label, stamp, next_row
            if label >= 0:
                self.slot_of[label] = slot
        self.clock, self.num_used = w.clock, w.num_used

    def get_extra_state(self) -> dict[str, Any]:
        return {"id_of": torch.from_numpy(self.id_of.copy()), "stamp": torch.from_numpy(self.stamp.copy()),
                "next_row": torch.from_numpy(self.next_row.copy()), "clock": self.clock, "num_used": self.num_used}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.id_of = state["id_of"].numpy().copy()
        self.stamp = state["stamp"].numpy().copy()
        self.next_row = state["next_row"].numpy().copy()
        self.clock, self.num_used = int(state["clock"]), int(state["num_used"])
        self.slot_of = {int(label): slot for slot, label in enumerate(self.id_of.tolist()) if label >= 0}

    def extra_repr(self) -> str:
        return f"size={self.size}, used={len(self.slot_of)}"


@register_head("dcp")
class DCPHead(TwinHead):
    """F2C's Dynamic Class Pool with an EMA gallery net (see the module docstring).

    Args:
        cfg: the ``[head]`` section (dcp_form, pool_fraction, gallery_momentum, hard_negatives, bank_negatives).
        deps: margin, sizes, device, the backbone (the probe net, copied as the gallery net), its autocast dtype, and
            the bank config (its seed initialises the pool; its tier and path hold the centers in bank mode).

    Raises:
        ValueError: ``deps.backbone`` is None (the trainer always passes it).

    Example::

        head = DCPHead(HeadCfg(kind="dcp"), deps)            # deps.backbone = the trained backbone
        images, labels = head.take_dual_batch(batch, labels, instance_rows=B, images_per_identity=K)
        loss = head(backbone(images), labels); loss.backward(); optimizer.step(); head.update(lr)
    """

    def __init__(self, cfg: HeadCfg, deps: HeadDeps) -> None:
        super().__init__(deps, kind="dcp", bank_negatives=cfg.bank_negatives)
        self.cfg = cfg
        self.gallery_net = self.make_twin()  # the probe net is the trained backbone (self.trained_net)
        self.pool = DynamicClassPool(max(1, int(cfg.pool_fraction * deps.num_classes)), deps.dim, device=deps.device,
                                     seed=deps.bank.seed)
        self.hard_negatives = cfg.hard_negatives or hard_negative_count(self.pool.size)
        self._gallery: tuple[torch.Tensor, torch.Tensor, int] | None = None  # images, labels, rows of x
        self._pending: PoolWrite | None = None  # the kept pass's pool changes, until update (or skip undoes them)
        self._centers: tuple[torch.Tensor, torch.Tensor] | None = None  # bank mode: the kept pass's gallery
        self._last: dict[str, torch.Tensor] = {}

    def take_dual_batch(self, images: torch.Tensor, labels: torch.Tensor, *, instance_rows: int,
                        images_per_identity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Splits a normalised ``dual`` batch into x and y; keeps the gallery images for ``forward`` and returns the
        probe net's images and labels (``single``: y; ``symmetric``: [x, y])."""
        x, y = dual_halves(images.shape[0], instance_rows, images_per_identity)
        if self.cfg.dcp_form == "single":
            x, y = x.to(images.device), y.to(images.device)
            self._gallery = (images.index_select(0, x), labels.index_select(0, x), x.numel())
            return images.index_select(0, y), labels.index_select(0, y)
        order = torch.cat([x, y]).to(images.device)
        both, both_labels = images.index_select(0, order), labels.index_select(0, order)
        self._gallery = (both, both_labels, x.numel())
        return both, both_labels

    @torch.no_grad()
    def gallery_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float32 gallery-net features of ``images``; train-mode BatchNorm (its own batch statistics)."""
        self.gallery_net.train()
        with self._autocast(images.device):
            z = self.gallery_net(images)
        return F.normalize(z.float(), dim=1)

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """The pool loss of the probe embeddings (one pass, or pass A rolled back + pass B)."""
        if self._gallery is None:
            raise RuntimeError("dcp: take_dual_batch() must come before each forward (data.sampler = 'dual')")
        images_g, labels_g, num_x = self._gallery
        self._gallery = None
        g_nD = self.gallery_features(images_g)
        e_BD = F.normalize(emb_BD.float(), dim=1)
        # bank mode: the step's negatives (the gallery's labels plan the step when the trainer did not)
        bank = self.center_bank.read(labels_g) if self.center_bank is not None else None
        if self.cfg.dcp_form == "single":
            if e_BD.shape[0] != labels_B.shape[0]:
                raise ValueError(f"dcp: {e_BD.shape[0]} probe embeddings for {labels_B.shape[0]} labels")
            gallery = self.from_all_ranks(g_nD, labels_g)
            loss, kept = self._pass(e_BD, labels_B, *gallery, bank)
            self._centers = (gallery[1], gallery[0])  # every rank's: each writes the rows it owns
        else:
            if e_BD.shape[0] != g_nD.shape[0]:
                raise ValueError(f"dcp: {e_BD.shape[0]} probe embeddings for {g_nD.shape[0]} gallery rows")
            gallery_y = self.from_all_ranks(g_nD[num_x:], labels_g[num_x:])
            gallery_x = self.from_all_ranks(g_nD[:num_x], labels_g[:num_x])
            loss_a, temporary = self._pass(e_BD[:num_x], labels_B[:num_x], *gallery_y, bank)
            self.pool.undo(temporary)  # pass A leaves no trace
            loss_b, kept = self._pass(e_BD[num_x:], labels_B[num_x:], *gallery_x, bank)
            loss = loss_a + loss_b
            self._centers = (gallery_x[1], gallery_x[0])
        self._pending = kept
        self._last["dcp/pool_used"] = torch.tensor(float(len(self.pool)))
        return loss

    def _pass(self, e_BD: torch.Tensor, labels_B: torch.Tensor, g_nD: torch.Tensor, labels_n: torch.Tensor,
              bank: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, PoolWrite]:
        """One ``impl`` of §3.4: writes the gallery, then L(cos1) + L(cos2) of the probes."""
        written = self.pool.write(g_nD, labels_n.tolist())
        target_B = self.pool.slots_of(labels_B.tolist())
        rows = self.pool.rows_2SD
        w1_SD = rows[0].clone()  # clones: a later in-place write or undo must not alter what autograd saved
        w2_SD = torch.where(written.ones_S[:, None], rows[1], rows[0])
        loss = e_BD.new_zeros(())
        cos1_BS = None
        for w_SD in (w1_SD, w2_SD):
            cos_BC, mask_BC = e_BD @ w_SD.t(), None
            cos1_BS = cos_BC.detach() if cos1_BS is None else cos1_BS
            if bank is not None:
                cos_BC, mask_BC = CenterBank.append(e_BD, labels_B, cos_BC, None, *bank)
            loss = loss + self.pool_loss(cos_BC, target_B, mask_BC)
        assert cos1_BS is not None
        positive_B = (target_B >= 0).float()
        positive_cos_B = cos1_BS.gather(1, target_B.clamp(min=0)[:, None]).squeeze(1)
        self._last = {"dcp/positives": positive_B.mean(),  # tensors: read (synced) only when logged
                      "dcp/positive_cos": (positive_cos_B * positive_B).sum() / positive_B.sum().clamp(min=1),
                      "dcp/outlier_term": outlier_loss(cos1_BS, target_B, self.hard_negatives)}
        return loss, written

    def pool_loss(self, cos_BC: torch.Tensor, target_B: torch.Tensor, mask_BC: torch.Tensor | None) -> torch.Tensor:
        """L of §3.4: margin softmax CE over the rows with a slot, plus the outlier term of the rows without one."""
        logits_BC = self.margin(cos_BC, target_B)
        if mask_BC is not None:
            logits_BC = logits_BC.masked_fill(mask_BC, float("-inf"))
            cos_BC = cos_BC.masked_fill(mask_BC, float("-inf"))
        return margin_cross_entropy(logits_BC, target_B) + outlier_loss(cos_BC, target_B, self.hard_negatives)

    @torch.no_grad()
    def update(self, lr: float) -> None:
        """After the backbone's step: the kept pass's pool changes become final (and reach the bank in bank mode),
        then the gallery net's parameters follow the EMA."""
        if self.center_bank is not None and self._centers is not None:
            self.center_bank.write(*self._centers)
        self._pending = self._centers = None
        ema_(self.gallery_net, self.trained_net, self.cfg.gallery_momentum)

    @torch.no_grad()
    def skip(self) -> None:
        """Undoes this step's pool changes; the gallery net does not move and nothing reaches the bank."""
        if self._pending is not None:
            self.pool.undo(self._pending)
        self._pending = self._centers = None
        self._gallery = None
        self.skip_bank_step()

    def metrics(self) -> dict[str, float]:
        """Used pool slots, the fraction of probes with a slot, their mean cosine, the outlier term (kept pass); in
        bank mode also the bank's traffic."""
        return self.with_bank_metrics(self._last)

    def __repr__(self) -> str:
        return (f"DCPHead(form={self.cfg.dcp_form}, pool_size={self.pool.size}, hard_negatives={self.hard_negatives}, "
                f"gallery_momentum={self.cfg.gallery_momentum}, bank_negatives={self.cfg.bank_negatives}, "
                f"margin={self.margin})")
