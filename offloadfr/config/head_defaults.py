"""Per-head defaults: what a run gets for the keys it did not set, once it has chosen ``head.kind``.

A user who sets only ``head.kind`` must get a run that learns. Some heads need another sampler (``attfc`` its query
and key images, ``dcp`` its identity pairs) and some learn only with settings that differ from the global defaults,
which are those of ``fc``. So the value of a key comes from, in increasing precedence:

1. the field's default in :mod:`offloadfr.config.sections`;
2. the head's default here (:data:`HEAD_DEFAULTS`), when the run file and ``--set`` leave the key unset;
3. the run file (with what it inherits);
4. ``--set`` on the command line.

``data.sampler = "auto"`` (the default, or set explicitly) always resolves to the head's sampler
(:data:`SAMPLER_OF_HEAD`). The resolved :class:`~offloadfr.config.Config` lists the keys that came from step 2 or
from ``"auto"`` (``Config.head_defaults``), and ``to_toml`` marks each with a comment, so ``--print-config`` and
every run's ``config.toml`` say which value came from where. Each entry records the value the paper or its code
uses beside ours and why ours differs (docs/methods.md has the measurements). No trainer code asks which head it
runs to pick a setting: they all arrive here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["HeadDefault", "HEAD_DEFAULTS", "SAMPLER_OF_HEAD", "apply_head_defaults", "explain"]


@dataclass(frozen=True, kw_only=True, slots=True)
class HeadDefault:
    """One key's default for one head."""

    key: str
    """``section.name``, e.g. ``loss.arcface_grad``."""
    value: Any
    """What a run of this head gets when nothing sets the key."""
    reference: str
    """The paper's or its code's value, and where it is from."""
    why: str
    """Why ours is what it is (one line; it is printed beside the value in the resolved config)."""


SAMPLER_OF_HEAD: dict[str, str] = {
    "fc": "instance",
    "partial_fc": "instance",
    "pfc_dense": "instance",
    "vfc": "identity",
    "attfc": "attention",
    "dcp": "dual",
}
"""What ``data.sampler = "auto"`` resolves to, by ``head.kind``."""

_STRAIGHT_THROUGH = "arcface_torch's gradient (margin in the forward only)"

HEAD_DEFAULTS: dict[str, tuple[HeadDefault, ...]] = {
    "fc": (),
    "partial_fc": (),
    "pfc_dense": (),
    "vfc": (
        HeadDefault(key="loss.arcface_grad", value="straight_through", reference="Virtual FC code: the legacy "
                    "ArcFace (analytic gradient), m = 0.5",
                    why=f"{_STRAIGHT_THROUGH}: with the analytic one 2 of 4 seeds stayed at chance"),
    ),
    "attfc": (
        HeadDefault(key="loss.arcface_grad", value="straight_through", reference="AttFC code: arcface_torch's "
                    "ArcFace (straight-through)", why=f"{_STRAIGHT_THROUGH}, as the AttFC code"),
        HeadDefault(key="head.key_momentum", value=0.99, reference="AttFC code: 0.999",
                    why="a faster key-encoder EMA, so short runs leave the random start"),
        HeadDefault(key="data.keys_include_query", value=True, reference="AttFC code: random.choices over all the "
                    "identity's images (the query included)", why="as the AttFC code's loader"),
        HeadDefault(key="data.num_keys", value=4, reference="AttFC code: 2",
                    why="4 keys learn in one synth_tiny epoch where 2 stay near chance"),
        HeadDefault(key="data.shard_window", value=20, reference="AttFC code: its DataLoader's shuffle (no shards)",
                    why="mix 20 neighbouring shards, closer to a global shuffle than 4"),
        HeadDefault(key="head.queue_fraction", value=1.0, reference="AttFC code: 0.3",
                    why="the queue holds every identity; lower it at millions of ids (Q x D floats on the device)"),
        HeadDefault(key="loss.s", value=16.0, reference="AttFC code: 64",
                    why="at s = 32 or 64 the generated centers collapse on short runs"),
    ),
    "dcp": (
        HeadDefault(key="head.gallery_momentum", value=0.0, reference="F2C code: 0.99",
                    why="at 0.99 every embedding collapses onto one direction on synth_tiny; 0 (an instant copy) "
                        "learns"),
        HeadDefault(key="head.pool_fraction", value=0.25, reference="F2C code: 0.01 or 0.001",
                    why="a pool of a quarter of the ids learns on synth_tiny; lower it at millions of ids"),
    ),
}
"""Every head's defaults. A new head adds its entry (an empty tuple when the global defaults suit it)."""


def apply_head_defaults(data: dict[str, Any], default_kind: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Fills in the head's defaults for the keys ``data`` leaves unset, and resolves ``data.sampler = "auto"``.

    Args:
        data: the nested ``{section: {key: value}}`` of the run file and ``--set`` overrides (not changed).
        default_kind: ``head.kind`` when ``data`` does not set it.

    Returns:
        ``(data with the defaults filled in, the ``section.name`` keys that came from the head)``. An unknown
        ``head.kind`` returns ``data`` unchanged, for the section check to name.
    """
    head = data.get("head")
    kind = head.get("kind", default_kind) if isinstance(head, dict) else default_kind
    if kind not in HEAD_DEFAULTS:
        return data, ()
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    chosen = []
    for default in HEAD_DEFAULTS[kind]:
        section, name = default.key.split(".")
        values = out.setdefault(section, {})
        if isinstance(values, dict) and name not in values:
            values[name] = default.value
            chosen.append(default.key)
    data_section = out.setdefault("data", {})
    if isinstance(data_section, dict) and data_section.get("sampler", "auto") == "auto":
        data_section["sampler"] = SAMPLER_OF_HEAD[kind]
        chosen.append("data.sampler")
    return out, tuple(chosen)


def explain(kind: str, key: str) -> str:
    """The comment ``to_toml`` writes beside a key that came from the head: ours and the paper's value, and why."""
    if key == "data.sampler":
        return f"auto: the sampler of head.kind = {kind!r}"
    for default in HEAD_DEFAULTS.get(kind, ()):
        if default.key == key:
            return f"head default of {kind!r} ({default.reference}): {default.why}"
    raise KeyError(key)
