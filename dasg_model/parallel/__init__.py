"""Scale-out on torch.distributed: expert parallelism and context parallelism.

- :func:`apply_expert_parallel` (:mod:`.expert`): routed experts sharded over an EP mesh,
  tokens exchanged with two all-to-alls.
- :func:`apply_context_parallel` (:mod:`.context`): the sequence sharded over a CP mesh,
  attention through :func:`dasg_kernels.distributed.swa_attention_cp`.
"""
from dasg_model.parallel.context import apply_context_parallel
from dasg_model.parallel.expert import apply_expert_parallel

__all__ = ["apply_context_parallel", "apply_expert_parallel"]
