"""The MoE Triton launches as ``torch.library`` custom ops.

``torch.ops.dasg_kernels.<name>``:

* ``moe_route_select``: the routing kernel (ids, counts from the softmax probabilities;
  the differentiable softmax / gather around it stays plain PyTorch, so the router's
  gradient is ordinary autograd and is traced by ``torch.compile``).
* ``moe_dispatch``: the five-launch counting sort that builds a :class:`DispatchPlan`.
* ``moe_expert_ffn_fwd`` / ``moe_expert_ffn_bwd``: the grouped SwiGLU GEMMs and the
  combine, forward and backward, with the autograd formula registered on the forward.

Each has a fake (meta) implementation, so ``torch.compile`` sees one opaque op per
launch group and never tries to trace into Triton (no graph break at the launch), and
eager autograd runs through the same ops. Validation happens before, in
:mod:`dasg_kernels.moe.interface`.

Layering: this module sits above the kernels and their launchers
(:mod:`.routing`, :mod:`.dispatch`, :mod:`.grouped_gemm`, :mod:`.combine`) and below
:mod:`.interface`, which composes the ops; nothing here imports upwards. The kernel
modules are imported inside the op implementations, so importing the package (or the
fake implementations, all ``torch.compile`` needs to trace) decorates no Triton kernel.

Output sizes depend only on input shapes and int arguments (the worst-case bounds of
:mod:`dasg_kernels.moe.types`), never on the routing itself, so the fake
implementations need no data and work with symbolic shapes.

(No ``from __future__ import annotations`` here: ``custom_op`` reads the annotations
to build the op schema.)
"""
import torch
from torch import Tensor

from dasg_kernels.moe.types import num_rows_bound, num_tiles_bound, plan_from_tensors

_EMPTY_SHAPE = (0,)


def _unit_stride(*ts: Tensor):
    """The kernels take any row strides but need stride 1 along the last dimension (and the
    routing ``weights [N, k]`` fully contiguous); a no-op for what the public ops pass."""
    return [t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in ts]


# --------------------------------------------------------------------------- route


@torch.library.custom_op("dasg_kernels::moe_route_select", mutates_args=())
def moe_route_select(
    probs: Tensor, top_p: float, k_max: int, k_cap: int, min_k: int, n_group: int, topk_group: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``probs [N, E]`` fp32 -> ``expert_ids [N, k_max]``, ``num_selected [N]``, ``tokens_per_expert [E]`` (int32)."""
    from dasg_kernels.moe.routing import route_select_triton

    return route_select_triton(probs, top_p=top_p, k_max=k_max, k_cap=k_cap, min_k=min_k, n_group=n_group,
                               topk_group=topk_group)


@moe_route_select.register_fake
def _moe_route_select_fake(probs, top_p, k_max, k_cap, min_k, n_group, topk_group):
    n, e = probs.shape
    i32 = dict(dtype=torch.int32)
    return probs.new_empty((n, k_max), **i32), probs.new_empty((n,), **i32), probs.new_empty((e,), **i32)


# --------------------------------------------------------------------------- dispatch


@torch.library.custom_op("dasg_kernels::moe_dispatch", mutates_args=())
def moe_dispatch(expert_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> ``row_pair, pair_row, expert_offsets, tile_expert, tokens_per_expert`` of the plan."""
    from dasg_kernels.moe.dispatch import build_plan_triton

    p = build_plan_triton(expert_ids, num_experts, block_m)
    return p.row_pair, p.pair_row, p.expert_offsets, p.tile_expert, p.tokens_per_expert


@moe_dispatch.register_fake
def _moe_dispatch_fake(expert_ids, num_experts, block_m):
    n, k = expert_ids.shape
    m = n * k
    num_tiles = num_tiles_bound(m, num_experts, block_m)
    i32 = dict(dtype=torch.int32)
    return (expert_ids.new_empty((num_tiles * block_m,), **i32), expert_ids.new_empty((m,), **i32),
            expert_ids.new_empty((num_experts + 1,), **i32), expert_ids.new_empty((num_tiles,), **i32),
            expert_ids.new_empty((num_experts,), **i32))


# --------------------------------------------------------------------------- expert FFN


@torch.library.custom_op("dasg_kernels::moe_expert_ffn_fwd", mutates_args=())
def moe_expert_ffn_fwd(
    x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, weights: Tensor,
    row_pair: Tensor, pair_row: Tensor, expert_offsets: Tensor, tile_expert: Tensor,
    block_m: int, save_gu: bool,
) -> tuple[Tensor, Tensor]:
    """-> ``y [N, D]`` in ``x.dtype`` and the gate/up pre-activations ``gu [rows, 2F]``
    (empty unless ``save_gu``; without them the backward reruns the gate/up GEMM)."""
    from dasg_kernels.moe import combine as _combine
    from dasg_kernels.moe import grouped_gemm as _gg

    x, gate_up_proj, down_proj = _unit_stride(x, gate_up_proj, down_proj)
    weights = weights.contiguous()
    n, k = weights.shape
    plan = plan_from_tensors(row_pair, pair_row, expert_offsets, tile_expert, gate_up_proj.shape[0], k, block_m)
    fuse = k == 1
    h, gu = _gg.gate_up_fwd(x, gate_up_proj, plan, save_gu=save_gu)
    y, y_slot = _gg.down_fwd(h, down_proj, plan, weights, n, fuse_combine=fuse, save_slot=not fuse)
    del h
    if not fuse:
        y = _combine.combine(y_slot, plan, weights, n, x.dtype)
    return y, (gu if save_gu else x.new_empty(_EMPTY_SHAPE))


@moe_expert_ffn_fwd.register_fake
def _moe_expert_ffn_fwd_fake(x, gate_up_proj, down_proj, weights, row_pair, pair_row, expert_offsets, tile_expert,
                             block_m, save_gu):
    y = x.new_empty(x.shape)
    if not save_gu:
        return y, x.new_empty(_EMPTY_SHAPE)
    rows = num_rows_bound(pair_row.shape[0], gate_up_proj.shape[0], block_m)
    return y, x.new_empty((rows, gate_up_proj.shape[1]))


@torch.library.custom_op("dasg_kernels::moe_expert_ffn_bwd", mutates_args=())
def moe_expert_ffn_bwd(
    dy: Tensor, x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, weights: Tensor, gu: Tensor,
    row_pair: Tensor, pair_row: Tensor, expert_offsets: Tensor, tile_expert: Tensor,
    block_m: int, need_x: bool, need_gate_up: bool, need_down: bool, need_weights: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> ``dx, d gate_up_proj, d down_proj, d weights`` (each empty when not needed).

    ``gu`` is the forward's saved pre-activations, or empty: then the gate/up GEMM is
    rerun here to rebuild them (``recompute``).
    """
    from dasg_kernels.moe import combine as _combine
    from dasg_kernels.moe import grouped_gemm as _gg

    dy, x, gate_up_proj, down_proj = _unit_stride(dy.to(x.dtype), x, gate_up_proj, down_proj)
    weights = weights.contiguous()
    n, k = weights.shape
    plan = plan_from_tensors(row_pair, pair_row, expert_offsets, tile_expert, gate_up_proj.shape[0], k, block_m)
    if gu.numel() == 0:
        _, gu = _gg.gate_up_fwd(x, gate_up_proj, plan, save_gu=True, write_h=False)
    dx, dw1, dw2, dwt = (x.new_empty(_EMPTY_SHAPE) for _ in range(4))  # distinct: outputs may not alias
    if need_x or need_gate_up or need_down or need_weights:
        # the down backward first: it also writes w * h, d down_proj's operand
        dgu, dw_row, hw = _gg.down_bwd(dy, down_proj, gu, weights, plan, need_dw=need_weights, need_hw=need_down)
        if need_down:
            dw2 = _gg.dw_down(dy, hw, plan, down_proj)
            del hw
        if need_weights:
            pr = plan.pair_row.long()
            dwt = torch.where(pr >= 0, dw_row[pr.clamp(min=0)], torch.zeros_like(dw_row[:1]))
            dwt = dwt.view(n, k).to(weights.dtype)
        if need_x:
            fuse = k == 1
            dx = _gg.gate_up_bwd_dx(dgu, gate_up_proj, plan, n, fuse_combine=fuse)
            if not fuse:
                dx = _combine.combine(dx, plan, None, n, x.dtype)
        if need_gate_up:
            dw1 = _gg.dw_gate_up(dgu, x, plan, gate_up_proj)
    return dx, dw1, dw2, (dwt if need_weights else weights.new_empty(_EMPTY_SHAPE))


@moe_expert_ffn_bwd.register_fake
def _moe_expert_ffn_bwd_fake(dy, x, gate_up_proj, down_proj, weights, gu, row_pair, pair_row, expert_offsets,
                             tile_expert, block_m, need_x, need_gate_up, need_down, need_weights):
    def grad(flag, t):
        return t.new_empty(t.shape) if flag else t.new_empty(_EMPTY_SHAPE)

    return grad(need_x, x), grad(need_gate_up, gate_up_proj), grad(need_down, down_proj), grad(need_weights, weights)


def _setup_context(ctx, inputs, output):
    x, w1, w2, weights, row_pair, pair_row, expert_offsets, tile_expert, block_m, save_gu = inputs
    _, gu = output
    ctx.save_for_backward(x, w1, w2, weights, gu, row_pair, pair_row, expert_offsets, tile_expert)
    ctx.block_m = block_m
    ctx.mark_non_differentiable(gu)


def _backward(ctx, dy, dgu):
    x, w1, w2, weights, gu, row_pair, pair_row, expert_offsets, tile_expert = ctx.saved_tensors
    need_x, need_w1, need_w2, need_wt = ctx.needs_input_grad[:4]
    dx, dw1, dw2, dwt = moe_expert_ffn_bwd(dy, x, w1, w2, weights, gu, row_pair, pair_row, expert_offsets,
                                           tile_expert, ctx.block_m, need_x, need_w1, need_w2, need_wt)
    return (dx if need_x else None, dw1 if need_w1 else None, dw2 if need_w2 else None,
            dwt if need_wt else None, None, None, None, None, None, None)


moe_expert_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)
