"""The compatible import path of :mod:`dasg_kernels.context_parallel` (context parallelism):
``from dasg_kernels.distributed import swa_attention_cp`` and the other names below keep
working. New code imports :mod:`dasg_kernels.context_parallel`. The next-token targets of a
sharded batch (``shift_labels_cp``) are the model's: :func:`dasg_model.parallel.shift_labels_cp`.
"""
from dasg_kernels.context_parallel import (
    CP_LAYOUTS,
    CPGeometry,
    CommCounter,
    check_cp_layout,
    cp_comm_stats,
    cp_exchange_plan,
    cp_exchange_rows,
    cp_positions,
    cp_shard,
    resolve_group,
    swa_attention_cp,
)

__all__ = ["CP_LAYOUTS", "CPGeometry", "CommCounter", "check_cp_layout", "cp_comm_stats", "cp_exchange_plan",
           "cp_exchange_rows", "cp_positions", "cp_shard", "resolve_group", "swa_attention_cp"]
