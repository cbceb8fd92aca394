"""Forward kernel: flash-style sliding-window attention with group summaries.

One program per (query block, batch * query head); the kv head is ``h // (Hq // Hkv)``.
Online softmax in the log2 domain (``exp2``, ``softmax_scale * log2(e)`` folded into
the scores), fp32 accumulators. The program visits only

* the local key tiles that intersect the window of its query block, split into
  boundary tiles (masked) and fully-visible tiles (no mask), and
* the summary tiles that some query of the block sees (the group means computed by
  :mod:`dasg_kernels.attention.pool`), in the same online softmax,

so the work is ``O(T * (W + T/G))``. Rows that see no key get output 0 and
lse ``-inf`` (the ``-inf - -inf`` case is guarded). Query blocks run last-first
(the heaviest blocks of full causal attention start first). ``PACK_GQA`` (decode)
packs the query heads of one kv head into the rows of a program instead.

``TMA`` (2-byte inputs with aligned strides on Hopper, :func:`host.tma_loads_ok`): key
and value tiles come through device-side tensor descriptors and, with the config's
``PIPELINE`` (the default), each loop is software pipelined, so the softmax of a tile runs
while the tensor cores compute the next tile's scores (:func:`_fwd_tiles`); otherwise
masked pointer loads and a plain loop. The autotune space holds both schedules
(:mod:`dasg_kernels.attention.configs`): the pipelined one's gain is an overlap no
calibration point of the offline model covers, so on a GPU the autotuner decides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dasg_kernels.attention import host
from dasg_kernels.attention.common import (
    K_LN2,
    block_and_head,
    key_tile_visible,
    kv_tile,
    load_tile,
    local_key_range,
    row_windows,
    seq_bounds,
    store_tile,
    summary_key_range,
)
from dasg_kernels.attention.configs import INTERPRET, launch_meta, tuned, untuned, win_key
from dasg_kernels.attention.host import LOG2E, dot_precision, effective_window, summary_flags
from dasg_kernels.attention.pool import group_means_fwd


@triton.jit
def _fwd_tiles(
    b_acc, b_l, b_m, b_q, pos_m, p_k, p_v, k_desc, v_desc, stride_kt, stride_vt, o_k2d, o_v2d, o_d, o_dv,
    lo, full_lo, full_hi, hi, left, right, G, n_keys, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_SUMMARY: tl.constexpr,
    SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    PIPELINE: tl.constexpr,
):
    """Fold the key tiles ``[lo, hi)`` (local keys or summaries) into the online softmax.

    One loop for masked and unmasked tiles: the tiles in ``[full_lo, full_hi)`` are seen
    by every row and skip the mask (a branch per tile). Separate masked and unmasked
    loops over the same keys make ptxas serialise every wgmma of the kernel (C7515: a
    loop's zero-trip path defines accumulator registers between a wgmma and its wait).

    With ``TMA`` the loop is software-pipelined: the scores of tile ``j + 1`` are issued
    (an asynchronous wgmma) before the softmax of tile ``j``, which runs while the tensor
    cores compute them. Each call computes one spare ``Q K^T``: the tile after the last
    (rows past ``n_keys`` read 0; its scores are never used).

    The row max is taken on the unscaled scores (``qk_scale > 0``; the launchers check
    it), so the scale costs one FMA per score, inside the exponent.
    """
    o_n = tl.arange(0, BLOCK_N)
    lo_i, width = row_windows(pos_m, left, right, n_keys, IS_SUMMARY)
    if PIPELINE:
        b_k = kv_tile(p_k, k_desc, lo, o_n, o_k2d, stride_kt, o_d, n_keys, HEAD_DIM, BLOCK_D, TMA)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
    for start_n in range(lo, hi, BLOCK_N):
        if PIPELINE:
            b_v = kv_tile(p_v, v_desc, start_n, o_n, o_v2d, stride_vt, o_dv, n_keys, HEAD_DV, BLOCK_DV, TMA)
            b_k = kv_tile(p_k, k_desc, start_n + BLOCK_N, o_n, o_k2d, stride_kt, o_d, n_keys, HEAD_DIM, BLOCK_D,
                           TMA)
            b_s_next = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        else:
            b_k = kv_tile(p_k, k_desc, start_n, o_n, o_k2d, stride_kt, o_d, n_keys, HEAD_DIM, BLOCK_D, TMA)
            b_v = kv_tile(p_v, v_desc, start_n, o_n, o_v2d, stride_vt, o_dv, n_keys, HEAD_DV, BLOCK_DV, TMA)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        if (start_n < full_lo) | (start_n >= full_hi):
            m_vis = key_tile_visible(pos_m, start_n + o_n, lo_i, width, left, right, G, n_keys, IS_SUMMARY,
                                      SUM_BEFORE, SUM_AFTER)
            b_s = tl.where(m_vis, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
        # a row that has seen nothing yet: subtract 0, not -inf (exp2(-inf - -inf) = nan)
        b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp2(b_s * qk_scale - b_m_use[:, None])
        b_alpha = tl.exp2(b_m - b_m_use)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None]
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=DOT_PREC)
        b_m = b_m_new
        if PIPELINE:
            b_s = b_s_next
    return b_acc, b_l, b_m


@tuned("fwd")
@triton.jit(do_not_specialize=host.no_specialize(
    "stride_lb stride_lh T_Q T_K TOTAL_Q TOTAL_K Q_OFFSET POS0 H_Q KV_GROUP left right G NG WIN_KEY"))
def _swa_fwd_kernel(
    Q, K, V, KS, VS, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ksb, stride_kst, stride_ksh,
    stride_vsb, stride_vst, stride_vsh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    T_Q, T_K, TOTAL_Q, TOTAL_K, Q_OFFSET, POS0, H_Q, KV_GROUP, left, right, G, NG, qk_scale,
    WIN_KEY,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr, DOT_PREC: tl.constexpr,
    PACK_GQA: tl.constexpr, VARLEN: tl.constexpr, TMA: tl.constexpr, PIPELINE: tl.constexpr = True,
):
    # last query blocks first: with causal full attention they have the most key tiles
    i_blk, i_bh, n_blk = block_and_head(VARLEN)
    i_m = n_blk - 1 - i_blk
    start_m = i_m * BLOCK_M
    o_m = tl.arange(0, BLOCK_M)
    rows = start_m + o_m
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    if PACK_GQA:
        # decode: one program per (row block, batch * kv head); packed row r is query
        # position r // KV_GROUP of q head kv_head * KV_GROUP + r % KV_GROUP, so every
        # key tile is loaded once for all the q heads that share it.
        H_KV = H_Q // KV_GROUP
        i_b = (i_bh // H_KV).to(tl.int64)
        i_hk = (i_bh % H_KV).to(tl.int64)
        n_rows = T_Q * KV_GROUP
        t_q = rows // KV_GROUP
        h_q = (i_hk * KV_GROUP + rows % KV_GROUP).to(tl.int64)
        m_q = (rows < n_rows)[:, None] & (o_d < HEAD_DIM)[None, :]
        o_q = t_q.to(tl.int64) * stride_qt + h_q * stride_qh
        b_q = tl.load(Q + i_b * stride_qb + o_q[:, None] + o_d[None, :], mask=m_q, other=0.0)
        first = start_m // KV_GROUP + Q_OFFSET
        last = (tl.minimum(start_m + BLOCK_M, n_rows) - 1) // KV_GROUP + Q_OFFSET
    else:
        i_b = (i_bh // H_Q).to(tl.int64)
        i_h = i_bh % H_Q
        i_hk = (i_h // KV_GROUP).to(tl.int64)
        i_h = i_h.to(tl.int64)
        if VARLEN:
            # sequence i_b of a packed batch: rows [q0, q0 + T_Q) of q/out/lse, keys
            # [k0, k0 + T_K) (clamped to the packed lengths and max_seqlen, len_q <= len_k);
            # positions, windows and groups restart at its first token
            q0, T_Q = seq_bounds(CU_Q, i_b, TOTAL_Q, T_Q)
            k0, T_K = seq_bounds(CU_K, i_b, TOTAL_K, T_K)
            T_Q = tl.minimum(T_Q, T_K)
            if start_m >= T_Q:
                return
            Q_OFFSET = T_K - T_Q
            NG = (T_K + G - 1) // G
            Q += q0 * stride_qt
            O += q0 * stride_ot
            LSE += q0
            K += k0 * stride_kt
            V += k0 * stride_vt
        t_q = rows
        b_q = load_tile(Q + i_b * stride_qb + i_h * stride_qh, start_m, o_m, o_m[:, None] * stride_qt + o_d[None, :],
                         stride_qt, o_d, T_Q, HEAD_DIM, BLOCK_D, True)
        first = start_m + Q_OFFSET
        last = tl.minimum(start_m + BLOCK_M, T_Q) - 1 + Q_OFFSET
    pos_m = t_q + Q_OFFSET
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh

    o_n = tl.arange(0, BLOCK_N)
    o_k2d = o_n[:, None] * stride_kt + o_d[None, :]
    o_v2d = o_n[:, None] * stride_vt + o_dv[None, :]

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = local_key_range(first, last, left, right, T_K, BLOCK_N)
    k_desc, v_desc = p_k, p_v
    if TMA:  # bounded by this sequence's keys: the tile after the last reads 0
        k_desc = tl.make_tensor_descriptor(p_k, shape=[T_K, HEAD_DIM], strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(p_v, shape=[T_K, HEAD_DV], strides=[stride_vt, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])
    b_acc, b_l, b_m = _fwd_tiles(b_acc, b_l, b_m, b_q, pos_m, p_k, p_v, k_desc, v_desc, stride_kt, stride_vt,
                                 o_k2d, o_v2d, o_d, o_dv, lo, full_lo, full_hi, hi, left, right, G, T_K, qk_scale,
                                 HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, False, SUM_BEFORE, SUM_AFTER, DOT_PREC,
                                 TMA, TMA and PIPELINE)

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
        # (a shard of a longer sequence: context parallelism; 0 otherwise)
        s_full, s_bhi, s_alo = summary_key_range(first + POS0, last + POS0, left, right, G, NG, BLOCK_N,
                                                  SUM_BEFORE, SUM_AFTER)
        # "before" summaries: [0, s_full) seen by every row, [s_full, s_bhi) masked
        b_acc, b_l, b_m = _fwd_tiles(b_acc, b_l, b_m, b_q, pos_m + POS0, p_ks, p_vs, ks_desc, vs_desc, stride_kst,
                                     stride_vst, o_ks2d, o_vs2d, o_d, o_dv, 0, 0, s_full, s_bhi, left, right, G, NG,
                                     qk_scale, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True, SUM_BEFORE,
                                     SUM_AFTER, DOT_PREC, TMA, TMA and PIPELINE)
        if SUM_AFTER:  # "after" summaries (non-causal): [s_alo, NG), masked
            b_acc, b_l, b_m = _fwd_tiles(b_acc, b_l, b_m, b_q, pos_m + POS0, p_ks, p_vs, ks_desc, vs_desc, stride_kst,
                                         stride_vst, o_ks2d, o_vs2d, o_d, o_dv, s_alo, s_alo, s_alo, NG, left, right,
                                         G, NG, qk_scale, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True,
                                         SUM_BEFORE, SUM_AFTER, DOT_PREC, TMA, TMA and PIPELINE)

    m_empty = b_l == 0.0
    b_l = tl.where(m_empty, 1.0, b_l)
    # one reciprocal per row, not an IEEE division per element (~3x the instructions)
    b_out = b_acc * (1.0 / b_l)[:, None]
    b_lse = tl.where(m_empty, float("-inf"), (b_m + tl.log2(b_l)) * K_LN2)
    if PACK_GQA:
        o_o = t_q.to(tl.int64) * stride_ot + h_q * stride_oh
        m_o = (rows < n_rows)[:, None] & (o_dv < HEAD_DV)[None, :]
        tl.store(O + i_b * stride_ob + o_o[:, None] + o_dv[None, :], b_out.to(O.dtype.element_ty), mask=m_o)
        tl.store(LSE + i_b * stride_lb + h_q * stride_lh + t_q, b_lse, mask=rows < n_rows)
    else:
        store_tile(O + i_b * stride_ob + i_h * stride_oh, b_out, start_m, o_m, stride_ot, o_dv, T_Q, HEAD_DV,
                    BLOCK_DV)
        tl.store(LSE + i_b * stride_lb + i_h * stride_lh + rows, b_lse, mask=rows < T_Q)


@host.on_device_of_first_arg
def swa_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    left: int,
    right: int,
    causal: bool,
    group_size: int | None,
    summaries: bool,
    scale: float,
    q_offset: int | None = None,
    summary_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    pos_offset: int = 0,
    pack_gqa: bool = False,
    config: dict | None = None,
    varlen: host.Varlen | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward. ``left, right`` are the user's window with ``causal`` applied.

    Args:
        q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``, v: ``[B, Tk, Hkv, Dv]`` (any strides,
            last stride 1; ``Dv`` may differ from ``D``, as in MLA).
        q_offset: position of query row 0 (default ``Tk - Tq``).
        summary_kv: precomputed group means ``(ks, vs)`` (e.g. a decode cache); pooled here if ``None``.
        pos_offset: the summaries' position of key 0 (dense only): summary ``g`` stands for the
            positions ``[g*G, (g+1)*G)`` and the query at key position ``i`` sees it when
            ``(g+1)*G - 1 < pos_offset + i - left`` (a shard of a longer sequence whose means
            come in ``summary_kv``); the local window depends only on ``i - j``.
        pack_gqa: put the ``Hq // Hkv`` query heads of a kv head in the rows of one
            program (decode: few query positions, many heads per kv head).
        config: explicit launch config (``BLOCK_M, BLOCK_N, num_warps, num_stages``) that
            bypasses the autotuner (decode); ignored under the interpreter.
        varlen: a packed batch (:class:`~dasg_kernels.attention.host.Varlen`): then
            ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``, and each sequence's queries
            are its last ``len_q`` positions.
    Returns:
        ``out [B, Tq, Hq, Dv]`` (q.dtype), ``lse [B, Hq, Tq]`` fp32, and the pooled
        summaries ``ks [B, ceil(Tk/G), Hkv, D]``, ``vs [.., Dv]`` (``None`` when no summary is visible).
        With ``varlen``: ``out [total_q, Hq, D]``, ``lse [Hq, total_q]``, summaries
        ``[B, ceil(max_k/G), Hkv, D]`` (group ``g`` of sequence ``b``).
    """
    if not scale > 0:  # the kernel takes the row max of the unscaled scores
        raise ValueError(f"swa_attention: scale must be > 0, got {scale}")
    hq, d = q.shape[-2], q.shape[-1]
    hkv, dv = k.shape[-2], v.shape[-1]
    if varlen is None:
        b, tq = q.shape[0], q.shape[1]
        tk = k.shape[1]
        out = host.new_empty((b, tq, hq, dv), q.dtype, q.device)
        lse = host.new_empty((b, hq, tq), torch.float32, q.device)
        out4, lse3 = out, lse
    else:
        b, tq, tk = varlen.batch, varlen.max_q, varlen.max_k
        out = host.new_empty((q.shape[0], hq, dv), q.dtype, q.device)
        lse = host.new_empty((hq, q.shape[0]), torch.float32, q.device)
        out4, lse3 = host.batched_view(out, varlen), lse.unsqueeze(0).expand(b, -1, -1)
        q, k, v = (host.batched_view(x, varlen) for x in (q, k, v))
        pack_gqa = False
    q_offset = tk - tq if q_offset is None or varlen is not None else q_offset
    sum_before, sum_after = summary_flags(left, right, causal, summaries)
    use_sum = sum_before or sum_after
    pos_offset = 0 if varlen is not None else pos_offset
    l_eff, r_eff = effective_window(left, right, tk, pos_offset + q_offset + tq - 1)
    pack_gqa = pack_gqa and hq != hkv
    n_rows, n_heads = (tq * (hq // hkv), hkv) if pack_gqa else (tq, hq)
    if varlen is None:
        host.check_grid("swa_attention", b * n_heads, "batch * kv heads" if pack_gqa else "batch * q heads")
    host.check_row_stride("swa_attention", q=q, k=k, v=v)
    if summary_kv is not None:
        host.check_row_stride("swa_attention", k_summary=summary_kv[0], v_summary=summary_kv[1])
    ks = vs = None
    if use_sum:  # summaries that no query can see (e.g. left=-1 and causal) are skipped
        ks, vs = group_means_fwd(k, v, group_size, varlen=varlen) if summary_kv is None else summary_kv
    if out.numel() == 0 or tk == 0 or b == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse, ks, vs
    g = group_size if use_sum else 1
    ng = ks.shape[1] if use_sum else 0
    ks_ = ks if use_sum else k
    vs_ = vs if use_sum else v
    cu_q, cu_k = (q, q) if varlen is None else (varlen.cu_q, varlen.cu_k)  # unused when dense

    def grid(meta):
        return host.block_grid(triton.cdiv(n_rows, meta["BLOCK_M"]), b * n_heads, varlen)

    kernel, meta = _swa_fwd_kernel, launch_meta("fwd")
    if config is not None and not INTERPRET:
        kernel, meta = untuned(_swa_fwd_kernel), dict(config)
    use_tma = host.tma_loads_ok(k, v, ks_, vs_)
    with host.tma_scratch(q.device, use_tma):
        kernel[grid](
            q, k, v, ks_, vs_, out4, lse3, cu_q, cu_k,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            ks_.stride(0), ks_.stride(1), ks_.stride(2),
            vs_.stride(0), vs_.stride(1), vs_.stride(2),
            out4.stride(0), out4.stride(1), out4.stride(2),
            lse3.stride(0), lse3.stride(1),
            tq, tk, q.shape[1], k.shape[1], q_offset, pos_offset, hq, hq // hkv, l_eff, r_eff, g, ng,
            scale * LOG2E,
            win_key(l_eff, r_eff, tk),
            HEAD_DIM=d, BLOCK_D=host.block_d(d), HEAD_DV=dv, BLOCK_DV=host.block_d(dv),
            SUM_BEFORE=sum_before, SUM_AFTER=sum_after, DOT_PREC=dot_precision(q.dtype), PACK_GQA=pack_gqa,
            VARLEN=varlen is not None, TMA=use_tma,
            **meta,
        )
    return out, lse, ks, vs
