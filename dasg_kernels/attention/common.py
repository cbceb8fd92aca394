"""Triton helpers shared by the attention kernels: tile loads, visibility, loop bounds.

Conventions (FLA style): ``b_`` block values, ``p_`` pointers, ``o_`` offsets, ``m_`` masks.
Positions: query row ``r`` is at position ``i = Q_OFFSET + r``; local key ``j`` is at
position ``j``; summary key ``g`` stands for group ``[g*G, (g+1)*G)``.

The launchers pass *effective* window bounds: an unbounded side (``-1``) becomes
``T_K`` and any bound larger than ``T_K`` is clipped to it, so every kernel works
with ``0 <= left, right <= T_K`` and plain integer arithmetic (no ``-1`` special
case, no int32 overflow). With ``left = T_K`` the "before" summary count
``max(i - left, 0) // G`` is 0 for every query, and with ``right = T_K`` the first
"after" summary ``(i + right) // G + 1`` is ``>= ceil(T_K / G)``, so unbounded sides
also switch the summaries off exactly as :func:`reference.summary_mask` does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # Python floats for the launchers ...
LN2 = 0.6931471805599453
K_LOG2E = tl.constexpr(LOG2E)  # ... and constexpr globals for the kernels
K_LN2 = tl.constexpr(LN2)

#: Tests set this to fill every buffer the launchers allocate with NaN, so an output
#: element that a kernel forgets to write fails the comparison (FLA's conftest habit).
POISON_ALLOCATIONS = False


def new_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for every buffer a launcher hands to a kernel (NaN-filled when poisoned)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_ALLOCATIONS:
        t.fill_(float("nan"))
    return t


@triton.jit
def _load_rows(base, rows, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a ``[len(rows), BLOCK_D]`` tile; rows ``>= n_rows`` and columns ``>= HEAD_DIM`` read 0.

    ``rows * stride_t`` is computed in int64 so long sequences with large strides cannot overflow.
    """
    p = base + rows.to(tl.int64)[:, None] * stride_t + o_d[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(p, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(p, mask=(rows < n_rows)[:, None] & (o_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(p)
        else:
            x = tl.load(p, mask=(o_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _load_tile(base, start, o_t, o_2d, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load rows ``start + o_t`` (a contiguous tile): like :func:`_load_rows`, but only the
    scalar ``start * stride_t`` is int64, and the int32 tile offsets
    ``o_2d = o_t[:, None] * stride_t + o_d[None, :]`` are computed once by the kernel and
    shared by all its loops (one loop-invariant tensor instead of one per inlined loop:
    measured with cuobjdump on sm_90, this is what keeps register spills down)."""
    p = base + tl.cast(start, tl.int64) * stride_t + o_2d
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(p, mask=((start + o_t) < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(p, mask=((start + o_t) < n_rows)[:, None] & (o_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(p)
        else:
            x = tl.load(p, mask=(o_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(base, x, start, o_t, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a tile of rows ``start + o_t`` (cast to the buffer's dtype), masked."""
    p = base + tl.cast(start, tl.int64) * stride_t + (o_t[:, None] * stride_t + o_d[None, :])
    m = ((start + o_t) < n_rows)[:, None]
    if BLOCK_D != HEAD_DIM:
        m = m & (o_d < HEAD_DIM)[None, :]
    tl.store(p, x.to(base.dtype.element_ty), mask=m)


@triton.jit
def _store_rows(base, x, rows, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a ``[len(rows), BLOCK_D]`` tile (cast to the buffer's dtype), masked."""
    p = base + rows.to(tl.int64)[:, None] * stride_t + o_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(p, x.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None])
    else:
        tl.store(p, x.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None] & (o_d < HEAD_DIM)[None, :])


@triton.jit
def _local_visible(i, j, left, right, n_keys):
    """Query position ``i`` sees local key ``j`` (broadcasting)."""
    return (j >= i - left) & (j <= i + right) & (j < n_keys)


@triton.jit
def _summary_visible(i, g, left, right, G, NG, SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr):
    """Query position ``i`` sees the summary of group ``g`` (broadcasting).

    Before the window: ``(g+1)*G - 1 < i - left``  <=>  ``g < (i - left) // G`` (for ``i >= left``).
    After the window (non-causal only): ``g*G > i + right``  <=>  ``g >= (i + right) // G + 1``.
    """
    if SUM_BEFORE:
        vis = g < tl.maximum(i - left, 0) // G
        if SUM_AFTER:
            vis = vis | (g >= (i + right) // G + 1)
    else:
        vis = g >= (i + right) // G + 1
    return vis & (g < NG)


@triton.jit
def _local_key_range(first, last, left, right, n_keys, BLOCK_N: tl.constexpr):
    """Key tiles for the query positions ``[first, last]``.

    Returns ``lo <= full_lo <= full_hi <= hi``: tiles in ``[lo, full_lo)`` and
    ``[full_hi, hi)`` need the mask, tiles in ``[full_lo, full_hi)`` are visible to
    every query of the block (and in bounds), so they are processed without a mask.
    Tiles outside ``[lo, hi)`` are never loaded.
    """
    lo = tl.maximum(first - left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(last + right + 1, n_keys)
    full_lo = (tl.maximum(last - left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(first + right + 1, n_keys) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _summary_key_range(first, last, left, right, G, NG, BLOCK_N: tl.constexpr,
                       SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr):
    """Summary tiles for the query positions ``[first, last]``.

    Returns ``(full, b_hi, a_lo)``: ``[0, full)`` is visible to every query (no mask),
    ``[full, b_hi)`` holds the rest of the "before" summaries (masked), and
    ``[a_lo, NG)`` the "after" summaries (masked; starts past the last "before" tile
    so no tile is visited twice).
    """
    if SUM_BEFORE:
        b_hi = tl.maximum(last - left, 0) // G
        full = tl.maximum(first - left, 0) // G // BLOCK_N * BLOCK_N
        b_end = (b_hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    else:
        b_hi = 0
        full = 0
        b_end = 0
    if SUM_AFTER:
        a_lo = tl.maximum(((first + right) // G + 1) // BLOCK_N * BLOCK_N, b_end)
    else:
        a_lo = NG
    return full, b_hi, a_lo


@triton.jit
def _local_query_range(first_n, last_n, left, right, n_q, BLOCK_M: tl.constexpr):
    """Query tiles that see some key of ``[first_n, last_n]`` (the dk/dv loop).

    Same contract as :func:`_local_key_range`, with the roles swapped: query ``i``
    sees key ``j`` when ``j - right <= i <= j + left``.
    """
    lo = tl.maximum(first_n - right, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(last_n + left + 1, n_q)
    full_lo = (tl.maximum(last_n - right, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(first_n + left + 1, n_q) // BLOCK_M * BLOCK_M
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _summary_query_range(g_first, g_last, left, right, G, n_q, BLOCK_M: tl.constexpr,
                         SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr):
    """Query tiles that see some summary of ``[g_first, g_last]`` (the summary dk/dv loop).

    Query ``i`` sees group ``g`` after its window when ``i < g*G - right`` and before it
    when ``i >= (g+1)*G + left``. Returns ``(a_hi, b_lo, b_full, b_tail)``: masked
    ``[0, a_hi)`` ("after" queries), masked ``[b_lo, b_full)``, unmasked
    ``[b_full, b_tail)`` (these queries see the whole block), masked ``[b_tail, n_q)``.
    """
    if SUM_AFTER:
        a_hi = tl.minimum(tl.maximum(g_last * G - right, 0), n_q)
    else:
        a_hi = g_first * 0
    if SUM_BEFORE:
        b_lo = tl.maximum(((g_first + 1) * G + left) // BLOCK_M * BLOCK_M,
                          (a_hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
        b_full = ((g_last + 1) * G + left + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        b_full = tl.minimum(tl.maximum(b_full, b_lo), n_q)
        b_tail = tl.maximum(n_q // BLOCK_M * BLOCK_M, b_full)
    else:
        b_lo = n_q
        b_full = n_q
        b_tail = n_q
    return a_hi, b_lo, b_full, b_tail
