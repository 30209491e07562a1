"""Typed run configuration: one frozen dataclass per component, loaded from TOML with dotted overrides.

A run config file (``ds_configs/runs/*.toml``) lists only what differs from the defaults below (STYLE R5)::

    [run]
    name = "synth_tiny"

    [train]
    batch_size = 128

Overrides use the same dotted keys: ``--set train.batch_size=64 --set run.name=try2``. Every key, type and range is
checked; a mistake raises :class:`~offloadfr.errors.ConfigError` with one line naming the key, the bad value and
what is allowed. The resolved config is saved with every run and checkpoint (``to_toml``) and can be read back
(``config_from_dict``). Each component takes only its own section (``ZarrBank.open(cfg.bank)``, never the whole
``Config``; STYLE R4).
"""

from __future__ import annotations

from offloadfr.config.checks import check_synth
from offloadfr.config.loading import apply_overrides, config_from_dict, config_to_dict, load_config, to_toml
from offloadfr.config.sections import (
    BankCfg,
    CacheCfg,
    Config,
    DataCfg,
    EngineCfg,
    EvalCfg,
    HeadCfg,
    LossCfg,
    ModelCfg,
    RunCfg,
    SynthCfg,
    TrainCfg,
    section_names,
)

__all__ = [
    "RunCfg",
    "DataCfg",
    "SynthCfg",
    "ModelCfg",
    "HeadCfg",
    "LossCfg",
    "TrainCfg",
    "EngineCfg",
    "BankCfg",
    "CacheCfg",
    "EvalCfg",
    "Config",
    "load_config",
    "check_synth",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "to_toml",
    "section_names",
]
