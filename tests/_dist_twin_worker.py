"""One rank of the 2-process tests of the twin heads (run by tests/test_twin_dist.py, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests._dist_twin_worker OUT_DIR KIND``
``[bank]``, KIND ``dcp`` or ``attfc``. Each rank trains 3 steps of the real trainer step (``train_step``: tiny
backbone under DDP, the head, ``dual`` or ``attention`` batches) on its own batches, whose ids come from its own half
of the 24 ids, then writes ``OUT_DIR/{KIND}_rank{r}.pt``: the head's pool or queue (``store``: rows and labels), its
twin network's parameters, the backbone's, and the losses.

With ``bank``: bank mode (``head.bank_negatives = 6``, the global bank ``OUT_DIR/bank``), ids drawn from all 24, the
trainer's lookahead (``with_lookahead``, L = 2) planning the steps, and 5 steps after loading the head state of
``OUT_DIR/start.pt`` (a 1-process checkpoint, bank at step 3); then the two-phase flush of step 8. Its file,
``OUT_DIR/{KIND}_bank_rank{r}.pt``, also holds each step's bank negatives (ids and rows, as ``CenterBank.read``
returned them), the centers written (ids and rows, as ``CenterBank.write`` got them), the head's metrics and, on
rank 0, the head's state saved at step 8.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, TrainCfg
from offloadfr.distributed import DistEnv, destroy_process_group, init_process_group
from offloadfr.heads import HeadDeps, build_head
from offloadfr.losses import build_margin
from offloadfr.models import build_backbone
from offloadfr.train.engine import PlainEngine
from offloadfr.train.trainer import train_step, with_lookahead

NUM_CLASSES, DIM, IMAGE = 24, 8, 16
INSTANCE, PAIRS, K = 4, 2, 2  # dcp, per rank: 4 instance images, then 2 identities x 2 images
QUERIES, KEYS = 4, 2  # attfc, per rank: 4 queries with 2 keys each
BANK_NEGATIVES, START_STEP, BANK_STEPS = 6, 3, 5  # bank mode: n, the 1-process checkpoint's step, steps on W ranks


def _batch(kind: str, rank: int, g: torch.Generator, *, every_id: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """uint8 images, labels and the dual layout of one rank's batch, ids from the rank's half (or from all ids)."""
    half = NUM_CLASSES // 2
    if every_id:
        ids = torch.randperm(NUM_CLASSES, generator=g)[: INSTANCE + PAIRS]
    else:
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


def build(kind: str, out_dir: Path, rank: int, world_size: int, bank: bool) -> tuple[PlainEngine, torch.nn.Module]:
    """The engine (tiny backbone) and the head of a rank; the same on 1 process (the test's reference runs)."""
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=DIM, image_size=IMAGE)
    engine = PlainEngine(model, TrainCfg(optimizer="sgd", precision="fp32", batch_size=INSTANCE), torch.device("cpu"))
    margin = build_margin(LossCfg(kind="cosface", s=16.0, cosface_m=0.3))
    deps = HeadDeps(margin=margin, num_classes=NUM_CLASSES, dim=DIM, device=torch.device("cpu"),
                    bank=BankCfg(chunk_rows=4), cache=CacheCfg(), bank_path=out_dir / ("bank" if bank else "unused"),
                    rank=rank, world_size=world_size, backbone=engine.model)
    # dcp: 6 slots, attfc: a queue of 12 entries, so that eviction and wrap-around happen within 3 steps
    cfg = HeadCfg(kind="dcp", pool_fraction=0.25) if kind == "dcp" else HeadCfg(kind="attfc", queue_fraction=0.5)
    cfg = dataclasses.replace(cfg, bank_negatives=BANK_NEGATIVES if bank else 0)
    return engine, build_head(cfg, deps)


def record_bank(center_bank: Any) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Wraps the ``read`` and ``write`` of a ``CenterBank`` to keep what each step read and wrote."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"read": [], "write": []}
    read, write = center_bank.read, center_bank.write

    def recorded_read(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, rows = read(labels)
        out["read"].append((ids.cpu().clone(), rows.cpu().clone()))
        return ids, rows

    def recorded_write(ids: torch.Tensor, centers: torch.Tensor) -> None:
        out["write"].append((ids.cpu().clone(), centers.detach().cpu().clone()))
        write(ids, centers)

    center_bank.read, center_bank.write = recorded_read, recorded_write
    return out


def main(out_dir: Path, kind: str, bank: bool) -> None:
    torch.set_num_threads(1)
    env = DistEnv.from_env("cpu")
    created = init_process_group(env)
    engine, head = build(kind, out_dir, env.rank, env.world_size, bank)
    model = engine.model
    g = torch.Generator().manual_seed(100 + env.rank)
    losses, out = [], {}
    if bank:
        head.load_state_dict(torch.load(out_dir / "start.pt", weights_only=False))  # saved on 1 process
        out["bank"] = record_bank(head.center_bank)
        batches = [(0, _batch(kind, env.rank, g, every_id=True)) for _ in range(BANK_STEPS)]
        planned = with_lookahead(((e, (x, y)) for e, (x, y, _) in batches), 2, head.plan)
        dual = batches[0][1][2]
    else:
        planned = ((0, _batch(kind, env.rank, g)[:2]) for _ in range(3))
        dual = (INSTANCE, K) if kind == "dcp" else None
    for _, (images_u8, labels) in planned:
        loss, _, updated = train_step(engine, head, images_u8, labels, 0.1, env.device, dual=dual)
        assert updated, "the guard skipped a step"
        losses.append(loss)
    if bank:
        out["metrics"] = head.metrics()
        head.prepare(START_STEP + BANK_STEPS)
        state = head.state_dict()  # a collective: every rank's pointer and queued negatives
        head.commit(START_STEP + BANK_STEPS)
        if env.rank == 0:
            out["state"] = state
        head.close()
    twin = head.gallery_net if kind == "dcp" else head.key_encoder
    torch.save({"store": _store(head, kind), "losses": losses, **out,
                "twin": [p.detach().clone() for p in twin.parameters()],
                "backbone": [p.detach().clone() for p in model.parameters()]},
               out_dir / f"{kind}{'_bank' if bank else ''}_rank{env.rank}.pt")
    if created:
        destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:] == ["bank"])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
