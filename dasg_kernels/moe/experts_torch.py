"""The ``backend="torch"`` routed SwiGLU experts: static shapes, no host read.

:func:`dasg_kernels.reference.expert_ffn_ref` (the oracle) gathers each expert's
tokens with ``torch.where(expert_ids == e)``, whose size depends on the routing: under
``torch.compile`` that is a graph break (or, with ``fullgraph=True``, an unbacked size
with runtime asserts), and on CUDA a host synchronisation. The torch backend instead
computes the same sum with every size known from the input shapes alone, in one of two
ways, picked per call from those shapes:

* ``"dense"``: every expert runs on all ``N`` tokens and a ``torch.where`` keeps the
  routed rows (``E * N`` rows: the cheaper one for few experts, e.g. the one-expert
  shared banks, or decode-sized batches).
* ``"grouped"``: the (token, slot) pairs are sorted by expert into tiles of ``block_m``
  rows (:func:`dasg_kernels.moe.dispatch_torch.build_plan_torch`, the worst-case tile count
  ``cdiv(N*k, block_m) + min(E, N*k)``), each tile's expert weights are gathered and a
  ``torch.bmm`` runs the tiles (``~N*k + E*block_m`` rows; what many experts need).

Both compute in fp32 and return ``x.dtype`` (as the reference with ``upcast=True``),
agree with the reference to fp32 rounding (forward and backward), ignore slots whose id
lies outside ``[0, E)``, and keep every input in the autograd graph (an unused bank gets
zero gradients, not ``None``). Rows that are not routed never mix into the result:
they are masked with ``torch.where`` (not multiplied by a zero weight), and padding rows
of the grouped path hold zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dasg_kernels.moe.dispatch_torch import build_plan_torch
from dasg_kernels.moe.types import num_tiles_bound

METHODS = ("dense", "grouped")
# The cost model of choose_method, in rows of GEMM work (rough CPU / GPU figures): reading
# one expert's weights, the grouped path's plan (sort, scatters) and its block_m candidates.
_WEIGHT_READ_ROWS = 8
_PLAN_ROWS = 64
_BLOCK_MS = (16, 32, 64, 128)


def choose_method(n: int, k: int, e: int) -> tuple[str, int]:
    """``(method, block_m)`` for ``N`` tokens, ``k`` slots and ``E`` experts, from the sizes
    only. Cost in rows of GEMM work: dense ``E * (N + w)`` (each expert's weights read once),
    grouped ``tiles * (block_m + 3 w) + plan`` (a tile's weights are gathered, written and
    read again), ``tiles = cdiv(N*k, block_m) + min(E, N*k)`` (the worst case)."""
    w = _WEIGHT_READ_ROWS
    best_bm, best_cost = _BLOCK_MS[0], None
    for bm in _BLOCK_MS:
        cost = num_tiles_bound(n * k, e, bm) * (bm + 3 * w) + _PLAN_ROWS
        if best_cost is None or cost < best_cost:
            best_bm, best_cost = bm, cost
    return ("dense" if e * (n + w) <= best_cost else "grouped"), best_bm


def expert_ffn_torch(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    method: str | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Routed SwiGLU experts, traceable by ``torch.compile`` without a graph break.

    Args:
        x: ``[N, D]``; gate_up_proj: ``[E, 2F, D]``; down_proj: ``[E, D, F]``;
        expert_ids: ``[N, k]`` int (``-1`` = unused slot); weights: ``[N, k]``.
        method: ``"dense"``, ``"grouped"`` or ``None`` (chosen by :func:`choose_method`).
        block_m: rows per tile of the grouped path (default: chosen with the method).
    Returns:
        ``y [N, D]`` in ``x.dtype``, as :func:`dasg_kernels.reference.expert_ffn_ref`.
    """
    n, k = expert_ids.shape
    e = gate_up_proj.shape[0]
    auto_method, auto_bm = choose_method(n, k, e)
    method = auto_method if method is None else method
    if method not in METHODS:
        raise ValueError(f"expert_ffn_torch: method must be one of {METHODS} or None, got {method!r}")
    if method == "dense":
        y = _dense(x.float(), gate_up_proj, down_proj, expert_ids, weights.float())
    else:
        y = _grouped(x.float(), gate_up_proj, down_proj, expert_ids, weights.float(), block_m or auto_bm)
    return y.to(x.dtype)


def _dense(x, gate_up_proj, down_proj, expert_ids, weights):
    """Every expert on every token; ``torch.where`` keeps the routed rows (``E`` static steps)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(gate_up_proj.shape[0]):
        hit = expert_ids == e  # [N, k]
        w = torch.where(hit, weights, 0.0).sum(1, keepdim=True)  # a token's weight for expert e
        gate, up = F.linear(x, gate_up_proj[e].float()).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[e].float())
        out = out + torch.where(hit.any(1, keepdim=True), y * w, 0.0)
    if gate_up_proj.shape[0] == 0:  # no expert: keep the inputs in the graph (zero gradients)
        out = out + sum(t[:0].sum() for t in (x, gate_up_proj.float(), down_proj.float(), weights))
    return out


def _grouped(x, gate_up_proj, down_proj, expert_ids, weights, block_m):
    """Pairs sorted by expert into ``block_m``-row tiles, one ``bmm`` over the tiles."""
    n, k = expert_ids.shape
    e = gate_up_proj.shape[0]
    d = x.shape[1]
    plan = build_plan_torch(expert_ids, e, block_m)
    t = plan.num_tiles
    row_pair = plan.row_pair.long()  # [t * block_m], -1 = padding
    has_pair = (row_pair >= 0)[:, None]
    token = torch.where(row_pair >= 0, row_pair // max(k, 1), 0)
    xs = torch.where(has_pair, x[token], 0.0).view(t, block_m, d)  # padding rows hold zeros
    tile = plan.tile_expert.long().clamp(min=0)  # unused tiles (-1) hold only padding rows
    gu = torch.bmm(xs, gate_up_proj[tile].float().transpose(1, 2))  # [t, block_m, 2F]
    gate, up = gu.chunk(2, dim=-1)
    ys = torch.bmm(F.silu(gate) * up, down_proj[tile].float().transpose(1, 2)).view(t * block_m, d)
    pair_row = plan.pair_row.long().view(n, k)  # -1 = unused slot
    used = (pair_row >= 0)[..., None]
    y_slot = ys[pair_row.clamp(min=0)]  # [N, k, D]
    return torch.where(used, y_slot * weights[..., None], 0.0).sum(1)
