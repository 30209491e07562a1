"""Shared test settings: the device under test, and GPU tests skipped without a GPU."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("OFFLOADFR_TEST_DEVICE", "cpu"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
