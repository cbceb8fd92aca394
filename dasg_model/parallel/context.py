"""Context parallelism for :class:`~dasg_model.DASGForCausalLM`: the sequence sharded over a CP mesh.

After :func:`apply_context_parallel` every rank of the CP group feeds its equal shard of
each sequence, ``input_ids`` and ``labels`` sliced alike
(:func:`dasg_kernels.context_parallel.cp_shard`): with ``layout="contiguous"`` rank ``r`` of
``W`` holds the positions ``[r * T_local, (r + 1) * T_local)``; with ``layout="zigzag"``
the chunks ``r`` and ``2W - 1 - r`` of ``T_local / 2`` positions, which balances the
attention work over the ranks (later queries see more group summaries; within 6% at
T=128k, W=2048, G=256 over 8 ranks, against 30% contiguous, by
:func:`dasg_model.parallel.cost.cp_rank_work`).

- RoPE uses the shard's global positions (:func:`dasg_kernels.context_parallel.cp_positions`);
- every :class:`~dasg_model.GroupedMultiHeadAttention` runs through
  :func:`dasg_kernels.context_parallel.swa_attention_cp` (halo keys/values from the chunks
  before each of the rank's chunks + the group means it reads, gradients sent back to
  their owners);
- the LM loss: the target of a chunk's last position is the next chunk's first label
  (the sequence's last one is ignored; :func:`~dasg_model.parallel.shift_labels_cp`), and
  ``lm_loss`` on rank ``r`` is ``W * (its summed cross-entropy) / (targets counted over the
  group)``: the *mean* over the CP ranks equals the single-process ``lm_loss``, and
  gradients averaged over the CP ranks (``all_reduce(AVG)``, or DDP / FSDP over a dp x cp
  mesh) equal the single-process gradients. The MoE aux losses are each shard's own (load balance over its tokens).

Everything else (embeddings, norms, MoE) is position-wise and runs on the shard unchanged.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from dasg_kernels.context_parallel import check_cp_layout, resolve_group
from dasg_model.attention import GroupedMultiHeadAttention

__all__ = ["apply_context_parallel", "remove_context_parallel"]


def apply_context_parallel(model: nn.Module, cp_mesh, *, layout: str = "contiguous",
                           validate: bool = True) -> nn.Module:
    """Shard the sequence of ``model`` over ``cp_mesh`` (in place; returns ``model``).

    Args:
        model: a :class:`~dasg_model.DASGForCausalLM` (or a :class:`~dasg_model.DASGModel`).
        cp_mesh: a 1-D ``torch.distributed.device_mesh.DeviceMesh`` (e.g. ``mesh["cp"]`` of a
            dp x cp mesh) or a ``ProcessGroup``; every rank of it runs the model on its shard.
        layout: ``"contiguous"`` or ``"zigzag"`` (see above; zigzag needs an even shard
            length, and is needed for an unbounded attention window).
        validate: each attention call checks with one all-reduce of a few ints that all
            ranks passed the same shapes (no host sync on CUDA, see
            :func:`~dasg_kernels.context_parallel.swa_attention_cp`); ``False`` skips it.

    Call it after any ``copy.deepcopy`` of the model (a process group does not copy).
    Undo with :func:`remove_context_parallel`.
    """
    # imported here: dasg_model.model imports this package (for shift_labels_cp)
    from dasg_model.model import DASGForCausalLM, DASGModel

    if not isinstance(model, (DASGForCausalLM, DASGModel)):
        raise TypeError(f"apply_context_parallel: model must be a DASGForCausalLM or DASGModel, "
                        f"got {type(model).__name__}")
    if not isinstance(validate, bool):
        raise TypeError(f"apply_context_parallel: validate must be a bool, got {type(validate).__name__}")
    check_cp_layout("apply_context_parallel", layout)
    group = resolve_group(cp_mesh, op="apply_context_parallel", name="cp_mesh")
    base = model.model if isinstance(model, DASGForCausalLM) else model
    base.cp_group = group
    base.cp_layout = layout
    n = 0
    for m in model.modules():
        if isinstance(m, GroupedMultiHeadAttention):
            m.cp_group = group
            m.cp_validate = validate
            m.cp_layout = layout
            n += 1
    if n == 0:
        raise ValueError("apply_context_parallel: model has no GroupedMultiHeadAttention layer")
    model.cp_size = dist.get_world_size(group)
    return model


def remove_context_parallel(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_context_parallel`: the model runs on whole sequences again."""
    from dasg_model.model import DASGModel

    for m in model.modules():
        if isinstance(m, (GroupedMultiHeadAttention, DASGModel)):
            m.cp_group = None
            m.cp_layout = "contiguous"
    if hasattr(model, "cp_size"):
        del model.cp_size
    return model
