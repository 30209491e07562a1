"""Shared test settings: the device under test, and GPU tests skipped without a GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# On the CPU, Triton kernels (head.kernel = "triton") run only in Triton's interpreter, which must be switched on
# before triton is first imported; on a GPU (OFFLOADFR_TEST_DEVICE=cuda) the same tests run the compiled kernels.
if os.environ.get("OFFLOADFR_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = torch.device(os.environ.get("OFFLOADFR_TEST_DEVICE", "cpu"))

_DIST_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR",
                  "TORCH_EXTENSIONS_DIR")


@contextmanager
def single_process_afterwards() -> Iterator[None]:
    """A DeepSpeed engine sets the distributed variables and opens a 1-rank process group: undo both on the way out,
    so later tests still see a plain single process (STYLE R2)."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV_KEYS}
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
