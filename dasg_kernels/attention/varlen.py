"""``swa_attention_varlen``: packed batches of sequences of different lengths (flash-attn's layout).

``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``; sequence ``b`` is rows
``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` of ``q`` and ``[cu_seqlens_k[b], cu_seqlens_k[b+1])``
of ``k, v``. Each sequence is its own problem: positions, windows and groups restart at its
first token, so no group mean spans two sequences; a sequence's queries are its last
``len_q`` positions (``len_q <= len_k``; equal for training).

The Triton path runs the dense kernels with a ``VARLEN`` flag: each program reads its
sequence's bounds from ``cu_seqlens`` on the device and the grid is sized by
``max_seqlen_q/k``, which the caller passes (as in flash-attn); programs past a
sequence's end exit at once. Each program clamps its bounds to the packed length and to
``max_seqlen`` (non-negative lengths), so no ``cu_seqlens`` can make a kernel read or
write outside its buffers. In eager mode the op first checks the values of
``cu_seqlens`` with one host read (:func:`~dasg_kernels.validation.check_cu_seqlens`);
``validate=False`` and ``torch.compile`` skip that read (no host sync). The ``torch``
backend loops over the sequences: it reads ``cu_seqlens`` on the host anyway and always
checks them.
"""
from __future__ import annotations

import torch

from dasg_kernels.attention import host, ops
from dasg_kernels.attention.checks import check_options, head_dim_backend
from dasg_kernels.backend import bf16_via_fp32, interpreted_bf16
from dasg_kernels.validation import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_int,
    check_last_dim_contiguous,
    check_same,
    check_tensor,
)

OP = "swa_attention_varlen"


def _validate(q, k, v, cu_q, cu_k, max_q, max_k) -> None:
    q = check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, op=OP)
    k = check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, op=OP)
    v = check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, op=OP)
    check_same(OP, "dtype", q=q, k=k, v=v)
    check_same(OP, "device", q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if tuple(k.shape[:-1]) != tuple(v.shape[:-1]):
        raise ValueError(f"{OP}: k and v must have the same shape but for the head dim, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    if k.shape[2] != d:
        raise ValueError(f"{OP}: k must have head dim {d} (from q), got {k.shape[2]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{OP}: q heads ({hq}) must be a multiple of k heads ({hkv})")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), op=OP)
        if cu.shape[0] < 1:
            raise ValueError(f"{OP}: {name} must have B + 1 >= 1 entries, got none")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"{OP}: cu_seqlens_q and cu_seqlens_k must both have B + 1 entries, "
                         f"got {cu_q.shape[0]} and {cu_k.shape[0]}")
    check_int(OP, "max_seqlen_q", max_q, low=0)
    check_int(OP, "max_seqlen_k", max_k, low=0)
    if max_q > max_k:
        raise ValueError(f"{OP}: max_seqlen_q ({max_q}) must be <= max_seqlen_k ({max_k}): a sequence's "
                         f"queries are its last positions")


def _pick_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_q: int, max_k: int) -> str:
    be = head_dim_backend(OP, backend, q, k, v)
    if be != "triton":
        return be
    check_last_dim_contiguous(OP, q=q, k=k, v=v)
    host.check_row_stride(OP, **{n: x.unsqueeze(0) for n, x in (("q", q), ("k", k), ("v", v))})
    # varlen grids put batch * heads on axis 0 (2**31 - 1) and the blocks of the longest
    # sequence on axis 1: at most 65535 blocks of >= 16 rows
    if max(max_q, max_k) > host.MAX_GRID_YZ * 16:
        raise ValueError(f"{OP}: max_seqlen {max(max_q, max_k)} exceeds the kernels' limit "
                         f"{host.MAX_GRID_YZ * 16} (65535 blocks of 16 rows)")
    return be


def _check_bounds(q, k, cu_q, cu_k, max_q, max_k) -> tuple[list[int], list[int]]:
    """The values of ``cu_seqlens_q/k`` checked against the packed lengths and ``max_seqlen``
    (one host read); returns them as lists."""
    return check_cu_seqlens(OP, cu_q, cu_k, total_q=q.shape[0], total_k=k.shape[0], max_seqlen_q=max_q,
                            max_seqlen_k=max_k)


def _torch_varlen(q, k, v, bounds, *, window, causal, group_size, summaries, scale):
    """The ``torch`` backend: the blockwise op per sequence; ``bounds``: the checked
    ``cu_seqlens_q/k`` as lists."""
    from dasg_kernels.attention.blockwise import swa_attention_blockwise

    out = q.new_zeros(*q.shape[:-1], v.shape[-1])  # rows of empty sequences: 0, lse -inf
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    bq, bk = bounds
    for i in range(len(bq) - 1):
        (q0, q1), (k0, k1) = (bq[i], bq[i + 1]), (bk[i], bk[i + 1])
        if q1 > q0:  # slice assignment keeps autograd (CopySlices)
            out[q0:q1], lse[:, q0:q1] = (x[0] for x in swa_attention_blockwise(
                q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], window=window, causal=causal,
                group_size=group_size, summaries=summaries, softmax_scale=scale))
    return out, lse


def swa_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    window: tuple[int, int] = (-1, -1),
    causal: bool = True,
    group_size: int | None = None,
    summaries: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Grouped sliding-window attention over a packed batch of sequences.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]`` (``Hq % Hkv == 0``), fp16 /
            bf16 / fp32, stride 1 in the last dim.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` on the device of ``q``, non-decreasing
            from 0 to the packed length (``total_q``, ``total_k``): sequence ``b`` is rows
            ``[cu[b], cu[b+1])``, with ``len_q <= len_k``. Sequences of length 0 and 1 are fine.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest sequence (they size the
            launch grid).
        window, causal, group_size, summaries, softmax_scale: as in
            :func:`~dasg_kernels.swa_attention`, per sequence (positions start at 0 at each
            sequence's first key; its queries are its last ``len_q`` positions).
        return_lse: also return ``lse [Hq, total_q]`` (fp32; ``-inf`` for rows that see nothing).
        backend: ``"auto" | "triton" | "torch"``.
        validate: check the values of ``cu_seqlens_q/k`` and ``max_seqlen_q/k`` (as listed
            above) with one host read, raising a ``ValueError`` that names the argument. Skipped
            under ``torch.compile`` and with ``False`` (no host sync: for bounds the caller
            built itself; bad ones then give wrong rows, never an out-of-bounds access). The
            ``torch`` backend reads ``cu_seqlens`` on the host anyway and always checks.

    Returns:
        ``out [total_q, Hq, D]`` in ``q.dtype`` (and ``lse``). Differentiable w.r.t. ``q, k, v``
        when ``cu_seqlens_q == cu_seqlens_k`` (training); the backward raises otherwise.
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    left, right, scale = check_options(OP, q.shape[-1], window=window, causal=causal, group_size=group_size,
                                       summaries=summaries, softmax_scale=softmax_scale)
    be = _pick_backend(backend, q, k, v, max_seqlen_q, max_seqlen_k)
    if be == "torch":
        bounds = _check_bounds(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        out, lse = _torch_varlen(q, k, v, bounds, window=window, causal=causal,
                                 group_size=group_size, summaries=summaries, scale=scale)
        return (out, lse) if return_lse else out
    if validate and not torch.compiler.is_compiling():
        _check_bounds(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    def fwd(q, k, v):
        return ops.swa_attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            left, right, causal, group_size, summaries, scale)[:2]

    # the interpreter's bf16 dots are wrong: fp32 kernels, output rounded (gradients follow the casts)
    out, lse = bf16_via_fp32(fwd, q, k, v) if interpreted_bf16(q) else fwd(q, k, v)
    return (out, lse) if return_lse else out
