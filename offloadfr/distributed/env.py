"""Where this process runs: rank, world size and device, read from the launcher's environment (STYLE R2).

A world size of 1 is the plain path: no process group is created and no collective runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from offloadfr.errors import ConfigError

__all__ = ["DistEnv"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DistEnv:
    """Rank, world size and device of this process.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of training processes.
        local_rank: rank on this machine (selects the GPU).
        device: the device this process computes on.
        local_world_size: processes of this run on this machine (``LOCAL_WORLD_SIZE``, set by torchrun and
            accelerate; the world size when unset, as for a single-machine launch). They share its host memory.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that prints and writes run files (rank 0)."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> DistEnv:
        """Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (set by accelerate, torchrun or
        deepspeed launchers).

        Args:
            device: ``auto`` (a GPU when present, else the CPU), ``cpu`` or ``cuda``.

        Raises:
            ConfigError: ``device = "cuda"`` on a machine without a GPU.
        """
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError("run.device = 'cuda' but no CUDA GPU is visible; use run.device = 'auto' or 'cpu'")
        dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                   local_world_size=local_world_size)
