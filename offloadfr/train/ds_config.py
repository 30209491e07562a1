"""The DeepSpeed config to run: a JSON of DeepSpeed knobs, completed from the run config.

``engine.deepspeed_config`` names a JSON in ``ds_configs/deepspeed/`` that holds only DeepSpeed knobs (ZeRO stage,
offload, buckets). Everything the run config already says is filled in here from ``[train]``, and a JSON value that
disagrees with it is a :class:`~offloadfr.errors.ConfigError` (STYLE R5): the JSON may leave a key out or write
``"auto"``. :class:`~offloadfr.train.ds_engine.DeepSpeedEngine` runs the result.

===============================  ==========================================================================
DeepSpeed key                    filled from
===============================  ==========================================================================
train_micro_batch_size_per_gpu   ``train.batch_size``
gradient_accumulation_steps      1 (offloadfr does not accumulate yet)
train_batch_size                 ``train.batch_size`` × ``WORLD_SIZE``
gradient_clipping                ``train.grad_clip`` (0: off)
optimizer                        ``train.optimizer``: torch ``SGD`` (lr, momentum, weight_decay) or torch
                                 ``AdamW`` (lr, weight_decay, ``torch_adam: true, fused: true``: no JIT op)
zero_allow_untested_optimizer    true (ZeRO refuses torch SGD otherwise)
zero_force_ds_cpu_optimizer      false (ZeRO-Offload would refuse or replace the torch optimizer otherwise)
bf16 / torch_autocast            ``train.precision`` resolved (``auto``: bf16 on a GPU, fp32 on the CPU), below
===============================  ==========================================================================

Precision. fp32 is plain fp32. bf16 comes in two mechanisms and the JSON picks one:

* default: ``"torch_autocast": {"enabled": true, "dtype": "bfloat16"}`` is filled in: fp32 weights and BatchNorm,
  ``torch.autocast`` inside the engine's forward: the numerics of
  :class:`~offloadfr.train.engine.PlainEngine`, step for step. (DeepSpeed's forward switches an outer autocast off,
  so the engine cannot simply be called inside one: that ran in fp32.)
* ``"bf16": {"enabled": true}`` (or ``"auto"``) in the JSON: DeepSpeed's native bf16: bf16 weights, fp32 master
  weights in the optimizer; the engine casts the images to bf16 and the embeddings back to fp32, and fills
  ``data_types.buffer_dtype = "bf16"`` because DeepSpeed casts only parameters and BatchNorm refuses bf16 weights
  with fp32 running statistics.

fp16 is refused: ``engine.backward`` multiplies the loss by the fp16 loss scale, so the head rows, which live
outside the engine, would receive scaled gradients. bf16 and fp32 have no loss scale and accumulation is 1, so the
head's gradients are the true ones.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from offloadfr.config import TrainCfg
from offloadfr.errors import ConfigError
from offloadfr.train.engine import resolve_precision

__all__ = ["load_ds_config", "resolve_ds_config"]

_REPO_ROOT = Path(__file__).resolve().parents[2]


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Reads a DeepSpeed JSON; a relative path is tried in the working directory, then in the repository root.

    Raises:
        ConfigError: the file does not exist or is not a JSON object (the message names ``engine.deepspeed_config``).
    """
    p = Path(path)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, _REPO_ROOT / p]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        tried = ", ".join(dict.fromkeys(str(c) for c in candidates))  # cwd may be the repository root
        raise ConfigError(f"engine.deepspeed_config = {str(path)!r} does not exist (tried {tried}); pass a file "
                          "from ds_configs/deepspeed/, e.g. ds_configs/deepspeed/zero2_offload_cpu.json")
    try:
        raw = json.loads(found.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine.deepspeed_config = {str(found)!r} is not valid JSON ({e}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"engine.deepspeed_config = {str(found)!r} holds a {type(raw).__name__}, not a JSON "
                          "object; write {\"zero_optimization\": {...}}")
    return raw


def _fill(cfg: dict[str, Any], key: str, value: Any, origin: str, source: str, fix: str = "") -> None:
    """Sets ``cfg[key] = value`` unless the JSON has another value there ("auto" or absent means fill)."""
    present = cfg.get(key, "auto")
    same = present == value and isinstance(present, bool) == isinstance(value, bool)
    if present != "auto" and not same:
        hint = fix or "remove the key from the JSON (the run config sets it)"
        raise ConfigError(f"{source}: {key} = {present!r} disagrees with {origin} = {value!r}; {hint}")
    cfg[key] = value


def _optimizer_section(raw: dict[str, Any] | None, train: TrainCfg, source: str) -> dict[str, Any]:
    """The ``optimizer`` section: type and hyper-parameters from ``[train]``, implementation knobs from the JSON."""
    if train.optimizer == "sgd":
        name = "SGD"
        params: dict[str, Any] = {"lr": train.lr, "momentum": train.momentum, "weight_decay": train.weight_decay}
        knobs: dict[str, Any] = {}
    else:
        name = "AdamW"
        params = {"lr": train.lr, "weight_decay": train.weight_decay}
        # torch's AdamW instead of DeepSpeed's FusedAdam / DeepSpeedCPUAdam: no JIT build (60 s on 2 cores), and on
        # torch >= 2.4 the fused torch kernel is as fast on the CPU and on CUDA (reference/env-notes.md §3.1).
        knobs = {"torch_adam": True, "fused": True}
    if raw is None:
        return {"type": name, "params": {**params, **knobs}}
    if not isinstance(raw, dict) or not isinstance(raw.get("params", {}), dict):
        raise ConfigError(f"{source}: optimizer must be an object {{\"type\": ..., \"params\": {{...}}}}; "
                          "remove it (train.optimizer sets it)")
    json_type = raw.get("type", name)
    if str(json_type).lower() != name.lower():
        raise ConfigError(f"{source}: optimizer.type = {json_type!r} disagrees with train.optimizer = "
                          f"{train.optimizer!r}; remove optimizer.type from the JSON or set train.optimizer")
    merged = dict(raw.get("params", {}))
    for key, value in params.items():
        _fill(merged, key, value, f"train.{key}", f"{source}: optimizer.params",
              f"set train.{key} instead of optimizer.params.{key}")
    for key, value in knobs.items():
        merged.setdefault(key, value)
    return {"type": name, "params": merged}


def _enabled(section: Any) -> bool | str:
    if section is None:
        return False
    if not isinstance(section, dict):
        return True
    return section.get("enabled", False)


def resolve_ds_config(raw: dict[str, Any], train: TrainCfg, *, world_size: int, device: torch.device,
                      source: str = "engine.deepspeed_config") -> dict[str, Any]:
    """The DeepSpeed config to run: ``raw``'s DeepSpeed knobs plus what ``[train]`` sets (see the module table).

    Args:
        raw: the JSON as loaded.
        train: the ``[train]`` section.
        world_size: number of data-parallel processes.
        device: where this process computes (precision ``auto`` depends on it; fp16 is refused everywhere).
        source: how error messages name the JSON.

    Returns:
        A new dict; ``raw`` is not modified.

    Raises:
        ConfigError: a value in ``raw`` disagrees with ``[train]``, or asks for something offloadfr refuses (fp16,
            an LR scheduler, gradient accumulation).
    """
    cfg = copy.deepcopy(raw)
    micro = train.batch_size
    _fill(cfg, "train_micro_batch_size_per_gpu", micro, "train.batch_size", source)
    _fill(cfg, "gradient_accumulation_steps", 1, "the run config (offloadfr does not accumulate gradients)", source)
    _fill(cfg, "train_batch_size", micro * world_size, f"train.batch_size × WORLD_SIZE ({micro} × {world_size})",
          source)
    _fill(cfg, "gradient_clipping", train.grad_clip, "train.grad_clip", source)
    _fill(cfg, "zero_allow_untested_optimizer", True, "offloadfr's torch optimizers", source,
          "ZeRO refuses torch SGD without it: remove the key")
    _fill(cfg, "zero_force_ds_cpu_optimizer", False, "offloadfr's torch optimizers", source,
          "ZeRO-Offload would refuse the torch optimizer: remove the key")
    if "zenflow" in (cfg.get("zero_optimization") or {}):
        # Measured with DeepSpeed 0.19.8 on the CPU (docs/deepspeed.md, hypothesis 5): ZenFlow's device-side optimizer
        # is AdamW (SGD fails), it needs DeepSpeed's CPU Adam (not torch's), and its column selection handles 1-D and
        # 2-D weights only: an iresnet's 4-D convolution weight fails in the first backward.
        raise ConfigError(f"{source}: zero_optimization.zenflow does not train offloadfr's backbones (DeepSpeed's "
                          "ZenFlow updates AdamW only and selects columns of 2-D weights, not convolutions); remove "
                          "the zenflow section")
    if "scheduler" in cfg:
        raise ConfigError(f"{source}: has a 'scheduler' section, but the learning rate follows train.scheduler "
                          "(the engine sets it every step); remove the section")
    cfg["optimizer"] = _optimizer_section(cfg.get("optimizer"), train, source)

    dtype = resolve_precision(train.precision, device)
    want = "bf16" if dtype == torch.bfloat16 else "fp32"
    origin = f"train.precision = {train.precision!r} (resolves to {want} on {device.type})"
    for half in ("fp16", "amp"):
        if _enabled(cfg.get(half)) not in (False, "auto"):
            raise ConfigError(f"{source}: {half}.enabled = true, but offloadfr refuses fp16: the loss scale would "
                              f"reach the head rows outside the engine; remove the {half} section and use "
                              "train.precision = 'bf16'")
        if isinstance(cfg.get(half), dict):
            cfg[half] = {**cfg[half], "enabled": False}
    native, autocast = _enabled(cfg.get("bf16")), _enabled(cfg.get("torch_autocast"))
    bf16 = dict(cfg.get("bf16") or {})
    ac = dict(cfg.get("torch_autocast") or {})
    if want == "fp32":
        for name, on in (("bf16", native), ("torch_autocast", autocast)):
            if on is True:
                raise ConfigError(f"{source}: {name}.enabled = true disagrees with {origin}; set train.precision = "
                                  f"'bf16' or remove {name}.enabled from the JSON")
        cfg["bf16"] = {**bf16, "enabled": False}
        if ac:
            cfg["torch_autocast"] = {**ac, "enabled": False}
        return cfg
    if native is True and autocast is True:
        raise ConfigError(f"{source}: both bf16.enabled and torch_autocast.enabled are true; keep one (bf16: bf16 "
                          "weights, fastest; torch_autocast: fp32 weights, the plain engine's numerics)")
    if native in (True, "auto"):
        # Native bf16: bf16 weights. DeepSpeed casts parameters only, and BatchNorm refuses bf16 weights with fp32
        # running statistics, so the buffers follow unless the JSON says otherwise.
        cfg["bf16"] = {**bf16, "enabled": True}
        data_types = dict(cfg.get("data_types") or {})
        data_types.setdefault("buffer_dtype", "bf16")
        cfg["data_types"] = data_types
        if ac:
            cfg["torch_autocast"] = {**ac, "enabled": False}
        return cfg
    if ac.get("enabled", "auto") is False:
        raise ConfigError(f"{source}: torch_autocast.enabled = false, but {origin} needs a bf16 mechanism; remove "
                          "the key (torch_autocast is the default) or set bf16.enabled = true")
    dt = str(ac.get("dtype", "bfloat16")).replace("torch.", "")
    if dt not in ("bfloat16", "bf16"):
        raise ConfigError(f"{source}: torch_autocast.dtype = {dt!r}, but only bfloat16 is allowed (fp16 would need "
                          "a loss scale); set \"dtype\": \"bfloat16\"")
    cfg["torch_autocast"] = {**ac, "enabled": True, "dtype": "bfloat16"}
    cfg["bf16"] = {**bf16, "enabled": False}
    return cfg
