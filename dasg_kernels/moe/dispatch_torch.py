"""The ``backend="torch"`` dispatch plan: stable sort, cumsum and searchsorted on the device.

:func:`build_plan_torch` builds the :class:`~dasg_kernels.moe.types.DispatchPlan` (layout in
:mod:`dasg_kernels.moe.types`) with torch ops only: no ``.item()``, no host synchronisation,
static shapes (the worst-case bounds), so ``torch.compile`` traces it. It equals the Triton
counting sort of :mod:`dasg_kernels.moe.dispatch` bit for bit, and the torch experts
(:mod:`dasg_kernels.moe.experts_torch`) walk it.
"""
from __future__ import annotations

import torch

from dasg_kernels.moe.types import DispatchPlan, num_rows_bound, num_tiles_bound


def build_plan_torch(
    expert_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    tokens_per_expert: torch.Tensor | None = None,
) -> DispatchPlan:
    """The plan of ``expert_ids [N, k]`` int for ``num_experts`` experts and ``block_m``-row
    tiles, from device-side torch ops only. Entries outside ``[0, num_experts)`` count as
    unused (the public :func:`dasg_kernels.moe.dispatch` rejects them on the CPU, where
    checking is free). ``tokens_per_expert [E]``, when given, is used instead of recounting.
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
