"""Resume across a change of process count: a run saved on 1 process resumes on 2 real gloo processes, and one saved on
2 resumes on 1, for fc (rows gathered into the checkpoint), partial_fc (one global Zarr bank), vfc (anchors gathered
like fc's rows), dcp and attfc (the pool or queue, the same on every rank) and the DeepSpeed engine (consolidated
weights and the optimizer state by parameter name). Each hop first re-saves the checkpoint it loaded without training
(max_steps = its step), which must reproduce the saved state exactly, then trains on. Below the trainer, fc's and
vfc's rows saved by 2 ranks (gathered on rank 0 alone) load on 1 and on 3 processes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from offloadfr.train.checkpoint import load_checkpoint

from ._ranks import run_ranks

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 400


def _train(root: Path, name: str, world: int, head: str, engine: str, max_steps: int, resume: bool) -> None:
    """``engine``: ``plain``, ``deepspeed`` (its default JSON: ZeRO-2 with CPU offload) or ``deepspeed_zero3``."""
    sets = [f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", f"run.name={name}",
            "synth.num_identities=16", "synth.num_holdout=6", "synth.num_pairs=20", "synth.min_images=3",
            "synth.max_images=8", "synth.mean_images=5.0", "synth.samples_per_shard=30", "data.num_workers=0",
            f"train.batch_size={8 // world}", "train.epochs=2", "train.warmup_steps=0", "train.scheduler=constant",
            f"train.max_steps={max_steps}", "eval.at_end=false", f"head.kind={head}", "bank.chunk_rows=4",
            f"engine.kind={engine.split('_')[0]}", "train.cpu_threads=1"]
    if engine == "deepspeed_zero3":  # parameters and optimizer state partitioned: another gather than ZeRO-2's
        zero3 = root / "zero3.json"
        zero3.write_text('{"zero_optimization": {"stage": 3}}')
        sets.append(f"engine.deepspeed_config={zero3}")
    if head == "dcp":  # a pool of 8 slots for 16 ids: eviction happens; identity pairs in every batch
        sets += ["data.sampler=dual", "data.images_per_identity=2", "head.pool_fraction=0.5"]
    if head == "attfc":  # a queue of 8 entries for 16 ids: it wraps around
        sets += ["data.sampler=attention", "head.queue_fraction=0.5"]
    if head == "vfc":  # 8 anchors for 16 ids, 4 per rank on 2 processes
        sets += ["head.num_anchors=8"]
    cmd = [sys.executable, str(REPO / "launch/train.py"), "--config", str(REPO / "ds_configs/runs/synth_tiny.toml")]
    cmd += [a for s in sets for a in ("--set", s)] + (["--resume", "auto"] if resume else [])
    run_ranks(cmd, world, timeout_s=TIMEOUT_S, what=f"{name}: training")


def _state(root: Path, name: str, step: int, head: str, engine: str) -> dict[str, torch.Tensor]:
    state, _ = load_checkpoint(root / "runs" / name / "checkpoints" / f"step_{step:08d}")
    assert state["step"] == step
    out = {f"model.{k}": v for k, v in state["engine"]["model"].items()}
    if engine.startswith("deepspeed"):  # the optimizer state by parameter name, gathered from the ZeRO partitions
        tensors = state["engine"]["optimizer_by_name"]["tensors"]
        out.update({f"optimizer.{param}.{key}": v for param, keys in tensors.items() for key, v in keys.items()})
        assert any(k.startswith("optimizer.") for k in out), "no optimizer state: it would start fresh on resume"
    if head == "fc":
        out["head.weight"] = state["head"]["weight"]
        out["head.momentum"] = state["head"]["momentum_buf"]
    elif head in ("dcp", "attfc", "vfc"):  # the pool (its rows and LRU), the queue and the twin network, the anchors
        for key, value in state["head"].items():
            if key.endswith("_extra_state"):
                out.update({f"head.{key}.{k}": torch.as_tensor(v) for k, v in value.items()})
            else:
                out[f"head.{key}"] = value
    else:
        from offloadfr.bank import ZarrBank

        bank = ZarrBank.open(root / "runs" / name / "bank", read_only=True)
        assert bank.step == step
        out["bank.centers"] = bank.read_rows(torch.arange(16))
        out["bank.momentum"] = bank.read_rows(torch.arange(16), "momentum")
    return out


def _copy_run(root: Path, src: str, dst: str) -> None:
    shutil.copytree(root / "runs" / src, root / "runs" / dst)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize(("head", "engine"), [("fc", "plain"), ("partial_fc", "plain"), ("fc", "deepspeed"),
                                             ("fc", "deepspeed_zero3"), ("dcp", "plain"), ("attfc", "plain"),
                                             ("vfc", "plain")])
def test_resume_across_process_counts(tmp_path: Path, head: str, engine: str) -> None:
    """Catches a checkpoint that holds only one rank's rows, a bank written per rank, or a DeepSpeed checkpoint that
    loads only on its own process count: any of them fails a hop or changes the state it re-saves."""
    _train(tmp_path, "a", 1, head, engine, max_steps=3, resume=False)
    saved_on_1 = _state(tmp_path, "a", 3, head, engine)
    _copy_run(tmp_path, "a", "b")
    _train(tmp_path, "b", 2, head, engine, max_steps=3, resume=True)  # 1 -> 2: load and re-save
    _assert_same(_state(tmp_path, "b", 3, head, engine), saved_on_1)
    _train(tmp_path, "b", 2, head, engine, max_steps=5, resume=True)  # trains on with 2 processes
    saved_on_2 = _state(tmp_path, "b", 5, head, engine)
    assert not torch.equal(next(iter(saved_on_2.values())), next(iter(saved_on_1.values())))
    _copy_run(tmp_path, "b", "c")
    _train(tmp_path, "c", 1, head, engine, max_steps=5, resume=True)  # 2 -> 1: load and re-save
    _assert_same(_state(tmp_path, "c", 5, head, engine), saved_on_2)
    _train(tmp_path, "c", 1, head, engine, max_steps=6, resume=True)
    assert _state(tmp_path, "c", 6, head, engine)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fc", "vfc"])
def test_rows_saved_on_2_ranks_load_on_1_and_3(tmp_path: Path, kind: str) -> None:
    """37 rows (fc's classes, vfc's anchors; uneven over 2 and 3 ranks) saved by 2 gloo ranks, where only rank 0
    gathers them, then loaded on 1 and 3 processes (tests/_dist_ckpt_worker.py): catches a checkpoint missing rank
    1's rows, rows out of rank order, or a load that keeps the wrong range on a process count that did not write it.
    Each loading count must also save exactly the rows it loaded, and rank 1 of the writers must hold none of them."""
    worker = [sys.executable, "-m", "tests._dist_ckpt_worker"]
    run_ranks([*worker, "save", str(tmp_path)], 2, timeout_s=TIMEOUT_S, what="save on 2")
    state, _ = load_checkpoint(tmp_path / "ckpt")
    saved = state[kind]
    marked = torch.arange(37, dtype=torch.float32)[:, None] * 100 + torch.arange(8, dtype=torch.float32)
    assert torch.equal(saved["weight"], marked) and torch.equal(saved["momentum_buf"], -marked)
    writers = [torch.load(tmp_path / f"save_rank{r}.pt", weights_only=True)[kind] for r in range(2)]
    assert {"weight", "momentum_buf"} <= set(writers[0]["keys"])
    assert not {"weight", "momentum_buf"} & set(writers[1]["keys"]), writers[1]["keys"]
    assert writers[1]["tensor_bytes"] < marked.numel() * 4, writers[1]  # not even one array of the N rows
    for world in (1, 3):
        run_ranks([*worker, "load", str(tmp_path)], world, timeout_s=TIMEOUT_S, what=f"load on {world}")
        ranks = [torch.load(tmp_path / f"load_rank{r}_w{world}.pt", weights_only=True)[kind] for r in range(world)]
        assert [r["range"] for r in ranks] == ([(0, 37)] if world == 1 else [(0, 13), (13, 25), (25, 37)])
        for name in ("weight", "momentum_buf"):
            assert torch.equal(torch.cat([r[name] for r in ranks]), saved[name]), (world, name)
            assert torch.equal(ranks[0]["resaved"][name], saved[name]), (world, name)
