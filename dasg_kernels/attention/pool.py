"""Group-summary pooling: the mean of ``k`` and ``v`` over each group of ``G`` positions.

``k, v [B, T, H, D]`` -> ``ks, vs [B, ceil(T/G), H, D]`` in the input dtype, summed in
fp32; the last (possibly partial) group is the mean over the positions it has,
exactly as :func:`dasg_kernels.reference.group_means_ref`.

The backward of the mean (``dk[t] += dks[t // G] / count(t // G)``) is fused into
the epilogue of the dk/dv kernel (:mod:`dasg_kernels.attention.bwd`), so it costs
no extra pass over ``dk`` and ``dv``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dasg_kernels.attention import host
from dasg_kernels.attention.common import block_and_head, seq_bounds
from dasg_kernels.attention.configs import POOL_BLOCK_G


@triton.jit(do_not_specialize=host.no_specialize("T TOTAL H G"))
def _group_mean_kernel(
    K, V, KS, VS, CU,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ksb, stride_kst, stride_ksh,
    stride_vsb, stride_vst, stride_vsh,
    T, TOTAL, H, G,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_G: tl.constexpr, VARLEN: tl.constexpr,
):
    i_g, i_bh, _ = block_and_head(VARLEN)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    start = i_g * G
    if VARLEN:  # groups of sequence i_b: its keys [k0, k0 + T) (clamped); groups past its end are not written
        k0, T = seq_bounds(CU, i_b, TOTAL, T)
        if start >= T:
            return
        K += k0 * stride_kt
        V += k0 * stride_vt
    end = tl.minimum(start + G, T)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < HEAD_DV
    o_t = tl.arange(0, BLOCK_G)
    p_k = K + i_b * stride_kb + i_h * stride_kh
    p_v = V + i_b * stride_vb + i_h * stride_vh
    b_ks = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_vs = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_G):
        rows = t0 + o_t
        m_t = (rows < end)[:, None]
        r64 = rows.to(tl.int64)[:, None]
        b_ks += tl.sum(tl.load(p_k + r64 * stride_kt + o_d[None, :], mask=m_t & m_d[None, :], other=0.0)
                       .to(tl.float32), 0)
        b_vs += tl.sum(tl.load(p_v + r64 * stride_vt + o_dv[None, :], mask=m_t & m_dv[None, :], other=0.0)
                       .to(tl.float32), 0)
    cnt = (end - start).to(tl.float32)
    p_ks = KS + i_b * stride_ksb + i_g.to(tl.int64) * stride_kst + i_h * stride_ksh + o_d
    p_vs = VS + i_b * stride_vsb + i_g.to(tl.int64) * stride_vst + i_h * stride_vsh + o_dv
    tl.store(p_ks, (b_ks / cnt).to(KS.dtype.element_ty), mask=m_d)
    tl.store(p_vs, (b_vs / cnt).to(VS.dtype.element_ty), mask=m_dv)


@host.on_device_of_first_arg
def group_means_fwd(
    k: torch.Tensor, v: torch.Tensor, group_size: int, *, varlen: host.Varlen | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool ``k [B, T, H, D]``, ``v [B, T, H, Dv]`` (any strides, last stride 1) to ``[B, ceil(T/G), H, D or Dv]``.

    With ``varlen``, ``k, v`` are the ``[B, total_k, H, D]`` batch-stride-0 views of a packed
    batch (:func:`~dasg_kernels.attention.host.batched_view`): each sequence's groups
    restart at its first key, ``ks[b, g]`` is group ``g`` of sequence ``b`` (the output has
    ``ceil(max_k / G)`` groups; those past a sequence's end are left unwritten)."""
    b, t, h, d = k.shape
    dv = v.shape[-1]
    if varlen is not None:
        t = varlen.max_k
    ng = triton.cdiv(t, group_size)
    ks = host.new_empty((b, ng, h, d), k.dtype, k.device)
    vs = host.new_empty((b, ng, h, dv), v.dtype, v.device)
    if ks.numel() == 0:
        return ks, vs
    if varlen is None:
        host.check_grid("group_means", b * h, "batch * kv heads")
    _group_mean_kernel[host.block_grid(ng, b * h, varlen)](
        k, v, ks, vs, k if varlen is None else varlen.cu_k,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2),
        t, k.shape[1], h, group_size,
        HEAD_DIM=d, BLOCK_D=host.block_d(d), HEAD_DV=dv, BLOCK_DV=host.block_d(dv),
        BLOCK_G=max(2, min(POOL_BLOCK_G, triton.next_power_of_2(group_size))), VARLEN=varlen is not None,
    )
    return ks, vs
