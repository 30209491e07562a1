"""The cache layer (L5): the device-resident Dynamic Class Container and the prefetcher that feeds it from a bank.

``DynamicClassContainer`` holds K rows per array on the device with an id -> slot map and LRU/FIFO eviction;
``Prefetcher`` moves rows between a ``ClassBank`` and the container in a background thread (reads ahead of the plan,
writes behind evictions, read-your-writes). ``offloadfr.cache.testing`` has bank wrappers for tests.
"""

from __future__ import annotations

from offloadfr.cache.container import DynamicClassContainer
from offloadfr.cache.prefetcher import Prefetcher

__all__ = ["DynamicClassContainer", "Prefetcher"]
