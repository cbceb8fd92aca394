"""Triton helpers shared by the attention kernels: tile loads, visibility, loop bounds
(``@triton.jit`` only; the launchers' host-side helpers are in :mod:`.host`).

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

import triton
import triton.language as tl

from dasg_kernels.attention.host import LN2, LOG2E

K_LOG2E = tl.constexpr(LOG2E)  # constexpr globals for the kernels
K_LN2 = tl.constexpr(LN2)


@triton.jit
def load_tile(base, start, o_t, o_2d, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load rows ``start + o_t`` (a contiguous tile); rows ``>= n_rows`` (when ``CHECK_ROWS``)
    and columns ``>= HEAD_DIM`` read 0. Only the scalar ``start * stride_t`` is int64 (long
    sequences cannot overflow), and the int32 tile offsets (in range: the launchers
    reject row strides above ``host.MAX_ROW_STRIDE``, :func:`.host.check_row_stride`)
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
def block_and_head(VARLEN: tl.constexpr):
    """``(block, batch * head, number of blocks)`` of this program. Dense launches put the
    blocks on grid axis 0 and ``batch * heads`` on axis 1 (at most 65535); varlen launches
    swap them, since a packed batch may hold many (mostly empty) sequences: e.g. ``B*T + 1``
    bounds sized for the worst case under ``torch.compile``."""
    if VARLEN:
        return tl.program_id(1), tl.program_id(0), tl.num_programs(1)
    else:
        return tl.program_id(0), tl.program_id(1), tl.num_programs(0)


@triton.jit
def seq_bounds(CU, i_b, n_rows, max_len):
    """``(start, length)`` of sequence ``i_b`` of a varlen batch (``CU``: int32 ``cu_seqlens``),
    clamped so that whatever ``CU`` holds (it is not checked under ``torch.compile`` or with
    ``validate=False``) the rows ``[start, start + length)`` lie in ``[0, n_rows)`` (the packed
    length) and ``0 <= length <= max_len`` (the ``max_seqlen`` that sized the grid and the
    summary buffers). ``start`` is int64 (it multiplies row strides), ``length`` int32."""
    start = tl.minimum(tl.maximum(tl.load(CU + i_b), 0), n_rows)
    end = tl.minimum(tl.maximum(tl.load(CU + i_b + 1), start), n_rows)
    return start.to(tl.int64), tl.minimum(end - start, max_len).to(tl.int32)


@triton.jit
def store_tile(base, x, start, o_t, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a tile of rows ``start + o_t`` (cast to the buffer's dtype), masked."""
    p = base + tl.cast(start, tl.int64) * stride_t + (o_t[:, None] * stride_t + o_d[None, :])
    m = ((start + o_t) < n_rows)[:, None]
    if BLOCK_D != HEAD_DIM:
        m = m & (o_d < HEAD_DIM)[None, :]
    tl.store(p, x.to(base.dtype.element_ty), mask=m)


@triton.jit
def local_visible(i, j, left, right, n_keys):
    """Query position ``i`` sees local key ``j`` (broadcasting)."""
    return (j >= i - left) & (j <= i + right) & (j < n_keys)


@triton.jit
def local_window(i, left, right, n_keys, m_valid):
    """``(lo, width)`` of query positions ``i``: ``i`` sees local key ``j`` iff
    ``0 <= j - lo <= width`` (one unsigned compare per score, :func:`in_window`), the same
    relation as :func:`local_visible`. Rows that see no key, or where the mask ``m_valid``
    (like ``i``) is false, get ``lo = -1, width = 0``, which no ``j >= 0`` matches."""
    lo = i - left
    width = tl.minimum(i + right, n_keys - 1) - lo
    m_none = (width < 0) | (m_valid == 0)
    return tl.where(m_none, -1, lo), tl.where(m_none, 0, width).to(tl.uint32)


@triton.jit
def in_window(j, lo, width):
    """Key ``j`` lies in the window ``(lo, width)`` of :func:`local_window` (broadcasting)."""
    return (j - lo).to(tl.uint32) <= width


@triton.jit
def summary_visible(i, g, left, right, G, NG, SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr):
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
def visible(i, j, left, right, G, n_keys, IS_SUMMARY: tl.constexpr, SUM_BEFORE: tl.constexpr,
             SUM_AFTER: tl.constexpr):
    """Query position ``i`` sees key ``j``: a local key, or the summary of group ``j``
    when ``IS_SUMMARY`` (broadcasting)."""
    if IS_SUMMARY:
        vis = summary_visible(i, j, left, right, G, n_keys, SUM_BEFORE, SUM_AFTER)
    else:
        vis = local_visible(i, j, left, right, n_keys)
    return vis


@triton.jit
def row_windows(pos, left, right, n_keys, IS_SUMMARY: tl.constexpr):
    """The local windows ``(lo, width)`` (:func:`local_window`) of the query positions ``pos``
    (``< 0``: no query) for a loop over local key tiles; a loop over summaries does not use
    them (it masks by group, :func:`key_tile_visible`) and gets ``pos`` twice."""
    if IS_SUMMARY:
        lo, width = pos, pos
    else:  # the local mask as one unsigned compare per score
        lo, width = local_window(pos, left, right, n_keys, pos >= 0)
    return lo, width


@triton.jit
def key_tile_visible(pos, j, lo, width, left, right, G, n_keys, IS_SUMMARY: tl.constexpr,
                      SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr):
    """``[rows, keys]``: query positions ``pos`` see the keys ``j`` of a tile (the forward's
    and dq's boundary tiles): summaries by :func:`visible`, local keys by the windows
    ``(lo, width)`` of :func:`row_windows`."""
    if IS_SUMMARY:
        vis = visible(pos[:, None], j[None, :], left, right, G, n_keys, IS_SUMMARY, SUM_BEFORE, SUM_AFTER)
    else:
        vis = in_window(j[None, :], lo[:, None], width[:, None])
    return vis


@triton.jit
def kv_tile(p, desc, start, o_t, o_2d, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             TMA: tl.constexpr):
    """Rows ``start + o_t`` of a tile the main loops stream (keys, values; queries and dO in
    dk/dv), rows ``>= n_rows`` reading 0: a TMA load through the descriptor ``desc`` (whose
    shape bounds the rows, see :func:`.host.tma_loads_ok`), or a masked load of ``p``."""
    if TMA:
        x = desc.load([start, 0])
    else:
        x = load_tile(p, start, o_t, o_2d, stride_t, o_d, n_rows, HEAD_DIM, BLOCK_D, True)
    return x


@triton.jit
def local_key_range(first, last, left, right, n_keys, BLOCK_N: tl.constexpr):
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
def summary_key_range(first, last, left, right, G, NG, BLOCK_N: tl.constexpr,
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
def local_query_range(first_n, last_n, left, right, n_q, BLOCK_M: tl.constexpr):
    """Query tiles that see some key of ``[first_n, last_n]`` (the dk/dv loop).

    Query ``i`` sees key ``j`` when ``j - right <= i <= j + left``: the same relation as in
    :func:`local_key_range` with ``left`` and ``right`` swapped, so it is that function.
    """
    return local_key_range(first_n, last_n, right, left, n_q, BLOCK_M)


@triton.jit
def summary_query_range(g_first, g_last, left, right, G, n_q, BLOCK_M: tl.constexpr,
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
