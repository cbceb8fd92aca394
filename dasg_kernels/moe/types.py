"""The MoE result types and the plan's worst-case sizes (host code: no Triton kernel here).

:class:`Routing` is what :func:`dasg_kernels.moe.route` returns; :class:`DispatchPlan` is the
expert-sorted plan of the (token, slot) pairs that :func:`dasg_kernels.moe.dispatch` builds
and the grouped GEMMs walk.

The plan. A token's ``k`` slots are the (token, slot) *pairs* ``pair = token * k + slot``
(``M = N * k`` of them; slots with expert ``-1`` are unused). The grouped GEMMs walk the
pairs sorted by expert, each expert's run padded up to a multiple of ``block_m`` so that
every ``block_m`` tile of rows belongs to one expert:

* ``tokens_per_expert [E]``: histogram of the used pairs.
* ``expert_offsets [E+1]``: block-aligned start row of each expert's run (prefix sum
  of the padded counts); ``expert_offsets[E]`` is the number of rows in use.
* ``row_pair [num_tiles * block_m]``: the pair held by each row (``-1`` = padding).
  Pairs of one expert keep their original order (stable sort), so the plan is
  deterministic.
* ``pair_row [M]``: the inverse, the row of each pair (``-1`` = unused slot).
* ``tile_expert [num_tiles]``: the expert of each tile, ``-1`` for tiles past the
  last run. ``num_tiles = cdiv(M, block_m) + min(E, M)`` is the worst case, known on
  the host without reading the routing back; unused tiles exit at once, and experts with
  no pairs own no tile.

Everything is sized by the worst case (:func:`num_tiles_bound`, :func:`num_rows_bound`), so
the host never waits on the device, and the custom ops' fake implementations need no data.
Two builders give the same plan bit for bit: :func:`dasg_kernels.moe.dispatch.build_plan_triton`
(the ``triton`` backend) and :func:`dasg_kernels.moe.dispatch_torch.build_plan_torch` (the
``torch`` backend).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """The result of :func:`dasg_kernels.moe.route` for ``N`` tokens and ``E`` experts.

    Attributes:
        expert_ids: ``[N, k_max]`` int32, the chosen experts by descending probability,
            ``-1`` in the slots a token does not use.
        weights: ``[N, k_max]`` float32, the combine weights (0 in unused slots);
            differentiable with respect to the router logits.
        num_selected: ``[N]`` int32, how many slots each token uses (``1..k_max``).
        tokens_per_expert: ``[E]`` int32, how many (token, slot) pairs chose each expert.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    num_selected: torch.Tensor
    tokens_per_expert: torch.Tensor


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
    return (num_pairs + (block_m - 1)) // block_m + torch.sym_min(num_experts, num_pairs)


def num_rows_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case used rows: ``M`` plus at most ``block_m - 1`` padding rows per used expert."""
    return num_pairs + torch.sym_min(num_experts, num_pairs) * (block_m - 1)


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
