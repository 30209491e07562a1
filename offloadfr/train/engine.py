"""Engines train the backbone: forward, backward, clip and step. The head's rows are not theirs (heads/base.py).

``PlainEngine`` is a PyTorch optimizer in this process; with W processes the backbone runs under
``DistributedDataParallel``, which averages its gradients over ranks (what ``dist.all_gather_with_grad`` expects). A
DeepSpeed engine arrives behind the same methods, so the trainer never changes when ``engine.kind`` does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from offloadfr.config import TrainCfg

__all__ = ["Engine", "PlainEngine", "resolve_precision", "torch_state_to_names", "torch_state_from_names"]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU and fp32 on the CPU; returns the autocast dtype (fp32 means no autocast)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def torch_state_to_names(model: nn.Module, torch_state: dict[str, Any]) -> dict[str, Any]:
    """A torch optimizer's ``state_dict()`` over ``model.parameters()`` (in that order) by parameter name.

    The layout both engines read, whatever holds the state (one optimizer, ZeRO partitions on any number of ranks):
    ``{"step": the step count or None (SGD has none), "tensors": {parameter name: {state key: full tensor}}}``,
    where the state keys are the per-element ones (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``).
    """
    named = list(model.named_parameters())
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    step: float | None = None
    for index, (name, p) in enumerate(named):
        entry = torch_state["state"].get(index, {})
        tensors[name] = {k: v for k, v in entry.items() if torch.is_tensor(v) and v.shape == p.shape}
        if "step" in entry:
            step = float(entry["step"])
    return {"step": step, "tensors": tensors}


def torch_state_from_names(model: nn.Module, optimizer: torch.optim.Optimizer,
                          by_name: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`torch_state_to_names`: a ``state_dict`` that ``optimizer`` (built over
    ``model.parameters()``) loads, with its own hyper-parameters (the run's config wins over the checkpoint's)."""
    named = list(model.named_parameters())
    state: dict[int, dict[str, Any]] = {}
    for index, (name, _) in enumerate(named):
        entry: dict[str, Any] = dict(by_name["tensors"].get(name, {}))
        if entry and by_name["step"] is not None:
            entry["step"] = torch.tensor(by_name["step"], dtype=torch.float32)
        if entry:
            state[index] = entry
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


class Engine(Protocol):
    """What the trainer needs from whatever trains the backbone."""

    model: nn.Module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, D) of normalised images."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagates ``loss`` (also into head rows that require grad)."""
        ...

    def grad_norm(self) -> float:
        """Clips the backbone gradients to ``train.grad_clip`` (if set) and returns their total norm before it."""
        ...

    def step(self, lr: float) -> None:
        """Applies the optimizer with learning rate ``lr`` and clears the gradients."""
        ...

    def zero_grad(self) -> None:
        """Drops the gradients without stepping (a skipped step)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state for a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned."""
        ...


class PlainEngine:
    """A PyTorch optimizer (SGD or AdamW) in this process, with bf16 autocast where configured.

    When a process group of more than one rank exists, the backbone is wrapped in ``DistributedDataParallel``
    (gradients averaged over ranks); ``model`` stays the unwrapped backbone, so checkpoints hold plain weights that
    load on any number of processes.

    Args:
        model: the backbone, already on ``device``.
        cfg: the ``[train]`` section (optimizer, momentum, weight decay, clipping, precision).
        device: where the model runs.
    """

    def __init__(self, model: nn.Module, cfg: TrainCfg, device: torch.device) -> None:
        self.model = model
        self.cfg = cfg
        self.device = device
        self.autocast_dtype = resolve_precision(cfg.precision, device)
        self._forward_module: nn.Module = model
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._forward_module = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        params = list(model.parameters())
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self._forward_module(images)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return float(nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads this engine's :meth:`state_dict`, or a DeepSpeed engine's (its optimizer state is by name)."""
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        elif "optimizer_by_name" in state:  # written by DeepSpeedEngine: resuming with engine.kind changed
            self.optimizer.load_state_dict(torch_state_from_names(self.model, self.optimizer,
                                                                 state["optimizer_by_name"]))
