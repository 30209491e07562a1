"""Tools around a finished run: ``plot`` (PNGs of metrics and ROC), ``export`` (ONNX, TorchScript, state dict),
``embed`` (embeddings of image files) and ``inspect`` (a bank or a run directory, readable or JSON).

Each module has one job and is reached from the ``offloadfr`` command (``offloadfr plot|export|embed|inspect``).
Optional packages (matplotlib, onnx, onnxruntime) are imported only by the command that needs them, through
:func:`require`, so a missing extra is one clear error, not a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from offloadfr.errors import OffloadFRError

__all__ = ["MissingExtraError", "ExportError", "require"]


class MissingExtraError(OffloadFRError, ImportError):
    """A command needs an optional package that is not installed."""


class ExportError(OffloadFRError, RuntimeError):
    """An exported model does not reproduce the PyTorch model (outputs differ beyond the tolerance)."""


def require(module: str, extra: str) -> ModuleType:
    """Imports ``module``, or raises :class:`MissingExtraError` naming the extra that installs it.

    Args:
        module: the module to import, e.g. ``"matplotlib.pyplot"``.
        extra: the offloadfr extra that provides it, e.g. ``"plot"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{module} is not installed ({e}); pip install 'offloadfr[{extra}]' "
                                f"(or -e '.[{extra}]' in a checkout)") from e
