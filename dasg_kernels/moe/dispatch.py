"""The ``triton`` dispatch plan: a counting sort in five small Triton launches, no host sync.

:func:`build_plan_triton` builds the :class:`~dasg_kernels.moe.types.DispatchPlan` (its
layout and worst-case sizes are in :mod:`dasg_kernels.moe.types`) as the body of the
``dasg_kernels::moe_dispatch`` custom op of :mod:`dasg_kernels.moe.ops`. It equals
:func:`dasg_kernels.moe.dispatch_torch.build_plan_torch` (the ``torch`` backend) bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dasg_kernels.backend import interpreter_enabled
from dasg_kernels.moe.types import DispatchPlan, num_rows_bound, num_tiles_bound

# --------------------------------------------------------------------------- Triton counting sort
#
# The pairs are cut into chunks of CHUNK. (1) each chunk counts its pairs per expert;
# (2) per expert, an exclusive scan over the chunks gives each chunk's first slot inside
# the expert's run, and the totals; (3) one program turns the totals into the
# block-aligned offsets; (4) each chunk places its pairs at offset + chunk prefix + rank
# inside the chunk (a cumsum over its one-hot block); (5) the tile map compares each
# tile's first row with the run ends. Stable and deterministic (no atomics), and equal
# to the sort-based plan of dispatch_torch bit for bit.


@triton.jit
def _plan_count_kernel(ids, chunk_counts, M, E, CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr):
    c = tl.program_id(0)
    o_e = tl.arange(0, E_PAD)
    cnt = tl.zeros([E_PAD], dtype=tl.int32)
    for s0 in range(0, CHUNK, SUB):  # SUB pairs at a time keep the one-hot block small
        o = c * CHUNK + s0 + tl.arange(0, SUB)
        v = tl.load(ids + o, mask=o < M, other=-1)
        hot = ((v[:, None] == o_e[None, :]) & (v[:, None] < E)).to(tl.int32)
        cnt += tl.sum(hot, axis=0)
    tl.store(chunk_counts + c.to(tl.int64) * E_PAD + o_e, cnt)


@triton.jit
def _plan_scan_kernel(chunk_counts, chunk_prefix, totals, NUM_CHUNKS,
                      E_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    o_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, NUM_CHUNKS, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < NUM_CHUNKS
        o = o_c[:, None].to(tl.int64) * E_PAD + o_e[None, :]
        b = tl.load(chunk_counts + o, mask=m_c[:, None], other=0)
        tl.store(chunk_prefix + o, tl.cumsum(b, axis=0) - b + carry[None, :], mask=m_c[:, None])
        carry += tl.sum(b, axis=0)
    tl.store(totals + o_e, carry)


@triton.jit
def _plan_offsets_kernel(totals, tokens_per_expert, offsets, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    o_e = tl.arange(0, E_PAD)
    m_e = o_e < E
    tot = tl.load(totals + o_e, mask=m_e, other=0)
    padded = (tot + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    tl.store(offsets + o_e + 1, end, mask=m_e)
    tl.store(offsets + o_e, end - padded, mask=o_e == 0)
    tl.store(tokens_per_expert + o_e, tot, mask=m_e)


@triton.jit
def _plan_scatter_kernel(ids, chunk_prefix, offsets, row_pair, pair_row, M, E,
                         CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr):
    c = tl.program_id(0)
    o_e = tl.arange(0, E_PAD)
    # first row of this chunk's pairs inside each expert's run
    start = tl.load(chunk_prefix + c.to(tl.int64) * E_PAD + o_e)
    start += tl.load(offsets + o_e, mask=o_e < E, other=0)
    for s0 in range(0, CHUNK, SUB):
        o = c * CHUNK + s0 + tl.arange(0, SUB)
        m = o < M
        v = tl.load(ids + o, mask=m, other=-1)
        valid = m & (v >= 0) & (v < E)
        hot = ((v[:, None] == o_e[None, :]) & valid[:, None]).to(tl.int32)
        incl = tl.cumsum(hot, axis=0)
        row = tl.sum(hot * (incl - hot + start[None, :]), axis=1)  # start + earlier pairs of my expert
        tl.store(row_pair + row, o, mask=valid)
        tl.store(pair_row + o, tl.where(valid, row, -1), mask=m)
        start += tl.sum(hot, axis=0)


@triton.jit
def _plan_tiles_kernel(offsets, tile_expert, NUM_TILES, E,
                       BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    o_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_e = tl.arange(0, E_PAD)
    m_e = o_e < E
    end = tl.load(offsets + o_e + 1, mask=m_e, other=0)
    first = o_t * BLOCK_M
    owner = tl.sum(((end[None, :] <= first[:, None]) & m_e[None, :]).to(tl.int32), axis=1)
    tl.store(tile_expert + o_t, tl.where(owner < E, owner, -1), mask=o_t < NUM_TILES)


def build_plan_triton(expert_ids: torch.Tensor, num_experts: int, block_m: int, *,
                      chunk: int | None = None, block_c: int | None = None) -> DispatchPlan:
    """The plan of ``expert_ids [N, k]`` int for ``num_experts`` experts and ``block_m``-row
    tiles, from five small Triton launches (no host sync). Ids outside ``[-1, E)`` count as
    unused.

    ``chunk`` (pairs per program, a power of two >= 16) and ``block_c`` (chunks per scan
    step) override the defaults, for tests.
    """
    n, k = expert_ids.shape
    dev = expert_ids.device
    m = n * k
    e = num_experts
    num_tiles = num_tiles_bound(m, e, block_m)
    e_pad = triton.next_power_of_2(e)
    # SUB pairs per step: a [SUB, E_PAD] one-hot block; CHUNK pairs per program: about
    # 512 programs, at most 8192 pairs each (so the [chunks, E] counts stay small)
    sub = max(16, (65536 if interpreter_enabled() else 8192) // e_pad)
    if chunk is None:
        chunk = min(max(triton.next_power_of_2(triton.cdiv(max(m, 1), 512)), 1024), 8192)
        if interpreter_enabled():
            chunk = 8192
        chunk = min(chunk, triton.next_power_of_2(max(m, 16)))
    sub = min(sub, chunk)
    num_chunks = triton.cdiv(m, chunk)
    # ids outside [-1, E) count as unused; clamp before narrowing so none wraps into range
    ids = expert_ids.reshape(-1).clamp(-1, e).to(torch.int32)
    i32 = dict(dtype=torch.int32, device=dev)
    chunk_counts = torch.empty((max(num_chunks, 1), e_pad), **i32)
    chunk_prefix = torch.empty_like(chunk_counts)
    totals = torch.empty((e_pad,), **i32)
    counts = torch.empty((e,), **i32)
    offsets = torch.empty((e + 1,), **i32)
    row_pair = torch.full((num_tiles * block_m,), -1, **i32)
    pair_row = torch.empty((m,), **i32)
    tile_expert = torch.empty((num_tiles,), **i32)
    if num_chunks:
        _plan_count_kernel[(num_chunks,)](ids, chunk_counts, m, e, CHUNK=chunk, SUB=sub, E_PAD=e_pad)
    block_e = min(e_pad, 32)
    if block_c is None:
        block_c = max(16, min(triton.next_power_of_2(max(num_chunks, 1)), 8192 // block_e))
    _plan_scan_kernel[(e_pad // block_e,)](chunk_counts, chunk_prefix, totals, num_chunks,
                                           E_PAD=e_pad, BLOCK_C=block_c, BLOCK_E=block_e)
    _plan_offsets_kernel[(1,)](totals, counts, offsets, e, BLOCK_M=block_m, E_PAD=e_pad)
    if num_chunks:
        _plan_scatter_kernel[(num_chunks,)](ids, chunk_prefix, offsets, row_pair, pair_row, m, e,
                                            CHUNK=chunk, SUB=sub, E_PAD=e_pad)
    if num_tiles:
        block_t = max(16, min(triton.next_power_of_2(num_tiles), 8192 // e_pad))
        _plan_tiles_kernel[(triton.cdiv(num_tiles, block_t),)](offsets, tile_expert, num_tiles, e,
                                                              BLOCK_M=block_m, E_PAD=e_pad, BLOCK_T=block_t)
    return DispatchPlan(
        row_pair=row_pair,
        pair_row=pair_row,
        expert_offsets=offsets,
        tile_expert=tile_expert,
        tokens_per_expert=counts,
        block_m=block_m,
        num_slots=k,
        num_tiles=num_tiles,
        num_rows=num_rows_bound(m, e, block_m),
    )

