"""Decode: a few new queries (positions ``Tk - Tq .. Tk - 1``) against a KV cache.

Runs the forward kernel of :mod:`dasg_kernels.attention.fwd` with ``Q_OFFSET = Tk - Tq``
and ``PACK_GQA``: one program per (row block, batch * kv head) whose rows are the
``Tq * Hq/Hkv`` (position, q head) pairs sharing that kv head, so each cache tile is
loaded once per kv head, not once per q head. The same key-tile bounds apply: a query
only loads the cache tiles inside its window plus the summary tiles. With at most 64
packed rows it launches with a fixed small-M config instead of the autotuner (no
benchmarking inside a generation loop, no 128-row tiles for one query). Forward only.

The cache is not split across programs (flash-decoding): with a long unbounded window
and few (batch, kv head) pairs, few programs walk the whole cache.

Summaries: pass ``summary_kv=(ks, vs)`` (the group means of the cache, e.g. kept up
to date by the caller) to avoid re-pooling the whole cache, an ``O(Tk)`` pass, on
every step; without it they are pooled here.
"""
from __future__ import annotations

import torch

from dasg_kernels.attention.configs import decode_config
from dasg_kernels.attention.fwd import swa_fwd


def swa_decode_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    left: int,
    right: int,
    causal: bool,
    group_size: int | None,
    summaries: bool,
    scale: float,
    summary_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, Tq, Hq, D]``, caches ``[B, Tk, Hkv, D]`` -> ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``."""
    tq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    rows = tq * (hq // k_cache.shape[2])  # packed rows per program (see PACK_GQA)
    out, lse, _, _ = swa_fwd(q, k_cache, v_cache, left=left, right=right, causal=causal,
                             group_size=group_size, summaries=summaries, scale=scale,
                             q_offset=k_cache.shape[1] - tq, summary_kv=summary_kv, pack_gqa=True,
                             config=decode_config(rows, d) if rows <= 64 else None)
    return out, lse
