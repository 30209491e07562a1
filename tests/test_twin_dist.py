"""The twin heads (dcp, attfc) on 2 real gloo processes (tests/_dist_twin_worker.py): data parallel, with one pool or
queue that every rank holds identically, written with the generated centers of both ranks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg
from offloadfr.errors import ConfigError
from offloadfr.heads import HeadDeps, build_head
from offloadfr.losses import build_margin
from offloadfr.models import build_backbone

from ._ranks import run_ranks


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dcp", "attfc"])
def test_two_ranks_keep_one_store_written_from_both(tmp_path: Path, kind: str) -> None:
    """Each rank trains on ids of its own half. Catches a pool (dcp) or queue (attfc) written with this rank's centers
    only (the ranks' copies would differ, and hold one half's ids each; F2C's code and MoCo all-gather them), and twin
    networks that drift apart. Both ranks must end with the same store bit for bit, holding ids of both halves."""
    run_ranks([sys.executable, "-m", "tests._dist_twin_worker", str(tmp_path), kind], 2, timeout_s=240,
              what=f"{kind} 2-process workers")
    r0, r1 = (torch.load(tmp_path / f"{kind}_rank{r}.pt", weights_only=False) for r in range(2))
    for key, value in r0["store"].items():
        assert torch.equal(value, r1["store"][key]), f"the ranks' {kind} stores differ in {key}"
    ids = r0["store"]["labels"][r0["store"]["labels"] >= 0]
    assert (ids < 12).any() and (ids >= 12).any(), f"the {kind} store holds one rank's ids only: {ids.tolist()}"
    for a, b in zip(r0["twin"] + r0["backbone"], r1["twin"] + r1["backbone"], strict=True):
        assert torch.equal(a, b)
    assert all(math.isfinite(x) for x in r0["losses"] + r1["losses"])


@pytest.mark.parametrize("kind", ["dcp", "attfc"])
def test_bank_mode_on_several_processes_is_refused(kind: str) -> None:
    """Catches bank mode silently run on W processes (each rank would write the shared bank's rows on its own)."""
    deps = HeadDeps(margin=build_margin(LossCfg()), num_classes=40, dim=8, device=torch.device("cpu"),
                    bank=BankCfg(), cache=CacheCfg(), bank_path=Path("unused"), rank=0, world_size=2,
                    backbone=build_backbone("tiny", embedding_size=8, image_size=16))
    with pytest.raises(ConfigError, match="bank_negatives = 3 on 2 processes"):
        build_head(HeadCfg(kind=kind, bank_negatives=3), deps)
