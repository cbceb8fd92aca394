"""The Triton attention launchers as ``torch.library`` custom ops.

``torch.ops.dasg_kernels.swa_attention_fwd`` / ``swa_attention_bwd`` wrap
:func:`~dasg_kernels.attention.fwd.swa_fwd` and :func:`~dasg_kernels.attention.bwd.swa_bwd`
with fake (meta) implementations and an autograd formula, so ``torch.compile`` sees one
opaque op per call (no graph break at the Triton launch) and eager autograd works the
same way; ``swa_attention_varlen_fwd/bwd`` do the same for packed batches, and
``swa_decode`` and ``bounded_cache_attention`` (forward only) for decoding against a
KV cache and a bounded cache. Every launcher is imported inside its op, so importing
this module loads no Triton kernel. Validation happens before, in the public
interface (:mod:`.interface`, :mod:`.varlen`, :mod:`.kvcache`; :mod:`.checks`).

(No ``from __future__ import annotations`` here: ``custom_op`` reads the annotations
to build the op schema.)
"""
from typing import Optional

import torch
from torch import Tensor

_EMPTY_SHAPE = (0,)


def _uses_summaries(left: int, right: int, causal: bool, summaries: bool) -> bool:
    from dasg_kernels.attention.host import summary_flags

    before, after = summary_flags(left, right, causal, summaries)
    return before or after


def _fake_summaries(q, k, v, b, n_keys, left, right, causal, group_size, summaries):
    """Fake pooled summaries ``[B, ceil(n_keys/G), Hkv, D | Dv]`` (empty when no query sees one)."""
    if not _uses_summaries(left, right, causal, summaries):
        return q.new_empty(_EMPTY_SHAPE), q.new_empty(_EMPTY_SHAPE)
    ng = (n_keys + group_size - 1) // group_size  # works for SymInts too
    hkv = k.shape[-2]
    return k.new_empty((b, ng, hkv, k.shape[-1])), v.new_empty((b, ng, hkv, v.shape[-1]))


@torch.library.custom_op("dasg_kernels::swa_attention_fwd", mutates_args=())
def swa_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, left: int, right: int, causal: bool,
    group_size: Optional[int], summaries: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> ``out [B,T,Hq,D]``, ``lse [B,Hq,T]`` fp32, pooled ``ks, vs [B,ceil(T/G),Hkv,D]`` (empty when unused)."""
    from dasg_kernels.attention.fwd import swa_fwd

    out, lse, ks, vs = swa_fwd(q, k, v, left=left, right=right, causal=causal, group_size=group_size,
                               summaries=summaries, scale=scale)
    if ks is None:
        ks, vs = q.new_empty(_EMPTY_SHAPE), q.new_empty(_EMPTY_SHAPE)
    return out, lse, ks, vs


@swa_attention_fwd.register_fake
def _swa_attention_fwd_fake(q, k, v, left, right, causal, group_size, summaries, scale):
    b, t, hq, _ = q.shape
    out = q.new_empty((b, t, hq, v.shape[3]))
    lse = q.new_empty((b, hq, t), dtype=torch.float32)
    ks, vs = _fake_summaries(q, k, v, b, t, left, right, causal, group_size, summaries)
    return out, lse, ks, vs


@torch.library.custom_op("dasg_kernels::swa_attention_bwd", mutates_args=())
def swa_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, ks: Tensor, vs: Tensor,
    left: int, right: int, causal: bool, group_size: Optional[int], summaries: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> ``dq, dk, dv`` (``ks, vs`` are the forward's pooled summaries, empty when unused)."""
    from dasg_kernels.attention.bwd import swa_bwd

    use = _uses_summaries(left, right, causal, summaries)
    return swa_bwd(dout, q, k, v, out, lse, ks if use else None, vs if use else None,
                   left=left, right=right, causal=causal, group_size=group_size,
                   summaries=summaries, scale=scale)


@swa_attention_bwd.register_fake
def _swa_attention_bwd_fake(dout, q, k, v, out, lse, ks, vs, left, right, causal, group_size, summaries, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, left, right, causal, group_size, summaries, scale = inputs
    out, lse, ks, vs = output
    ctx.save_for_backward(q, k, v, out, lse, ks, vs)
    ctx.args = (left, right, causal, group_size, summaries, scale)
    ctx.mark_non_differentiable(lse, ks, vs)


def _backward(ctx, dout, dlse, dks, dvs):
    q, k, v, out, lse, ks, vs = ctx.saved_tensors
    dq, dk, dv = swa_attention_bwd(dout, q, k, v, out, lse, ks, vs, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


swa_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- varlen


def _varlen(cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int):
    from dasg_kernels.attention.host import Varlen

    return Varlen(cu_q, cu_k, max_q, max_k)


@torch.library.custom_op("dasg_kernels::swa_attention_varlen_fwd", mutates_args=())
def swa_attention_varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    left: int, right: int, causal: bool, group_size: Optional[int], summaries: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> ``out [total_q,Hq,D]``, ``lse [Hq,total_q]`` fp32, pooled ``ks, vs [B,ceil(max_k/G),Hkv,D]``."""
    from dasg_kernels.attention.fwd import swa_fwd

    out, lse, ks, vs = swa_fwd(q, k, v, left=left, right=right, causal=causal, group_size=group_size,
                               summaries=summaries, scale=scale, varlen=_varlen(cu_q, cu_k, max_q, max_k))
    if ks is None:
        ks, vs = q.new_empty(_EMPTY_SHAPE), q.new_empty(_EMPTY_SHAPE)
    return out, lse, ks, vs


@swa_attention_varlen_fwd.register_fake
def _swa_attention_varlen_fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, left, right, causal, group_size,
                                   summaries, scale):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    ks, vs = _fake_summaries(q, k, v, cu_k.shape[0] - 1, max_k, left, right, causal, group_size, summaries)
    return out, lse, ks, vs


@torch.library.custom_op("dasg_kernels::swa_attention_varlen_bwd", mutates_args=())
def swa_attention_varlen_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, ks: Tensor, vs: Tensor,
    cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    left: int, right: int, causal: bool, group_size: Optional[int], summaries: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> ``dq, dk, dv`` of the packed batch (needs ``cu_q == cu_k``)."""
    from dasg_kernels.attention.bwd import swa_bwd

    use = _uses_summaries(left, right, causal, summaries)
    return swa_bwd(dout, q, k, v, out, lse, ks if use else None, vs if use else None,
                   left=left, right=right, causal=causal, group_size=group_size,
                   summaries=summaries, scale=scale, varlen=_varlen(cu_q, cu_k, max_q, max_k))


@swa_attention_varlen_bwd.register_fake
def _swa_attention_varlen_bwd_fake(dout, q, k, v, out, lse, ks, vs, cu_q, cu_k, max_q, max_k, left, right,
                                   causal, group_size, summaries, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, left, right, causal, group_size, summaries, scale = inputs
    out, lse, ks, vs = output
    ctx.save_for_backward(q, k, v, out, lse, ks, vs, cu_q, cu_k)
    ctx.args = (max_q, max_k, left, right, causal, group_size, summaries, scale)
    ctx.mark_non_differentiable(lse, ks, vs)


def _varlen_backward(ctx, dout, dlse, dks, dvs):
    q, k, v, out, lse, ks, vs, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = swa_attention_varlen_bwd(dout, q, k, v, out, lse, ks, vs, cu_q, cu_k, *ctx.args)
    return (dq, dk, dv) + (None,) * 10


swa_attention_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


# --------------------------------------------------------------------------- decode


@torch.library.custom_op("dasg_kernels::swa_decode", mutates_args=())
def swa_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k_summary: Optional[Tensor], v_summary: Optional[Tensor],
    left: int, right: int, causal: bool, group_size: Optional[int], summaries: bool, scale: float,
) -> tuple[Tensor, Tensor]:
    """:func:`~dasg_kernels.attention.decode.swa_decode_fwd` as an opaque op, forward only
    (``k_summary``/``v_summary``: the cache's group means, or ``None`` to pool them)
    -> ``out [B,Tq,Hq,Dv]``, ``lse [B,Hq,Tq]`` fp32."""
    from dasg_kernels.attention.decode import swa_decode_fwd

    summary_kv = None if k_summary is None else (k_summary, v_summary)
    return swa_decode_fwd(q, k_cache, v_cache, left=left, right=right, causal=causal, group_size=group_size,
                          summaries=summaries, scale=scale, summary_kv=summary_kv)


@swa_decode.register_fake
def _swa_decode_fake(q, k_cache, v_cache, k_summary, v_summary, left, right, causal, group_size, summaries,
                     scale):
    b, tq, hq, _ = q.shape
    return q.new_empty((b, tq, hq, v_cache.shape[3])), q.new_empty((b, hq, tq), dtype=torch.float32)


# --------------------------------------------------------------------------- bounded cache


@torch.library.custom_op("dasg_kernels::bounded_cache_attention", mutates_args=())
def bounded_cache_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k_means: Optional[Tensor], v_means: Optional[Tensor],
    cache_seqlens: Tensor, seq_offset: int, left: int, group_size: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """:func:`~dasg_kernels.attention.bounded_cache.bounded_cache_attention_fwd` as an opaque op
    (``k_means``/``v_means`` ``None`` without summaries) -> ``out [B,Tq,Hq,D]``, ``lse [B,Hq,Tq]`` fp32."""
    from dasg_kernels.attention.bounded_cache import bounded_cache_attention_fwd

    summary = None if k_means is None else (k_means, v_means)
    return bounded_cache_attention_fwd(q, k_cache, v_cache, summary, cache_seqlens, seq_offset=seq_offset,
                                       left=left, group_size=group_size, scale=scale)


@bounded_cache_attention.register_fake
def _bounded_cache_attention_fake(q, k_cache, v_cache, k_means, v_means, cache_seqlens, seq_offset, left,
                                  group_size, scale):
    b, tq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, tq), dtype=torch.float32)
