"""Argument checks shared by the public attention ops (dense, decode, varlen, bounded
cache, context parallel): they raise ``TypeError`` / ``ValueError`` naming the argument,
before any launch, and pick the backend within the kernels' limits."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from dasg_kernels.attention import host
from dasg_kernels.backend import resolve_backend
from dasg_kernels.validation import (
    FLOAT_DTYPES,
    check_int,
    check_last_dim_contiguous,
    check_same,
    check_tensor,
)

__all__ = ["SUPPORTED_HEAD_DIMS", "check_options", "check_summary_kv", "check_window", "head_dim_backend",
           "pick_backend", "validate_attention"]

#: Head dims the Triton kernels support: every multiple of 8 up to 256 (``BLOCK_D`` is the
#: next power of two >= 16; the extra columns are masked in the kernels, never copied).
SUPPORTED_HEAD_DIMS: tuple[int, ...] = tuple(range(8, 257, 8))


def check_window(op: str, window: object) -> tuple[int, int]:
    """``window`` as ``(left, right)``: two ints, each ``-1`` (unbounded) or ``>= 0``."""
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


def validate_attention(
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
    return check_options(op, d, window=window, causal=causal, group_size=group_size, summaries=summaries,
                          softmax_scale=softmax_scale)


def check_options(
    op: str, d: int, *, window: object, causal: object, group_size: object, summaries: object,
    softmax_scale: object,
) -> tuple[int, int, float]:
    """The non-tensor arguments; ``d`` is the q/k head dim (default scale ``1/sqrt(d)``)."""
    left, right = check_window(op, window)
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


def pick_backend(op: str, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
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


def check_summary_kv(
    op: str, summary_kv: object, k_cache: torch.Tensor, v_cache: torch.Tensor, group_size: int | None,
    summaries: bool,
) -> None:
    """``summary_kv`` of :func:`~dasg_kernels.swa_decode`: a ``(k_summary, v_summary)`` pair of
    ``[B, ceil(Tk/G), Hkv, D | Dv]`` tensors matching the cache's dtype and device."""
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
