"""Config loading: every key, type and range is checked and named in one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from offloadfr.config import Config, config_from_dict, config_to_dict, load_config, to_toml
from offloadfr.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    """Catches a resolved config that cannot be read back (checkpoints and eval rely on it)."""
    cfg = load_config(None, ["train.batch_size=64", "loss.combined_m=[1.0, 0.2, 0.1]", 'eval.pairs=["a.bin"]'])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert cfg.train.batch_size == 64 and cfg.loss.combined_m == (1.0, 0.2, 0.1) and cfg.eval.pairs == ("a.bin",)


def test_every_shipped_run_config_loads() -> None:
    """Catches a run TOML in ds_configs/runs/ that drifted from the dataclasses."""
    files = sorted((REPO / "ds_configs" / "runs").glob("*.toml"))
    assert files, "no run configs shipped"
    for f in files:
        assert isinstance(load_config(f), Config)


def test_override_order_and_strings() -> None:
    """Catches overrides applied before the file, or bare strings rejected."""
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", ["run.name=other", "data.path=/x/y"])
    assert cfg.run.name == "other" and cfg.data.path == "/x/y"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batchsize=3", "unknown config key 'train.batchsize'; did you mean 'train.batch_size'?"),
        ("nosuch.key=1", "unknown config section [nosuch]"),
        ("train.batch_size=-3", "train.batch_size = -3 is out of range: must be >= 1"),
        ("train.batch_size=abc", "train.batch_size = 'abc' has the wrong type: expected an integer"),
        ("train.batch_size=1.5", "train.batch_size = 1.5 has the wrong type"),
        ("train.lr=true", "train.lr = True has the wrong type: expected a number"),
        ("loss.kind=sphereface", "loss.kind = 'sphereface' is not allowed: expected one of 'arcface'"),
        ("eval.flip=1", "eval.flip = 1 has the wrong type: expected true or false"),
        ("loss.combined_m=[1.0, 0.2]", "loss.combined_m = [1.0, 0.2] has the wrong type"),
        ("head.momentum=1.0", "head.momentum = 1.0 is out of range: must be >= 0 and < 1"),
        ("trainlr=1", "is malformed: write section.key=value"),
        ("synth.min_images=100", "synth.min_images = 100 exceeds synth.max_images"),
    ],
)
def test_bad_values_name_key_value_and_rule(override: str, expected: str) -> None:
    """Catches a silent acceptance of a bad value, or a message that does not say what is wrong."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    """Catches a missing or broken TOML surfacing as a traceback instead of a ConfigError."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nbatch_size = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_sections_are_frozen() -> None:
    """Catches a mutable config (components must not change shared settings; STYLE R4)."""
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.batch_size = 3  # type: ignore[misc]


def test_config_reference_is_up_to_date() -> None:
    """Catches a config field added or changed without regenerating docs/config.md."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "launch/config_docs.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_inherit_merges_parent_under_child(tmp_path: Path) -> None:
    """Catches a variant run that loses its parent's settings, or a cycle that recurses forever."""
    (tmp_path / "base.toml").write_text('[train]\nbatch_size = 32\nlr = 0.3\n[run]\nname = "base"\n')
    (tmp_path / "child.toml").write_text('inherit = "base.toml"\n[train]\nlr = 0.05\n')
    cfg = load_config(tmp_path / "child.toml")
    assert (cfg.train.batch_size, cfg.train.lr, cfg.run.name) == (32, 0.05, "base")
    (tmp_path / "a.toml").write_text('inherit = "b.toml"\n')
    (tmp_path / "b.toml").write_text('inherit = "a.toml"\n')
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "a.toml")
