"""The trained backbone of a checkpoint, rebuilt from the checkpoint alone (its ``config.toml`` and ``state.pt``).

Both engines store the backbone weights under ``state["engine"]["model"]``: the plain engine its ``state_dict``, the
DeepSpeed engine the consolidated fp32 weights (every ZeRO stage), so one loader serves both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from offloadfr.config import Config
from offloadfr.errors import CheckpointError
from offloadfr.models import build_backbone
from offloadfr.train.checkpoint import load_checkpoint, load_checkpoint_config

__all__ = ["load_backbone"]


def load_backbone(checkpoint: str | Path) -> tuple[torch.nn.Module, Config, Path]:
    """Loads the backbone of a checkpoint, in eval mode on the CPU.

    Args:
        checkpoint: ``runs/<name>/checkpoints/step_N``, or a run directory (its newest checkpoint).

    Returns:
        The backbone, the run config saved with the checkpoint, and the checkpoint directory.

    Raises:
        CheckpointError: ``checkpoint`` is not a checkpoint, or its weights do not fit the backbone of its config.
    """
    cfg = load_checkpoint_config(checkpoint)
    state, ckpt_dir = load_checkpoint(checkpoint)
    model = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                           image_size=cfg.model.image_size)
    try:
        model.load_state_dict(state["engine"]["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds no weights for backbone {cfg.model.backbone!r} "
                              f"({type(e).__name__}: {str(e).splitlines()[0]}); pass a checkpoint written by "
                              "offloadfr train") from e
    return model.eval(), cfg, ckpt_dir
