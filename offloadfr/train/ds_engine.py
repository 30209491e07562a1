"""The DeepSpeed engine: the backbone trained by ``deepspeed.initialize`` behind the :class:`Engine` methods.

``[engine] kind = "deepspeed"`` selects it; ``engine.deepspeed_config`` names a JSON in ``ds_configs/deepspeed/``
that holds only DeepSpeed knobs, completed from ``[train]`` by :func:`~offloadfr.train.ds_config.resolve_ds_config`
(which also says how precision is set up). The state it keeps in ``state.pt``, whole tensors by parameter name, is
gathered and scattered by :mod:`offloadfr.train.ds_state`.

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
from offloadfr.train.ds_config import load_ds_config, resolve_ds_config
from offloadfr.train.ds_state import (
    gather_optimizer_state,
    gather_weights,
    optimizer_state_gatherable,
    scatter_optimizer_state,
    scatter_weights,
)
from offloadfr.train.engine import Engine, PlainEngine, torch_state_to_names

__all__ = ["DeepSpeedEngine", "build_engine", "ensure_dist_env"]

_log = logging.getLogger(__name__)
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
        if optimizer_state_gatherable(self.config, self.zero_stage):
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

    # --- the whole state by parameter name (resuming on another process count): offloadfr.train.ds_state ---------

    def optimizer_state_by_name(self) -> dict[str, Any]:
        """The optimizer state, whole, fp32 on the CPU, by parameter name; every rank must call it (it gathers).

        Raises:
            CheckpointError: ZeRO-3 with the optimizer on NVMe or partly offloaded (it cannot be gathered by name).
        """
        return gather_optimizer_state(self.model, self.ds.optimizer, zero_stage=self.zero_stage, config=self.config)

    def load_optimizer_state_by_name(self, by_name: dict[str, Any]) -> None:
        """Writes :meth:`optimizer_state_by_name`'s output into this engine's optimizer, whatever process count and
        ZeRO stage wrote it; every rank takes its own part.

        Raises:
            CheckpointError: a trainable parameter has no state in ``by_name`` (another backbone).
        """
        scatter_optimizer_state(self.model, self.ds.optimizer, by_name, zero_stage=self.zero_stage,
                                config=self.config)

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
                :func:`~offloadfr.train.ds_state.consolidate_checkpoint` and :meth:`load_consolidated_state_dict`
                instead).
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

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole backbone state dict in fp32 on the CPU (master weights, buffers), loadable into a fresh backbone.

        Works for ZeRO 0-3; on more than one process every rank must call it (ZeRO partitions are gathered).
        """
        return gather_weights(self.model, self.ds.optimizer)

    def load_consolidated_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads full fp32 weights (from :meth:`consolidated_state_dict` or
        :func:`~offloadfr.train.ds_state.consolidate_checkpoint`) into the model and DeepSpeed's master copy, whatever
        the ZeRO stage and process count; the optimizer state is kept.

        Raises:
            CheckpointError: the keys or shapes do not match the backbone.
        """
        scatter_weights(self.model, self.ds.optimizer, state, zero_stage=self.zero_stage)

    def close(self) -> None:
        """Releases DeepSpeed's hooks and buffers (the process group stays)."""
        self.ds.destroy()
