"""The ``fc`` head: loss against a naive float64 reference, and the SGD row update against torch.optim.SGD."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg
from offloadfr.heads import HeadDeps, build_head
from offloadfr.losses import build_margin

from .conftest import DEVICE

C, D, B = 37, 8, 6


def _head(loss: LossCfg, cfg: HeadCfg | None = None) -> torch.nn.Module:
    deps = HeadDeps(margin=build_margin(loss), num_classes=C, dim=D, device=DEVICE, bank=BankCfg(seed=3),
                    cache=CacheCfg(), bank_path=Path("unused"))
    return build_head(cfg or HeadCfg(), deps)


def test_loss_matches_float64_cosface_reference() -> None:
    """Catches a head that forgets to normalise centers or embeddings, or applies the margin to the wrong column."""
    torch.manual_seed(0)
    head = _head(LossCfg(kind="cosface", s=16.0, cosface_m=0.3))
    emb = torch.randn(B, D, device=DEVICE)
    labels = torch.randint(0, C, (B,), device=DEVICE)
    loss = head(emb, labels)
    e = F.normalize(emb.double(), dim=1)
    w = F.normalize(head.weight.detach().double(), dim=1)
    logits = 16.0 * (e @ w.t())
    logits[torch.arange(B), labels] -= 16.0 * 0.3
    ref = F.cross_entropy(logits, labels)
    assert torch.allclose(loss.double(), ref, rtol=1e-5)


def test_update_equals_torch_sgd_over_all_rows() -> None:
    """Catches a wrong momentum/weight-decay order or a head update that skips rows."""
    torch.manual_seed(1)
    cfg = HeadCfg(momentum=0.9, weight_decay=5e-4, lr_scale=1.0)
    head = _head(LossCfg(kind="arcface", s=16.0, arcface_m=0.2), cfg)
    ref = torch.nn.Parameter(head.weight.detach().clone())
    opt = torch.optim.SGD([ref], lr=0.05, momentum=0.9, weight_decay=5e-4)
    margin = build_margin(LossCfg(kind="arcface", s=16.0, arcface_m=0.2))
    for _ in range(3):
        emb = torch.randn(B, D, device=DEVICE)
        labels = torch.randint(0, C, (B,), device=DEVICE)
        head(emb, labels).backward()
        head.update(lr=0.05)
        cos = F.normalize(emb, dim=1) @ F.normalize(ref, dim=1).t()
        F.cross_entropy(margin(cos, labels), labels).backward()
        opt.step()
        opt.zero_grad()
    assert torch.allclose(head.weight.detach(), ref.detach(), atol=1e-6)
    assert head.weight.grad is None


def test_initial_rows_are_deterministic_per_seed() -> None:
    """Catches an fc head whose init depends on the global RNG instead of the bank's (seed, id) initialiser."""
    torch.manual_seed(0)
    a = _head(LossCfg()).weight.detach().clone()
    torch.manual_seed(1)
    b = _head(LossCfg()).weight.detach().clone()
    assert torch.equal(a, b)
