"""One rank of the checkpoint tests of partitioned heads (run by tests/test_dist_resume.py, not collected by pytest).

Usage: ``[RANK=r WORLD_SIZE=W MASTER_ADDR=127.0.0.1 MASTER_PORT=p] python -m tests._dist_ckpt_worker MODE OUT_DIR``.
Without ``WORLD_SIZE`` it is one process. Modes:

* ``save``: ``fc`` (N = 37 classes) and ``vfc`` (M = 37 anchors), D = 8, each row set to a value that names its
  global row (``weight[i, j] = 100 i + j``, momentum its negative); every rank calls ``head.state_dict()`` and rank 0
  writes ``OUT_DIR/ckpt/state.pt`` (``{kind: state}``, as the trainer's ``state["head"]``). Every rank writes
  ``OUT_DIR/save_rank{r}.pt``: per kind, the keys of its state dict and the bytes of its tensors.
* ``load``: the heads built afresh on W processes load ``OUT_DIR/ckpt`` (memory-mapped, as a resume does); every
  rank writes ``OUT_DIR/load_rank{r}_w{W}.pt``: per kind, its id range and its rows, and on rank 0 the state dict
  it would save again.
* ``rss N D``: peak resident memory (``ru_maxrss``) of each rank around one ``fc`` checkpoint of N × D rows: after
  building the head, after ``head.state_dict()`` and after rank 0's ``save_checkpoint``; each rank prints one JSON
  line (the numbers in docs/checkpoints.md).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from pathlib import Path

import torch

from offloadfr.config import BankCfg, CacheCfg, Config, HeadCfg, LossCfg
from offloadfr.distributed import DistEnv, barrier, destroy_process_group, init_process_group
from offloadfr.heads import HeadDeps, build_head
from offloadfr.losses import build_margin
from offloadfr.train.checkpoint import load_checkpoint, save_checkpoint

NUM_ROWS, DIM = 37, 8  # uneven over 2 and 3 ranks (STYLE R10); fc's classes and vfc's anchors alike
KINDS = ("fc", "vfc")


def _head(kind: str, env: DistEnv, out_dir: Path, num_rows: int = NUM_ROWS, dim: int = DIM) -> torch.nn.Module:
    deps = HeadDeps(margin=build_margin(LossCfg()), num_classes=num_rows, dim=dim, device=env.device, bank=BankCfg(),
                    cache=CacheCfg(), rank=env.rank, world_size=env.world_size, bank_path=out_dir / "unused_bank")
    return build_head(HeadCfg(kind=kind, num_anchors=num_rows), deps)


def _marked_rows(start: int, end: int) -> torch.Tensor:
    """Rows ``start .. end-1`` of the N × D matrix whose entry (i, j) is ``100 i + j``: each value names its place."""
    return torch.arange(start, end, dtype=torch.float32)[:, None] * 100 + torch.arange(DIM, dtype=torch.float32)


def _tensor_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def save(out_dir: Path, env: DistEnv) -> None:
    states, summary = {}, {}
    for kind in KINDS:
        head = _head(kind, env, out_dir)
        part = head.partition
        with torch.no_grad():
            head.weight.copy_(_marked_rows(part.class_start, part.class_end))
            head.momentum_buf.copy_(-_marked_rows(part.class_start, part.class_end))
        states[kind] = head.state_dict()
        summary[kind] = {"keys": sorted(states[kind]), "tensor_bytes": _tensor_bytes(states[kind])}
    if env.is_main:
        (out_dir / "ckpt").mkdir(exist_ok=True)
        torch.save(states, out_dir / "ckpt" / "state.pt")
    torch.save(summary, out_dir / f"save_rank{env.rank}.pt")


def load(out_dir: Path, env: DistEnv) -> None:
    state, _ = load_checkpoint(out_dir / "ckpt")
    results = {}
    for kind in KINDS:
        head = _head(kind, env, out_dir)
        head.load_state_dict(state[kind])
        part = head.partition
        results[kind] = {"range": (part.class_start, part.class_end), "weight": head.weight.detach().clone(),
                         "momentum_buf": head.momentum_buf.clone()}
        resaved = head.state_dict()  # a collective: every rank calls it
        if env.is_main:
            results[kind]["resaved"] = {k: v.clone() for k, v in resaved.items()}
    torch.save(results, out_dir / f"load_rank{env.rank}_w{env.world_size}.pt")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss(out_dir: Path, env: DistEnv, num_rows: int, dim: int) -> None:
    head = _head("fc", env, out_dir, num_rows, dim)
    barrier()
    built = _peak_mib()
    state = {"head": head.state_dict()}
    after_state = _peak_mib()
    if env.is_main:
        save_checkpoint(out_dir / "run", 1, state, Config(), keep=1)
    barrier()
    print(json.dumps({"rank": env.rank, "world_size": env.world_size, "rows": num_rows, "dim": dim,
                      "peak_built(MiB)": round(built), "peak_after_state_dict(MiB)": round(after_state),
                      "peak_after_save(MiB)": round(_peak_mib())}), flush=True)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    mode, out_dir = argv[0], Path(argv[1])
    env = DistEnv.from_env("cpu")
    created = init_process_group(env)
    if mode == "save":
        save(out_dir, env)
    elif mode == "load":
        load(out_dir, env)
    else:
        assert mode == "rss", mode
        rss(out_dir, env, int(argv[2]), int(argv[3]))
    barrier()
    if created:
        destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
