"""Resume: a run continued from a checkpoint ends with exactly the weights of an uninterrupted run, and a bank
whose step disagrees with the checkpoint is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from offloadfr.config import load_config
from offloadfr.errors import CheckpointError
from offloadfr.train.checkpoint import list_checkpoints, load_checkpoint
from offloadfr.train.trainer import train

REPO = Path(__file__).resolve().parent.parent


def _cfg(root: Path, name: str, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", f"run.name={name}",
        "synth.num_identities=16", "synth.num_holdout=6", "synth.num_pairs=20", "synth.min_images=3",
        "synth.max_images=8", "synth.mean_images=5.0", "synth.samples_per_shard=30",
        "data.num_workers=0", "train.batch_size=8", "train.epochs=2", "train.checkpoint_every=4",
        "train.keep_checkpoints=5", "train.warmup_steps=0", "eval.at_end=false", *extra])


@pytest.mark.parametrize("head", ["fc", "partial_fc"])
def test_resume_equals_uninterrupted(tmp_path: Path, head: str) -> None:
    """Catches a resume that restarts the data order, the optimizer state or the head's rows (bank and momentum):
    any of them changes the final weights. The schedule is constant, so stopping early changes nothing else."""
    full = train(_cfg(tmp_path, "full", f"head.kind={head}", "train.scheduler=constant"))
    cut = _cfg(tmp_path, "cut", f"head.kind={head}", "train.scheduler=constant", "train.max_steps=6")
    train(cut)  # stops at step 6, as a crash after the checkpoint of step 6 would
    resumed = train(_cfg(tmp_path, "cut", f"head.kind={head}", "train.scheduler=constant"), resume="auto")
    assert resumed.steps == full.steps > 6
    a, _ = load_checkpoint(full.checkpoint)
    b, _ = load_checkpoint(resumed.checkpoint)
    for k, v in a["engine"]["model"].items():
        assert torch.equal(v, b["engine"]["model"][k]), k
    if head == "fc":
        assert torch.equal(a["head"]["weight"], b["head"]["weight"])
    else:
        from offloadfr.bank import ZarrBank

        rows = [ZarrBank.open(tmp_path / "runs" / n / "bank", read_only=True).read_rows(torch.arange(16))
                for n in ("full", "cut")]
        assert torch.equal(rows[0], rows[1])


def test_partial_fc_resume_refuses_a_bank_at_another_step(tmp_path: Path) -> None:
    """Catches a resume that silently mixes bank rows of step N with a checkpoint of step M."""
    cfg = _cfg(tmp_path, "pfc", "head.kind=partial_fc")
    train(cfg)
    run_dir = tmp_path / "runs" / "pfc"
    ckpts = list_checkpoints(run_dir)
    shutil.rmtree(ckpts[-1])  # the bank stays at the final step; the newest checkpoint is older
    with pytest.raises(CheckpointError, match="bank .* is at step"):
        train(cfg, resume="auto")


def test_resume_refuses_another_backbone(tmp_path: Path) -> None:
    """Catches loading weights of one backbone into another (a crash deep in load_state_dict, or worse)."""
    train(_cfg(tmp_path, "bb", "train.epochs=1"))
    with pytest.raises(CheckpointError, match="model.embedding_size"):
        train(_cfg(tmp_path, "bb", "train.epochs=1", "model.embedding_size=64"), resume="auto")


@pytest.mark.parametrize(("signame", "head"), [("SIGTERM", "fc"), ("SIGINT", "partial_fc")])
def test_signal_finishes_the_step_checkpoints_and_exits_0(tmp_path: Path, signame: str, head: str) -> None:
    """Catches a SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) that kills the run without a checkpoint,
    exits non-zero, or (partial_fc) leaves the bank at another step than that checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, str(REPO / "launch/train.py"), "--set", f"data.path={tmp_path / 'data'}",
            "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.name=sig", "--set", "synth.num_identities=40",
            "--set", "synth.num_holdout=6", "--set", "synth.num_pairs=20", "--set", "data.num_workers=0",
            "--set", "train.batch_size=8", "--set", "train.epochs=500", "--set", "train.log_every=1",
            "--set", f"head.kind={head}", "--set", "cache.num_slots=32"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert signame in err and "--resume auto" in err
    ckpts = list_checkpoints(tmp_path / "runs" / "sig")
    assert ckpts, err
    state, _ = load_checkpoint(ckpts[-1])
    assert 3 <= state["step"] < 500
    if head == "partial_fc":
        from offloadfr.bank import ZarrBank

        bank = ZarrBank.open(tmp_path / "runs" / "sig" / "bank", read_only=True)
        assert (bank.step, bank.pending_step) == (state["step"], None)
        bank.close()


def test_resume_with_another_engine_or_zero_config_keeps_the_optimizer_state(tmp_path: Path) -> None:
    """Catches a resume that starts SGD's momentum afresh when engine.kind or engine.deepspeed_config changed
    (plain -> DeepSpeed ZeRO-0 -> ZeRO-2), and DeepSpeed's own per-rank checkpoint loaded into another ZeRO config:
    the weights then drift from the uninterrupted plain run by ~1e-2 here. Carried over, only the engines' rounding
    separates them (DeepSpeed's ZeRO-2 reductions add ~1e-7 a step, which training amplifies)."""
    steady = ("train.scheduler=constant", "train.checkpoint_every=3", "train.lr=0.02")
    full = train(_cfg(tmp_path, "full", *steady, "train.max_steps=9"))
    train(_cfg(tmp_path, "hop", *steady, "train.max_steps=3"))
    zero0 = ("engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/deepspeed/zero0.json")
    train(_cfg(tmp_path, "hop", *steady, *zero0, "train.max_steps=6"), resume="auto")
    zero2 = ("engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/deepspeed/zero2.json")
    resumed = train(_cfg(tmp_path, "hop", *steady, *zero2, "train.max_steps=9"), resume="auto")
    assert resumed.steps == full.steps == 9
    a, _ = load_checkpoint(full.checkpoint)
    b, _ = load_checkpoint(resumed.checkpoint)
    assert b["engine"]["optimizer_by_name"]["tensors"]
    diff = max((b["engine"]["model"][k] - v).abs().max().item() for k, v in a["engine"]["model"].items())
    assert diff < 1e-5, diff  # 3.6e-7 measured; 0.06-0.15 with the momentum or the stale DeepSpeed checkpoint
