"""Context parallelism for :class:`~dasg_model.DASGForCausalLM`: the sequence sharded over a CP mesh.

After :func:`apply_context_parallel` every rank of the CP group feeds its contiguous,
equal shard of each sequence (rank ``r`` of ``W`` holds positions
``[r * T_local, (r + 1) * T_local)`` of ``input_ids`` and of ``labels``, sliced alike):

- RoPE uses the global positions ``r * T_local + arange(T_local)``;
- every :class:`~dasg_model.GroupedMultiHeadAttention` runs through
  :func:`dasg_kernels.distributed.swa_attention_cp` (halo keys/values from the preceding
  ranks + the group means of all earlier shards, gradients sent back to their owners);
- the LM loss: the target of a shard's last position is the next rank's first label
  (the last rank's is ignored), and ``lm_loss`` on rank ``r`` is
  ``W * (its summed cross-entropy) / (targets counted over the group)``: the *mean* over
  the CP ranks equals the single-process ``lm_loss``, and gradients averaged over the CP
  ranks (``all_reduce(AVG)``, or DDP / FSDP over a dp x cp mesh) equal the single-process
  gradients. The MoE aux losses are each shard's own (load balance over its tokens).

Everything else (embeddings, norms, MoE) is position-wise and runs on the shard unchanged.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from dasg_kernels.distributed import resolve_group
from dasg_model.attention import GroupedMultiHeadAttention
from dasg_model.model import DASGForCausalLM, DASGModel

__all__ = ["apply_context_parallel", "remove_context_parallel"]


def apply_context_parallel(model: nn.Module, cp_mesh, *, validate: bool = True) -> nn.Module:
    """Shard the sequence of ``model`` over ``cp_mesh`` (in place; returns ``model``).

    Args:
        model: a :class:`~dasg_model.DASGForCausalLM` (or a :class:`~dasg_model.DASGModel`).
        cp_mesh: a 1-D ``torch.distributed.device_mesh.DeviceMesh`` (e.g. ``mesh["cp"]`` of a
            dp x cp mesh) or a ``ProcessGroup``; every rank of it runs the model on its shard.
        validate: each attention call checks with one tiny all-gather (a host sync) that all
            ranks passed the same shapes; ``False`` skips it.

    Call it after any ``copy.deepcopy`` of the model (a process group does not copy).
    Undo with :func:`remove_context_parallel`.
    """
    if not isinstance(model, (DASGForCausalLM, DASGModel)):
        raise TypeError(f"apply_context_parallel: model must be a DASGForCausalLM or DASGModel, "
                        f"got {type(model).__name__}")
    if not isinstance(validate, bool):
        raise TypeError(f"apply_context_parallel: validate must be a bool, got {type(validate).__name__}")
    group = resolve_group(cp_mesh, op="apply_context_parallel", name="cp_mesh")
    base = model.model if isinstance(model, DASGForCausalLM) else model
    base.cp_group = group
    n = 0
    for m in model.modules():
        if isinstance(m, GroupedMultiHeadAttention):
            m.cp_group = group
            m.cp_validate = validate
            n += 1
    if n == 0:
        raise ValueError("apply_context_parallel: model has no GroupedMultiHeadAttention layer")
    model.cp_size = dist.get_world_size(group)
    return model


def remove_context_parallel(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_context_parallel`: the model runs on whole sequences again."""
    for m in model.modules():
        if isinstance(m, (GroupedMultiHeadAttention, DASGModel)):
            m.cp_group = None
    if hasattr(model, "cp_size"):
        del model.cp_size
    return model
