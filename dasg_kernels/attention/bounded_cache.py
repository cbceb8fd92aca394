"""Kernel: new queries against a bounded cache (a ring of the last ``C`` keys + group means).

One program per (packed row block, batch * kv head); packed row ``r`` is query ``r // KV_GROUP``
of q head ``kv_head * KV_GROUP + r % KV_GROUP``, so each cache tile is loaded once for all
the q heads that share it (as the decode path of :mod:`.fwd`).

Row ``b`` of the batch has its own length (``SEQ[b] + SEQ_OFFSET`` is the position of its
first query), so the ring slot ``s`` holds position ``total - 1 - ((total - 1 - s) mod C)``
(``total`` = positions in the cache after the new ones), empty when negative. A query at
``i`` sees the slots holding ``i - left <= p <= i`` and the means of the groups ``g`` with
``(g + 1) * G <= i - left`` (wholly before its window, hence finished). Online softmax in
the log2 domain with fp32 accumulators; a row that sees nothing outputs 0 and lse ``-inf``.

Every program walks all ``C`` slots (the ring is sized ``left + Tq``, so nearly every slot
is in the window) and the summary tiles up to the last group its queries can see. Not
done: splitting the ring over programs (flash-decoding) for few (batch, kv head) pairs.

The custom op ``torch.ops.dasg_kernels.bounded_cache_attention`` (:mod:`.ops`, with a fake
implementation) wraps the launcher, so ``torch.compile(fullgraph=True)`` traces a decode step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dasg_kernels.attention import host
from dasg_kernels.attention.common import K_LN2
from dasg_kernels.attention.configs import INTERPRET, decode_config
from dasg_kernels.attention.host import LOG2E, dot_precision


@triton.jit
def _online_step(b_acc, b_l, b_m, b_s, b_v, DOT_PREC: tl.constexpr):
    """Fold one masked score tile ``b_s`` (log2 domain, ``-inf`` = invisible) and its values."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # exp2(-inf - -inf) = nan
    b_alpha = tl.exp2(b_m - b_m_use)
    b_p = tl.exp2(b_s - b_m_use[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=DOT_PREC)
    return b_acc, b_l, b_m_new


@triton.jit(do_not_specialize=host.no_specialize("T_Q C KV_GROUP H_KV left G SEQ_OFFSET"))
def _bounded_cache_fwd_kernel(
    Q, K, V, KS, VS, SEQ, O, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ksb, stride_kst, stride_ksh,
    stride_vsb, stride_vst, stride_vsh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    T_Q, C, H_KV, KV_GROUP, left, G, SEQ_OFFSET, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUMMARIES: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_bh = tl.program_id(1)
    i_b = (i_bh // H_KV).to(tl.int64)
    i_hk = (i_bh % H_KV).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_q = rows // KV_GROUP
    h_q = (i_hk * KV_GROUP + rows % KV_GROUP).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_row = rows < T_Q * KV_GROUP
    m_qd = m_row[:, None] & (o_d < HEAD_DIM)[None, :]
    o_q = t_q.to(tl.int64) * stride_qt + h_q * stride_qh
    b_q = tl.load(Q + i_b * stride_qb + o_q[:, None] + o_d[None, :], mask=m_qd, other=0.0)

    first = tl.load(SEQ + i_b).to(tl.int32) + SEQ_OFFSET  # position of query 0 of this row
    pos = first + t_q
    total = first + T_Q  # positions in the cache, the new ones included
    lo = pos - left  # first visible position of each query (left >= 0)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    o_n = tl.arange(0, BLOCK_N)
    m_d = (o_d < HEAD_DIM)[None, :]
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh
    last = tl.maximum(total, 0) - 1  # a row still all left padding holds nothing
    r_last = (last + C) % C  # the slot of the last position (one division per program, operands >= 0)
    for start in range(0, C, BLOCK_N):
        slot = start + o_n
        m_slot = slot < C
        back = r_last - slot  # how far behind the last position slot s is, mod C: no division per key
        p = last - tl.where(back < 0, back + C, back)  # the position slot s holds (< 0: empty)
        m_kv = m_slot[:, None] & m_d
        b_k = tl.load(p_k + slot[:, None] * stride_kt + o_d[None, :], mask=m_kv, other=0.0)
        b_v = tl.load(p_v + slot[:, None] * stride_vt + o_d[None, :], mask=m_kv, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        vis = (m_slot & (p >= 0))[None, :] & (p[None, :] <= pos[:, None]) & (p[None, :] >= lo[:, None])
        b_acc, b_l, b_m = _online_step(b_acc, b_l, b_m, tl.where(vis, b_s, float("-inf")), b_v, DOT_PREC)

    if SUMMARIES:
        # groups g with (g + 1) * G <= i - left: wholly before the window, hence finished
        n_vis = tl.maximum(lo, 0) // G
        ng = tl.maximum(total - 1 - left, 0) // G  # what the last query of the row sees
        p_ks = KS + i_b * stride_ksb + i_hk * stride_ksh
        p_vs = VS + i_b * stride_vsb + i_hk * stride_vsh
        for start in range(0, ng, BLOCK_N):
            g = start + o_n
            m_g = (g < ng)[:, None] & m_d
            b_k = tl.load(p_ks + g[:, None] * stride_kst + o_d[None, :], mask=m_g, other=0.0)
            b_v = tl.load(p_vs + g[:, None] * stride_vst + o_d[None, :], mask=m_g, other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
            vis = g[None, :] < n_vis[:, None]
            b_acc, b_l, b_m = _online_step(b_acc, b_l, b_m, tl.where(vis, b_s, float("-inf")), b_v, DOT_PREC)

    m_empty = b_l == 0.0
    b_out = b_acc / tl.where(m_empty, 1.0, b_l)[:, None]
    b_lse = tl.where(m_empty, float("-inf"), (b_m + tl.log2(tl.where(m_empty, 1.0, b_l))) * K_LN2)
    o_o = t_q.to(tl.int64) * stride_ot + h_q * stride_oh
    tl.store(O + i_b * stride_ob + o_o[:, None] + o_d[None, :], b_out.to(O.dtype.element_ty), mask=m_qd)
    tl.store(LSE + i_b * stride_lb + h_q * stride_lh + t_q, b_lse, mask=m_row)


@host.on_device_of_first_arg
def bounded_cache_attention_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    summary: tuple[torch.Tensor, torch.Tensor] | None,
    cache_seqlens: torch.Tensor,
    *,
    seq_offset: int,
    left: int,
    group_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the bounded-cache kernel (arguments checked by the caller).

    Args:
        q: ``[B, Tq, Hq, D]``; k_cache, v_cache: ``[B, C, Hkv, D]`` rings (slot ``p % C``
            holds position ``p``); summary: ``(k_means, v_means) [B, NG, Hkv, D]`` or ``None``.
        cache_seqlens: ``[B]`` int32; query ``j`` of row ``b`` is at position
            ``cache_seqlens[b] + seq_offset + j``.
        left: the window's left bound (``>= 0``).
    Returns:
        ``out [B, Tq, Hq, D]`` (q.dtype), ``lse [B, Hq, Tq]`` fp32.
    """
    b, tq, hq, d = q.shape
    c, hkv = k_cache.shape[1], k_cache.shape[2]
    host.check_grid("swa_attention_with_kvcache", b * hkv, "batch * kv heads")
    out = host.new_empty((b, tq, hq, d), q.dtype, q.device)
    lse = host.new_empty((b, hq, tq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    ks, vs = summary if summary is not None else (k_cache, v_cache)
    rows = tq * (hq // hkv)
    cfg = decode_config(min(rows, 64), d)
    meta = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
    if not INTERPRET:
        meta.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (triton.cdiv(rows, meta["BLOCK_M"]), b * hkv)
    _bounded_cache_fwd_kernel[grid](
        q, k_cache, v_cache, ks, vs, cache_seqlens, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        tq, c, hkv, hq // hkv, left, group_size, seq_offset, scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=host.block_d(d), SUMMARIES=summary is not None,
        DOT_PREC=dot_precision(q.dtype), **meta,
    )
    return out, lse
