"""Public attention ops: validation, backend dispatch, autograd.

The Triton path runs through the ``torch.library`` custom ops of :mod:`.ops`
(``torch.ops.dasg_kernels.swa_attention_fwd/bwd``), which carry the autograd
formula and fake implementations for ``torch.compile``.

``swa_attention`` / ``swa_attention_with_lse`` (training: forward + backward) and
``swa_decode`` (a few new queries against a KV cache, forward only). Inputs are
checked here, in Python, before any launch; errors name the argument.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from dasg_kernels import reference
from dasg_kernels.attention import host, ops
from dasg_kernels.backend import interpreted_bf16, resolve_backend
from dasg_kernels.validation import (
    FLOAT_DTYPES,
    check_int,
    check_last_dim_contiguous,
    check_same,
    check_tensor,
)

#: Head dims the Triton kernels support: every multiple of 8 up to 256 (``BLOCK_D`` is the
#: next power of two >= 16; the extra columns are masked in the kernels, never copied).
SUPPORTED_HEAD_DIMS: tuple[int, ...] = tuple(range(8, 257, 8))


def _check_window(op: str, window: object) -> tuple[int, int]:
    if not isinstance(window, Sequence) or isinstance(window, (str, bytes)) or len(window) != 2:
        raise TypeError(f"{op}: window must be a (left, right) pair of ints, got {window!r}")
    out = []
    for name, w in zip(("window[0] (left)", "window[1] (right)"), window):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{op}: {name} must be an int (-1 = unbounded, or >= 0), got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"{op}: {name} must be -1 (unbounded) or >= 0, got {w}")
        out.append(w)
    return out[0], out[1]


def _validate(
    op: str,
    q: object,
    k: object,
    v: object,
    *,
    window: object,
    causal: object,
    group_size: object,
    summaries: object,
    softmax_scale: object,
    decode: bool,
) -> tuple[int, int, float]:
    """Check every argument; return ``(left, right, scale)`` with ``causal`` applied to ``right``."""
    q = check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, op=op)
    kname, vname = ("k_cache", "v_cache") if decode else ("k", "v")
    k = check_tensor(kname, k, ndim=4, dtypes=FLOAT_DTYPES, op=op)
    v = check_tensor(vname, v, ndim=4, dtypes=FLOAT_DTYPES, op=op)
    check_same(op, "dtype", **{"q": q, kname: k, vname: v})
    check_same(op, "device", **{"q": q, kname: k, vname: v})
    b, tq, hq, d = q.shape
    if tuple(k.shape[:-1]) != tuple(v.shape[:-1]):
        raise ValueError(f"{op}: {kname} and {vname} must have the same shape but for the head dim, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, tk, hkv, dk = k.shape
    if bk != b:
        raise ValueError(f"{op}: {kname} must have batch size {b} (from q), got {bk}")
    if decode:
        if tq > tk:
            raise ValueError(f"{op}: q has {tq} positions but the cache only {tk}; "
                             f"q must be the last Tq <= Tk positions")
    elif tk != tq:
        raise ValueError(f"{op}: {kname} must have sequence length {tq} (from q), got {tk}")
    if dk != d:
        raise ValueError(f"{op}: {kname} must have head dim {d} (from q), got {dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: q heads ({hq}) must be a multiple of {kname} heads ({hkv})")
    return _check_options(op, d, window=window, causal=causal, group_size=group_size, summaries=summaries,
                          softmax_scale=softmax_scale)


def _check_options(
    op: str, d: int, *, window: object, causal: object, group_size: object, summaries: object,
    softmax_scale: object,
) -> tuple[int, int, float]:
    """The non-tensor arguments; ``d`` is the q/k head dim (default scale ``1/sqrt(d)``)."""
    left, right = _check_window(op, window)
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    if not isinstance(summaries, bool):
        raise TypeError(f"{op}: summaries must be a bool, got {type(summaries).__name__}")
    if summaries and group_size is None:
        raise ValueError(f"{op}: summaries=True needs group_size (a positive int)")
    if group_size is not None:
        check_int(op, "group_size", group_size, low=1)
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"{op}: softmax_scale must be a float > 0 or None, got {type(softmax_scale).__name__}")
        scale = float(softmax_scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"{op}: softmax_scale must be a finite float > 0, got {softmax_scale}")
    if causal:
        right = 0
    return left, right, scale


def _pick_backend(op: str, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """``resolve_backend`` plus the kernels' own limits (head dim, unit last stride).

    ``backend="auto"`` falls back to the reference for a head dim the kernels do not
    support; ``backend="triton"`` raises instead.
    """
    be = head_dim_backend(op, backend, q, k, v)
    if be != "triton":
        return be
    names = ("q", "k_cache", "v_cache") if op == "swa_decode" else ("q", "k", "v")
    check_last_dim_contiguous(op, **dict(zip(names, (q, k, v))))
    host.check_row_stride(op, **dict(zip(names, (q, k, v))))
    b, hq, hkv = q.shape[0], q.shape[2], k.shape[2]
    if op == "swa_decode" and hq != hkv:  # decode packs the q heads of a kv head into one program
        host.check_grid(op, b * hkv, "batch * kv heads")
    else:
        host.check_grid(op, b * hq, "batch * q heads")
    return be


def _unsupported_head_dim(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot take these head dims (``None``: they can)."""
    for what, d in (("q/k head dim", q.shape[-1]), ("value head dim", v.shape[-1])):
        if d not in SUPPORTED_HEAD_DIMS:
            return f"the Triton kernels need a {what} that is a multiple of 8 and <= 256, got {d}"
    return None


def head_dim_backend(op: str, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """``resolve_backend``, then ``"torch"`` (``backend="auto"``) or a ``ValueError``
    (``"triton"``) for head dims the kernels lack."""
    be = resolve_backend(backend, q, k, v, op=op)
    bad = _unsupported_head_dim(q, v) if be == "triton" else None
    if bad:
        if backend == "auto":
            return "torch"
        raise ValueError(f"{op}: {bad} (use backend='torch' for other head dims)")
    return be


def _check_summary_kv(op, summary_kv, k_cache, v_cache, group_size, summaries) -> None:
    if not summaries:
        raise ValueError(f"{op}: summary_kv is only used with summaries=True")
    if not isinstance(summary_kv, (tuple, list)) or len(summary_kv) != 2:
        raise TypeError(f"{op}: summary_kv must be a (k_summary, v_summary) pair of tensors")
    b, tk, hkv, d = k_cache.shape
    ng = (tk + group_size - 1) // group_size
    for name, t, dd in zip(("k_summary", "v_summary"), summary_kv, (d, v_cache.shape[-1])):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, op=op)
        expected = (b, ng, hkv, dd)
        if tuple(t.shape) != expected:
            raise ValueError(f"{op}: {name} must have shape {expected} ([B, ceil(Tk/G), Hkv, head dim]), "
                             f"got {tuple(t.shape)}")
    check_same(op, "dtype", k_cache=k_cache, k_summary=summary_kv[0], v_summary=summary_kv[1])
    check_same(op, "device", k_cache=k_cache, k_summary=summary_kv[0], v_summary=summary_kv[1])


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
    left, right, scale = _validate(op, q, k, v, window=window, causal=causal, group_size=group_size,
                                   summaries=summaries, softmax_scale=softmax_scale, decode=False)
    be = _pick_backend(op, backend, q, k, v)
    if be == "torch":  # blockwise PyTorch, O(T * (W + T/G)); reference.py stays the oracle
        from dasg_kernels.attention.blockwise import swa_attention_blockwise

        return swa_attention_blockwise(
            q, k, v, window=window, causal=causal, group_size=group_size,
            summaries=summaries, softmax_scale=scale,
        )
    if interpreted_bf16(q):  # the gradients follow the casts
        out, lse = swa_attention_with_lse(q.float(), k.float(), v.float(), window=window, causal=causal,
                                          group_size=group_size, summaries=summaries, softmax_scale=scale,
                                          backend="triton")
        return out.to(q.dtype), lse
    out, lse, _, _ = ops.swa_attention_fwd(q, k, v, left, right, causal, group_size, summaries, scale)
    return out, lse


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
    left, right, scale = _validate(op, q, k_cache, v_cache, window=window, causal=causal,
                                   group_size=group_size, summaries=summaries,
                                   softmax_scale=softmax_scale, decode=True)
    if summary_kv is not None:
        _check_summary_kv(op, summary_kv, k_cache, v_cache, group_size, summaries)
    be = _pick_backend(op, backend, q, k_cache, v_cache)
    with torch.no_grad():
        if be == "torch":  # blockwise PyTorch; it pools the summaries from the cache itself
            from dasg_kernels.attention.blockwise import swa_attention_blockwise

            out, lse = swa_attention_blockwise(
                q, k_cache, v_cache, window=window, causal=causal, group_size=group_size,
                summaries=summaries, softmax_scale=scale,
            )
        else:
            from dasg_kernels.attention.decode import swa_decode_fwd

            if summary_kv is not None:
                check_last_dim_contiguous(op, k_summary=summary_kv[0], v_summary=summary_kv[1])
                host.check_row_stride(op, k_summary=summary_kv[0], v_summary=summary_kv[1])
            out_dtype = q.dtype
            if interpreted_bf16(q):
                q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
                if summary_kv is not None:
                    summary_kv = (summary_kv[0].float(), summary_kv[1].float())
            out, lse = swa_decode_fwd(q, k_cache, v_cache, left=left, right=right, causal=causal,
                                      group_size=group_size, summaries=summaries, scale=scale,
                                      summary_kv=summary_kv)
            out = out.to(out_dtype)
    return (out, lse) if return_lse else out
