"""``launch/bench.py quality`` in CI size: real trainer subprocesses on a tiny synthetic dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offloadfr.bench.quality import head_kinds, plan_configs, render_table, row_overrides
from offloadfr.config import load_config
from offloadfr.config.head_defaults import SAMPLER_OF_HEAD

REPO = Path(__file__).resolve().parent.parent


def test_every_head_kind_has_its_needs_and_runs_by_default() -> None:
    """Catches a head added to ``head.kind`` (e.g. dcp) that the bench would run without its sampler, and a
    margin configuration planned twice."""
    assert set(head_kinds()) <= set(SAMPLER_OF_HEAD), "add the new head's sampler to SAMPLER_OF_HEAD"
    names = [c["name"] for c in plan_configs(["fc", "attfc"], ["arcface", "cosface"], "arcface")]
    assert names == ["fc+arcface", "attfc+arcface", "fc+cosface"]
    attfc = plan_configs(["attfc"], [], "arcface")[0]["overrides"]
    assert attfc[0] == "head.kind=attfc" and load_config(None, attfc).data.sampler == "attention"
    only = plan_configs(["partial_fc"], [], "arcface", bench_overrides=False)[0]["overrides"]
    assert only == ["head.kind=partial_fc", "loss.kind=arcface"]  # --head-kind-only: what a user sets


def _tiny(tmp_path: Path) -> list[str]:
    sets = [f"data.path={tmp_path / 'data'}", "synth.num_identities=24", "synth.num_holdout=8", "synth.num_pairs=40",
            "synth.min_images=4", "synth.max_images=12", "synth.mean_images=8.0", "synth.samples_per_shard=50",
            "data.num_workers=0", "train.batch_size=16", "train.log_every=2", "train.warmup_steps=0",
            "eval.batch_size=32", "run.tensorboard=off"]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.slow
def test_quality_bench_rows_table_and_resume(tmp_path: Path) -> None:
    """Three real runs (fc, attfc with its attention sampler, fc with cosface): catches a head the bench cannot train,
    rows with different images seen, eval fields missing, a table not written, and --resume running a row again."""
    out, md = tmp_path / "q.jsonl", tmp_path / "q.md"
    cmd = [sys.executable, str(REPO / "launch/bench.py"), "quality", "--heads", "fc", "attfc", "--margins",
           "cosface", "--epochs", "0.5", "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--md", str(md),
           "--machine", "ci", *_tiny(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["fc+arcface", "attfc+arcface", "fc+cosface"]
    assert [r["sampler"] for r in rows] == ["instance", "attention", "instance"]
    assert len({r["images_seen"] for r in rows}) == 1 and rows[0]["images_seen"] == rows[0]["steps"] * 16
    assert rows[1]["images_decoded"] == 5 * rows[1]["images_seen"]  # a query and 4 key images (attfc's head default)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["steps_trained"] == r["steps"] >= 2
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["tar_at_far_1e-2"] <= 1.0
        assert r["step_ms_mean"] > 0 and r["peak_host_rss_GiB"] > 0 and r["wall_s"] > 0
        assert r["env"]["torch"] and r["command"].startswith("python launch/bench.py quality")
    table = md.read_text()
    assert table.count("| fc+") == 2 and "| attfc+arcface |" in table and "TAR@FAR=1e-2" in table

    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped (--resume)") == 3
    assert len(out.read_text().splitlines()) == 3  # nothing trained, nothing appended

    (md).unlink()
    redo = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "quality", "--table", "--out", str(out),
                           "--md", str(md), "--machine", "ci"], capture_output=True, text=True, timeout=120)
    assert redo.returncode == 0 and md.read_text() == render_table(rows, "ci")


def _row(name: str, head: str, seed: int, accuracy: float) -> dict[str, object]:
    return {"bench": "quality", "name": name, "seed": seed, "head": head, "margin": name.split("+")[1],
            "sampler": "instance", "config": "c.toml", "extra_overrides": [], "overrides": [f"head.kind={head}"],
            "steps": 10, "batch_size": 8, "images_seen": 80, "images_decoded": 160, "wall_s": 10.0 + seed,
            "status": "ok", "accuracy": accuracy, "accuracy_std": 0.01, "tar_at_far_1e-2": 0.1}


def test_table_over_seeds_gives_each_seed_the_mean_and_the_gap_to_fc() -> None:
    """Catches seeds of one configuration overwriting each other in the table (the newest row per name only), a
    mean over the wrong rows, or a gap to fc of the wrong sign or scale."""
    rows = [_row("fc+arcface", "fc", 0, 0.70), _row("vfc+arcface", "vfc", 0, 0.60),
            _row("fc+arcface", "fc", 1, 0.80), _row("vfc+arcface", "vfc", 1, 0.64),
            _row("vfc+arcface", "vfc", 1, 0.66)]  # a rerun of seed 1: the newest counts
    table = render_table(rows, "ci")
    summary = next(line for line in table.splitlines() if line.startswith("| vfc+arcface | instance |"))
    cells = [c.strip() for c in summary.strip("|").split("|")]
    assert cells[2:] == ["0.600 ± 0.010", "0.660 ± 0.010", "0.630", "-12.0", "0.600", "0.100", "2", "10"]
    assert "| fc+arcface | instance | 0.700 ± 0.010 | 0.800 ± 0.010 | 0.750 | +0.0 |" in table
    assert sum(line.startswith("| vfc+arcface | 1 |") for line in table.splitlines()) == 1  # every run, newest
    assert "Over seeds" not in render_table(rows[:2], "ci")  # one seed: no summary


def test_a_commands_set_wins_over_the_bench_defaults_but_not_over_the_rows_kinds() -> None:
    """Catches ``--set cache.num_slots=192`` silently replaced by partial_fc's bench default of 1024 slots (K >= N:
    nothing offloads), or a ``--set head.kind`` turning every row into one head."""
    from offloadfr.config import load_config

    spec = next(s for s in plan_configs(["partial_fc"], [], "arcface") if s["head"] == "partial_fc")
    sets = row_overrides(spec, ["cache.num_slots=192", "head.kind=fc"], seed=2, steps=5, runs_dir="/tmp/q",
                         run_name="r")
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", sets)
    assert (cfg.cache.num_slots, cfg.head.kind, cfg.run.seed, cfg.train.max_steps) == (192, "partial_fc", 2, 5)
