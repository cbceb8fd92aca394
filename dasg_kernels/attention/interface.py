"""Public attention ops: validation, backend dispatch, autograd.

The Triton path runs through the ``torch.library`` custom ops of :mod:`.ops`
(``torch.ops.dasg_kernels.swa_attention_fwd/bwd``), which carry the autograd
formula and fake implementations for ``torch.compile``.

``swa_attention`` / ``swa_attention_with_lse`` (training: forward + backward) and
``swa_decode`` (a few new queries against a KV cache, forward only). Inputs are
checked here, in Python, before any launch; errors name the argument.
"""
from __future__ import annotations

import torch

from dasg_kernels.attention import host, ops
from dasg_kernels.attention.checks import (
    SUPPORTED_HEAD_DIMS,
    check_summary_kv,
    pick_backend,
    validate_attention,
)
from dasg_kernels.backend import bf16_via_fp32, interpreted_bf16
from dasg_kernels.validation import check_last_dim_contiguous

__all__ = ["SUPPORTED_HEAD_DIMS", "swa_attention", "swa_attention_with_lse", "swa_decode"]


def swa_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: tuple[int, int] = (-1, -1),
    causal: bool = True,
    group_size: int | None = None,
    summaries: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`swa_attention`, also returning ``lse [B, Hq, T]`` (fp32, natural log).

    ``lse`` is ``-inf`` for a row that sees no key. It is not differentiable (the
    gradient flows through ``out`` only).
    """
    op = "swa_attention"
    left, right, scale = validate_attention(op, q, k, v, window=window, causal=causal, group_size=group_size,
                                              summaries=summaries, softmax_scale=softmax_scale, decode=False)
    be = pick_backend(op, backend, q, k, v)
    if be == "torch":  # blockwise PyTorch, O(T * (W + T/G)); reference.py stays the oracle
        from dasg_kernels.attention.blockwise import swa_attention_blockwise

        return swa_attention_blockwise(
            q, k, v, window=window, causal=causal, group_size=group_size,
            summaries=summaries, softmax_scale=scale,
        )

    def fwd(q, k, v):
        return ops.swa_attention_fwd(q, k, v, left, right, causal, group_size, summaries, scale)[:2]

    if interpreted_bf16(q):  # the gradients follow the casts
        return bf16_via_fp32(fwd, q, k, v)
    return fwd(q, k, v)


def swa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: tuple[int, int] = (-1, -1),
    causal: bool = True,
    group_size: int | None = None,
    summaries: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Grouped sliding-window attention with optional group summaries (GMHA).

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
            fp16, bf16 or fp32 (all the same); any strides with stride 1 in the last dim.
        window: ``(left, right)`` like flash-attn's ``window_size``: query ``i`` sees key
            ``j`` when ``i - left <= j <= i + right``; ``-1`` = unbounded.
        causal: forces ``right = 0``. ``window=(-1, -1), causal=True`` is full causal attention.
        group_size, summaries: with ``summaries=True`` each group ``[g*G, (g+1)*G)``
            contributes the mean of its keys and values; a query sees the summaries of the
            groups wholly before its window (and wholly after it when ``causal=False``),
            in the same softmax as its local keys.
        softmax_scale: default ``1/sqrt(D)``.
        backend: ``"auto" | "triton" | "torch"`` (see :mod:`dasg_kernels.backend`). The
            Triton kernels need ``D`` a multiple of 8, at most 256; ``auto`` uses the
            ``torch`` backend for other head dims: :mod:`dasg_kernels.attention.blockwise`,
            query blocks against their window's keys and visible summaries in fp32,
            ``O(T * (W + T/G))`` time and memory (``reference.swa_attention_ref`` is the
            readable oracle it is tested against).

    Returns:
        ``out [B, T, Hq, D]`` in ``q.dtype``; differentiable w.r.t. ``q, k, v``.
    """
    return swa_attention_with_lse(
        q, k, v, window=window, causal=causal, group_size=group_size,
        summaries=summaries, softmax_scale=softmax_scale, backend=backend,
    )[0]


def swa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    window: tuple[int, int] = (-1, -1),
    causal: bool = True,
    group_size: int | None = None,
    summaries: bool = False,
    softmax_scale: float | None = None,
    summary_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``Tq`` new queries against a KV cache (forward only).

    Args:
        q: ``[B, Tq, Hq, D]``, the queries at positions ``Tk - Tq, ..., Tk - 1``.
        k_cache, v_cache: ``[B, Tk, Hkv, D]`` holding every position so far (the new
            ones included), ``Tq <= Tk``.
        window, causal, group_size, summaries, softmax_scale, backend: as in
            :func:`swa_attention` (same semantics as ``reference.swa_attention_ref`` with
            its default ``q_offset = Tk - Tq``).
        summary_kv: optional ``(ks, vs)``, each ``[B, ceil(Tk/G), Hkv, D]``: the group
            means of the cache (``reference.group_means_ref`` semantics, the last group
            averaged over the positions it has; the Triton pooling kernel is
            ``dasg_kernels.attention.pool.group_means_fwd(k, v, G)``). Without it the summaries are pooled from
            the whole cache on every call, an ``O(Tk)`` pass; a generation loop should keep
            them up to date instead (only the last group changes per new token). The
            ``torch`` backend ignores it and pools from the cache.
        return_lse: also return ``lse [B, Hq, Tq]`` (fp32).

    Returns:
        ``out [B, Tq, Hq, D]`` (and ``lse`` when ``return_lse``). No autograd.
    """
    op = "swa_decode"
    left, right, scale = validate_attention(op, q, k_cache, v_cache, window=window, causal=causal,
                                              group_size=group_size, summaries=summaries,
                                              softmax_scale=softmax_scale, decode=True)
    if summary_kv is not None:
        check_summary_kv(op, summary_kv, k_cache, v_cache, group_size, summaries)
    be = pick_backend(op, backend, q, k_cache, v_cache)
    with torch.no_grad():
        if be == "torch":  # blockwise PyTorch; it pools the summaries from the cache itself
            from dasg_kernels.attention.blockwise import swa_attention_blockwise

            out, lse = swa_attention_blockwise(
                q, k_cache, v_cache, window=window, causal=causal, group_size=group_size,
                summaries=summaries, softmax_scale=scale,
            )
        else:
            if summary_kv is not None:
                check_last_dim_contiguous(op, k_summary=summary_kv[0], v_summary=summary_kv[1])
                host.check_row_stride(op, k_summary=summary_kv[0], v_summary=summary_kv[1])

            def fwd(q, k_cache, v_cache, k_summary, v_summary):
                return ops.swa_decode(q, k_cache, v_cache, k_summary, v_summary, left, right, causal, group_size,
                                      summaries, scale)

            tensors = (q, k_cache, v_cache, *(summary_kv or (None, None)))
            out, lse = bf16_via_fp32(fwd, *tensors) if interpreted_bf16(q) else fwd(*tensors)
    return (out, lse) if return_lse else out
