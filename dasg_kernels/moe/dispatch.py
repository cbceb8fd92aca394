"""Expert-sorted dispatch plan, built on the device with no host synchronisation.

A token's ``k`` slots are the (token, slot) *pairs* ``pair = token * k + slot``
(``M = N * k`` of them; slots with expert ``-1`` are unused). The grouped GEMMs walk
the pairs sorted by expert, each expert's run padded up to a multiple of
``block_m`` so that every ``block_m`` tile of rows belongs to one expert:

* ``tokens_per_expert [E]``: histogram of the used pairs.
* ``expert_offsets [E+1]``: block-aligned start row of each expert's run (prefix sum
  of the padded counts); ``expert_offsets[E]`` is the number of rows in use.
* ``row_pair [num_tiles * block_m]``: the pair held by each row (``-1`` = padding).
  Pairs of one expert keep their original order (stable sort), so the plan is
  deterministic.
* ``pair_row [M]``: the inverse, the row of each pair (``-1`` = unused slot).
* ``tile_expert [num_tiles]``: the expert of each tile, ``-1`` for tiles past the
  last run. ``num_tiles = cdiv(M, block_m) + min(E, M)`` is the worst case, known on
  the host without reading the routing back; unused tiles exit at once, and experts with no
  pairs own no tile.

Everything is sized by the worst case, so the host never waits on the device.

Two builders give the same plan bit for bit: :func:`build_plan_triton` (a counting
sort in five small Triton launches: the ``triton`` backend, run through the
``dasg_kernels::moe_dispatch`` custom op of :mod:`dasg_kernels.moe.ops`) and
:func:`build_plan_torch` (stable sort, cumsum, searchsorted: readable, the ``torch``
backend and the test oracle). This module is the bottom layer: it imports nothing
from the MoE modules above it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dasg_kernels.backend import interpreter_enabled


class DispatchPlan(NamedTuple):
    """The plan the grouped GEMMs walk; see the module docstring."""

    row_pair: torch.Tensor          # [num_tiles * block_m] int32
    pair_row: torch.Tensor          # [N * k] int32
    expert_offsets: torch.Tensor    # [E + 1] int32
    tile_expert: torch.Tensor       # [num_tiles] int32
    tokens_per_expert: torch.Tensor  # [E] int32
    block_m: int
    num_slots: int                  # k
    num_tiles: int
    num_rows: int                   # rows the GEMM buffers need (worst case)


def num_tiles_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case tile count: only experts with pairs own tiles, at most ``min(E, M)`` of them,
    so ``sum_e cdiv(c_e, block_m) <= cdiv(M, block_m) + min(E, M)``. (``torch.sym_min``: the
    custom ops' fake implementations call this with symbolic sizes.)"""
    return triton.cdiv(num_pairs, block_m) + torch.sym_min(num_experts, num_pairs)


def num_rows_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case used rows: ``M`` plus at most ``block_m - 1`` padding rows per used expert."""
    return num_pairs + torch.sym_min(num_experts, num_pairs) * (block_m - 1)


def build_plan_torch(
    expert_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    tokens_per_expert: torch.Tensor | None = None,
) -> DispatchPlan:
    """Build the plan with device-side torch ops only (no ``.item()``, no sync): the
    readable version, and the ``backend="torch"`` path; :func:`build_plan_triton` is the
    same plan (bitwise) in five launches.

    ``expert_ids [N, k]`` int; entries outside ``[0, num_experts)`` count as unused
    (the public :func:`dispatch` rejects them on the CPU, where checking is free).
    """
    n, k = expert_ids.shape
    dev = expert_ids.device
    m = n * k
    e = num_experts
    num_tiles = num_tiles_bound(m, e, block_m)
    rows = num_tiles * block_m  # row_pair covers every tile, so tile loads never need a mask

    flat = expert_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < e)
    key = torch.where(valid, flat, torch.full_like(flat, e))  # unused pairs sort last
    if tokens_per_expert is None:
        counts = torch.zeros(e + 1, dtype=torch.int64, device=dev)
        counts.scatter_add_(0, key, torch.ones_like(key))
        counts = counts[:e]
    else:
        counts = tokens_per_expert.long()
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(e + 1, dtype=torch.int64, device=dev)
    torch.cumsum(padded, 0, out=offsets[1:])
    starts = torch.zeros(e + 1, dtype=torch.int64, device=dev)  # unpadded start of each run
    torch.cumsum(counts, 0, out=starts[1:])

    order = torch.sort(key, stable=True).indices  # pairs by expert, original order inside
    skey = key[order]
    rank = torch.arange(m, device=dev) - starts[skey]
    svalid = skey < e
    # offsets has E+1 entries, so unused pairs (key E) index it safely; their row is the dummy
    row = torch.where(svalid, offsets[skey] + rank, torch.full_like(rank, rows))

    row_pair = torch.full((rows + 1,), -1, dtype=torch.int32, device=dev)
    row_pair.scatter_(0, row, order.to(torch.int32))  # unused pairs all land on the dummy row
    row_pair = row_pair[:rows]
    pair_row = torch.full((m,), -1, dtype=torch.int32, device=dev)
    pair_row.scatter_(0, order, torch.where(svalid, row, torch.full_like(row, -1)).to(torch.int32))

    tile_start = torch.arange(num_tiles, device=dev, dtype=torch.int64) * block_m
    tile_expert = torch.searchsorted(offsets[1:].contiguous(), tile_start, right=True)
    tile_expert = torch.where(tile_expert < e, tile_expert, torch.full_like(tile_expert, -1))

    return DispatchPlan(
        row_pair=row_pair,
        pair_row=pair_row,
        expert_offsets=offsets.to(torch.int32),
        tile_expert=tile_expert.to(torch.int32),
        tokens_per_expert=counts.to(torch.int32),
        block_m=block_m,
        num_slots=k,
        num_tiles=num_tiles,
        num_rows=num_rows_bound(m, e, block_m),
    )


# --------------------------------------------------------------------------- Triton counting sort
#
# The pairs are cut into chunks of CHUNK. (1) each chunk counts its pairs per expert;
# (2) per expert, an exclusive scan over the chunks gives each chunk's first slot inside
# the expert's run, and the totals; (3) one program turns the totals into the
# block-aligned offsets; (4) each chunk places its pairs at offset + chunk prefix + rank
# inside the chunk (a cumsum over its one-hot block); (5) the tile map compares each
# tile's first row with the run ends. Stable and deterministic (no atomics), and equal
# to the sort-based plan bit for bit.


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
    """:func:`build_plan_torch`'s plan from five small Triton launches (no host sync).

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



def plan_from_tensors(row_pair: torch.Tensor, pair_row: torch.Tensor, expert_offsets: torch.Tensor,
                      tile_expert: torch.Tensor, num_experts: int, num_slots: int, block_m: int,
                      tokens_per_expert: torch.Tensor | None = None) -> DispatchPlan:
    """A :class:`DispatchPlan` around plan tensors (as the custom ops pass them), with the
    sizes derived from their shapes (no data read)."""
    return DispatchPlan(
        row_pair=row_pair, pair_row=pair_row, expert_offsets=expert_offsets, tile_expert=tile_expert,
        tokens_per_expert=tokens_per_expert, block_m=block_m, num_slots=num_slots,
        num_tiles=tile_expert.shape[0], num_rows=num_rows_bound(pair_row.shape[0], num_experts, block_m),
    )
