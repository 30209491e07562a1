"""The backbone's state as whole tensors by parameter name, gathered from and scattered into DeepSpeed's partitions.

:class:`~offloadfr.train.ds_engine.DeepSpeedEngine` keeps its weights and optimizer state this way in ``state.pt``,
so a run resumes on another process count or ZeRO stage, or with ``engine.kind`` changed: DeepSpeed refuses to
repartition its own checkpoint for another world size. The weights go through DeepSpeed's
``safe_get/safe_set_full_fp32_param`` (and the fp32 master of its bf16 wrappers without ZeRO), the optimizer state
through ``safe_get/safe_set_full_optimizer_state``, in the layout of
:func:`~offloadfr.train.engine.torch_state_to_names`. A fresh optimizer has no state to write into (torch makes it in
the first step), so :func:`scatter_optimizer_state` first steps once at learning rate 0 on zero gradients.
:func:`consolidate_checkpoint` reads the weights of a DeepSpeed checkpoint offline, in one process.

``model`` below is the engine's module and ``opt`` DeepSpeed's optimizer (``ds_engine.optimizer``: a ZeRO or bf16
wrapper around the torch optimizer, or the torch optimizer itself). deepspeed is imported inside the functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from offloadfr.errors import CheckpointError

__all__ = [
    "gather_weights",
    "scatter_weights",
    "optimizer_state_gatherable",
    "gather_optimizer_state",
    "scatter_optimizer_state",
    "consolidate_checkpoint",
]


# ---------------------------------------------------------------------------------------------------------------
# The weights.


def _wrapper_masters(opt: Any) -> dict[int, torch.Tensor]:
    """``id(param)`` → fp32 master of DeepSpeed's FP16 wrappers (native bf16 without ZeRO); empty otherwise."""
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


def gather_weights(model: nn.Module, opt: Any) -> dict[str, torch.Tensor]:
    """The whole backbone state dict in fp32 on the CPU (master weights, buffers), loadable into a fresh backbone.

    Works for ZeRO 0-3; on more than one process every rank must call it (ZeRO partitions are gathered).

    Args:
        model: the engine's module.
        opt: DeepSpeed's optimizer.

    Returns:
        ``model.state_dict()``'s keys, in its order, with whole fp32 tensors (integer buffers keep their dtype).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    keys = list(model.state_dict().keys())
    masters = _wrapper_masters(opt)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p)  # ZeRO 1-3: the fp32 partition, gathered (None when frozen)
        if full is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter: gather the partitions
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().clone()
        tensors[name] = full if full is not None else masters.get(id(p), p.detach())
    for name, b in model.named_buffers():
        tensors[name] = b.detach()
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        t = tensors[k]
        out[k] = (t.float() if t.is_floating_point() else t).to("cpu", copy=True)
    return out


@torch.no_grad()
def scatter_weights(model: nn.Module, opt: Any, state: dict[str, torch.Tensor], *, zero_stage: int) -> None:
    """Loads full fp32 weights (from :func:`gather_weights` or :func:`consolidate_checkpoint`) into the model and
    DeepSpeed's master copy, whatever the ZeRO stage and process count; the optimizer state is kept.

    Args:
        model: the engine's module.
        opt: DeepSpeed's optimizer.
        state: the whole state dict.
        zero_stage: the engine's ZeRO stage (ZeRO-3 gathers the parameters to write them).

    Raises:
        CheckpointError: the keys or shapes do not match the backbone.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    expected = set(model.state_dict().keys())
    if set(state) != expected:
        diff = sorted(set(state) ^ expected)[:5]
        raise CheckpointError(f"the weights do not match the backbone (differing keys, first 5: {diff}); load a "
                              "checkpoint of the same model.backbone")
    params = dict(model.named_parameters())
    for name, p in params.items():
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the whole shape in ds_shape
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{name}: shape {tuple(state[name].shape)} in the weights, {shape} in the "
                                  "backbone; load a checkpoint of the same model")
    if zero_stage == 3:
        import deepspeed

        # Gather whole parameters, write them, and let DeepSpeed re-partition them (from rank 0) on exit.
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            for name, p in params.items():
                p.data.copy_(state[name].to(p.device, p.dtype))
    else:
        for name, p in params.items():
            p.data.copy_(state[name].to(p.device, p.dtype))
    for name, b in model.named_buffers():
        if name in state:
            b.copy_(state[name].to(b.device, b.dtype))
    masters = _wrapper_masters(opt)
    for name, p in params.items():
        value = state[name].to(p.device, torch.float32)
        safe_set_full_fp32_param(p, value)  # ZeRO 1-3: this rank's part of the fp32 master
        if id(p) in masters:
            masters[id(p)].copy_(value.view_as(masters[id(p)]))


# ---------------------------------------------------------------------------------------------------------------
# The optimizer state.


def _base_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer that steps: DeepSpeed's ZeRO and bf16 wrappers hold it as ``.optimizer``."""
    return getattr(opt, "optimizer", opt)


def _state_owners(model: nn.Module, opt: Any) -> dict[int, torch.Tensor]:
    """``id(param)`` → the tensor the base optimizer keeps a parameter's state under, without ZeRO (the parameter
    itself, or its fp32 master in DeepSpeed's bf16 wrapper)."""
    masters = _wrapper_masters(opt)
    return {id(p): masters.get(id(p), p) for p in model.parameters()}


def optimizer_state_gatherable(config: dict[str, Any], zero_stage: int) -> bool:
    """False for ZeRO-3 with the optimizer on NVMe or partly offloaded: its state is swapped out, or split over
    two optimizers, in ways the by-name calls do not follow (untested here: this VM has no libaio).

    Args:
        config: the DeepSpeed config as run.
        zero_stage: the engine's ZeRO stage.

    Returns:
        Whether :func:`gather_optimizer_state` and :func:`scatter_optimizer_state` work for this engine.
    """
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return not (zero_stage == 3 and (offload.get("device") == "nvme" or float(offload.get("ratio", 1.0)) < 1))


def _check_optimizer_state_is_reachable(config: dict[str, Any], zero_stage: int) -> None:
    if not optimizer_state_gatherable(config, zero_stage):
        raise CheckpointError("the optimizer state of ZeRO-3 with offload_optimizer on NVMe (or ratio < 1) cannot "
                              "be gathered by parameter; resume on the same process count (DeepSpeed's own "
                              "checkpoint)")


def _flat_state_owners(opt: Any, zero_stage: int) -> list[tuple[int, torch.Tensor]]:
    """(parameter group, tensor) for each tensor the base optimizer keeps state under. ZeRO-3 puts its fp32
    partitions into the base optimizer's groups only for the length of a step; the others keep them there."""
    if zero_stage == 3:
        return [(opt.sub_group_to_group_id[i], flat) for i, flat in enumerate(opt.fp32_partitioned_groups_flat)]
    return [(g, q) for g, group in enumerate(_base_optimizer(opt).param_groups) for q in group["params"]]


def gather_optimizer_state(model: nn.Module, opt: Any, *, zero_stage: int, config: dict[str, Any]) -> dict[str, Any]:
    """The base optimizer's state, whole, by parameter name (:func:`~offloadfr.train.engine.torch_state_to_names`
    layout), fp32 on the CPU: ZeRO partitions are gathered from every rank, so every rank must call it.

    Args:
        model: the engine's module.
        opt: DeepSpeed's optimizer.
        zero_stage: the engine's ZeRO stage.
        config: the DeepSpeed config as run.

    Returns:
        ``{"step": n or None, "tensors": {parameter name: {state key: tensor}}}``.

    Raises:
        CheckpointError: the state cannot be gathered by parameter (:func:`optimizer_state_gatherable`).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base_optimizer(opt)
    keys, step = _per_element_state_keys(base, [q for _, q in _flat_state_owners(opt, zero_stage)])
    if not keys:
        return {"step": step, "tensors": {}}
    _check_optimizer_state_is_reachable(config, zero_stage)
    owners = _state_owners(model, opt)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
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
def scatter_optimizer_state(model: nn.Module, opt: Any, by_name: dict[str, Any], *, zero_stage: int,
                            config: dict[str, Any]) -> None:
    """Writes :func:`gather_optimizer_state`'s output into this engine's optimizer, whatever process count and
    ZeRO stage wrote it; every rank takes its own part.

    A fresh optimizer has no state yet (torch makes it in the first step), so one step at learning rate 0 on
    zero gradients makes it first, in the optimizer's own layout (partitions, devices, dtypes); that step leaves
    the weights as they are.

    Args:
        model: the engine's module.
        opt: DeepSpeed's optimizer.
        by_name: the state by parameter name.
        zero_stage: the engine's ZeRO stage.
        config: the DeepSpeed config as run.

    Raises:
        CheckpointError: a trainable parameter has no state in ``by_name`` (another backbone), or the state cannot
            be scattered by parameter (:func:`optimizer_state_gatherable`).
    """
    from deepspeed.utils import safe_set_full_optimizer_state

    if not any(by_name["tensors"].values()):
        return
    _check_optimizer_state_is_reachable(config, zero_stage)
    base = _base_optimizer(opt)
    _make_optimizer_state(base, _flat_state_owners(opt, zero_stage))
    getattr(opt, "_lazy_init_hp_params_optimizer_state", lambda: None)()  # ZeRO 1-2: link views
    owners = _state_owners(model, opt)
    for name, p in model.named_parameters():
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


# ---------------------------------------------------------------------------------------------------------------
# A DeepSpeed checkpoint, offline.


def consolidate_checkpoint(directory: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 backbone state dict stored in a DeepSpeed checkpoint written by
    :meth:`~offloadfr.train.ds_engine.DeepSpeedEngine.save`.

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
