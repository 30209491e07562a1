"""Loading a run config: TOML files (with ``inherit``), ``--set section.key=value`` overrides, and the check of every
key, type and range, so that a mistake raises :class:`~offloadfr.errors.ConfigError` with one line naming the key, the
bad value and what is allowed; and back to a dict or TOML text (``to_toml``, what every run saves).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import tomli_w

from offloadfr.config.checks import check_config
from offloadfr.config.head_defaults import apply_head_defaults, explain
from offloadfr.config.sections import Config, HeadCfg, section_names
from offloadfr.errors import ConfigError

__all__ = ["load_config", "apply_overrides", "config_from_dict", "config_to_dict", "to_toml"]


def _suggest(name: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {prefix + close[0]!r}? " if close else ""


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Returns ``value`` converted to ``tp`` or raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} = {value!r} has the wrong type: expected {_describe(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != isinstance(typing.get_args(tp)[0], bool):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected {_describe(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"{key}: unsupported config type {tp}")


def _check_range(key: str, value: Any, bounds: typing.Mapping[str, float]) -> None:
    checks = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
              "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for name, bound in bounds.items():
        ok, sym = checks[name]
        if not ok(value, bound):
            allowed = " and ".join(f"{checks[n][1]} {b}" for n, b in bounds.items())
            raise ConfigError(f"{key} = {value!r} is out of range: must be {allowed}")


def _build_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in fields:
            known = list(fields)
            raise ConfigError(f"unknown config key {key!r}; {_suggest(name, known, section + '.')}keys in [{section}]: "
                              + ", ".join(known))
        coerced = _coerce(key, value, hints[name])
        _check_range(key, coerced, fields[name].metadata)
        kwargs[name] = coerced
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Builds a :class:`Config` from nested ``{section: {key: value}}``, checking every key, type and range.

    The head's defaults fill the keys ``data`` leaves unset, and ``data.sampler = "auto"`` becomes the head's
    sampler (:mod:`offloadfr.config.head_defaults`); ``Config.head_defaults`` lists those keys.

    Raises:
        ConfigError: an unknown section or key, a wrong type, or a value out of range.
    """
    sections = section_names()
    hints = typing.get_type_hints(Config)
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]; {_suggest(section, list(sections))}"
                              f"sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
    data, chosen = apply_head_defaults(data, HeadCfg().kind)
    built = {section: _build_section(hints[section], section, values) for section, values in data.items()}
    cfg = Config(**built, head_defaults=chosen)
    check_config(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The nested ``{section: {key: value}}`` form of ``cfg`` (tuples become lists), the inverse of
    :func:`config_from_dict`."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {section: {k.name: plain(getattr(getattr(cfg, section), k.name))
                      for k in dataclasses.fields(getattr(cfg, section))}
            for section in section_names()}


def to_toml(cfg: Config) -> str:
    """The fully resolved config as TOML text (what ``--print-config`` prints and every run saves).

    Each key whose value the head chose (``cfg.head_defaults``) carries a comment saying so, with the paper's value
    and the reason; reading the text back gives the same config, those keys now set explicitly.
    """
    text = tomli_w.dumps(config_to_dict(cfg))
    if not cfg.head_defaults:
        return text
    lines, section = [], ""
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        name, sep, _ = line.partition(" = ")
        if sep and f"{section}.{name}" in cfg.head_defaults:
            line += f"  # {explain(cfg.head.kind, f'{section}.{name}')}"
        lines.append(line)
    header = (f"# Keys marked '# head default' or '# auto' were set neither by the run file nor by --set: head.kind = "
              f"{cfg.head.kind!r} chose them (offloadfr/config/head_defaults.py, docs/methods.md).\n")
    return header + "\n".join(lines) + "\n"


def _parse_value(text: str) -> Any:
    """A TOML value (``64``, ``0.1``, ``true``, ``"x"``, ``[1, 2]``), or the raw text when it is not valid TOML."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of nested ``data`` with ``section.key=value`` overrides applied.

    Raises:
        ConfigError: an override is not of the form ``section.key=value``.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name or "." in name:
            raise ConfigError(f"--set {item!r} is malformed: write section.key=value, e.g. --set train.batch_size=64")
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {out[section]!r}")
        out[section][name] = _parse_value(text.strip())
    return out


def _read_run_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The nested dict of a run TOML, with the file named by its top-level ``inherit`` key merged underneath."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a file from ds_configs/runs/")
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r} inherits from itself through {[str(p) for p in seen]}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"inherit = {parent!r} in {str(path)!r} must be a file name, e.g. \"synth_tiny.toml\"")
    merged = _read_run_file(path.parent / parent, (*seen, path.resolve()))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a run config: defaults, then the TOML file at ``path`` (if any), then ``overrides``.

    A run file may start with ``inherit = "other.toml"`` (a path relative to it): the other file is loaded first and
    this one's keys override it, so a variant of a run lists only what it changes.

    Args:
        path: a run TOML such as ``ds_configs/runs/synth_tiny.toml``; None for the defaults alone.
        overrides: ``section.key=value`` strings, applied in order after the file.

    Returns:
        The checked, frozen :class:`Config`.

    Raises:
        ConfigError: the file is missing or not valid TOML, or any key, type or range is wrong.

    Example::

        cfg = load_config("ds_configs/runs/synth_tiny.toml", ["train.batch_size=64"])
    """
    data = _read_run_file(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))
