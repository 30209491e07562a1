"""Datasets (DESIGN §6): identity-grouped WebDataset shards, the synthetic face dataset, the training loader and
verification packs.

- :mod:`offloadfr.data.shards`: the shard format, ``index.json`` (:func:`read_index`) and :class:`ShardWriter`;
- :mod:`offloadfr.data.synth`: :func:`generate_synthetic` (``offloadfr synth``);
- :mod:`offloadfr.data.loader`: :func:`build_train_loader`, exact batches per epoch on every rank;
- :mod:`offloadfr.data.samplers`: the planned samplers of ``data.sampler`` (identity P×K, attention, dual, block);
- :mod:`offloadfr.data.pairs`: ``pairs.bin`` / ``lfw.bin``-style verification packs.
"""

from __future__ import annotations

from offloadfr.data.loader import TrainLoader, build_train_loader
from offloadfr.data.pairs import decode_images, read_pairs_bin, write_pairs_bin
from offloadfr.data.shards import DatasetIndex, ShardInfo, ShardWriter, read_index
from offloadfr.data.synth import generate_synthetic

__all__ = [
    "DatasetIndex",
    "ShardInfo",
    "ShardWriter",
    "read_index",
    "generate_synthetic",
    "TrainLoader",
    "build_train_loader",
    "read_pairs_bin",
    "write_pairs_bin",
    "decode_images",
]
