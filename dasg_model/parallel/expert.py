"""Expert parallelism (EP) for :class:`dasg_model.DASGMoE` on ``torch.distributed``.

:func:`apply_expert_parallel` shards the two routed-expert banks of every ``DASGMoE``
(shallow and deep) over a 1-D EP ``DeviceMesh`` (or process group): EP rank ``r`` of
``ep`` keeps experts ``[r*E/ep, (r+1)*E/ep)`` of each bank. The bank parameters become
``DTensor`` s sharded ``Shard(0)`` on the EP mesh (``gate_up_proj [E, 2F, D]``,
``down_proj [E, D, F]``, each rank holding its ``E/ep`` rows), so
``torch.distributed.checkpoint`` saves them once and loads them at another EP size
(or into an unsharded model). Everything else -- the router (ADR), the shared experts
(DSSE), ``routed_scale``, attention, embeddings -- stays replicated (data parallel).
Each EP rank feeds its own tokens.

**Per-rank exchange (the default).** One layer's forward, per rank (both levels share the
exchanges; DeepEP's normal-mode rule)::

    route locally (replicated router)        ids [N, k] per level (global expert ids)
    the token's destination ranks            the distinct ranks holding one of its
                                             experts (either level), in rank order
    all_to_all_single(counts [ep])           (token, rank) rows per destination
    counts.tolist()                          <- THE ONE HOST SYNC per layer (split sizes)
    all-to-all (async): x[token]             one row per (token, destination rank)
                        weights [rows, K]    fp32, the token's routing weights of the
                        ids [rows, K]        slots on that rank (K = k_shallow + k_deep
                                             slots, local expert column or -1)
    while in flight: the shared experts, the aux all_reduce (async) and the rows this
        rank keeps for itself (its own experts' GEMMs)
    expert_ffn on the received rows, one call per level: one weighted partial sum per
        (token, rank) over all of the token's experts on this rank
    all-to-all #2: the partial sums back      [rows, D] in x.dtype
    y[t] = sum over the token's ranks in rank order of partial[t, rank]   (fp32)

Each (token, rank) pair moves one row each way (``D * dtype_size`` bytes, plus ``K``
fp32 weights and ``K`` ids -- int8 up to 127 local experts, else int32 -- forward and the
``K`` weight gradients in the backward),
however many of the token's experts (of either level) live on that rank: the bytes follow
the distinct (token, rank) pairs, not the routed (token, slot) pairs. The partial sums are
added in rank order, so the result is deterministic for a given EP size and equals one
process up to rounding (the slots of a token are summed per rank first). Every gather with
repeated rows sums its gradient in a fixed order (:class:`_GatherRows`), so the backward is
deterministic too. No per-slot ``[N, D]`` copy is kept for the backward: the combine keeps
only row indices, the routing-weight gradients come from the expert kernels on the receiver.

**Per-slot exchange (``bitwise=True``).** One row per routed (token, slot, level), expert
outputs returned unweighted, and the source rank sums ``w[t, s] * out[t, s]`` in the fixed
slot order (:class:`_CombineRows`, fp32, saving the rows in ``x.dtype``), so output and
gradients do not depend on the number of ranks (bitwise for ep = 1, 2, 4, any ``k_max``;
the tests check ``k_max=4``), and the output equals the unsharded layer's bitwise in fp32 on
``backend="torch"`` for ``k_max <= 2`` when that runs the same rows. It moves one row per
routed slot instead of one per destination rank: measured at ep=2, ``k_max=4``, 2.9x the
bytes of the per-rank exchange (4.6x with ``topk_group=1``); at 64+ ranks, where a token's
experts rarely share a rank, about the same (:mod:`dasg_model.parallel.cost`).

**Overlap.** The exchanges are functional collectives (``torch.distributed.
_functional_collectives``: issued at once, waited for only when the result is needed), so
the shared experts, the aux ``all_reduce`` and, in the per-rank mode, the GEMMs of the rows
a rank keeps for itself run while the dispatch is in flight, on every backend: with NCCL
the collective runs on NCCL's own stream (the side stream) while the default stream
computes; with gloo on the process group's worker threads. The backward's exchanges are
torch's ``all_to_all_single`` backward, which waits at once (no overlap there).

**Host syncs.** Exactly one per layer: the ``.tolist()`` of the exchanged counts, because
``all_to_all_single`` takes its split sizes as host ints (as in torchtitan and Megatron;
the receive buffers are sized from them). Everything else -- sorting, histograms, row
indices, the row counts of the statistics (carried in the same host read) -- stays on the
device.

Auxiliary losses and statistics are reduced over the EP group in one (asynchronous)
``all_reduce`` per layer: ``load_balance`` uses the EP group's global expert fractions and
mean router probabilities, ``z_loss`` and ``entropy`` are means over the group's tokens,
and ``<level>/tokens_per_expert`` etc. are group totals, so they equal one process run on
the concatenation of the group's tokens. The reduced sums enter the losses as
``global.detach() + ep * (local - local.detach())`` (same value), so no collective runs in
the backward and, under the usual data-parallel rule (gradients summed over the replicas of
a parameter and divided by the number of data shards, see :func:`allreduce_gradients`),
the aux gradients are those of the group loss.

ADR's ``n_group`` expert groups map onto EP ranks when ``n_group`` is a multiple of ``ep``
(the experts of a group live on one rank), so ``topk_group`` bounds the number of ranks a
token visits, and in the per-rank mode its bytes; ``<level>/mean_ranks_per_token`` in the
layer's ``MoEOutput.stats`` measures it (EP-group mean over the level's tokens).

:attr:`ExpertParallelDASGMoE.ep_comm` counts the bytes sent to other ranks by phase and the
rows behind them (:func:`ep_comm_stats` sums a model); :mod:`dasg_model.parallel.cost`
predicts bytes and times at scale.

Gradients: every rank back-propagates its own loss; :func:`allreduce_gradients` then
averages (DDP semantics: sum over a parameter's replicas, divide by ``dp * ep``; bucketed).
FSDP2 composes: ``fully_shard`` each expert bank over ``mesh["dp"]`` with
``set_gradient_divide_factor(dp * ep)`` (the expert gradients already hold the EP group's
contributions; add ``set_force_sum_reduction_for_comms(True)`` on gloo) and the model over
the 2-D ``(dp, ep)`` mesh (HSDP); the 0-dim parameter ``shared.shallow_scale`` of each
layer goes to ``ignored_params`` and is all-reduced by hand (see
``tests/distributed/test_distributed_ep.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from dasg_kernels import expert_ffn
from dasg_kernels.context_parallel import CommCounter, resolve_group
from dasg_model.experts import SwiGLUExperts
from dasg_model.moe import DASGMoE
from dasg_model.router import LEVELS, RouterOutput

__all__ = [
    "EPCommStats",
    "ExpertParallelDASGMoE",
    "ExpertParallelExperts",
    "allreduce_gradients",
    "apply_expert_parallel",
    "ep_comm_stats",
    "ep_routed_experts",
    "ep_routed_experts_per_slot",
]

_BUCKET_BYTES = 25 * 2**20  # allreduce_gradients' bucket size (DDP's default)


# --------------------------------------------------------------------------- groups


def _group_rank_size(mesh_or_group, op: str, name: str) -> tuple[dist.ProcessGroup, int, int]:
    """``(process_group, rank_in_group, group_size)`` of a 1-D ``DeviceMesh``, a
    ``ProcessGroup`` or ``None`` (the default group), checked by :func:`resolve_group`."""
    group = resolve_group(mesh_or_group, op=op, name=name, allow_none=True)
    return group, dist.get_rank(group), dist.get_world_size(group)


def _as_mesh(mesh_or_group, group, device_type: str) -> DeviceMesh:
    """The 1-D ``DeviceMesh`` the expert ``DTensor`` s live on (built over ``group`` when
    the caller passed a process group or ``None``)."""
    if isinstance(mesh_or_group, DeviceMesh):
        return mesh_or_group
    return DeviceMesh.from_group(group, device_type)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (differentiable), a plain tensor unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------- communication


class EPCommStats(CommCounter):
    """Bytes this rank sent to *other* ranks in the EP exchanges (its own rows, which stay
    local, are not counted), by phase, the rows behind them, and the number of host syncs.

    Byte phases: ``dispatch`` / ``combine`` (forward token rows and expert outputs),
    ``dispatch_meta`` (per-rank mode: the rows' routing weights, fp32, and local expert
    ids, int8 or int32), their gradients in the backward (``dispatch_bwd``,
    ``combine_bwd``, ``dispatch_meta_bwd``: the weight gradients), ``counts`` (the split
    sizes: ``ep`` int64 per-rank, ``ep * C`` per-slot) and ``aux`` (the stats
    ``all_reduce``, the whole vector counted once).

    Rows (forward, to other ranks): ``sent`` (rows dispatched: (token, rank) pairs per-rank,
    (token, slot, level) pairs per-slot), ``token_rank`` and ``token_rank_level`` (the
    distinct (token, rank) and (token, rank, level) destinations), ``token_slot`` (the
    routed (token, slot, level) pairs). The counter itself is
    :class:`dasg_kernels.context_parallel.CommCounter`, shared with context parallelism.
    """


def _remote(splits: list[int], me: int) -> int:
    return sum(c for r, c in enumerate(splits) if r != me)


class _Pending:
    """An all-to-all in flight (a functional collective, waited for in :meth:`wait`); the
    forward bytes are counted at issue, the backward's by a hook on the waited result."""

    def __init__(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, me: int,
                 stats: EPCommStats | None, phase: str):
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        a2a = funcol.all_to_all_single_autograd if x.requires_grad else funcol.all_to_all_single
        self._t = a2a(x.contiguous(), out_splits, in_splits, group)
        self._hook = None
        if stats is not None:
            stats.add(phase, _remote(in_splits, me) * row_bytes)
            if x.requires_grad:
                nbwd = _remote(out_splits, me) * row_bytes
                self._hook = lambda g: stats.add(phase + "_bwd", nbwd)

    def wait(self) -> torch.Tensor:
        out = funcol.wait_tensor(self._t)
        if self._hook is not None and out.requires_grad:
            out.register_hook(self._hook)
        return out


class _GatherRows(torch.autograd.Function):
    """``src.index_select(0, tok)`` whose backward sums each source row's gradient over
    its copies in a fixed order: ``grad_src[t] = sum_j grad[pos[t, j]]`` for ``j`` in
    order (``pos [N, J]``, ``-1`` = no copy; fp32 accumulation). Autograd's
    ``index_select`` backward (``index_add_``) adds repeated rows in an unspecified order
    on CUDA."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pos)
        ctx.src_dtype = src.dtype
        return src.index_select(0, tok)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (pos,) = ctx.saved_tensors
        n = pos.shape[0]
        acc = g.new_zeros((n,) + tuple(g.shape[1:]), dtype=torch.float32)
        if g.shape[0]:
            for j in range(pos.shape[1]):
                pj = pos[:, j]
                rows = g.index_select(0, pj.clamp(min=0)).float()
                acc = acc + torch.where((pj >= 0).view(-1, *[1] * (g.dim() - 1)), rows, 0.0)
        return acc.to(ctx.src_dtype), None, None


class _CombineRows(torch.autograd.Function):
    """``y[t] = sum_j w[t, j] * rows[pos[t, j]]`` over ``j`` in order (``pos [N, J]``,
    ``-1`` = none; ``w`` ``None`` = weight 1), accumulated in fp32, returned in
    ``rows.dtype``. Saves ``rows`` (in their dtype) only when ``w`` needs a gradient;
    ``grad_rows[pos[t, j]] = w[t, j] * g[t]``, ``grad_w[t, j] = <g[t], rows[pos[t, j]]>``."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, w: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        n, d = pos.shape[0], rows.shape[1]
        acc = None
        for j in range(pos.shape[1]):
            pj = pos[:, j]
            if rows.shape[0]:
                term = torch.where((pj >= 0)[:, None], rows.index_select(0, pj.clamp(min=0)).float(), 0.0)
            else:
                term = rows.new_zeros((n, d), dtype=torch.float32)
            if w is not None:
                term = term * w[:, j, None].float()
            acc = term if acc is None else acc + term
        if acc is None:
            acc = rows.new_zeros((n, d), dtype=torch.float32)
        keep = rows if (w is not None and w.requires_grad) else None
        ctx.save_for_backward(pos, w, keep)
        ctx.n_rows, ctx.rows_dtype = rows.shape[0], rows.dtype
        ctx.w_dtype = None if w is None else w.dtype
        return acc.to(rows.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        pos, w, rows = ctx.saved_tensors
        m = ctx.n_rows
        g32 = g.float()
        grad_rows = g32.new_zeros((m + 1, g.shape[1]))  # row m: the sink of the -1 slots
        grad_w = None
        for j in range(pos.shape[1]):
            pj = pos[:, j]
            valid = pj >= 0
            term = g32 if w is None else g32 * w[:, j, None].float()
            grad_rows.index_copy_(0, torch.where(valid, pj, m), term)
        if rows is not None and ctx.needs_input_grad[1]:
            cols = []
            for j in range(pos.shape[1]):
                pj = pos[:, j]
                r = torch.where((pj >= 0)[:, None], rows.index_select(0, pj.clamp(min=0)).float(), 0.0) \
                    if m else g32.new_zeros(g32.shape)
                cols.append((g32 * r).sum(-1))
            grad_w = torch.stack(cols, 1).to(ctx.w_dtype)
        return grad_rows[:m].to(ctx.rows_dtype), grad_w, None


@dataclass
class _RouteTable:
    """Every (token, slot) of all levels, token-major: ``dest [N, K]`` (EP rank, ``ep`` =
    unused slot), ``col [N, K]`` (local expert column on that rank over both banks, ``-1``
    unused), ``w [N, K]`` fp32 routing weights; ``level_cols`` the ``[lo, hi)`` slot range
    of each level, ``col_offs`` the first local column of each level (and ``C`` last)."""

    dest: torch.Tensor
    col: torch.Tensor
    w: torch.Tensor
    level_cols: list[tuple[int, int]]
    col_offs: list[int]
    visited: list[torch.Tensor]  # [N] distinct ranks per token, per level
    trl: torch.Tensor  # [ep] distinct (token, rank, level) per destination rank
    ts: torch.Tensor  # [ep] routed (token, slot, level) pairs per destination rank


def _sorted_firsts(dest: torch.Tensor, ep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted, first)``: each row of ``dest`` sorted ascending and the mask of the first
    occurrence of each rank (``< ep``) in it."""
    s = dest.sort(dim=1).values
    prev = torch.cat([torch.full_like(s[:, :1], -1), s[:, :-1]], dim=1)
    return s, (s < ep) & (s != prev)


def _per_dest(dest: torch.Tensor, mask: torch.Tensor, ep: int) -> torch.Tensor:
    """``[ep]`` int64: the entries of ``mask`` per destination rank in ``dest`` (scatter_add_:
    torch.bincount syncs with the host on CUDA)."""
    idx = torch.where(mask, dest, ep).reshape(-1)
    out = torch.zeros(ep + 1, dtype=torch.int64, device=dest.device)
    return out.scatter_add_(0, idx, mask.reshape(-1).to(torch.int64))[:ep]


def _route_table(levels, ep: int) -> _RouteTable:
    e_loc = [bank.num_experts for bank, _, _ in levels]
    col_offs = [0]
    for e in e_loc:
        col_offs.append(col_offs[-1] + e)
    dests, cols, ws, level_cols, visited = [], [], [], [], []
    trl = ts = None
    k0 = 0
    for lvl, (_, ids, w) in enumerate(levels):
        ids64 = ids.long()
        valid = ids64 >= 0
        gid = ids64.clamp(min=0)
        dest = torch.where(valid, torch.div(gid, e_loc[lvl], rounding_mode="floor"), ep)
        dests.append(dest)
        cols.append(torch.where(valid, col_offs[lvl] + gid % e_loc[lvl], -1))
        ws.append(w.float())
        level_cols.append((k0, k0 + ids.shape[1]))
        k0 += ids.shape[1]
        s, first = _sorted_firsts(dest, ep)
        visited.append(first.sum(1))
        a, b = _per_dest(s, first, ep), _per_dest(dest, valid, ep)
        trl, ts = (a, b) if trl is None else (trl + a, ts + b)
    return _RouteTable(torch.cat(dests, 1), torch.cat(cols, 1), torch.cat(ws, 1), level_cols, col_offs,
                       visited, trl, ts)


def _exchange_counts(send: torch.Tensor, extra: list[torch.Tensor], group, ep: int, me: int,
                     stats: EPCommStats | None) -> tuple[list[int], list[int], list[list[int]], torch.Tensor]:
    """All-to-all of the per-destination ``send [ep, ...]`` counts and THE host sync of the
    layer: ``(in_splits, out_splits, extra, recv)``: host ints (rows this rank sends to /
    receives from each rank, and each tensor of ``extra [ep]``, read in the same
    ``.tolist()``) and the received counts on the device."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # all_to_all_single takes its split sizes as host ints and the receive buffers are sized
    # from them: the one unavoidable host read per layer (as in torchtitan and Megatron).
    host = torch.cat([send.reshape(ep, -1).sum(1), recv.reshape(ep, -1).sum(1), *extra]).tolist()
    if stats is not None:
        stats.host_syncs += 1
        stats.add("counts", (ep - 1) * (send.numel() // ep) * send.element_size())
    parts = [host[i * ep:(i + 1) * ep] for i in range(2 + len(extra))]
    return parts[0], parts[1], parts[2:], recv


def _count_rows(stats: EPCommStats | None, me: int, sent: list[int], tr: list[int], trl: list[int],
                ts: list[int]) -> None:
    if stats is not None:
        for kind, v in (("sent", sent), ("token_rank", tr), ("token_rank_level", trl), ("token_slot", ts)):
            stats.add_rows(kind, _remote(v, me))


def _id_dtype(n_cols: int) -> torch.dtype:
    """The smallest id dtype every backend exchanges (gloo has no int16)."""
    return torch.int8 if n_cols <= 127 else torch.int32


# --------------------------------------------------------------------------- modules


class ExpertParallelExperts(SwiGLUExperts):
    """This rank's part of a routed expert bank: ``gate_up_proj [E, 2F, D]`` and
    ``down_proj [E, D, F]`` as ``DTensor`` s sharded ``Shard(0)`` over the EP mesh (the
    local shard holds experts ``[expert_offset, expert_offset + num_experts)`` of
    ``global_num_experts``); same parameter names as :class:`SwiGLUExperts`.
    ``forward`` takes *local* expert ids and runs on the local shards."""

    def __init__(self, bank: SwiGLUExperts, mesh: DeviceMesh, ep_rank: int, ep_size: int):
        e = bank.num_experts
        local = e // ep_size
        nn.Module.__init__(self)
        self.num_experts = local
        self.hidden_size = bank.hidden_size
        self.ffn_size = bank.ffn_size
        self.backend = bank.backend
        self.global_num_experts = e
        self.expert_offset = ep_rank * local
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        sl = slice(self.expert_offset, self.expert_offset + local)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(bank, name)
            # every rank holds the same full bank: take the slice, no communication
            shard = DTensor.from_local(full.detach()[sl].clone(), mesh, [Shard(0)], run_check=False,
                                       shape=full.shape, stride=full.stride())
            setattr(self, name, nn.Parameter(shard, requires_grad=full.requires_grad))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, _local(self.gate_up_proj), _local(self.down_proj), (expert_ids, weights),
                          backend=self.backend)

    def extra_repr(self) -> str:
        return (f"experts=[{self.expert_offset}, {self.expert_offset + self.num_experts}) of "
                f"{self.global_num_experts} (ep rank {self.ep_rank}/{self.ep_size}), hidden={self.hidden_size}, "
                f"ffn={self.ffn_size}")


def _partial_sums(levels, rows: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, table: _RouteTable) -> torch.Tensor:
    """One weighted partial sum per received row over its slots on this rank, all levels:
    ``[m, D]`` in ``rows.dtype`` (one ``expert_ffn`` call per level on the level's slots)."""
    out = None
    for lvl, (bank, _, _) in enumerate(levels):
        lo, hi = table.level_cols[lvl]
        cid = ids[:, lo:hi].long()
        lid = torch.where(cid >= 0, cid - table.col_offs[lvl], -1).to(torch.int32)
        o = bank(rows, lid, w[:, lo:hi])
        out = o if out is None else out + o
    return out


def ep_routed_experts(
    x: torch.Tensor,
    levels: list[tuple[ExpertParallelExperts, torch.Tensor, torch.Tensor]],
    *,
    group,
    ep_rank: int,
    ep_size: int,
    stats: EPCommStats | None = None,
    while_in_flight: Callable[[list[torch.Tensor]], Any] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], Any]:
    """The routed experts of several banks over EP, one row per (token, destination rank).

    Args:
        x: ``[N, D]`` this rank's tokens.
        levels: ``(bank, expert_ids [N, k] (global ids, -1 = unused), weights [N, k])`` per
            bank; every bank is an :class:`ExpertParallelExperts` with the same ``ep_size``.
        while_in_flight: called with ``ranks_visited`` once the dispatch is issued; its
            result is returned (the layer runs its shared experts there).
    Returns:
        ``(y, ranks_visited, side)``: ``y [N, D]`` in ``x.dtype``, the sum over all banks of
        ``sum_s w[:, s] * expert(x)`` (partial sums per rank added in rank order);
        ``ranks_visited`` per bank ``[N]``, the distinct EP ranks holding the token's experts
        of that bank; ``side`` the result of ``while_in_flight`` (``None`` without one).
    """
    n, d = x.shape
    ep, me = ep_size, ep_rank
    t = _route_table(levels, ep)
    k = t.dest.shape[1]
    r_max = max(1, min(ep, k))  # most ranks a token visits
    s_dest, first = _sorted_firsts(t.dest, ep)
    j = first.long().cumsum(1) - 1  # the destination's position among the token's ranks
    tok = torch.arange(n, device=x.device)[:, None]
    # (token, rank) pairs by rank, then token; this rank's own pairs last (they stay here)
    rank_key = torch.where(s_dest == me, ep - 1, s_dest - (s_dest > me).long())
    key = torch.where(first, rank_key * n + tok, ep * n).reshape(-1)
    order = torch.argsort(key, stable=True)
    send = _per_dest(s_dest, first, ep)
    in_splits, out_splits, (trl, ts), _ = _exchange_counts(send, [t.trl, t.ts], group, ep, me, stats)
    _count_rows(stats, me, in_splits, in_splits, trl, ts)

    p = sum(in_splits)
    sel = order[:p]
    tok_sel = torch.div(sel, k, rounding_mode="floor")
    r_sel = s_dest.reshape(-1).index_select(0, sel)
    q = tok_sel * r_max + j.reshape(-1).index_select(0, sel)  # the pair in [N, r_max]
    pos = torch.full((n * r_max,), -1, dtype=torch.long, device=x.device)
    pos = pos.index_copy(0, q, torch.arange(p, device=x.device)).view(n, r_max)
    x_rows = _GatherRows.apply(x, tok_sel, pos)
    w_rows = _GatherRows.apply(t.w, tok_sel, pos)  # slots on other ranks: id -1 below, unused
    match = t.dest.index_select(0, tok_sel) == r_sel[:, None]  # [P, K]: the slots on that rank
    id_rows = torch.where(match, t.col.index_select(0, tok_sel), -1).to(_id_dtype(t.col_offs[-1]))

    # the other ranks' rows travel (rank order); this rank's own rows, last, are computed here
    # while they do
    a = p - in_splits[me]
    in_remote, out_remote = list(in_splits), list(out_splits)
    in_remote[me] = out_remote[me] = 0
    xs = _Pending(x_rows[:a], out_remote, in_remote, group, me, stats, "dispatch")
    ws = _Pending(w_rows[:a], out_remote, in_remote, group, me, stats, "dispatch_meta")
    ids = _Pending(id_rows[:a], out_remote, in_remote, group, me, stats, "dispatch_meta")
    side = while_in_flight(t.visited) if while_in_flight is not None else None
    own = _partial_sums(levels, x_rows[a:], w_rows[a:], id_rows[a:], t)
    got = _partial_sums(levels, xs.wait(), ws.wait(), ids.wait(), t)
    back = _Pending(got, in_remote, out_remote, group, me, stats, "combine").wait()
    parts = torch.cat([back, own])  # the rows' partial sums in the sent order
    y = _CombineRows.apply(parts, None, pos)
    return y, t.visited, side


def ep_routed_experts_per_slot(
    x: torch.Tensor,
    levels: list[tuple[ExpertParallelExperts, torch.Tensor, torch.Tensor]],
    *,
    group,
    ep_rank: int,
    ep_size: int,
    stats: EPCommStats | None = None,
    while_in_flight: Callable[[list[torch.Tensor]], Any] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
    """The routed experts of several banks over EP, one row per (token, slot, level): the
    result does not depend on the EP size (bitwise).

    Arguments as :func:`ep_routed_experts`. Returns ``(outputs, ranks_visited, side)``:
    per bank ``y [N, D]`` in ``x.dtype`` (``sum_s w[:, s] * expert(x)`` in slot order).
    """
    n = x.shape[0]
    dev = x.device
    ep, me = ep_size, ep_rank
    t = _route_table(levels, ep)
    k = t.dest.shape[1]
    c = t.col_offs[-1]
    valid = t.dest < ep
    key = torch.where(valid, t.dest * c + t.col, ep * c).reshape(-1)
    order = torch.argsort(key, stable=True)  # by (rank, level, local expert), then token, slot
    send = torch.zeros(ep * c + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    send = send[: ep * c].reshape(ep, c)
    s_dest, first = _sorted_firsts(t.dest, ep)
    tr = _per_dest(s_dest, first, ep)
    in_splits, out_splits, (tr_h, trl, ts), recv = _exchange_counts(send, [tr, t.trl, t.ts], group, ep, me, stats)
    _count_rows(stats, me, in_splits, tr_h, trl, ts)
    p, m = sum(in_splits), sum(out_splits)

    sel = order[:p]
    pos = torch.full((n * k,), -1, dtype=torch.long, device=dev)
    pos = pos.index_copy(0, sel, torch.arange(p, device=dev)).view(n, k)
    # rows per (token, slot); the input gradient sums them over the slots in slot order
    x_rows = _GatherRows.apply(x, torch.div(sel, k, rounding_mode="floor"), pos)
    pending = _Pending(x_rows, out_splits, in_splits, group, me, stats, "dispatch")
    side = while_in_flight(t.visited) if while_in_flight is not None else None
    # received rows arrive per source in (level, local expert) order: their column from the counts
    col_recv = torch.repeat_interleave(torch.arange(c, device=dev).repeat(ep), recv.reshape(-1), output_size=m)
    x_recv = pending.wait()
    ones = torch.ones(m, 1, dtype=torch.float32, device=dev)
    out = None
    for lvl, (bank, _, _) in enumerate(levels):
        lo, hi = t.col_offs[lvl], t.col_offs[lvl + 1]
        lid = torch.where((col_recv >= lo) & (col_recv < hi), col_recv - lo, -1).to(torch.int32)[:, None]
        o = bank(x_recv, lid, ones)  # rows of other levels: id -1, exact zeros
        out = o if out is None else out + o
    back = _Pending(out, in_splits, out_splits, group, me, stats, "combine").wait()
    outputs = [_CombineRows.apply(back, t.w[:, lo:hi], pos[:, lo:hi]) for lo, hi in t.level_cols]
    return outputs, t.visited, side


class ExpertParallelDASGMoE(DASGMoE):
    """A :class:`DASGMoE` whose routed banks are :class:`ExpertParallelExperts` shards over
    an EP group (made by :func:`apply_expert_parallel`, which swaps the class in place).

    ``forward`` (:class:`DASGMoE`'s, with :meth:`mix_experts` overridden) returns what the
    unsharded layer returns for this rank's tokens, with the aux losses and statistics reduced
    over the EP group (see the module docstring) and the extra statistic
    ``"<level>/mean_ranks_per_token"``. ``ep_bitwise`` picks the per-slot exchange;
    ``ep_comm`` counts the bytes sent.
    """

    ep_group: object
    ep_rank: int
    ep_size: int
    ep_bitwise: bool
    ep_comm: EPCommStats

    def mix_experts(self, flat: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        """:meth:`DASGMoE.mix_experts` over EP: the routed rows travel to the ranks holding
        their experts while the shared experts and the aux all-reduce run; ``r.aux_losses``
        and ``r.stats`` become the EP group's."""
        def while_in_flight(visited):  # overlaps the dispatch
            return self.shared(flat, r.gate, r.deep_mask), self._launch_aux(r, visited)

        kw = dict(group=self.ep_group, ep_rank=self.ep_rank, ep_size=self.ep_size, stats=self.ep_comm,
                  while_in_flight=while_in_flight)
        if self.ep_bitwise:
            outs, _, (y, aux_pending) = ep_routed_experts_per_slot(flat, self.routed_levels(r), **kw)
            for o in outs:  # the unsharded layer's order: shared, shallow, deep
                y = y + o
        else:
            routed, _, (y, aux_pending) = ep_routed_experts(flat, self.routed_levels(r), **kw)
            y = y + routed
        r.aux_losses, r.stats = self._finish_aux(*aux_pending)
        return y

    def _launch_aux(self, r, visited):
        """Issue the all_reduce of the router's aux sums and stats over the EP group (async)."""
        diff, stat = [], []
        per_level = []
        for name, vis in zip(LEVELS, visited):
            lr = r.levels[name]
            m = lr.active.to(torch.float32)
            logits = lr.logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            probs = logp.exp()
            e = logits.shape[-1]
            diff += [(probs * m[:, None]).sum(0), (torch.logsumexp(logits, dim=-1).square() * m).sum()[None],
                     (-(probs * logp).sum(-1) * m).sum()[None]]
            stat += [lr.routing.tokens_per_expert.to(torch.float32), m.sum()[None],
                     (lr.routing.num_selected.to(torch.float32) * m).sum()[None],
                     (vis.to(torch.float32) * m).sum()[None]]
            per_level.append(e)
        n_tok = r.gate.shape[0]
        stat += [r.gate.new_full((1,), float(n_tok)), r.gate.detach().sum()[None],
                 r.deep_mask.to(torch.float32).sum()[None]]
        local = torch.cat(diff)
        buf = torch.cat([local.detach(), torch.cat(stat).detach()]).to(torch.float64)
        self.ep_comm.add("aux", buf.numel() * buf.element_size())
        return local, funcol.all_reduce(buf, "sum", self.ep_group), per_level

    def _finish_aux(self, local, pending, per_level) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The router's aux losses and stats over the EP group from the reduced sums."""
        ep = self.ep_size
        buf = funcol.wait_tensor(pending)
        nd = local.shape[0]
        glob = buf[:nd].to(local.dtype) + ep * (local - local.detach())
        sg = buf[nd:]
        aux: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        i = j = 0
        for name, e in zip(LEVELS, per_level):
            p_sum, z_sum, ent_sum = glob[i: i + e], glob[i + e], glob[i + e + 1]
            i += e + 2
            counts, n_act, sel_sum, ranks_sum = sg[j: j + e], sg[j + e], sg[j + e + 1], sg[j + e + 2]
            j += e + 3
            n = n_act.clamp(min=1.0).to(torch.float32)
            counts32 = counts.to(torch.float32)
            f = counts32 / counts32.sum().clamp(min=1.0)
            losses = {"load_balance": e * (f * (p_sum / n)).sum(), "z_loss": z_sum / n, "entropy": ent_sum / n}
            for k, v in losses.items():
                aux[f"{name}/{k}"] = v
                aux[k] = aux[k] + v if k in aux else v
            stats[f"{name}/tokens_per_expert"] = counts.round().to(torch.int32)
            stats[f"{name}/mean_experts_per_token"] = (sel_sum / n_act.clamp(min=1.0)).to(torch.float32)
            stats[f"{name}/num_tokens"] = n_act.to(torch.float32)
            stats[f"{name}/mean_ranks_per_token"] = (ranks_sum / n_act.clamp(min=1.0)).to(torch.float32)
        n_all, gate_sum, deep_sum = sg[j], sg[j + 1], sg[j + 2]
        stats["deep_fraction"] = (deep_sum / n_all.clamp(min=1.0)).to(torch.float32)
        stats["mean_gate"] = (gate_sum / n_all.clamp(min=1.0)).to(torch.float32)
        return aux, stats

    def extra_repr(self) -> str:
        return f"ep_rank={self.ep_rank}, ep_size={self.ep_size}, bitwise={self.ep_bitwise}"


# --------------------------------------------------------------------------- entry points


def apply_expert_parallel(model: nn.Module, ep_mesh, *, bitwise: bool = False) -> nn.Module:
    """Shard the routed experts of every :class:`DASGMoE` in ``model`` over ``ep_mesh``.

    Args:
        model: a module containing ``DASGMoE`` layers (or one itself), identically
            initialised on every rank (same seed or the same checkpoint).
        ep_mesh: a 1-D ``DeviceMesh`` (e.g. ``mesh["ep"]`` of
            ``init_device_mesh(device, (dp, ep), mesh_dim_names=("dp", "ep"))``), a
            ``ProcessGroup``, or ``None`` for the default group.
        bitwise: exchange one row per (token, slot, level) so that output and gradients are
            bitwise independent of the EP size (about ``k`` times the bytes); the default
            sends each token once per destination rank (deterministic for a given EP size,
            equal to one process up to rounding).
    Returns:
        ``model``, changed in place: each ``DASGMoE`` becomes an :class:`ExpertParallelDASGMoE`
        whose ``shallow_experts`` / ``deep_experts`` hold their weights as ``DTensor`` s
        sharded ``Shard(0)`` over the EP mesh (:class:`ExpertParallelExperts`). Parameter
        names are unchanged, so ``torch.distributed.checkpoint`` moves checkpoints between
        EP sizes and the unsharded model.
    Raises:
        ValueError: a bank's expert count is not divisible by the EP size (nothing is
            changed then), a multi-dimensional mesh, or a layer that is already EP.
        TypeError: ``ep_mesh`` of another type, ``bitwise`` not a bool.
    """
    if not isinstance(bitwise, bool):
        raise TypeError(f"apply_expert_parallel: bitwise must be a bool, got {type(bitwise).__name__}")
    group, rank, size = _group_rank_size(ep_mesh, "apply_expert_parallel", "ep_mesh")
    layers = [m for m in model.modules() if isinstance(m, DASGMoE)]
    for i, m in enumerate(layers):
        if isinstance(m, ExpertParallelDASGMoE):
            raise ValueError(f"apply_expert_parallel: DASGMoE layer {i} is already expert-parallel")
        for name in ("shallow_experts", "deep_experts"):
            e = getattr(m, name).num_experts
            if e % size:
                raise ValueError(
                    f"apply_expert_parallel: the {name.split('_')[0]} routed bank of DASGMoE layer {i} has E={e} "
                    f"experts, not divisible by the EP size {size}; choose E a multiple of ep"
                )
    mesh = None
    for m in layers:
        if mesh is None:
            mesh = _as_mesh(ep_mesh, group, m.shallow_experts.gate_up_proj.device.type)
        m.shallow_experts = ExpertParallelExperts(m.shallow_experts, mesh, rank, size)
        m.deep_experts = ExpertParallelExperts(m.deep_experts, mesh, rank, size)
        m.__class__ = ExpertParallelDASGMoE
        m.ep_group, m.ep_rank, m.ep_size, m.ep_bitwise = group, rank, size, bitwise
        m.ep_comm = EPCommStats()
    return model


def ep_comm_stats(model: nn.Module, reset: bool = False) -> dict[str, int]:
    """The EP bytes this rank sent, summed over the model's layers, by phase, plus
    ``"total"`` (bytes), ``"host_syncs"`` and the rows behind them as ``"rows/<kind>"``
    (see :class:`EPCommStats`); ``reset`` zeroes the counters after reading."""
    acc = CommCounter()
    for m in model.modules():
        if isinstance(m, ExpertParallelDASGMoE):
            acc.merge(m.ep_comm)
            if reset:
                m.ep_comm.reset()
    out = dict(acc.bytes)
    out["total"] = acc.total
    out["host_syncs"] = acc.host_syncs
    out.update({f"rows/{k}": v for k, v in acc.rows.items()})
    return out


def _is_expert_param(model: nn.Module) -> set[int]:
    ids = set()
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


@torch.no_grad()
def allreduce_gradients(model: nn.Module, ep_mesh, dp_mesh=None) -> None:
    """Data-parallel gradient averaging for an expert-parallel model (what DDP would do).

    Every rank feeds its own batch and back-propagates its own loss. Then each gradient is
    summed over the ranks holding a replica of its parameter -- expert shards over
    ``dp_mesh`` (their contributions from the whole EP group already arrived through the
    all-to-all backward), everything else over ``dp_mesh`` and ``ep_mesh`` -- and divided by
    the number of data shards ``dp * ep``. The result is the gradient of the mean of the
    ranks' losses. ``dp_mesh`` is a 1-D mesh or group, ``None``, or a sequence of them (every
    replica dimension besides EP, e.g. ``[mesh["dp"], mesh["cp"]]``). A missing gradient
    counts as zeros (so every rank runs the same collectives). Gradients travel in flat
    buckets of up to 25 MiB per dtype (a few collectives per step, not one per parameter).
    """
    ep_group, _, ep = _group_rank_size(ep_mesh, "allreduce_gradients", "ep_mesh")
    if dp_mesh is None:
        dp_mesh = []
    elif not isinstance(dp_mesh, (list, tuple)):
        dp_mesh = [dp_mesh]
    dp_groups = []
    world = ep
    for m in dp_mesh:
        g, _, n = _group_rank_size(m, "allreduce_gradients", "dp_mesh")
        world *= n
        if n > 1:
            dp_groups.append(g)
    experts = _is_expert_param(model)
    # buckets per (groups to reduce over, dtype, device), in parameter order on every rank
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, int] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = _local(p.grad)
        key = (tuple(dp_groups) + ((ep_group,) if id(p) not in experts and ep > 1 else ()), g.dtype, g.device)
        lists = buckets.setdefault(key, [[]])
        if filled.get(key, 0) >= _BUCKET_BYTES:
            lists.append([])
            filled[key] = 0
        lists[-1].append(g)
        filled[key] = filled.get(key, 0) + g.numel() * g.element_size()
    for (groups, _, _), lists in buckets.items():
        for grads in lists:
            flat = torch.cat([t.reshape(-1) for t in grads])
            for grp in groups:
                dist.all_reduce(flat, group=grp)
            flat.div_(world)
            off = 0
            for t in grads:
                t.copy_(flat[off: off + t.numel()].view_as(t))
                off += t.numel()
