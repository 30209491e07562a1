"""The command line: bad input exits 2 with one line; --print-config prints the resolved config."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from offloadfr.cli import main

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_bad_config_key_exits_2_with_one_line() -> None:
    """Catches a traceback (or exit 1) instead of the one-line message users need."""
    proc = _run("--set", "train.batchsize=3")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == ("offloadfr: error: unknown config key 'train.batchsize'; did you mean 'train.batch_size'? "
                         "keys in [train]: " + lines[-1].split("keys in [train]: ")[1])
    assert "Traceback" not in proc.stderr


def test_bad_value_exits_2() -> None:
    """Catches a range error that is not turned into exit code 2."""
    proc = _run("--set", "train.batch_size=0")
    assert proc.returncode == 2
    assert "train.batch_size = 0 is out of range: must be >= 1" in proc.stderr


def test_print_config_prints_resolved_default_run(tmp_path: Path) -> None:
    """Catches --print-config not loading ds_configs/runs/synth_tiny.toml by default, even from another directory."""
    proc = _run("--print-config", "--set", "train.lr=0.05", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = tomllib.loads(proc.stdout)
    assert cfg["run"]["name"] == "synth_tiny"
    assert cfg["model"]["backbone"] == "tiny"
    assert cfg["train"]["lr"] == 0.05
    assert set(cfg) == {"run", "data", "synth", "model", "head", "loss", "train", "engine", "bank", "cache", "eval"}


def test_missing_dataset_without_generation_exits_2(tmp_path: Path) -> None:
    """Catches a missing dataset surfacing as a traceback hours later instead of a clear error up front."""
    proc = _run("--set", f"data.path={tmp_path / 'nothing'}", "--set", "data.generate_if_missing=false",
                "--set", f"run.output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2, proc.stderr
    assert "nothing" in proc.stderr.strip().splitlines()[-1]


def test_convert_folder_cli_and_missing_source(tmp_path: Path) -> None:
    """Catches the convert subcommand not being wired, or a missing source turning into a traceback."""
    from PIL import Image

    for ident in ("alice", "bob"):
        (tmp_path / "src" / ident).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (32, 32), (40 * k, 80, 120)).save(tmp_path / "src" / ident / f"{k}.jpg")
    cmd = [sys.executable, "-m", "offloadfr.cli", "convert", "folder"]
    ok = subprocess.run([*cmd, str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"], capture_output=True,
                        text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "index.json").is_file()
    bad = subprocess.run([*cmd, str(tmp_path / "nope"), str(tmp_path / "out2")], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "nope" in bad.stderr.strip().splitlines()[-1]


def test_offloadfr_bench_runs_the_benchmarks_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches `offloadfr bench` not reaching offloadfr/bench/cli.py (launch/bench.py is the same entry)."""
    rows = REPO / "docs/benchmarks/kernel_cpu-2core_202611.jsonl"
    assert main(["bench", "table", str(rows)]) == 0
    assert capsys.readouterr().out.startswith("| num_slots | variant |")
