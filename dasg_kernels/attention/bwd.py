"""Backward kernels (FA2 split): preprocess, dk/dv over key blocks, dq over query blocks.

1. ``_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` (fp32, ``[B, Hq, T]``).
2. ``_swa_bwd_dkdv_kernel`` with ``IS_SUMMARY=True`` (only with summaries): one program
   per (summary block, batch * kv head, split of the query rows) computes the partial
   gradient of the pooled summary keys/values ``dks, dvs`` (fp32) over the query tiles
   of its split that see the block (a summary is seen by O(T) queries, so without the
   split a handful of programs would each walk the whole sequence).
3. ``_swa_bwd_dkdv_kernel`` with ``IS_SUMMARY=False``: one program per (key block,
   batch * kv head); it loops over the ``Hq // Hkv`` query heads of its group and over
   the query tiles that intersect the window (boundary tiles masked, full tiles not),
   so GQA gradients are summed in registers, deterministically, with no atomics. Its
   epilogue adds the pooling backward ``sum_splits(dks)[j // G] / count`` (``ADD_POOL_GRAD``).
4. ``_swa_bwd_dq_kernel``: one program per (query block, batch * query head), visiting
   the same local and summary tiles as the forward.

Probabilities are recomputed from the saved lse (natural log, converted to log2).
Rows with lse ``-inf`` (no visible key) are guarded so their gradients are 0, not NaN.
Like the forward, each kernel runs one loop per source of tiles (boundary tiles take a
masking branch) and, with ``TMA`` (:func:`host.tma_loads_ok`), streams its tiles (dk/dv:
q and dO; dq: keys and values) through device-side tensor descriptors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dasg_kernels.attention import configs, host
from dasg_kernels.attention.common import (
    K_LOG2E,
    block_and_head,
    in_window,
    key_tile_visible,
    kv_tile,
    load_tile,
    local_key_range,
    local_query_range,
    local_window,
    row_windows,
    seq_bounds,
    store_tile,
    summary_key_range,
    summary_query_range,
    visible,
)
from dasg_kernels.attention.configs import PREPROCESS_BLOCK_M, launch_meta, tuned, win_key
from dasg_kernels.attention.host import LOG2E, dot_precision, effective_window, summary_flags


@triton.jit(do_not_specialize=host.no_specialize("stride_db stride_dh T H"))
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_db, stride_dh,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    start_m = i_m * BLOCK_M
    o_m = tl.arange(0, BLOCK_M)
    rows = start_m + o_m
    o_d = tl.arange(0, BLOCK_D)
    b_o = load_tile(O + i_b * stride_ob + i_h * stride_oh, start_m, o_m, o_m[:, None] * stride_ot + o_d[None, :],
                     stride_ot, o_d, T, HEAD_DIM, BLOCK_D, True)
    b_do = load_tile(DO + i_b * stride_dob + i_h * stride_doh, start_m, o_m, o_m[:, None] * stride_dot + o_d[None, :],
                      stride_dot, o_d, T, HEAD_DIM, BLOCK_D, True)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(DELTA + i_b * stride_db + i_h * stride_dh + rows, b_delta, mask=rows < T)


@triton.jit
def _load_row_stats(p_lse, p_delta, rows, n_q, CHECK_ROWS: tl.constexpr):
    """lse (as log2, with -inf rows mapped to 0: their probabilities are masked to 0) and delta."""
    if CHECK_ROWS:
        b_lse = tl.load(p_lse + rows, mask=rows < n_q, other=0.0)
        b_delta = tl.load(p_delta + rows, mask=rows < n_q, other=0.0)
    else:
        b_lse = tl.load(p_lse + rows)
        b_delta = tl.load(p_delta + rows)
    b_lse2 = tl.where(b_lse == float("-inf"), 0.0, b_lse * K_LOG2E)
    return b_lse2, b_delta


@triton.jit
def _dkdv_tiles(
    b_dk, b_dv, b_k, b_v, cols, p_q, p_do, q_desc, do_desc, p_lse, p_delta, stride_qt, stride_dot, o_q2d, o_do2d,
    o_d, o_dv, lo, full_lo, full_hi, hi, left, right, G, n_keys, n_q, row_pos, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, IS_SUMMARY: tl.constexpr,
    SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr, DOT_PREC: tl.constexpr, DKDV_PASS: tl.constexpr,
    TMA: tl.constexpr,
):
    """Accumulate dk, dv of the key block over the query tiles ``[lo, hi)`` (transposed scores);
    the tiles in ``[full_lo, full_hi)`` see the whole block and skip the mask (one loop:
    see :func:`dasg_kernels.attention.fwd._fwd_tiles`). ``DKDV_PASS`` 1 accumulates dv only,
    2 dk only (the other stays as passed in). Query row ``r`` sits at position ``row_pos + r``
    (of the keys, or of the summaries' groups)."""
    o_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + o_m
        b_q = kv_tile(p_q, q_desc, start_m, o_m, o_q2d, stride_qt, o_d, n_q, HEAD_DIM, BLOCK_D, TMA)
        b_do = kv_tile(p_do, do_desc, start_m, o_m, o_do2d, stride_dot, o_dv, n_q, HEAD_DV, BLOCK_DV, TMA)
        b_lse2, b_delta = _load_row_stats(p_lse, p_delta, rows, n_q, True)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
        b_arg = b_st * qk_scale - b_lse2[None, :]
        if (start_m < full_lo) | (start_m >= full_hi):
            if IS_SUMMARY:
                m_vis = visible((rows + row_pos)[None, :], cols[:, None], left, right, G, n_keys, IS_SUMMARY,
                                 SUM_BEFORE, SUM_AFTER)
                m_vis = m_vis & (rows < n_q)[None, :]
            else:
                lo_i, width = local_window(rows + row_pos, left, right, n_keys, rows < n_q)
                m_vis = in_window(cols[:, None], lo_i[None, :], width[None, :])
            b_arg = tl.where(m_vis, b_arg, float("-inf"))
        b_pt = tl.exp2(b_arg)
        if DKDV_PASS != 2:
            b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)
        if DKDV_PASS != 1:
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=DOT_PREC)
    return b_dk, b_dv


@triton.jit
def _dkdv_head(
    b_dk, b_dv, b_k, b_v, cols, i_h, i_b, Q, DO, LSE, DELTA,
    stride_qb, stride_qh, stride_dob, stride_doh, stride_lb, stride_lh, stride_qt, stride_dot, o_q2d, o_do2d, o_d,
    o_dv, a_lo, a_hi, lo, full_lo, full_hi, hi, left, right, G, N_KEYS, T, row_pos, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, IS_SUMMARY: tl.constexpr,
    SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr, DOT_PREC: tl.constexpr, DKDV_PASS: tl.constexpr,
    TMA: tl.constexpr,
):
    """dk, dv of the key block from the query tiles of q head ``i_h``: for a summary block
    the "after" rows ``[a_lo, a_hi)`` (masked), then ``[lo, hi)`` of which
    ``[full_lo, full_hi)`` unmasked."""
    i_h = i_h.to(tl.int64)
    p_q = Q + i_b * stride_qb + i_h * stride_qh
    p_do = DO + i_b * stride_dob + i_h * stride_doh
    p_lse = LSE + i_b * stride_lb + i_h * stride_lh
    p_delta = DELTA + i_b * stride_lb + i_h * stride_lh
    q_desc, do_desc = p_q, p_do
    if TMA:  # this head's rows of this sequence; rows past T read 0
        q_desc = tl.make_tensor_descriptor(p_q, shape=[T, HEAD_DIM], strides=[stride_qt, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(p_do, shape=[T, HEAD_DV], strides=[stride_dot, 1],
                                            block_shape=[BLOCK_M, BLOCK_DV])
    if IS_SUMMARY and SUM_AFTER:
        b_dk, b_dv = _dkdv_tiles(b_dk, b_dv, b_k, b_v, cols, p_q, p_do, q_desc, do_desc, p_lse, p_delta,
                                 stride_qt, stride_dot, o_q2d, o_do2d, o_d, o_dv,
                                 a_lo, a_lo, a_lo, a_hi, left, right, G, N_KEYS, T, row_pos, qk_scale,
                                 HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M, True, SUM_BEFORE, SUM_AFTER, DOT_PREC,
                                 DKDV_PASS, TMA)
    b_dk, b_dv = _dkdv_tiles(b_dk, b_dv, b_k, b_v, cols, p_q, p_do, q_desc, do_desc, p_lse, p_delta,
                             stride_qt, stride_dot, o_q2d, o_do2d, o_d, o_dv,
                             lo, full_lo, full_hi, hi, left, right, G, N_KEYS, T, row_pos, qk_scale,
                             HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M, IS_SUMMARY, SUM_BEFORE, SUM_AFTER, DOT_PREC,
                             DKDV_PASS, TMA)
    return b_dk, b_dv


@tuned("dkdv")
@triton.jit(do_not_specialize=host.no_specialize(
    "stride_lb stride_lh T TOTAL N_KEYS Q_OFFSET POS0 H_KV left right G ROWS_PER_SPLIT WIN_KEY"))
def _swa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DKS, DVS, CU,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_dss, stride_dsb, stride_dst, stride_dsh,
    stride_dvss, stride_dvsb, stride_dvst, stride_dvsh,
    stride_lb, stride_lh,
    T, TOTAL, N_KEYS, Q_OFFSET, POS0, H_KV, KV_GROUP: tl.constexpr, HEADS_UNROLLED: tl.constexpr, left, right, G, qk_scale, sm_scale, ROWS_PER_SPLIT,
    WIN_KEY,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_SUMMARY: tl.constexpr, ADD_POOL_GRAD: tl.constexpr,
    SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr, DOT_PREC: tl.constexpr, VARLEN: tl.constexpr,
    DKDV_PASS: tl.constexpr, TMA: tl.constexpr,
):
    i_n, i_bh, _ = block_and_head(VARLEN)
    i_b = (i_bh // H_KV).to(tl.int64)
    i_hk = i_bh % H_KV

    start_n = i_n * BLOCK_N
    if VARLEN:
        # sequence i_b of a packed batch (queries and keys share cu_seqlens): its rows
        # [s0, s0 + T) of q/do/lse/delta and, for the local pass, of k/v/dk/dv; the summary
        # pass's KS/VS/DKS/DVS are [.., B, NG, ..] per sequence already (clamped to the
        # packed length and max_seqlen)
        s0, T = seq_bounds(CU, i_b, TOTAL, T)
        Q += s0 * stride_qt
        DO += s0 * stride_dot
        LSE += s0
        DELTA += s0
        if IS_SUMMARY:
            N_KEYS = (T + G - 1) // G
        else:
            N_KEYS = T
            K += s0 * stride_kt
            V += s0 * stride_vt
            DK += s0 * stride_dkt
            DV += s0 * stride_dvt
        if start_n >= N_KEYS:
            return
    o_n = tl.arange(0, BLOCK_N)
    cols = start_n + o_n
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    i_hk64 = i_hk.to(tl.int64)
    b_k = load_tile(K + i_b * stride_kb + i_hk64 * stride_kh, start_n, o_n, o_n[:, None] * stride_kt + o_d[None, :],
                     stride_kt, o_d, N_KEYS, HEAD_DIM, BLOCK_D, True)
    b_v = load_tile(V + i_b * stride_vb + i_hk64 * stride_vh, start_n, o_n, o_n[:, None] * stride_vt + o_dv[None, :],
                     stride_vt, o_dv, N_KEYS, HEAD_DV, BLOCK_DV, True)
    o_mm = tl.arange(0, BLOCK_M)
    o_q2d = o_mm[:, None] * stride_qt + o_d[None, :]
    o_do2d = o_mm[:, None] * stride_dot + o_dv[None, :]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    last_n = tl.minimum(start_n + BLOCK_N, N_KEYS) - 1

    if IS_SUMMARY:
        # Every summary is seen by O(T) queries: program_id(2) takes the query rows
        # [r0, r1) only (a multiple of BLOCK_M) and writes its partial sum to split i_s.
        i_s = tl.program_id(2)
        r0 = i_s * ROWS_PER_SPLIT
        r1 = tl.minimum(r0 + ROWS_PER_SPLIT, T)
        # query row r sits at group position row_pos + r: the ranges in rows shift the window
        row_pos = Q_OFFSET + POS0
        a_hi, b_lo, b_full, b_tail = summary_query_range(start_n, last_n, left - row_pos, right + row_pos, G, T,
                                                          BLOCK_M, SUM_BEFORE, SUM_AFTER)
        # clipped to the split: the "after" queries [r0, a_hi) (masked), then the "before"
        # ones laid out like the local ranges below: masked [lo, full_lo), unmasked
        # [full_lo, full_hi) (they see the whole block), masked [full_hi, hi)
        a_lo = r0
        a_hi = tl.minimum(a_hi, r1)
        lo = tl.maximum(b_lo, r0)
        full_lo = tl.minimum(tl.maximum(b_full, r0), r1)
        full_hi = tl.minimum(tl.maximum(b_tail, r0), r1)
        hi = r1
        DK += i_s.to(tl.int64) * stride_dss
        DV += i_s.to(tl.int64) * stride_dvss
    else:
        row_pos = Q_OFFSET  # query row r sits at key position Q_OFFSET + r
        lo, full_lo, full_hi, hi = local_query_range(start_n - row_pos, last_n - row_pos, left, right, T, BLOCK_M)

    # The q heads of the group: HEADS_UNROLLED of them unrolled (constexpr) per step of a
    # runtime loop. Unrolling a group of 2 spills less; larger groups compile for minutes
    # unrolled and spill no less looped (configs.heads_unrolled has the measurements).
    if not IS_SUMMARY:
        a_lo = 0
        a_hi = 0
    if HEADS_UNROLLED == KV_GROUP:
        for j in tl.static_range(KV_GROUP):
            b_dk, b_dv = _dkdv_head(b_dk, b_dv, b_k, b_v, cols, i_hk * KV_GROUP + j, i_b,
                                    Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_dob, stride_doh,
                                    stride_lb, stride_lh, stride_qt, stride_dot, o_q2d, o_do2d, o_d, o_dv,
                                    a_lo, a_hi, lo, full_lo, full_hi, hi, left, right, G, N_KEYS, T, row_pos, qk_scale,
                                    HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M, IS_SUMMARY, SUM_BEFORE, SUM_AFTER,
                                        DOT_PREC, DKDV_PASS, TMA)
    else:
        for j0 in range(0, KV_GROUP, HEADS_UNROLLED):
            for j in tl.static_range(HEADS_UNROLLED):
                b_dk, b_dv = _dkdv_head(b_dk, b_dv, b_k, b_v, cols, i_hk * KV_GROUP + j0 + j, i_b,
                                        Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_dob, stride_doh,
                                        stride_lb, stride_lh, stride_qt, stride_dot, o_q2d, o_do2d, o_d, o_dv,
                                        a_lo, a_hi, lo, full_lo, full_hi, hi, left, right, G, N_KEYS, T, row_pos, qk_scale,
                                        HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M, IS_SUMMARY, SUM_BEFORE, SUM_AFTER,
                                        DOT_PREC, DKDV_PASS, TMA)

    b_dk = b_dk * sm_scale
    p_dk = DK + i_b * stride_dkb + i_hk64 * stride_dkh
    p_dv = DV + i_b * stride_dvb + i_hk64 * stride_dvh
    _dkdv_epilogue(b_dk, b_dv, p_dk, p_dv, DKS, DVS, cols, start_n, o_n, o_d, o_dv, i_b, i_hk64, T, N_KEYS, G,
                   stride_dkt, stride_dvt, stride_dsb, stride_dst, stride_dsh, stride_dvsb, stride_dvst, stride_dvsh,
                   HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, ADD_POOL_GRAD, DKDV_PASS)


@triton.jit
def _dkdv_epilogue(b_dk, b_dv, p_dk, p_dv, DKS, DVS, cols, start_n, o_n, o_d, o_dv, i_b, i_hk64, T, N_KEYS, G,
                   stride_dkt, stride_dvt, stride_dsb, stride_dst, stride_dsh, stride_dvsb, stride_dvst, stride_dvsh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                   ADD_POOL_GRAD: tl.constexpr, DKDV_PASS: tl.constexpr):
    """Store dk and / or dv (``DKDV_PASS``), adding the pooling backward with ``ADD_POOL_GRAD``."""
    if ADD_POOL_GRAD:
        # backward of the group mean: every position of group g gets d(summary_g) / count_g.
        # The launcher has already summed the query-row splits (once, in a fixed order:
        # deterministic), so this reads one row per group. dk is finished and stored before
        # dv's row is read, to keep fewer tiles live.
        grp = cols // G
        inv_cnt = 1.0 / tl.maximum(tl.minimum(T - grp * G, G), 1).to(tl.float32)  # rows past T: not stored
        m_g = (cols < N_KEYS)[:, None] & (o_d < HEAD_DIM)[None, :]
        # groups relative to the block's first one (int32 tile offsets, int64 scalar base)
        g0 = start_n // G
        o_g2d = (grp - g0)[:, None] * stride_dst + o_d[None, :]
        p_ds = i_b * stride_dsb + i_hk64 * stride_dsh + tl.cast(g0, tl.int64) * stride_dst
        if DKDV_PASS != 1:
            b_dk += tl.load(DKS + p_ds + o_g2d, mask=m_g, other=0.0) * inv_cnt[:, None]
            store_tile(p_dk, b_dk, start_n, o_n, stride_dkt, o_d, N_KEYS, HEAD_DIM, BLOCK_D)
        if DKDV_PASS != 2:
            m_gv = (cols < N_KEYS)[:, None] & (o_dv < HEAD_DV)[None, :]
            o_gv2d = (grp - g0)[:, None] * stride_dvst + o_dv[None, :]
            p_dvs = i_b * stride_dvsb + i_hk64 * stride_dvsh + tl.cast(g0, tl.int64) * stride_dvst
            b_dv += tl.load(DVS + p_dvs + o_gv2d, mask=m_gv, other=0.0) * inv_cnt[:, None]
            store_tile(p_dv, b_dv, start_n, o_n, stride_dvt, o_dv, N_KEYS, HEAD_DV, BLOCK_DV)
    else:
        if DKDV_PASS != 1:
            store_tile(p_dk, b_dk, start_n, o_n, stride_dkt, o_d, N_KEYS, HEAD_DIM, BLOCK_D)
        if DKDV_PASS != 2:
            store_tile(p_dv, b_dv, start_n, o_n, stride_dvt, o_dv, N_KEYS, HEAD_DV, BLOCK_DV)


@triton.jit
def _dq_tiles(
    b_dq, b_q, b_do, b_lse2, b_delta, rows, p_k, p_v, k_desc, v_desc, stride_kt, stride_vt, o_k2d, o_v2d, o_d, o_dv,
    lo, full_lo, full_hi, hi, left, right, G, n_keys, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_SUMMARY: tl.constexpr,
    SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):
    """Accumulate dq of the query block over the key tiles ``[lo, hi)``; the tiles in
    ``[full_lo, full_hi)`` are seen by every row and skip the mask (one loop: see
    :func:`dasg_kernels.attention.fwd._fwd_tiles`)."""
    o_n = tl.arange(0, BLOCK_N)
    lo_i, width = row_windows(rows, left, right, n_keys, IS_SUMMARY)
    for start_n in range(lo, hi, BLOCK_N):
        b_k = kv_tile(p_k, k_desc, start_n, o_n, o_k2d, stride_kt, o_d, n_keys, HEAD_DIM, BLOCK_D, TMA)
        b_v = kv_tile(p_v, v_desc, start_n, o_n, o_v2d, stride_vt, o_dv, n_keys, HEAD_DV, BLOCK_DV, TMA)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        b_arg = b_s * qk_scale - b_lse2[:, None]
        if (start_n < full_lo) | (start_n >= full_hi):
            m_vis = key_tile_visible(rows, start_n + o_n, lo_i, width, left, right, G, n_keys, IS_SUMMARY,
                                      SUM_BEFORE, SUM_AFTER)
            b_arg = tl.where(m_vis, b_arg, float("-inf"))
        b_p = tl.exp2(b_arg)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=DOT_PREC)
    return b_dq


@tuned("dq")
@triton.jit(do_not_specialize=host.no_specialize(
    "stride_lb stride_lh T T_K TOTAL Q_OFFSET POS0 H_Q KV_GROUP left right G NG WIN_KEY"))
def _swa_bwd_dq_kernel(
    Q, K, V, KS, VS, DO, LSE, DELTA, DQ, CU,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ksb, stride_kst, stride_ksh,
    stride_vsb, stride_vst, stride_vsh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh,
    T, T_K, TOTAL, Q_OFFSET, POS0, H_Q, KV_GROUP, left, right, G, NG, qk_scale, sm_scale,
    WIN_KEY,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr, DOT_PREC: tl.constexpr, VARLEN: tl.constexpr,
    TMA: tl.constexpr,
):
    # last query blocks first: with causal full attention they have the most key tiles
    i_blk, i_bh, n_blk = block_and_head(VARLEN)
    i_m = n_blk - 1 - i_blk
    i_b = (i_bh // H_Q).to(tl.int64)
    i_h = i_bh % H_Q
    i_hk = (i_h // KV_GROUP).to(tl.int64)
    i_h = i_h.to(tl.int64)

    start_m = i_m * BLOCK_M
    if VARLEN:  # sequence i_b of a packed batch: rows [s0, s0 + T) of every row tensor (clamped)
        s0, T = seq_bounds(CU, i_b, TOTAL, T)
        if start_m >= T:
            return
        T_K = T
        NG = (T + G - 1) // G
        Q += s0 * stride_qt
        K += s0 * stride_kt
        V += s0 * stride_vt
        DO += s0 * stride_dot
        DQ += s0 * stride_dqt
        LSE += s0
        DELTA += s0
    o_m = tl.arange(0, BLOCK_M)
    rows = start_m + o_m
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    b_q = load_tile(Q + i_b * stride_qb + i_h * stride_qh, start_m, o_m, o_m[:, None] * stride_qt + o_d[None, :],
                     stride_qt, o_d, T, HEAD_DIM, BLOCK_D, True)
    b_do = load_tile(DO + i_b * stride_dob + i_h * stride_doh, start_m, o_m, o_m[:, None] * stride_dot + o_dv[None, :],
                      stride_dot, o_dv, T, HEAD_DV, BLOCK_DV, True)
    b_lse2, b_delta = _load_row_stats(LSE + i_b * stride_lb + i_h * stride_lh,
                                      DELTA + i_b * stride_lb + i_h * stride_lh, rows, T, True)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh
    o_n = tl.arange(0, BLOCK_N)
    o_k2d = o_n[:, None] * stride_kt + o_d[None, :]
    o_v2d = o_n[:, None] * stride_vt + o_dv[None, :]
    first = start_m + Q_OFFSET  # key positions of the block's rows
    last = tl.minimum(start_m + BLOCK_M, T) - 1 + Q_OFFSET
    lo, full_lo, full_hi, hi = local_key_range(first, last, left, right, T_K, BLOCK_N)
    k_desc, v_desc = p_k, p_v
    if TMA:  # this sequence's keys; rows past T_K read 0
        k_desc = tl.make_tensor_descriptor(p_k, shape=[T_K, HEAD_DIM], strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(p_v, shape=[T_K, HEAD_DV], strides=[stride_vt, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])
    b_dq = _dq_tiles(b_dq, b_q, b_do, b_lse2, b_delta, rows + Q_OFFSET, p_k, p_v, k_desc, v_desc, stride_kt,
                     stride_vt, o_k2d, o_v2d, o_d, o_dv, lo, full_lo, full_hi, hi, left, right, G, T_K, qk_scale,
                     HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, False, SUM_BEFORE, SUM_AFTER, DOT_PREC, TMA)
    if SUM_BEFORE or SUM_AFTER:
        p_ks = KS + i_b * stride_ksb + i_hk * stride_ksh
        p_vs = VS + i_b * stride_vsb + i_hk * stride_vsh
        o_ks2d = o_n[:, None] * stride_kst + o_d[None, :]
        o_vs2d = o_n[:, None] * stride_vst + o_dv[None, :]
        ks_desc, vs_desc = p_ks, p_vs
        if TMA:
            ks_desc = tl.make_tensor_descriptor(p_ks, shape=[NG, HEAD_DIM], strides=[stride_kst, 1],
                                                block_shape=[BLOCK_N, BLOCK_D])
            vs_desc = tl.make_tensor_descriptor(p_vs, shape=[NG, HEAD_DV], strides=[stride_vst, 1],
                                                block_shape=[BLOCK_N, BLOCK_DV])
        # summary g stands for the positions [g*G, (g+1)*G) counted from POS0 before key 0
        s_full, s_bhi, s_alo = summary_key_range(first + POS0, last + POS0, left, right, G, NG, BLOCK_N,
                                                  SUM_BEFORE, SUM_AFTER)
        # "before" summaries: [0, s_full) seen by every row, [s_full, s_bhi) masked
        b_dq = _dq_tiles(b_dq, b_q, b_do, b_lse2, b_delta, rows + Q_OFFSET + POS0, p_ks, p_vs, ks_desc, vs_desc, stride_kst, stride_vst,
                         o_ks2d, o_vs2d, o_d, o_dv, 0, 0, s_full, s_bhi, left, right, G, NG, qk_scale,
                         HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True, SUM_BEFORE, SUM_AFTER, DOT_PREC, TMA)
        if SUM_AFTER:  # "after" summaries (non-causal): [s_alo, NG), masked
            b_dq = _dq_tiles(b_dq, b_q, b_do, b_lse2, b_delta, rows + Q_OFFSET + POS0, p_ks, p_vs, ks_desc, vs_desc, stride_kst,
                             stride_vst, o_ks2d, o_vs2d, o_d, o_dv, s_alo, s_alo, s_alo, NG, left, right, G, NG,
                             qk_scale, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True, SUM_BEFORE, SUM_AFTER,
                             DOT_PREC, TMA)
    b_dq = b_dq * sm_scale
    store_tile(DQ + i_b * stride_dqb + i_h * stride_dqh, b_dq, start_m, o_m, stride_dqt, o_d, T, HEAD_DIM, BLOCK_D)


def _check_self_attention(varlen: host.Varlen) -> None:
    """The varlen backward needs the queries of a sequence to be its keys (training):
    ``cu_seqlens_q == cu_seqlens_k``. The same tensor passes without a look; two tensors
    are compared once (a host sync, in the backward only)."""
    cu_q, cu_k = varlen.cu_q, varlen.cu_k
    same = cu_q is cu_k or (cu_q.shape == cu_k.shape and cu_q.data_ptr() == cu_k.data_ptr())
    if not same and not torch.equal(cu_q, cu_k):
        raise ValueError("swa_attention_varlen backward: needs cu_seqlens_q == cu_seqlens_k (each sequence's "
                         "queries are its keys); got different sequence bounds")


@host.on_device_of_first_arg
def swa_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    ks: torch.Tensor | None,
    vs: torch.Tensor | None,
    *,
    left: int,
    right: int,
    causal: bool,
    group_size: int | None,
    summaries: bool,
    scale: float,
    varlen: host.Varlen | None = None,
    q_offset: int = 0,
    pos_offset: int = 0,
    summary_grads: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward of :func:`dasg_kernels.attention.fwd.swa_fwd`.

    Returns ``dq [B,Tq,Hq,D]``, ``dk, dv [B,Tk,Hkv,D]`` in the input dtypes. With ``varlen``
    (``cu_q == cu_k``): ``q, do, out [total, Hq, D]``, ``lse [Hq, total]``, ``k, v [total, Hkv, D]``,
    ``ks, vs [B, ceil(max/G), Hkv, D]``, and the gradients have the shapes of ``q, k, v``.

    Dense only: ``q_offset`` (query row 0 at key position ``q_offset``, ``Tq + q_offset <= Tk``)
    and ``pos_offset`` as in the forward. ``summary_grads=True``: ``ks, vs`` are external
    summaries (the forward's ``summary_kv``), whose gradients ``dks, dvs`` (fp32 sums, in
    their dtype; ``None`` when no summary is visible) are returned after ``dq, dk, dv``
    instead of being pooled back into ``dk, dv``.
    """
    hq, d = q.shape[-2], q.shape[-1]
    hkv, dv_ = k.shape[-2], v.shape[-1]
    sum_before, sum_after = summary_flags(left, right, causal, summaries)
    use_sum = sum_before or sum_after
    dq = host.new_empty(q.shape, q.dtype, q.device)
    dk = host.new_empty(k.shape, k.dtype, k.device)
    dv = host.new_empty(v.shape, v.dtype, v.device)
    def result(dks=None, dvs=None):
        return (dq, dk, dv, dks, dvs) if summary_grads else (dq, dk, dv)

    if q.numel() == 0 or k.numel() == 0 or (varlen is not None and varlen.batch == 0):
        dq.zero_(), dk.zero_(), dv.zero_()
        if summary_grads and use_sum:
            return result(torch.zeros_like(ks), torch.zeros_like(vs))
        return result()
    if do.stride(-1) != 1 or not host.row_stride_ok(do if varlen is None else do.unsqueeze(0)):
        # e.g. out.sum().backward() hands in an expanded tensor (all strides 0); the
        # kernels need a unit last-dim stride (and int32 tile offsets), so only then is dO copied.
        do = do.contiguous()
    lse = lse.contiguous()  # [B, Hq, T] fp32, produced by the forward (already contiguous)
    if varlen is None:
        b, t, tk = q.shape[0], q.shape[1], k.shape[1]
        delta = host.new_empty((b, hq, t), torch.float32, q.device)
        pre_out, pre_do, pre_delta, n_pre = out, do, delta, t
        lse3, delta3, cu = lse, delta, q  # cu: unused
    else:
        _check_self_attention(varlen)
        b, t = varlen.batch, max(varlen.max_q, varlen.max_k)
        tk, q_offset, pos_offset = t, 0, 0
        delta = host.new_empty((hq, q.shape[0]), torch.float32, q.device)
        # delta = rowsum(dO * O) is per row: the packed rows are one batch of total rows
        pre_out, pre_do, pre_delta, n_pre = out.unsqueeze(0), do.unsqueeze(0), delta.unsqueeze(0), q.shape[0]
        lse3, delta3 = (x.unsqueeze(0).expand(b, -1, -1) for x in (lse, delta))
        q, k, v, do, dq, dk, dv = (host.batched_view(x, varlen) for x in (q, k, v, do, dq, dk, dv))
        cu = varlen.cu_q
    l_eff, r_eff = effective_window(left, right, tk, pos_offset + q_offset + t - 1)  # as the forward
    n_rows = min(q.shape[1], k.shape[1])  # varlen: the packed length the kernels clamp to
    if varlen is None:
        host.check_grid("swa_attention backward", b * hq, "batch * q heads")
    host.check_row_stride("swa_attention backward", q=q, k=k, v=v)
    block_d = host.block_d(d)
    _bwd_preprocess_kernel[(triton.cdiv(n_pre, PREPROCESS_BLOCK_M), pre_out.shape[0] * hq)](
        pre_out, pre_do, pre_delta,
        pre_out.stride(0), pre_out.stride(1), pre_out.stride(2),
        pre_do.stride(0), pre_do.stride(1), pre_do.stride(2),
        pre_delta.stride(0), pre_delta.stride(1),
        n_pre, hq,
        HEAD_DIM=dv_, BLOCK_D=host.block_d(dv_), BLOCK_M=PREPROCESS_BLOCK_M,  # O and dO: the value head dim
    )
    g = group_size if use_sum else 1
    wk = win_key(l_eff, r_eff, t)
    flags = dict(HEAD_DIM=d, BLOCK_D=block_d, HEAD_DV=dv_, BLOCK_DV=host.block_d(dv_), SUM_BEFORE=sum_before, SUM_AFTER=sum_after,
                  DOT_PREC=dot_precision(q.dtype), VARLEN=varlen is not None)

    if use_sum:
        ng = ks.shape[1]
        # Split the summary dk/dv over query rows (see the kernel); the partial sums
        # [S, B, NG, Hkv, D] are added in a fixed order by the local dk/dv epilogue.
        rows = configs.SUMMARY_SPLIT_ROWS
        n_splits = max(1, min(triton.cdiv(t, rows), configs.SUMMARY_SPLIT_BUDGET // max(ng, 1)))
        rows = triton.cdiv(triton.cdiv(t, n_splits), rows) * rows
        n_splits = triton.cdiv(t, rows)
        dks = host.new_empty((n_splits, b, ng, hkv, d), torch.float32, q.device)
        dvs = host.new_empty((n_splits, b, ng, hkv, dv_), torch.float32, q.device)
    else:
        ng, rows, n_splits = 0, t, 0
        dks, dvs = dk.unsqueeze(0), dv.unsqueeze(0)  # unused

    passes = configs.dkdv_passes(d, dv_)
    tma_dkdv = host.tma_loads_ok(q, do)  # dk/dv streams q and dO tiles

    def dkdv_launch(kk, vv, dkk, dvv, n_keys, is_summary):
        for p in passes:
            dkdv_pass(kk, vv, dkk, dvv, n_keys, is_summary, p)

    def dkdv_pass(kk, vv, dkk, dvv, n_keys, is_summary, dkdv_pass):
        def grid(meta):
            return host.block_grid(triton.cdiv(n_keys, meta["BLOCK_N"]), b * hkv, varlen,
                                     n_splits if is_summary else 1)

        with host.tma_scratch(q.device, tma_dkdv):
            _swa_bwd_dkdv_kernel[grid](
                q, kk, vv, do, lse3, delta3, dkk, dvv, dks, dvs, cu,
                q.stride(0), q.stride(1), q.stride(2),
                kk.stride(0), kk.stride(1), kk.stride(2),
                vv.stride(0), vv.stride(1), vv.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                *dkk.stride()[-4:-1],
                *dvv.stride()[-4:-1],
                *dks.stride()[:4],
                *dvs.stride()[:4],
                lse3.stride(0), lse3.stride(1),
                t, n_rows, n_keys, q_offset, pos_offset, hkv, hq // hkv, configs.heads_unrolled(hq // hkv), l_eff,
                r_eff, g,
                scale * LOG2E, scale,
                rows, wk,
                IS_SUMMARY=is_summary, ADD_POOL_GRAD=use_sum and not is_summary and not summary_grads,
                DKDV_PASS=dkdv_pass,
                TMA=tma_dkdv, **flags,
                **launch_meta("dkdv"),
            )

    if use_sum:
        dkdv_launch(ks, vs, dks, dvs, ng, True)
        # sum the split partials once ([S, ...] -> [1, ...], a fixed-order reduction), so each
        # key block's epilogue reads one row per group instead of S of them (offline sm_90a,
        # T=64k G=256: 32 splits made the epilogue load half as many bytes as the main loop)
        dks, dvs = dks.sum(0, keepdim=True), dvs.sum(0, keepdim=True)
    dkdv_launch(k, v, dk, dv, tk, False)

    ks_ = ks if use_sum else k
    vs_ = vs if use_sum else v

    def dq_grid(meta):
        return host.block_grid(triton.cdiv(t, meta["BLOCK_M"]), b * hq, varlen)

    tma_dq = host.tma_loads_ok(k, v, ks_, vs_)  # dq streams key and value tiles
    with host.tma_scratch(q.device, tma_dq):
        _swa_bwd_dq_kernel[dq_grid](
            q, k, v, ks_, vs_, do, lse3, delta3, dq, cu,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            ks_.stride(0), ks_.stride(1), ks_.stride(2),
            vs_.stride(0), vs_.stride(1), vs_.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            lse3.stride(0), lse3.stride(1),
            t, tk, n_rows, q_offset, pos_offset, hq, hq // hkv, l_eff, r_eff, g, ng, scale * LOG2E, scale, wk,
            TMA=tma_dq, **flags, **launch_meta("dq"),
        )
    if varlen is not None:
        dq, dk, dv = dq[0], dk[0], dv[0]
    if summary_grads and use_sum:
        return result(dks[0].to(ks.dtype), dvs[0].to(vs.dtype))
    return result()
