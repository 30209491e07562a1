"""The DeepSpeed engine: the backbone trained by ``deepspeed.initialize`` behind the :class:`Engine` methods.

``[engine] kind = "deepspeed"`` selects it; ``engine.deepspeed_config`` names a JSON in ``ds_configs/deepspeed/``
that holds only DeepSpeed knobs (ZeRO stage, offload, buckets). Everything the run config already says is filled in
here from ``[train]``, and a JSON value that disagrees with it is a :class:`~offloadfr.errors.ConfigError`
(STYLE R5): the JSON may leave a key out or write ``"auto"``.

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

Gradient norm. :meth:`DeepSpeedEngine.grad_norm` computes the norm from the gradients DeepSpeed holds after
``backward`` (reduced and partitioned under ZeRO) with the routine its ``step`` uses, so the trainer can refuse a
non-finite step before any update; DeepSpeed then clips inside ``step`` with the same norm. Under ZeRO, DeepSpeed
would otherwise skip a non-finite step silently (:meth:`~DeepSpeedEngine.step` raises if it does); without ZeRO it
would apply it.

Distributed setup: DeepSpeed always creates a process group, even for one process. When the launcher set none of
``RANK``/``WORLD_SIZE`` (plain ``python launch/train.py``), :func:`ensure_dist_env` sets them for one process with a
free ``MASTER_PORT``. On the CPU, ``DS_ACCELERATOR=cpu`` is set before ``deepspeed`` is imported and its shared-memory
op (``deepspeed_shm_comm``, a 34 s JIT build that gloo does not need) is skipped. ``TORCH_EXTENSIONS_DIR`` defaults
to ``~/.cache/offloadfr/torch_extensions/<python>-<torch>-<deepspeed>`` so an op built by one venv is not rebuilt by
another (reference/env-notes.md §3.2); the filled-in optimizers need no JIT op at all.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import socket
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from torch import nn

from offloadfr.config import EngineCfg, TrainCfg
from offloadfr.errors import CheckpointError, ConfigError, NonFiniteError
from offloadfr.train.engine import (
    Engine,
    PlainEngine,
    resolve_precision,
    torch_state_to_names,
)

__all__ = [
    "DeepSpeedEngine",
    "build_engine",
    "load_ds_config",
    "resolve_ds_config",
    "ensure_dist_env",
    "consolidate_checkpoint",
]

_log = logging.getLogger(__name__)
_REPO_ROOT = Path(__file__).resolve().parents[2]
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def build_engine(cfg_engine: EngineCfg, cfg_train: TrainCfg, model: nn.Module, device: torch.device) -> Engine:
    """The engine ``engine.kind`` names, built around ``model``.

    Args:
        cfg_engine: the ``[engine]`` section.
        cfg_train: the ``[train]`` section (optimizer, batch size, clipping, precision).
        model: the backbone, on ``device``.
        device: where this process computes.

    Returns:
        A :class:`PlainEngine` for ``"plain"``, a :class:`DeepSpeedEngine` for ``"deepspeed"``.

    Raises:
        ConfigError: the DeepSpeed JSON is missing, malformed, or disagrees with ``[train]``.
    """
    if cfg_engine.kind == "plain":
        return PlainEngine(model, cfg_train, device)
    return DeepSpeedEngine(model, cfg_train, device, ds_config=cfg_engine.deepspeed_config)


# ---------------------------------------------------------------------------------------------------------------
# Config: the JSON's DeepSpeed knobs plus what [train] says.


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


# ---------------------------------------------------------------------------------------------------------------
# Process environment and the deepspeed import.


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_dist_env(env: MutableMapping[str, str] | None = None) -> int:
    """Makes sure ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set.

    A launcher (torchrun, accelerate, deepspeed) sets them; without one this is a single process, and the missing
    ones are set to rank 0 of 1 on 127.0.0.1 with a free port (otherwise DeepSpeed falls back to MPI discovery and
    fails on ``import mpi4py``).

    Args:
        env: the environment to complete; ``os.environ`` when None.

    Returns:
        The world size.

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 but the rendezvous variables are missing (a launcher bug or a hand-made
            environment).
    """
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    missing = [v for v in _DIST_VARS if v not in env]
    if world > 1 and missing:
        raise ConfigError(f"WORLD_SIZE = {world} but {', '.join(missing)} unset; launch with accelerate launch or "
                          "torchrun, which set all of " + ", ".join(_DIST_VARS))
    if missing:
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    return world


def _import_deepspeed(device: torch.device) -> Any:
    """Imports deepspeed for ``device``'s accelerator (CPU: ``DS_ACCELERATOR=cpu``, no shm op); returns the module.

    Raises:
        ConfigError: deepspeed was already imported for another accelerator in this process.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        import importlib.metadata as md

        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-ds{md.version('deepspeed')}"
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "offloadfr" / "torch_extensions" / tag)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator().device_name()
    if accel != device.type:
        raise ConfigError(f"run.device resolves to {device.type}, but deepspeed was already set up for {accel} in "
                          f"this process (DS_ACCELERATOR = {os.environ.get('DS_ACCELERATOR')!r}); use one device "
                          "per process")
    if accel == "cpu":
        # gloo does not need DeepSpeed's shared-memory all-reduce op, a 34 s JIT build on first use. The module must
        # be taken from sys.modules: ``deepspeed.comm.torch`` as an attribute is the real ``torch`` module.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def _nvme_paths(cfg: dict[str, Any], source: str) -> list[str]:
    """The ``nvme_path`` of each NVMe offload in ``cfg``.

    Raises:
        ConfigError: one of them is not an existing directory.
    """
    zero = cfg.get("zero_optimization") or {}
    paths = []
    for section in ("offload_param", "offload_optimizer"):
        off = zero.get(section) or {}
        if off.get("device") != "nvme":
            continue
        path = off.get("nvme_path")
        if not path or not Path(path).is_dir():
            raise ConfigError(f"{source}: zero_optimization.{section}.nvme_path = {path!r} is not a directory; copy "
                              "the JSON and point nvme_path at a directory on a local NVMe drive")
        paths.append(str(path))
    return paths


def _check_aio(source: str) -> None:
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("AsyncIOBuilder")
    if builder is None or not builder().is_compatible():
        raise ConfigError(f"{source}: NVMe offload needs DeepSpeed's async_io op, which needs libaio; install it "
                          "(apt install libaio-dev) or use ds_configs/deepspeed/zero2_offload_cpu.json")


def _offload_without_per_parameter_reads(opt: Any) -> None:
    """ZeRO-Offload's per-step checks without one device-to-host read per parameter (a no-op for other optimizers).

    DeepSpeed 0.19.8's ``DeepSpeedZeroOptimizer`` with ``offload_optimizer`` reads one scalar per parameter tensor
    back from the device three times a step (``.item()`` or ``bool()``): in backward for an overflow flag, and for
    the gradient norm in :meth:`DeepSpeedEngine.grad_norm` and again in DeepSpeed's ``step`` (iresnet50 at 32 px
    on the CPU: 713 reads a step; docs/benchmarks/backbone_cpu-2core_202611.md). On a GPU each read waits for the
    device, so the host cannot queue work ahead. This replaces, on this optimizer object only:

    * ``update_offload_overflow_tracker`` by nothing when ``check_grad_overflow`` is off (fp32 and bf16; offloadfr
      refuses fp16): its flag, ``local_overflow``, is read only by ``has_overflow``, which ``step`` calls only when
      ``check_grad_overflow`` is on. A non-finite gradient is still caught: the norm below is -1 (DeepSpeed's
      sentinel), :meth:`DeepSpeedEngine.grad_norm` reports ``inf`` and DeepSpeed's ``step`` skips the update.
    * ``complete_grad_norm_calculation_for_cpu_offload`` by the same sum of the squared per-parameter norms that
      DeepSpeed kept from backward, taken on the device in float64 and all-reduced over the data-parallel group as
      DeepSpeed does, then moved to ``opt.device`` (the CPU under offload) once.
    """
    from deepspeed import comm as ds_dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(opt, DeepSpeedZeroOptimizer) or not opt.cpu_offload:
        return
    if not opt.check_grad_overflow:
        opt.update_offload_overflow_tracker = lambda grad: None

    def grad_norm_for_cpu_offload(params: list[torch.Tensor]) -> torch.Tensor:
        ids = [opt.get_param_id(p) for p in params]
        norms = [opt.norm_for_param_grads[i] for i in ids if i in opt.norm_for_param_grads]
        if norms:
            total = torch.stack([n.reshape(()) for n in norms]).double().pow(2).sum().reshape(1)
        else:  # no gradient in this rank's partition: it still joins the all-reduce, on the communication device
            from deepspeed.accelerator import get_accelerator

            total = torch.zeros(1, dtype=torch.float64, device=get_accelerator().current_device_name())
        ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=opt.dp_process_group)
        opt._model_parallel_all_reduce(tensor=total, op=ds_dist.ReduceOp.SUM)
        norm = total[0].sqrt().float()
        return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, -1.0)).to(opt.device)

    opt.complete_grad_norm_calculation_for_cpu_offload = grad_norm_for_cpu_offload


# ---------------------------------------------------------------------------------------------------------------
# The engine.


class DeepSpeedEngine:
    """The backbone under ``deepspeed.initialize``, driven through the :class:`Engine` methods.

    Args:
        model: the backbone, on ``device``, in fp32 (DeepSpeed converts it to bf16 in native bf16 mode).
        cfg: the ``[train]`` section.
        device: where this process computes.
        ds_config: the DeepSpeed JSON (a path, resolved as :func:`load_ds_config` does, or an already-loaded dict).

    Raises:
        ConfigError: the JSON is missing or disagrees with ``cfg`` (see :func:`resolve_ds_config`).

    Example::

        engine = DeepSpeedEngine(model, cfg.train, device, ds_config="ds_configs/deepspeed/zero2_offload_cpu.json")
        emb_BD = engine.forward(images)
        loss = head(emb_BD, labels_B)
        engine.backward(loss)
        if math.isfinite(engine.grad_norm()):
            engine.step(lr)
    """

    def __init__(self, model: nn.Module, cfg: TrainCfg, device: torch.device, *,
                 ds_config: str | Path | dict[str, Any]) -> None:
        raw = ds_config if isinstance(ds_config, dict) else load_ds_config(ds_config)
        source = "engine.deepspeed_config" + ("" if isinstance(ds_config, dict) else f" ({ds_config})")
        # A launcher or distributed/ may already have made the process group; DeepSpeed then joins it.
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else ensure_dist_env()
        self.config = resolve_ds_config(raw, cfg, world_size=world, device=device, source=source)
        """The DeepSpeed config as run (JSON plus the values filled in from ``[train]``)."""
        zero = self.config.get("zero_optimization") or {}
        if int(zero.get("stage", 0)) == 3:
            # ZeRO-3's "memory efficient linear" replaces torch.nn.functional.linear for the whole process (every
            # later model and head too, until the process ends); off unless the JSON asks for it.
            zero.setdefault("memory_efficient_linear", False)
        self.cfg = cfg
        self.device = device
        nvme = _nvme_paths(self.config, source)
        deepspeed = _import_deepspeed(device)
        if not torch.distributed.is_initialized():
            # A process group destroyed through torch.distributed (not deepspeed.comm) leaves DeepSpeed's cached
            # groups pointing at it, and the next initialize fails with "Group ... is not registered".
            from deepspeed.utils import groups

            getattr(groups, "_release_process_group_references", lambda group: None)(None)
        if nvme:
            _check_aio(source)
        ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                  config=copy.deepcopy(self.config))
        self.ds = ds_engine
        """The ``deepspeed.DeepSpeedEngine``."""
        _offload_without_per_parameter_reads(ds_engine.optimizer)
        self.model: nn.Module = ds_engine.module
        self.zero_stage = int(ds_engine.zero_optimization_stage())
        self.input_dtype = torch.bfloat16 if ds_engine.bfloat16_enabled() else torch.float32

    # --- Engine protocol ---------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, D), fp32, of normalised images (cast to bf16 first in native bf16 mode)."""
        emb_BD = self.ds(images.to(self.input_dtype))
        return emb_BD.float()

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward(loss)``; the head rows outside the engine get the true (unscaled) gradient."""
        self.ds.backward(loss)

    def grad_norm(self) -> float:
        """The global L2 norm of the backbone gradient, before clipping; ``inf`` when it is not finite.

        DeepSpeed clips inside :meth:`step`, with the same norm; call this between :meth:`backward` and
        :meth:`step` (after ``step`` the gradients are gone).
        """
        opt = self.ds.optimizer
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.utils import combine_grad_norm_groups, get_global_norm_of_tensors
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if isinstance(opt, DeepSpeedZeroOptimizer):
            norm = opt.scaled_global_norm() / opt.loss_scale
        elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            norm = combine_grad_norm_groups(opt._get_norm_groups()) / opt.loss_scale
        elif isinstance(opt, BF16_Optimizer):
            norm = get_global_norm_of_tensors(opt.get_grads_for_norm()[0], mpu=opt.mpu, norm_type=2)
        else:  # no ZeRO: the gradients are on the parameters, already all-reduced by backward
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        value = float(norm)
        # DeepSpeed's norm helpers report inf/NaN as -1.
        return value if math.isfinite(value) and value >= 0 else float("inf")

    def step(self, lr: float) -> None:
        """Sets the learning rate, clips (``train.grad_clip``), applies the optimizer and clears the gradients.

        Raises:
            NonFiniteError: DeepSpeed skipped the update because the gradient was not finite (call
                :meth:`grad_norm` first to stop before that).
        """
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        if not self.ds.was_step_applied():
            raise NonFiniteError(f"DeepSpeed skipped step {self.ds.global_steps}: the gradient norm was not finite; "
                                 "lower train.lr or raise train.warmup_steps")

    def zero_grad(self) -> None:
        """Drops the gradients without stepping, as DeepSpeed does on an overflow (nothing leaks into the next step)."""
        opt = self.ds.optimizer
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

        if isinstance(opt, DeepSpeedZeroOptimizer):
            # What DeepSpeedZeroOptimizer.step does when it finds an overflow, plus the micro-step reset that makes
            # the next backward overwrite (not add to) the offloaded gradient buffer.
            opt._wait_for_offload_copies()
            opt.micro_step_id = INITIAL_MICRO_STEP_ID
            opt.zero_grad(set_to_none=True)
            opt._release_preflattened_grad_buffers()
            if opt.cpu_offload:
                opt._offload_accumulated_param_ids = set()
                opt.reset_cpu_buffers()
            else:
                for k in opt.averaged_gradients.keys():
                    opt.averaged_gradients[k] = None
                    opt.all_grad_tensors[k] = None
        elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            opt._overflow_clean_up(opt.loss_scale)
        elif isinstance(opt, BF16_Optimizer):
            opt.clear_hp_grads()
            opt.clear_lp_grads()
        else:
            self.ds.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        """``{"model": consolidated fp32 weights, "optimizer_by_name": whole optimizer state by parameter name}``.

        Both parts are whole tensors on the CPU that load on any process count and ZeRO stage (and into a
        :class:`PlainEngine`). On more than one process every rank must call it (it gathers partitions). Without
        ``"optimizer_by_name"`` where the optimizer state cannot be gathered by parameter (ZeRO-3 with the optimizer on
        NVMe: :meth:`optimizer_state_by_name`); DeepSpeed's own checkpoint (:meth:`save`) still holds it.
        """
        state: dict[str, Any] = {"model": self.consolidated_state_dict()}
        if self._optimizer_state_gatherable():
            state["optimizer_by_name"] = self.optimizer_state_by_name()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads :meth:`state_dict` (or a :class:`PlainEngine`'s), written on any process count and ZeRO stage.

        A checkpoint without optimizer state (written before any step) leaves the optimizer fresh.
        """
        self.load_consolidated_state_dict(state["model"])
        if "optimizer_by_name" in state:
            self.load_optimizer_state_by_name(state["optimizer_by_name"])
        elif "optimizer" in state:  # a PlainEngine's torch state dict: resuming with engine.kind changed
            self.load_optimizer_state_by_name(torch_state_to_names(self.model, state["optimizer"]))
        else:
            _log.warning("the checkpoint holds no optimizer state by parameter name (ZeRO-3 with the optimizer on "
                         "NVMe writes none, nor did offloadfr before 2026-11-25): the optimizer starts fresh; resume "
                         "on the process count and ZeRO config that wrote it to keep it")

    # --- the optimizer state by parameter name (resuming on another process count) ------------------------------

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that steps: DeepSpeed's ZeRO and bf16 wrappers hold it as ``.optimizer``."""
        opt = self.ds.optimizer
        return getattr(opt, "optimizer", opt)

    def _state_owners(self) -> dict[int, torch.Tensor]:
        """``id(param)`` → the tensor the base optimizer keeps a parameter's state under, without ZeRO (the parameter
        itself, or its fp32 master in DeepSpeed's bf16 wrapper)."""
        masters = self._wrapper_masters()
        return {id(p): masters.get(id(p), p) for p in self.model.parameters()}

    def _optimizer_state_gatherable(self) -> bool:
        """False for ZeRO-3 with the optimizer on NVMe or partly offloaded: its state is swapped out, or split over
        two optimizers, in ways the by-name calls do not follow (untested here: this VM has no libaio)."""
        offload = (self.config.get("zero_optimization") or {}).get("offload_optimizer") or {}
        return not (self.zero_stage == 3 and (offload.get("device") == "nvme" or float(offload.get("ratio", 1.0)) < 1))

    def _check_optimizer_state_is_reachable(self) -> None:
        if not self._optimizer_state_gatherable():
            raise CheckpointError("the optimizer state of ZeRO-3 with offload_optimizer on NVMe (or ratio < 1) cannot "
                                  "be gathered by parameter; resume on the same process count (DeepSpeed's own "
                                  "checkpoint)")

    def _flat_state_owners(self) -> list[tuple[int, torch.Tensor]]:
        """(parameter group, tensor) for each tensor the base optimizer keeps state under. ZeRO-3 puts its fp32
        partitions into the base optimizer's groups only for the length of a step; the others keep them there."""
        opt = self.ds.optimizer
        if self.zero_stage == 3:
            return [(opt.sub_group_to_group_id[i], flat) for i, flat in enumerate(opt.fp32_partitioned_groups_flat)]
        return [(g, q) for g, group in enumerate(self._base_optimizer().param_groups) for q in group["params"]]

    def optimizer_state_by_name(self) -> dict[str, Any]:
        """The base optimizer's state, whole, by parameter name (:func:`~offloadfr.train.engine.torch_state_to_names`
        layout), fp32 on the CPU: ZeRO partitions are gathered from every rank, so every rank must call it."""
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self._base_optimizer()
        keys, step = _per_element_state_keys(base, [q for _, q in self._flat_state_owners()])
        if not keys:
            return {"step": step, "tensors": {}}
        self._check_optimizer_state_is_reachable()
        owners = self._state_owners()
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if _zero_partitioned(p):
                whole = {k: safe_get_full_optimizer_state(p, k) for k in keys}
            else:
                entry = base.state.get(owners[id(p)], {})
                whole = {k: entry[k] for k in keys if k in entry}
            shape = tuple(getattr(p, "ds_shape", p.shape))
            tensors[name] = {k: v.detach().to("cpu", torch.float32, copy=True).view(shape) for k, v in whole.items()}
        return {"step": step, "tensors": tensors}

    @torch.no_grad()
    def load_optimizer_state_by_name(self, by_name: dict[str, Any]) -> None:
        """Writes :meth:`optimizer_state_by_name`'s output into this engine's optimizer, whatever process count and
        ZeRO stage wrote it; every rank takes its own part.

        A fresh optimizer has no state yet (torch makes it in the first step), so one step at learning rate 0 on
        zero gradients makes it first, in the optimizer's own layout (partitions, devices, dtypes); that step leaves
        the weights as they are.

        Raises:
            CheckpointError: a trainable parameter has no state in ``by_name`` (another backbone).
        """
        from deepspeed.utils import safe_set_full_optimizer_state

        if not any(by_name["tensors"].values()):
            return
        self._check_optimizer_state_is_reachable()
        base = self._base_optimizer()
        _make_optimizer_state(base, self._flat_state_owners())
        getattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()  # ZeRO 1-2: link views
        owners = self._state_owners()
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            saved = by_name["tensors"].get(name)
            if not saved:
                raise CheckpointError(f"the checkpoint's optimizer state has nothing for {name!r}; resume a "
                                      "checkpoint of the same model.backbone")
            for key, value in saved.items():
                if _zero_partitioned(p):
                    safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), key)
                else:
                    target = base.state[owners[id(p)]][key]
                    target.copy_(value.view_as(target))
        if by_name["step"] is not None:
            for entry in base.state.values():
                if "step" in entry:  # torch's Adam keeps a tensor, DeepSpeed's CPU Adam an int
                    old = entry["step"]
                    entry["step"] = old.fill_(by_name["step"]) if torch.is_tensor(old) else type(old)(by_name["step"])

    # --- checkpoints -----------------------------------------------------------------------------------------

    def save(self, directory: str | Path, tag: str) -> None:
        """Writes a DeepSpeed checkpoint (weights, optimizer state, per-rank ZeRO partitions) to ``directory/tag``.

        Every rank must call it.
        """
        self.ds.save_checkpoint(str(directory), tag=tag, client_state={}, save_latest=False)

    def load(self, directory: str | Path, tag: str) -> None:
        """Restores weights and optimizer state written by :meth:`save` with the same ZeRO stage and process count.

        Raises:
            CheckpointError: no such checkpoint, or it was written by another process count (load the weights with
                :func:`consolidate_checkpoint` and :meth:`load_consolidated_state_dict` instead).
        """
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        path = Path(directory) / tag
        if not path.is_dir():
            raise CheckpointError(f"no DeepSpeed checkpoint {str(path)!r}; pass a directory written by save()")
        try:
            load_path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        except ZeRORuntimeException as e:
            raise CheckpointError(f"{path}: {e} Resume the weights only, through consolidate_checkpoint() and "
                                  "load_consolidated_state_dict()") from None
        if load_path is None:
            raise CheckpointError(f"{path} is not a complete DeepSpeed checkpoint; pass a directory written by save()")

    def _wrapper_masters(self) -> dict[int, torch.Tensor]:
        """``id(param)`` → fp32 master of DeepSpeed's FP16 wrappers (native bf16 without ZeRO); empty otherwise."""
        opt = self.ds.optimizer
        masters: dict[int, torch.Tensor] = {}
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer: one flat master
            for lp_group, hp_flat in zip(opt.fp16_groups, opt.fp32_groups_flat, strict=True):
                offset = 0
                for lp in lp_group:
                    masters[id(lp)] = hp_flat.narrow(0, offset, lp.numel()).view_as(lp)
                    offset += lp.numel()
        elif hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: one per param
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
                for lp, hp in zip(lp_group, hp_group, strict=True):
                    masters[id(lp)] = hp
        return masters

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole backbone state dict in fp32 on the CPU (master weights, buffers), loadable into a fresh backbone.

        Works for ZeRO 0-3; on more than one process every rank must call it (ZeRO partitions are gathered).
        """
        from deepspeed.utils import safe_get_full_fp32_param

        keys = list(self.model.state_dict().keys())
        masters = self._wrapper_masters()
        tensors: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p)  # ZeRO 1-3: the fp32 partition, gathered (None when frozen)
            if full is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter: gather the partitions
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            tensors[name] = full if full is not None else masters.get(id(p), p.detach())
        for name, b in self.model.named_buffers():
            tensors[name] = b.detach()
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            t = tensors[k]
            out[k] = (t.float() if t.is_floating_point() else t).to("cpu", copy=True)
        return out

    @torch.no_grad()
    def load_consolidated_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads full fp32 weights (from :meth:`consolidated_state_dict` or :func:`consolidate_checkpoint`) into the
        model and DeepSpeed's master copy, whatever the ZeRO stage and process count; the optimizer state is kept.

        Raises:
            CheckpointError: the keys or shapes do not match the backbone.
        """
        from deepspeed.utils import safe_set_full_fp32_param

        expected = set(self.model.state_dict().keys())
        if set(state) != expected:
            diff = sorted(set(state) ^ expected)[:5]
            raise CheckpointError(f"the weights do not match the backbone (differing keys, first 5: {diff}); load a "
                                  "checkpoint of the same model.backbone")
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the whole shape in ds_shape
            if tuple(state[name].shape) != shape:
                raise CheckpointError(f"{name}: shape {tuple(state[name].shape)} in the weights, {shape} in the "
                                      "backbone; load a checkpoint of the same model")
        if self.zero_stage == 3:
            import deepspeed

            # Gather whole parameters, write them, and let DeepSpeed re-partition them (from rank 0) on exit.
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                for name, p in params.items():
                    p.data.copy_(state[name].to(p.device, p.dtype))
        else:
            for name, p in params.items():
                p.data.copy_(state[name].to(p.device, p.dtype))
        for name, b in self.model.named_buffers():
            if name in state:
                b.copy_(state[name].to(b.device, b.dtype))
        masters = self._wrapper_masters()
        for name, p in params.items():
            value = state[name].to(p.device, torch.float32)
            safe_set_full_fp32_param(p, value)  # ZeRO 1-3: this rank's part of the fp32 master
            if id(p) in masters:
                masters[id(p)].copy_(value.view_as(masters[id(p)]))

    def close(self) -> None:
        """Releases DeepSpeed's hooks and buffers (the process group stays)."""
        self.ds.destroy()


def _zero_partitioned(p: torch.Tensor) -> bool:
    """Whether ZeRO 1-3 (or DeepSpeed's BF16_Optimizer) keeps ``p``'s fp32 state in partitions. A parameter whose
    partition lies wholly on other ranks has ``_hp_mapping = None`` here, yet takes part in the gathers."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _per_element_state_keys(base: torch.optim.Optimizer, owners: list[torch.Tensor]) -> tuple[list[str], float | None]:
    """The state keys of ``base`` that hold one value per parameter element (``momentum_buffer``; ``exp_avg``,
    ``exp_avg_sq``), and its step count (None for SGD or before the first step). The same on every rank."""
    for q in owners:
        entry = base.state.get(q)
        if entry:
            keys = sorted(k for k, v in entry.items() if torch.is_tensor(v) and v.shape == q.shape)
            return keys, (float(entry["step"]) if "step" in entry else None)
    return [], None


def _make_optimizer_state(base: torch.optim.Optimizer, owners: list[tuple[int, torch.Tensor]]) -> None:
    """``base.step()`` at learning rate 0 on zero gradients over ``owners`` ((group, tensor) pairs), so that it holds
    every state tensor it would after a real step, where it keeps them; weights, gradients, learning rates and the
    groups' parameter lists are left as they were."""
    groups = [(group, group["lr"], group["params"]) for group in base.param_groups]
    grads = [(q, q.grad) for _, q in owners]
    try:
        for group in base.param_groups:
            group["lr"], group["params"] = 0.0, []
        for g, q in owners:
            base.param_groups[g]["params"].append(q)
            q.grad = torch.zeros_like(q)
        base.step()
    finally:
        for group, lr, params in groups:
            group["lr"], group["params"] = lr, params
        for q, grad in grads:
            q.grad = grad


def consolidate_checkpoint(directory: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 backbone state dict stored in a DeepSpeed checkpoint written by :meth:`DeepSpeedEngine.save`.

    Runs offline in one process, whatever process count and ZeRO stage wrote the checkpoint, without a process
    group (for ``offloadfr eval`` and for resuming on another process count).

    Raises:
        CheckpointError: ``directory/tag`` is not a DeepSpeed checkpoint.
    """
    path = Path(directory) / tag
    model_files = sorted(path.glob("*model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{str(path)!r} has no *model_states.pt; pass a directory written by "
                              "DeepSpeedEngine.save()")
    if any(path.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO 1-3: fp32 partitions in the optimizer files
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
        except ValueError as e:  # e.g. BF16_Optimizer files (ZeRO-1 with data_types.grad_accum_dtype = fp32)
            raise CheckpointError(f"{path}: DeepSpeed cannot consolidate it offline ({e}); take the weights from "
                                  "DeepSpeedEngine.consolidated_state_dict() in the training process") from None
        # Stage 1 leaves frozen parameters out of the fp32 reconstruction; they are whole in the model file.
        module = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
        sd.update({k: v for k, v in module.items() if k not in sd})
    else:  # no ZeRO: the model file holds the module (bf16 in native bf16 mode, whose fp32 master is not saved there)
        sd = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
