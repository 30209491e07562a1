"""Per-head defaults and ``data.sampler = "auto"`` (offloadfr/config/head_defaults.py): a run that sets only
``head.kind`` gets the head's sampler and settings, the user's file and ``--set`` still win, and the resolved config
says which value came from the head."""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path

import pytest

from offloadfr.cli import main
from offloadfr.config import HeadCfg, config_from_dict, load_config, to_toml
from offloadfr.config.head_defaults import HEAD_DEFAULTS, SAMPLER_OF_HEAD
from offloadfr.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
KINDS = list(typing.get_args(typing.get_type_hints(HeadCfg)["kind"]))


def test_every_head_kind_has_defaults_and_a_sampler() -> None:
    """Catches a head added to ``head.kind`` without an entry, which would run with another head's sampler."""
    assert set(HEAD_DEFAULTS) == set(KINDS) == set(SAMPLER_OF_HEAD)


@pytest.mark.parametrize("kind", KINDS)
def test_head_kind_alone_resolves_its_sampler_and_defaults(kind: str) -> None:
    """Catches a default naming a key that does not exist or has the wrong type (the section check would raise),
    and a head whose sampler "auto" does not resolve (attfc and dcp would be refused)."""
    cfg = load_config(None, [f"head.kind={kind}"])
    assert cfg.data.sampler == SAMPLER_OF_HEAD[kind]
    for default in HEAD_DEFAULTS[kind]:
        section, name = default.key.split(".")
        assert getattr(getattr(cfg, section), name) == default.value, default.key
        assert default.key in cfg.head_defaults
    assert "data.sampler" in cfg.head_defaults


def test_the_run_file_and_set_win_over_a_head_default(tmp_path: Path) -> None:
    """Catches head defaults applied over what the user wrote: the run file's loss.s = 32 stays, --set wins."""
    run = tmp_path / "run.toml"
    run.write_text(f'inherit = "{REPO / "ds_configs/runs/synth_tiny.toml"}"\n[loss]\ns = 32.0\n')
    cfg = load_config(run, ["head.kind=attfc", "data.num_keys=3"])
    assert cfg.loss.s == 32.0 and "loss.s" not in cfg.head_defaults  # the run file's value
    assert cfg.data.num_keys == 3 and "data.num_keys" not in cfg.head_defaults  # --set
    assert cfg.loss.arcface_grad == "straight_through" and "loss.arcface_grad" in cfg.head_defaults
    fc = load_config(REPO / "ds_configs/runs/synth_tiny.toml")
    assert fc.loss.arcface_grad == "analytic" and fc.data.sampler == "instance"


def test_an_explicit_sampler_mismatch_is_still_refused() -> None:
    """Catches "auto" swallowing an explicit choice: attfc with the instance sampler, dcp with identity."""
    with pytest.raises(ConfigError, match="attention"):
        load_config(None, ["head.kind=attfc", "data.sampler=instance"])
    with pytest.raises(ConfigError, match="dual"):
        load_config(None, ["head.kind=dcp", "data.sampler=identity"])
    assert load_config(None, ["head.kind=vfc", "data.sampler=auto"]).data.sampler == "identity"


def test_resolved_toml_marks_what_the_head_chose_and_reads_back_the_same() -> None:
    """Catches a resolved config that hides where a value came from, and comments that break the TOML."""
    cfg = load_config(None, ["head.kind=dcp", "head.pool_fraction=0.5"])
    text = to_toml(cfg)
    marked = [line for line in text.splitlines() if not line.startswith("#") and "#" in line]
    assert any(line.startswith('sampler = "dual"  # auto') for line in marked)
    assert any(line.startswith("gallery_momentum = 0.0  # head default of 'dcp' (F2C code: 0.99)") for line in marked)
    assert not any(line.startswith("pool_fraction") for line in marked)  # set by --set, not by the head
    again = config_from_dict(tomllib.loads(text))
    assert again == cfg and again.head_defaults == ()  # every key is now explicit


def test_print_config_shows_the_resolved_sampler(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches --print-config printing "auto" instead of what the run will use."""
    assert main(["train", "--print-config", "--set", "head.kind=attfc"]) == 0
    out = capsys.readouterr().out
    assert 'sampler = "attention"  # auto' in out and 'sampler = "auto"' not in out


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs/runs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_run_file_loads(path: Path) -> None:
    """Catches a ready run file that no longer loads (a renamed key, a head default it contradicts)."""
    cfg = load_config(path)
    assert cfg.data.sampler != "auto"


@pytest.mark.parametrize("kind", ["vfc", "attfc", "dcp"])
def test_each_seed_head_has_a_ready_run_file(kind: str) -> None:
    """Catches a seed head without its ready run file in ds_configs/runs/."""
    cfg = load_config(REPO / f"ds_configs/runs/synth_tiny_{kind}.toml")
    assert cfg.head.kind == kind and cfg.run.name == f"synth_tiny_{kind}"
