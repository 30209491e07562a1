"""Process topology (the only layer that touches torch.distributed)."""

from offloadfr.dist.env import DistEnv

__all__ = ["DistEnv"]
