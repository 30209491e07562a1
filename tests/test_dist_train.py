"""2 real gloo processes vs 1 process on the same global batch: the trainer's parts (DDP plain engine, partitioned fc
and partial_fc heads over a global Zarr bank) give the same loss and gradients (tests/_dist_train_worker.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from offloadfr.distributed import ClassPartition, check_launch
from offloadfr.errors import ConfigError

from ._ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 240.0
RTOL = 1e-5


def _launch(out_dir: Path, world: int) -> list[dict[str, Any]]:
    run_ranks([sys.executable, "-m", "tests._dist_train_worker", str(out_dir)], world, timeout_s=WORKER_TIMEOUT_S,
              what=f"{world}-process workers")
    return [torch.load(out_dir / f"rank{r}_w{world}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("dist_train")
    two = _launch(out_dir, 2)
    one = _launch(out_dir, 1)[0]
    return two, one


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fc", "partial_fc", "fc+zero0", "fc/adasin", "partial_fc/adasin", "vfc",
                                  "vfc/adasin"])
def test_two_ranks_match_one_process(runs: tuple[list[dict[str, Any]], dict[str, Any]], kind: str) -> None:
    two, one = runs
    ref = one[kind]
    for rank, res in enumerate(two):
        got = res[kind]
        assert torch.allclose(got["loss"], ref["loss"], rtol=RTOL, atol=0), (rank, got["loss"], ref["loss"])
        assert got.keys() == ref.keys()
        for name in ref:
            if name == "loss" or ref[name].dtype != torch.float32:
                continue
            assert ref[name].abs().sum() > 0 or name.endswith("running_mean"), f"{kind}/{name}: zero gradient"
            rel = _rel(got[name], ref[name])
            assert rel < RTOL, f"{kind}/{name} rank {rank}: relative difference {rel}"
    # fc, vfc: the checkpoint rows are global (gathered) on rank 0 and equal the 1-process rows; see below for rank 1
    if kind in ("fc", "vfc"):
        rows, main = one["state"][kind]["weight"], two[0]["state"][kind]
        if kind == "vfc":
            assert torch.equal(rows, one[kind]["anchors"])
        assert torch.equal(main["weight"], rows)
        assert torch.equal(main["gathered_rows"], rows)
        assert torch.equal(main["rows_by_chunks"], rows)
        assert main["keys"] == one["state"][kind]["keys"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fc", "vfc"])
def test_only_rank0_holds_the_checkpoint_rows(runs: tuple[list[dict[str, Any]], dict[str, Any]], kind: str) -> None:
    """Catches a state_dict that builds all N rows in every rank's host memory (8 copies of 41 GB on one host at 10M
    ids) although only rank 0 writes them: rank 1's state leaves the rows out, and so do its gathers."""
    two, _ = runs
    other = two[1]["state"][kind]
    assert "weight" not in other["keys"] and "momentum_buf" not in other["keys"], other["keys"]
    assert other["weight"] is None and other["gathered_rows"] is None and other["rows_by_chunks"] is None


def test_partition_aligned_to_bank_blocks() -> None:
    parts = [ClassPartition(37, 2, r, align=4) for r in range(2)]
    assert [(p.class_start, p.class_end) for p in parts] == [(0, 20), (20, 37)]
    ids = torch.arange(37)
    owner = parts[0].owner_of(ids)
    assert owner.tolist() == [0] * 20 + [1] * 17
    with pytest.raises(ConfigError, match="blocks"):
        ClassPartition(8, 3, 0, align=4)


def test_check_launch_refuses_accelerate_replicas_on_cpu() -> None:
    acc = {"WORLD_SIZE": "2", "RANK": "0", "ACCELERATE_MIXED_PRECISION": "no"}
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=1"):
        check_launch(acc, cuda_available=False)
    check_launch({**acc, "ACCELERATE_USE_CPU": "1"}, cuda_available=False)
    check_launch({**acc, "ACCELERATE_USE_CPU": "True"}, cuda_available=False)
    check_launch(acc, cuda_available=True)  # NCCL on GPUs: accelerate's state is right
    check_launch({"WORLD_SIZE": "2"}, cuda_available=False)  # torchrun: no accelerate state to be wrong
    with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_SIZE"):
        check_launch({"OMPI_COMM_WORLD_SIZE": "2"}, cuda_available=False)


def test_pfc_dense_refuses_several_processes(tmp_path: Path) -> None:
    from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg
    from offloadfr.heads import HeadDeps, build_head
    from offloadfr.losses import build_margin

    deps = HeadDeps(margin=build_margin(LossCfg()), num_classes=10, dim=4, device=torch.device("cpu"), bank=BankCfg(),
                    cache=CacheCfg(), bank_path=tmp_path / "bank", rank=0, world_size=2)
    with pytest.raises(ConfigError, match="pfc_dense.*does not run on 2 processes"):
        build_head(HeadCfg(kind="pfc_dense"), deps)
