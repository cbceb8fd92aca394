"""Deterministic combine: per token, the weighted sum of its slots' rows, in slot order.

``y[t] = sum_{s < k} w[t, s] * src[pair_row[t*k + s]]`` (unused slots, ``pair_row ==
-1``, add nothing), accumulated in fp32 in the fixed slot order: no atomics, so two
runs are bitwise equal. The same kernel without weights reduces the per-slot input
gradients of the backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dasg_kernels.backend import interpreter_enabled
from dasg_kernels.moe.types import DispatchPlan


@triton.jit
def _combine_kernel(
    src, pair_row, weights, out,
    N, D,
    stride_sr, stride_on,
    K_SLOTS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_d = tl.program_id(1)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < N
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(K_SLOTS):
        o_p = o_t.to(tl.int64) * K_SLOTS + s
        row = tl.load(pair_row + o_p, mask=m_t, other=-1)
        m_s = row >= 0
        b_v = tl.load(src + row.to(tl.int64)[:, None] * stride_sr + o_d[None, :],
                      mask=m_s[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            b_w = tl.load(weights + o_p, mask=m_s, other=0.0).to(tl.float32)
            b_v = b_v * b_w[:, None]
        acc += b_v
    p_o = out + o_t.to(tl.int64)[:, None] * stride_on + o_d[None, :]
    tl.store(p_o, acc.to(out.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


def _blocks(d: int) -> tuple[int, int]:
    if interpreter_enabled():
        return 32, min(triton.next_power_of_2(d), 128)
    return 16, min(triton.next_power_of_2(d), 256)


def combine(src: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor | None, n: int,
            out_dtype: torch.dtype) -> torch.Tensor:
    """``[n, D]`` in ``out_dtype``: per token, the (weighted) sum of its slots' rows of ``src``."""
    d = src.shape[1]
    out = torch.empty((n, d), dtype=out_dtype, device=src.device)
    if n == 0:
        return out
    bt, bd = _blocks(d)
    _combine_kernel[(triton.cdiv(n, bt), triton.cdiv(d, bd))](
        src, plan.pair_row, weights if weights is not None else src, out,
        n, d, src.stride(0), out.stride(0),
        K_SLOTS=plan.num_slots, HAS_WEIGHTS=weights is not None,
        BLOCK_T=bt, BLOCK_D=bd,
    )
    return out
