"""Scale-out on torch.distributed: expert parallelism and context parallelism.

- :func:`apply_expert_parallel` (:mod:`.expert`): routed experts as ``DTensor`` s sharded
  ``Shard(0)`` over an EP mesh (Distributed Checkpoint reshards them); each token sent once
  per destination rank and one weighted partial sum per (token, rank) returned
  (``bitwise=True``: one row per (token, slot), results bitwise independent of the EP size).
- :func:`apply_context_parallel` (:mod:`.context`): the sequence sharded over a CP mesh,
  attention through :func:`dasg_kernels.context_parallel.swa_attention_cp`; :func:`shift_labels_cp`
  (:mod:`.labels`): the next-token targets of a sharded batch.
- :mod:`.cost`: a cost model (a prediction) of both at 8 to 256 GPUs on NVLink and InfiniBand.
"""
from dasg_model.parallel.context import apply_context_parallel
from dasg_model.parallel.expert import apply_expert_parallel
from dasg_model.parallel.labels import shift_labels_cp

__all__ = ["apply_context_parallel", "apply_expert_parallel", "shift_labels_cp"]
