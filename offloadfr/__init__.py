"""offloadfr: face-recognition training with millions to 100M identities on one GPU.

The public surface: configs, the component builders, and the trainer.
"""

from offloadfr.config import Config, load_config
from offloadfr.errors import ConfigError, DataError, OffloadFRError

__all__ = ["Config", "ConfigError", "DataError", "OffloadFRError", "load_config", "__version__"]

__version__ = "0.1.0"
