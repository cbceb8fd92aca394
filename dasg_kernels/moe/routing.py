"""Dynamic top-p routing with a ``k_max`` cap and group-limited selection (ADR).

One Triton program routes a block of tokens: it holds the block's ``[BLOCK_T, E]``
probabilities in registers, picks the eligible groups, then the experts one at a
time by descending probability (ties to the lower index), tracks the prefix mass,
writes ``expert_ids`` / ``num_selected`` and bumps the per-expert histogram with
integer atomics (integer adds commute, so the counts are deterministic).

The softmax itself is ``torch.softmax(logits.float())`` -- the same call as
:func:`dasg_kernels.moe.routing_torch.route_torch` and of the oracle
:func:`dasg_kernels.reference.route_ref` -- so the kernel ranks bit-identical
probabilities and the ids match the torch backend and the oracle exactly, and the
weights are a differentiable ``gather`` of those probabilities (the router trains through
PyTorch's softmax backward). That composition lives in
:mod:`dasg_kernels.moe.interface`; this module holds only the kernel and its launcher
(a kernel module: of the package it imports only :mod:`dasg_kernels.backend`).

Prefix masses: ``torch.cumsum`` on the CPU accumulates fp32 in fp64 and rounds each
prefix to fp32; the kernel does the same (``before = fp32(prefix) - p`` compared with
``top_p`` in fp32), which is the correctly rounded prefix. CUDA's fp32 scan may
differ by an ulp, which only matters when a prefix mass lands within an ulp of
``top_p``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dasg_kernels.backend import interpreter_enabled


@triton.jit
def _route_kernel(
    probs, ids_out, num_out, counts,
    N, E, stride_pn, stride_in, top_p,
    GROUP_SIZE,
    K_MAX: tl.constexpr, K_CAP: tl.constexpr, K_PAD: tl.constexpr, MIN_K: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    o_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < N
    o_e = tl.arange(0, E_PAD)
    m_e = o_e < E
    p_p = probs + o_t[:, None].to(tl.int64) * stride_pn + o_e[None, :]
    b_p = tl.load(p_p, mask=m_t[:, None] & m_e[None, :], other=float("-inf"))
    # NaN probabilities (a row of logits holding NaN or +inf, or all -inf) rank above
    # every real probability, in index order, as torch.sort ranks NaN; 2.0 > any
    # probability keeps every pick inside [0, E) and the top-p count finite
    b_p = tl.where(b_p != b_p, 2.0, b_p)

    if N_GROUP > 1:
        # group-limited: score each group by its best expert, keep the best TOPK_GROUP
        grp = o_e // GROUP_SIZE
        o_g = tl.arange(0, G_PAD)
        b_gs = tl.full([BLOCK_T, G_PAD], float("-inf"), tl.float32)
        for g in range(N_GROUP):
            s = tl.max(tl.where((grp == g)[None, :], b_p, float("-inf")), axis=1)
            b_gs = tl.where(o_g[None, :] == g, s[:, None], b_gs)
        allowed = tl.zeros([BLOCK_T, E_PAD], tl.int32)
        for _ in range(TOPK_GROUP):
            m = tl.max(b_gs, axis=1)
            gi = tl.min(tl.where(b_gs == m[:, None], o_g[None, :], G_PAD), axis=1)
            allowed = tl.where(grp[None, :] == gi[:, None], 1, allowed)
            b_gs = tl.where(o_g[None, :] == gi[:, None], float("-inf"), b_gs)
        b_p = tl.where(allowed != 0, b_p, float("-inf"))

    o_k = tl.arange(0, K_PAD)
    b_ids = tl.full([BLOCK_T, K_PAD], -1, tl.int32)
    cum = tl.zeros([BLOCK_T], tl.float64)
    num = tl.zeros([BLOCK_T], tl.int32)
    for j in range(K_CAP):
        m = tl.max(b_p, axis=1)
        idx = tl.min(tl.where(b_p == m[:, None], o_e[None, :], E_PAD), axis=1)
        b_ids = tl.where(o_k[None, :] == j, idx[:, None], b_ids)
        if USE_TOP_P:
            m = tl.where(m_t, m, 0.0)  # rows past N hold -inf only
            cum = cum + m.to(tl.float64)
            before = cum.to(tl.float32) - m
            num += (before < top_p).to(tl.int32)
        b_p = tl.where(o_e[None, :] == idx[:, None], float("-inf"), b_p)
    if USE_TOP_P:
        num = tl.minimum(tl.maximum(num, MIN_K), K_CAP)
    else:
        num = tl.full([BLOCK_T], K_CAP, tl.int32)
    b_ids = tl.where(o_k[None, :] < num[:, None], b_ids, -1)

    m_out = m_t[:, None] & (o_k[None, :] < K_MAX)
    tl.store(ids_out + o_t[:, None].to(tl.int64) * stride_in + o_k[None, :], b_ids, mask=m_out)
    tl.store(num_out + o_t, num, mask=m_t)
    tl.atomic_add(counts + b_ids, tl.full([BLOCK_T, K_PAD], 1, tl.int32), mask=m_out & (b_ids >= 0))


def _route_block_t(n: int, e_pad: int) -> int:
    if interpreter_enabled():
        # the interpreter pays per program: few big blocks
        return max(1, min(triton.next_power_of_2(max(n, 1)), max(16, 16384 // e_pad)))
    return max(1, min(64, 4096 // e_pad))


def route_select_triton(probs: torch.Tensor, *, top_p: float, k_max: int, k_cap: int, min_k: int, n_group: int,
                        topk_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the routing kernel on ``probs [N, E]`` (fp32, no grad): ``expert_ids [N, k_max]``,
    ``num_selected [N]``, ``tokens_per_expert [E]``, all int32. (The body of the
    ``dasg_kernels::moe_route_select`` custom op.)"""
    n, e = probs.shape
    ids = torch.empty((n, k_max), dtype=torch.int32, device=probs.device)
    num = torch.empty((n,), dtype=torch.int32, device=probs.device)
    counts = torch.zeros((e,), dtype=torch.int32, device=probs.device)
    if n > 0:
        p_in = probs if probs.stride(-1) == 1 else probs.contiguous()
        e_pad = triton.next_power_of_2(e)
        block_t = _route_block_t(n, e_pad)
        _route_kernel[(triton.cdiv(n, block_t),)](
            p_in, ids, num, counts,
            n, e, p_in.stride(0), ids.stride(0), float(top_p),
            max(e // n_group, 1),
            K_MAX=k_max, K_CAP=k_cap, K_PAD=triton.next_power_of_2(k_max), MIN_K=min(min_k, k_cap),
            USE_TOP_P=top_p < 1.0,
            N_GROUP=n_group, TOPK_GROUP=topk_group, G_PAD=triton.next_power_of_2(n_group),
            BLOCK_T=block_t, E_PAD=e_pad,
        )
    return ids, num, counts

