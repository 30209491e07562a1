"""Checks across keys and sections, which the per-field types and ranges cannot express (a head and the sampler it
needs, ordered milestones, the synthetic dataset's image counts, a run name that stays inside run.output_dir)."""

from __future__ import annotations

import ntpath
import posixpath

from offloadfr.config.sections import Config, SynthCfg, TrainCfg
from offloadfr.errors import ConfigError

__all__ = ["check_config", "check_synth", "check_run_name"]


def check_config(cfg: Config) -> None:
    check_run_name(cfg.run.name)
    check_synth(cfg.synth)
    _check_milestones(cfg.train)
    if (cfg.head.kind == "attfc") != (cfg.data.sampler == "attention"):
        raise ConfigError(f"head.kind = {cfg.head.kind!r} with data.sampler = {cfg.data.sampler!r}: the attfc head "
                          "and the attention sampler (query + key images) go together; set both or neither")
    if (cfg.head.kernel, cfg.head.gemm_precision) != ("torch", "fp32") and cfg.head.kind not in ("fc", "partial_fc"):
        raise ConfigError(f"head.kernel = {cfg.head.kernel!r}, head.gemm_precision = {cfg.head.gemm_precision!r} with "
                          f"head.kind = {cfg.head.kind!r}: only fc and partial_fc have these options; set them to "
                          "'torch' and 'fp32'")
    if cfg.head.kernel == "triton" and cfg.loss.kind == "adasin":
        raise ConfigError("head.kernel = 'triton' with loss.kind = 'adasin': the fused kernel changes only the "
                          "positive column and adasin changes hard negatives too; set head.kernel = 'torch'")
    if cfg.head.kind == "dcp" and (cfg.data.sampler != "dual" or cfg.data.images_per_identity < 2):
        raise ConfigError(f"head.kind = 'dcp' with data.sampler = {cfg.data.sampler!r} and data.images_per_identity = "
                          f"{cfg.data.images_per_identity}: the dcp head needs identity pairs, set data.sampler = "
                          "'dual' and data.images_per_identity >= 2")


def _check_milestones(t: TrainCfg) -> None:
    ms = t.multistep_milestones
    if any(m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise ConfigError(f"train.multistep_milestones = {list(ms)} must be strictly increasing steps >= 1, "
                          "e.g. [3000, 4000]")
    if t.scheduler == "multistep" and not ms:
        raise ConfigError("train.multistep_milestones = [] but train.scheduler = 'multistep' needs at least one "
                          "milestone step, e.g. --set train.multistep_milestones=[3000,4000]")


def check_synth(s: SynthCfg) -> None:
    """Checks what the per-field ranges cannot: ``min_images <= mean_images <= max_images``.

    Raises:
        ConfigError: naming the keys and values that disagree.
    """
    if s.min_images > s.max_images:
        raise ConfigError(f"synth.min_images = {s.min_images} exceeds synth.max_images = {s.max_images}; "
                          "lower min_images or raise max_images")
    if not s.min_images <= s.mean_images <= s.max_images:
        raise ConfigError(f"synth.mean_images = {s.mean_images} must lie between synth.min_images = {s.min_images} "
                          f"and synth.max_images = {s.max_images}")


def check_run_name(name: str) -> None:
    """Checks that ``run.name`` is one path component, so that ``<run.output_dir>/<run.name>`` stays inside
    ``run.output_dir``: not empty, no ``/`` or ``\\``, not ``.`` or ``..``, not absolute (a drive on Windows).

    Raises:
        ConfigError: naming the value and the rule.
    """
    bad = (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or posixpath.isabs(name) or ntpath.splitdrive(name)[0])
    if bad:
        raise ConfigError(f"run.name = {name!r} is not a single directory name: it must be non-empty, without '/', "
                          "'\\' or '..', since the run writes to <run.output_dir>/<run.name>; use e.g. "
                          "run.name=try2 and put the parent directory in run.output_dir")
