"""Creating the process group from a launcher's environment, and refusing launches that would train replicas.

``accelerate launch``, ``torchrun`` and the ``deepspeed`` launcher set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_process_group` joins that group (gloo on the CPU, NCCL on CUDA).

The trap (reference/env-notes.md §4): on a machine without CUDA, ``accelerate launch --multi_gpu --num_processes 2``
without ``ACCELERATE_USE_CPU=1`` starts 2 processes whose accelerate state is ``DistributedType.NO`` with
``num_processes = 1`` each: 2 independent 1-process trainings, silently. :func:`check_launch` refuses it, and also
refuses an MPI launch (``mpirun``, accelerate's MULTI_CPU path) that sets only MPI's rank variables, where every
process would read ``WORLD_SIZE = 1``.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from offloadfr.distributed.collectives import check_process_group
from offloadfr.distributed.env import DistEnv
from offloadfr.errors import ConfigError

__all__ = ["check_launch", "init_process_group", "barrier", "all_gather_objects", "destroy_process_group"]

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "y", "on")


def check_launch(environ: Mapping[str, str] | None = None, *, cuda_available: bool | None = None) -> None:
    """Refuses a launch whose processes would train as independent replicas.

    Args:
        environ: the process environment (``os.environ`` when None).
        cuda_available: whether CUDA is usable (``torch.cuda.is_available()`` when None).

    Raises:
        ConfigError: accelerate started several processes on a machine without CUDA and ``ACCELERATE_USE_CPU`` is not
            set, or an MPI launcher started several processes without ``WORLD_SIZE``.
    """
    env = os.environ if environ is None else environ
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    world = int(env.get("WORLD_SIZE", "1"))
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env
    if world > 1 and launched_by_accelerate and not cuda and not _true(env.get("ACCELERATE_USE_CPU")):
        raise ConfigError(
            f"accelerate started {world} processes on a machine without CUDA but ACCELERATE_USE_CPU is not set, so "
            "accelerate treats them as independent 1-process runs; launch with ACCELERATE_USE_CPU=1 accelerate "
            f"launch --multi_gpu --num_processes {world} launch/train.py ...")
    if "WORLD_SIZE" not in env:
        for var in _MPI_SIZE_VARS:
            if int(env.get(var, "1") or "1") > 1:
                raise ConfigError(
                    f"{var} = {env[var]} but WORLD_SIZE is unset, so every process would train alone; launch with "
                    "accelerate launch --multi_gpu (ACCELERATE_USE_CPU=1 on the CPU) or torchrun, which set RANK and "
                    "WORLD_SIZE")


def init_process_group(env: DistEnv, *, timeout_s: float = 1800.0) -> bool:
    """Joins the launcher's process group when ``env.world_size > 1`` (gloo on the CPU, NCCL on CUDA).

    Args:
        env: rank, world size and device of this process.
        timeout_s: how long a collective may wait for the other ranks before failing.

    Returns:
        True when this call created the group (the caller destroys it with :func:`destroy_process_group`); False on
        the 1-process path or when a group already existed (DeepSpeed or a test made it).

    Raises:
        ConfigError: ``MASTER_ADDR``/``MASTER_PORT`` are missing, or the group disagrees with ``env``.
    """
    if env.world_size == 1:
        return False
    created = False
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE = {env.world_size} but {', '.join(missing)} unset; launch with "
                              "accelerate launch or torchrun, which set them")
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        created = True
    check_process_group(env)
    return created


def barrier() -> None:
    """Waits for every rank; nothing on the 1-process path."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order; ``[obj]`` on the 1-process path."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy_process_group() -> None:
    """Leaves the process group (if any).

    Objects of the finished run that still hold collective work (DDP's reducer, DeepSpeed's engine) can sit in
    reference cycles; collected only at interpreter shutdown, gloo's worker threads then meet a half-torn-down
    interpreter and the process aborts ("terminate called without an active exception", exit -6). So they are
    collected here, while the interpreter is whole, before the group goes.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # no barrier: on an error path the other ranks may never reach one
        dist.destroy_process_group()
