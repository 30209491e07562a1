"""One rank of the 2-process dcp test (run by tests/test_dcp.py, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests._dist_dcp_worker OUT_DIR``.
Each rank trains 3 steps of the real trainer step (``train_step``: tiny backbone under DDP, the ``dcp`` head, dual
batches) on its own dual batches, whose ids come from its own half of the 24 ids, then writes ``OUT_DIR/rank{r}.pt``:
the pool (rows, ids, stamps, next rows, clock), the gallery net's parameters, the backbone's, and the losses.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, TrainCfg
from offloadfr.dist import DistEnv, destroy_process_group, init_process_group
from offloadfr.heads import HeadDeps, build_head
from offloadfr.losses import build_margin
from offloadfr.models import build_backbone
from offloadfr.train.engine import PlainEngine
from offloadfr.train.trainer import train_step

NUM_CLASSES, DIM, IMAGE = 24, 8, 16
INSTANCE, PAIRS, K = 4, 2, 2  # per rank: 4 instance images, then 2 identities x 2 images


def main(out_dir: Path) -> None:
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
    head = build_head(HeadCfg(kind="dcp", pool_fraction=0.25), deps)  # 6 slots: eviction within 3 steps
    g = torch.Generator().manual_seed(100 + env.rank)
    half = NUM_CLASSES // 2
    losses = []
    for _ in range(3):
        ids = torch.randperm(half, generator=g)[: INSTANCE + PAIRS] + env.rank * half  # this rank's half
        labels = torch.cat([ids[:INSTANCE], ids[INSTANCE:].repeat_interleave(K)])
        images_u8 = torch.randint(0, 256, (labels.numel(), 3, IMAGE, IMAGE), generator=g, dtype=torch.uint8)
        loss, _, updated = train_step(engine, head, images_u8, labels, 0.1, env.device, dual=(INSTANCE, K))
        assert updated, "the guard skipped a step"
        losses.append(loss)
    pool = head.pool
    torch.save({"rows": pool.rows_2SD.clone(), "id_of": torch.from_numpy(pool.id_of.copy()),
                "stamp": torch.from_numpy(pool.stamp.copy()), "next_row": torch.from_numpy(pool.next_row.copy()),
                "clock": pool.clock, "losses": losses,
                "gallery": [p.detach().clone() for p in head.gallery_net.parameters()],
                "backbone": [p.detach().clone() for p in model.parameters()]}, out_dir / f"rank{env.rank}.pt")
    if created:
        destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
