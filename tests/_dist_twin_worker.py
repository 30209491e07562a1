"""One rank of the 2-process test of the twin heads (run by tests/test_twin_dist.py, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests._dist_twin_worker OUT_DIR KIND``,
KIND ``dcp`` or ``attfc``. Each rank trains 3 steps of the real trainer step (``train_step``: tiny backbone under DDP,
the head, ``dual`` or ``attention`` batches) on its own batches, whose ids come from its own half of the 24 ids, then
writes ``OUT_DIR/{KIND}_rank{r}.pt``: the head's pool or queue (``store``: rows and labels), its twin network's
parameters, the backbone's, and the losses.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, TrainCfg
from offloadfr.distributed import DistEnv, destroy_process_group, init_process_group
from offloadfr.heads import HeadDeps, build_head
from offloadfr.losses import build_margin
from offloadfr.models import build_backbone
from offloadfr.train.engine import PlainEngine
from offloadfr.train.trainer import train_step

NUM_CLASSES, DIM, IMAGE = 24, 8, 16
INSTANCE, PAIRS, K = 4, 2, 2  # dcp, per rank: 4 instance images, then 2 identities x 2 images
QUERIES, KEYS = 4, 2  # attfc, per rank: 4 queries with 2 keys each


def _batch(kind: str, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """uint8 images, labels and the dual layout of one rank's batch, ids from the rank's half."""
    half = NUM_CLASSES // 2
    ids = torch.randperm(half, generator=g)[: INSTANCE + PAIRS] + rank * half
    if kind == "dcp":
        labels = torch.cat([ids[:INSTANCE], ids[INSTANCE:].repeat_interleave(K)])
        shape: tuple[int, ...] = (labels.numel(), 3, IMAGE, IMAGE)
        dual: tuple[int, int] | None = (INSTANCE, K)
    else:
        labels, shape, dual = ids[:QUERIES], (QUERIES, 1 + KEYS, 3, IMAGE, IMAGE), None
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8), labels, dual


def _store(head: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The state every rank must hold identically: the pool (dcp) or the queue (attfc)."""
    if kind == "dcp":
        pool = head.pool
        return {"rows": pool.rows_2SD.clone(), "labels": torch.from_numpy(pool.id_of.copy()),
                "stamp": torch.from_numpy(pool.stamp.copy()), "next_row": torch.from_numpy(pool.next_row.copy()),
                "clock": torch.tensor(pool.clock)}
    return {"rows": head.queue_QD.clone(), "labels": head.queue_labels_Q.clone(), "ptr": head.queue_ptr.clone()}


def main(out_dir: Path, kind: str) -> None:
    torch.set_num_threads(1)
    env = DistEnv.from_env("cpu")
    created = init_process_group(env)
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=DIM, image_size=IMAGE)
    engine = PlainEngine(model, TrainCfg(optimizer="sgd", precision="fp32", batch_size=INSTANCE), env.device)
    margin = build_margin(LossCfg(kind="cosface", s=16.0, cosface_m=0.3))
    deps = HeadDeps(margin=margin, num_classes=NUM_CLASSES, dim=DIM, device=env.device, bank=BankCfg(),
                    cache=CacheCfg(), bank_path=out_dir / "unused", rank=env.rank, world_size=env.world_size,
                    backbone=engine.model)
    # dcp: 6 slots, attfc: a queue of 12 entries, so that eviction and wrap-around happen within 3 steps
    cfg = HeadCfg(kind="dcp", pool_fraction=0.25) if kind == "dcp" else HeadCfg(kind="attfc", queue_fraction=0.5)
    head = build_head(cfg, deps)
    g = torch.Generator().manual_seed(100 + env.rank)
    losses = []
    for _ in range(3):
        images_u8, labels, dual = _batch(kind, env.rank, g)
        loss, _, updated = train_step(engine, head, images_u8, labels, 0.1, env.device, dual=dual)
        assert updated, "the guard skipped a step"
        losses.append(loss)
    twin = head.gallery_net if kind == "dcp" else head.key_encoder
    torch.save({"store": _store(head, kind), "losses": losses,
                "twin": [p.detach().clone() for p in twin.parameters()],
                "backbone": [p.detach().clone() for p in model.parameters()]}, out_dir / f"{kind}_rank{env.rank}.pt")
    if created:
        destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), sys.argv[2])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
