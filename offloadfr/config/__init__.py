"""Typed run configuration: one frozen dataclass per component, loaded from TOML with dotted overrides.

A run config file (``ds_configs/runs/*.toml``) lists only what differs from the defaults below (STYLE R5)::

    [run]
    name = "synth_tiny"

    [train]
    batch_size = 128

Overrides use the same dotted keys: ``--set train.batch_size=64 --set run.name=try2``. Every key, type and range is
checked; a mistake raises :class:`~offloadfr.errors.ConfigError` with one line naming the key, the bad value and what is
allowed. The resolved config is saved with every run and checkpoint (``to_toml``) and can be read back
(``config_from_dict``). The sections are in :mod:`offloadfr.config.sections`, the loading in
:mod:`~offloadfr.config.loading`, the checks across keys in :mod:`~offloadfr.config.checks` and the per-head defaults in
:mod:`~offloadfr.config.head_defaults`. Each component takes only its own section (``ZarrBank.open(cfg.bank)``, never
the whole ``Config``; STYLE R4).
"""

from __future__ import annotations

from offloadfr.config import sections
from offloadfr.config.checks import check_synth
from offloadfr.config.loading import apply_overrides, config_from_dict, config_to_dict, load_config, to_toml
from offloadfr.config.sections import *  # noqa: F403 - the section dataclasses, Config and section_names

__all__ = [*sections.__all__, "load_config", "check_synth", "apply_overrides", "config_from_dict", "config_to_dict",
           "to_toml"]
