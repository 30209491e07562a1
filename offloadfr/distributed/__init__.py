"""Process topology and model-parallel primitives (the only layer that touches torch.distributed).

With one process (no process group) every primitive is the plain operation and runs no collective (STYLE R2).
"""

from offloadfr.distributed.collectives import (
    all_gather_labels,
    all_gather_rows,
    all_gather_with_grad,
    all_reduce_sum_,
    check_process_group,
    gather_batch_sizes,
    gather_rows_to_main,
    process_group_size,
)
from offloadfr.distributed.env import DistEnv
from offloadfr.distributed.group import (
    all_gather_objects,
    barrier,
    check_launch,
    destroy_process_group,
    init_process_group,
)
from offloadfr.distributed.partition import ClassPartition
from offloadfr.distributed.sharded_ce import sharded_softmax_cross_entropy

__all__ = [
    "DistEnv",
    "ClassPartition",
    "all_gather_with_grad",
    "all_gather_labels",
    "all_gather_rows",
    "all_reduce_sum_",
    "all_gather_objects",
    "barrier",
    "check_launch",
    "init_process_group",
    "destroy_process_group",
    "gather_batch_sizes",
    "gather_rows_to_main",
    "check_process_group",
    "process_group_size",
    "sharded_softmax_cross_entropy",
]
