"""One rank of the 2-process trainer-parts parity test (run by tests/test_dist_train.py, not collected by pytest).

Usage: ``[RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p] python -m tests._dist_train_worker OUT_DIR``.
Without ``WORLD_SIZE`` it is the 1-process reference. Writes ``OUT_DIR/rank{r}_w{W}.pt``: per head kind, the loss, the
backbone gradients (after DDP's average) and the gradient of every class center (N × D, all ranks' rows summed in);
under ``"state"``, per partitioned kind (``fc``, ``vfc``), what this rank's ``head.state_dict()`` holds.

The parts are the real ones the trainer uses: the ``tiny`` backbone under :class:`PlainEngine` (DistributedDataParallel
when W > 1), heads from :func:`build_head` with the rank and world size (``partial_fc`` over a real Zarr bank, one
global store shared by the ranks), the same seeded global batch of N = 8 images, rank r taking rows
``[r·N/W, (r+1)·N/W)``.
The backbone is in eval mode: BatchNorm then normalises with its running statistics, so the per-sample result does
not depend on which rows share a process (in train mode BatchNorm statistics are per rank, as in DDP and
arcface_torch, and a 2-rank step differs from a 1-process step by design).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, TrainCfg
from offloadfr.distributed import (
    DistEnv,
    all_gather_labels,
    all_gather_objects,
    destroy_process_group,
    gather_rows_to_main,
    init_process_group,
)
from offloadfr.heads import HeadDeps, build_head
from offloadfr.heads.base import gather_partitioned_rows
from offloadfr.losses import build_margin
from offloadfr.models import build_backbone
from offloadfr.train.engine import PlainEngine

NUM_CLASSES, DIM, IMAGE, ROWS = 37, 16, 16, 8
LABELS = [0, 19, 20, 36, 5, 5, 23, 31]  # both ranks' ranges, their boundary, a repeated id
# head kind, "+" the DeepSpeed config of the engine (plain otherwise), "/" the loss (arcface otherwise)
KINDS = ("fc", "partial_fc", "fc+zero0", "fc/adasin", "partial_fc/adasin", "vfc", "vfc/adasin")
# vfc with M = 4 anchors (2 per rank) and LABELS' 7 ids: groups id mod 4 = 0 (0, 20, 36), 1 (5), 3 (19, 23, 31);
# 20 borrows the free anchor 2 (rank 1's), 23, 31 and 36 are ignored: both the loan and the unlabelled rows cross ranks
NUM_ANCHORS = 4


def _center_grads(head: torch.nn.Module, kind: str) -> torch.Tensor:
    """The gradient of all N class centers (vfc: M anchors; zeros for rows without one), summed over ranks."""
    full_ND = torch.zeros(NUM_ANCHORS if kind == "vfc" else NUM_CLASSES, DIM)
    if kind in ("fc", "vfc"):
        start = head.partition.class_start
        full_ND[start:start + head.partition.num_local] = head.weight.grad
    else:
        ids = head.dcc.resident_ids()
        pos = torch.searchsorted(head._active_slots, head.dcc.slots_of(ids))
        full_ND[ids] = head._w_AD.grad[pos]
    if dist.is_initialized():
        dist.all_reduce(full_ND)  # the ranks' rows are disjoint
    return full_ND


def _all_rows(rows_CD: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of a partitioned matrix, on every rank (ranges are contiguous, in rank order)."""
    if not dist.is_initialized():
        return rows_CD.clone()
    return torch.cat(all_gather_objects(rows_CD))


def run(out_dir: Path) -> dict[str, dict[str, Any]]:
    env = DistEnv.from_env("cpu")
    g = torch.Generator().manual_seed(7)
    images_N = torch.rand(ROWS, 3, IMAGE, IMAGE, generator=g) * 2 - 1
    labels_N = torch.tensor(LABELS)
    per_rank = ROWS // env.world_size
    rows = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
    results: dict[str, dict[str, Any]] = {"state": {}}
    for kind in KINDS:
        spec, _, loss_kind = kind.partition("/")
        head_kind, _, ds_json = spec.partition("+")
        torch.manual_seed(0)
        model = build_backbone("tiny", embedding_size=DIM, image_size=IMAGE).eval()
        train_cfg = TrainCfg(optimizer="sgd", precision="fp32", batch_size=per_rank)
        if ds_json:  # DeepSpeed averages the backbone gradient itself (ZeRO-0: on the parameters after backward)
            from offloadfr.train.ds_engine import DeepSpeedEngine

            engine = DeepSpeedEngine(model, train_cfg, torch.device("cpu"),
                                     ds_config=f"ds_configs/deepspeed/{ds_json}.json")
            model = engine.model
        else:
            engine = PlainEngine(model, train_cfg, torch.device("cpu"))
        margin = build_margin(LossCfg(kind=loss_kind or "arcface", s=16.0))  # s = 16: AdaSin's hard negatives count
        deps = HeadDeps(margin=margin, num_classes=NUM_CLASSES, dim=DIM, device=env.device,
                        bank=BankCfg(chunk_rows=4), cache=CacheCfg(), rank=env.rank, world_size=env.world_size,
                        bank_path=out_dir / f"bank_{head_kind}_w{env.world_size}")
        head = build_head(HeadCfg(kind=head_kind, num_anchors=NUM_ANCHORS), deps)
        try:
            head.plan(labels_N[rows])
            loss = head(engine.forward(images_N[rows]), labels_N[rows])
            engine.backward(loss)
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            assert len(grads) > 4, "the backbone received no gradient"
            results[kind] = {"loss": loss.detach(), "centers": _center_grads(head, head_kind), **grads,
                             **{f"margin.{name}": value.clone() for name, value in margin.state_dict().items()}}
            if head_kind == "vfc":  # the anchors after this step's overwrite (the loan included), all M of them
                results[kind]["anchors"] = _all_rows(head.weight.detach())
            if kind == "fc":
                results[kind]["gathered_labels"] = all_gather_labels(labels_N[rows])
            if kind in ("fc", "vfc"):  # the rows a checkpoint holds: all N (M) of them on rank 0, none on the others
                state = head.state_dict()
                sizes = [end - start for start, end in map(head.partition.range_of, range(env.world_size))]
                results["state"][kind] = {
                    "keys": sorted(state), "weight": state.get("weight"), "momentum_buf": state.get("momentum_buf"),
                    "gathered_rows": gather_partitioned_rows(head.weight.detach(), head.partition),
                    # 3 rows per rank per chunk: several chunks, the last one partial, ranks of unequal size
                    "rows_by_chunks": gather_rows_to_main(head.weight.detach(), sizes,
                                                          chunk_bytes=env.world_size * 3 * DIM * 4)}
        finally:
            head.close()
    return results


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    env = DistEnv.from_env("cpu")
    created = init_process_group(env)
    results = run(out_dir)
    torch.save(results, out_dir / f"rank{env.rank}_w{env.world_size}.pt")
    if created:
        destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
