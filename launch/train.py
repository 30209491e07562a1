"""Entry for ``accelerate launch launch/train.py [--config ds_configs/runs/X.toml] [--set section.key=value ...]``.

With no arguments it trains ``ds_configs/runs/synth_tiny.toml``. ``python launch/train.py`` is the same single
process. It is ``offloadfr train`` under another name.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from offloadfr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
