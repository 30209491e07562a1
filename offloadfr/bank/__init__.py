"""The class-center bank: every identity's rows (centers, momentum) addressed by global class id.

``ClassBank`` is the interface; ``MemoryBank`` is the in-memory reference; ``ZarrBank`` persists a bank as a Zarr
group served from RAM or block by block (``open_bank`` creates or opens one from a ``BankCfg``); ``initial_rows`` is
the deterministic per-id initialiser every bank and the ``fc`` head share.
"""

from __future__ import annotations

from offloadfr.bank.base import ClassBank
from offloadfr.bank.init import initial_rows
from offloadfr.bank.layout import auto_chunk_rows
from offloadfr.bank.memory import MemoryBank
from offloadfr.bank.zarr_bank import ZarrBank, open_bank

__all__ = ["ClassBank", "MemoryBank", "ZarrBank", "auto_chunk_rows", "initial_rows", "open_bank"]
