"""Expert parallelism (EP) for :class:`dasg_model.DASGMoE` on ``torch.distributed``.

:func:`apply_expert_parallel` shards the two routed-expert banks of every ``DASGMoE``
(shallow and deep) over a 1-D EP ``DeviceMesh`` (or process group): EP rank ``r`` of
``ep`` keeps experts ``[r*E/ep, (r+1)*E/ep)`` of each bank (slices of ``gate_up_proj
[E, 2F, D]`` and ``down_proj [E, D, F]``). Everything else -- the router (ADR), the
shared experts (DSSE), ``routed_scale``, attention, embeddings -- stays replicated
(data parallel). Each EP rank feeds its own tokens.

One layer's forward, per rank (both levels share the exchanges)::

    route locally (replicated router)         ids [N, k] per level (global expert ids)
    sort the (token, slot) pairs by (destination rank, level, local expert), stable
    all_to_all_single(counts [ep, C])          C = E_shallow/ep + E_deep/ep local experts
    counts.tolist()                            <- THE ONE HOST SYNC per layer (split sizes)
    all-to-all #1: token rows x[token]          [pairs sent, D]
    expert_ffn on the received rows, local ids (one call per level; rows of the other
        level are id -1, so cost nothing), weight 1: unweighted per-slot outputs
    all-to-all #2: the per-slot outputs back    [pairs sent, D]
    y[t] = sum over slots s in order 0..k-1 of w[t, s] * out[t, s]   (fp32, on the source)

The source rank combines the per-slot outputs with its own routing weights in the fixed
slot order, and the sent rows are gathered per (level, token, slot), so each token's input
gradient sums its slots in a fixed order too: output and gradients do not depend on the
number of ranks (bitwise for ep = 1, 2, 4, any ``k_max``; the tests check ``k_max=4``), and
equal the unsharded layer bitwise in fp32 on ``backend="torch"`` for ``k_max <= 2`` (for
larger ``k_max`` the unsharded layer adds the slots in expert order: to rounding). In 16 bit the per-slot outputs travel in ``x.dtype`` (rounded once before
the weighted sum). Both exchanges have autograd (torch's functional
``all_to_all_single_autograd``: the backward is the reverse all-to-all), so gradients reach ``x``, the router and the routing weights on the
source and the expert slices on their owners.

The one host sync is the ``.tolist()`` of the exchanged counts: ``all_to_all_single``
needs its split sizes on the host, as in torchtitan and Megatron. Everything else
(sorting, histograms, the row indices on the receiver) stays on the device.

Auxiliary losses and statistics are reduced over the EP group in one ``all_reduce`` per
layer: ``load_balance`` uses the EP group's global expert fractions and mean router
probabilities, ``z_loss`` and ``entropy`` are means over the group's tokens, and
``<level>/tokens_per_expert`` etc. are group totals, so they equal one process run on the
concatenation of the group's tokens. The reduced sums enter the losses as
``global.detach() + ep * (local - local.detach())`` (same value), so no collective runs in
the backward and, under the usual data-parallel rule (gradients summed over the replicas
of a parameter and divided by the number of data shards, see :func:`allreduce_gradients`),
the aux gradients are those of the group loss.

ADR's ``n_group`` expert groups map onto EP ranks when ``n_group`` is a multiple of
``ep`` (the experts of a group live on one rank), so ``topk_group`` bounds the number of
ranks a token visits ("local expert activation"); ``<level>/mean_ranks_per_token`` in
the layer's ``MoEOutput.stats`` measures it (EP-group mean over the level's tokens).

Bytes per layer and step: each exchange moves the ``N * k_used`` routed rows (``k_used``
the mean experts per token, both levels together) of ``D * dtype_size`` bytes, forward
and back, so about ``2 * N * k * D * dtype_size`` bytes forward and as many in the
backward, of which the fraction ``(ep - 1) / ep`` leaves the rank under uniform routing.
:attr:`ExpertParallelDASGMoE.ep_comm` counts them (:func:`ep_comm_stats` sums a model).
A row costs ``6 * D * F`` expert FLOPs forward against ``2 * D * dtype_size`` bytes moved,
i.e. ``1.5 * F`` FLOP/byte in 16 bit: an overlapped EP hides its traffic when that exceeds
the GPU's FLOPs per link byte (H100: ~2200 over NVLink, so F >~ 1.5k; ~20000 over 400 Gb/s
InfiniBand). The exchanges here are synchronous (no overlap with compute), so they add
their transfer time; EP pays off when the experts' weights (``3 * E * F * D`` per bank) do
not fit, or would be wastefully replicated, on every rank, and inside a node first.

Gradients: every rank back-propagates its own loss; :func:`allreduce_gradients` then
averages (DDP semantics: sum over a parameter's replicas, divide by ``dp * ep``). FSDP2
composes: ``fully_shard`` each expert bank over ``mesh["dp"]`` and the model over the 2-D
``(dp, ep)`` mesh (HSDP), then divide the expert gradients by ``ep`` (or
``set_gradient_divide_factor(dp * ep)`` on NCCL; gloo lacks ``PREMUL_SUM``); 0-dim
parameters (``shared.shallow_scale``) must go to ``ignored_params`` and be all-reduced by
hand (see ``tests/test_distributed_ep.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from dasg_model.experts import SwiGLUExperts
from dasg_model.moe import DASGMoE, MoEOutput
from dasg_model.router import LEVELS

__all__ = [
    "EPCommStats",
    "ExpertParallelDASGMoE",
    "ExpertParallelExperts",
    "allreduce_gradients",
    "apply_expert_parallel",
    "ep_comm_stats",
]


# --------------------------------------------------------------------------- groups


def _resolve_group(mesh_or_group, what: str = "apply_expert_parallel: ep_mesh") -> tuple[object, int, int]:
    """``(process_group, rank_in_group, group_size)`` of a 1-D ``DeviceMesh``, a
    ``ProcessGroup`` or ``None`` (the default group)."""
    if mesh_or_group is None:
        return dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    if hasattr(mesh_or_group, "get_group") and hasattr(mesh_or_group, "mesh"):  # DeviceMesh
        if mesh_or_group.ndim != 1:
            raise ValueError(
                f"{what} must be a 1-D DeviceMesh (e.g. mesh['ep'] of a 2-D dp x ep "
                f"mesh), got {mesh_or_group.ndim} dims {mesh_or_group.mesh_dim_names}"
            )
        return mesh_or_group.get_group(), mesh_or_group.get_local_rank(), mesh_or_group.size()
    return mesh_or_group, dist.get_rank(mesh_or_group), dist.get_world_size(mesh_or_group)


# --------------------------------------------------------------------------- communication


@dataclass
class EPCommStats:
    """Bytes this rank sent to *other* ranks in the EP exchanges (its own chunk, a local
    copy, is not counted), by phase, and the number of host syncs.

    Phases: ``dispatch`` / ``combine`` (forward token rows and per-slot outputs),
    ``dispatch_bwd`` / ``combine_bwd`` (their gradients, in the backward), ``counts``
    (the per-expert counts, ``ep * C`` int64) and ``aux`` (the stats ``all_reduce``, the
    whole vector counted once).
    """

    bytes: dict[str, int] = field(default_factory=dict)
    host_syncs: int = 0

    def add(self, phase: str, n: int) -> None:
        self.bytes[phase] = self.bytes.get(phase, 0) + int(n)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.host_syncs = 0


def _remote_bytes(splits: list[int], me: int, row_bytes: int) -> int:
    return sum(c for r, c in enumerate(splits) if r != me) * row_bytes


def _all_to_all(x, out_splits, in_splits, group, me, stats, phase):
    """``all_to_all_single`` of rows with host split sizes, through torch's functional
    collective with autograd (the backward is the reverse exchange of the gradient rows);
    ``stats`` counts the bytes sent to other ranks both ways (a hook on the output counts
    the backward's, when its gradient arrives)."""
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    out = funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))
    if stats is not None:
        stats.add(phase, _remote_bytes(in_splits, me, row_bytes))
        if out.requires_grad:
            out.register_hook(lambda g: stats.add(phase + "_bwd", _remote_bytes(out_splits, me, row_bytes)))
    return out


# --------------------------------------------------------------------------- modules


class ExpertParallelExperts(SwiGLUExperts):
    """This rank's slice of a routed expert bank: experts ``[expert_offset,
    expert_offset + num_experts)`` of ``global_num_experts``, same parameter names and
    layout as :class:`SwiGLUExperts` (``forward`` takes *local* expert ids)."""

    def __init__(self, bank: SwiGLUExperts, ep_rank: int, ep_size: int):
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
        self.gate_up_proj = nn.Parameter(bank.gate_up_proj.detach()[sl].clone(),
                                         requires_grad=bank.gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(bank.down_proj.detach()[sl].clone(), requires_grad=bank.down_proj.requires_grad)

    def extra_repr(self) -> str:
        return (f"experts=[{self.expert_offset}, {self.expert_offset + self.num_experts}) of "
                f"{self.global_num_experts} (ep rank {self.ep_rank}/{self.ep_size}), hidden={self.hidden_size}, "
                f"ffn={self.ffn_size}")


def ep_routed_experts(
    x: torch.Tensor,
    levels: list[tuple[ExpertParallelExperts, torch.Tensor, torch.Tensor]],
    *,
    group,
    ep_rank: int,
    ep_size: int,
    stats: EPCommStats | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The routed experts of several banks over EP, with one pair of exchanges.

    Args:
        x: ``[N, D]`` this rank's tokens.
        levels: ``(bank, expert_ids [N, k] (global ids, -1 = unused), weights [N, k])`` per
            bank; every bank is an :class:`ExpertParallelExperts` with the same ``ep_size``.
    Returns:
        ``(outputs, ranks_visited)``: per bank ``y [N, D]`` in ``x.dtype`` (``sum_s w[:, s]
        * expert(x)`` in slot order) and ``[N]`` int, the number of distinct EP ranks holding
        the token's experts.
    """
    n, d = x.shape
    dev = x.device
    ep = ep_size
    e_loc = [bank.num_experts for bank, _, _ in levels]
    offs = [0]
    for e in e_loc:
        offs.append(offs[-1] + e)
    c = offs[-1]

    keys, visited = [], []
    for lvl, (bank, ids, _) in enumerate(levels):
        k = ids.shape[1]
        ids64 = ids.long()
        valid = ids64 >= 0
        gid = ids64.clamp(min=0)
        dest = torch.div(gid, e_loc[lvl], rounding_mode="floor")
        col = dest * c + offs[lvl] + (gid - dest * e_loc[lvl])
        keys.append(torch.where(valid, col, torch.full_like(col, ep * c)).reshape(-1))
        hit = torch.zeros(n, ep, dtype=torch.int32, device=dev).scatter_add_(1, dest, valid.to(torch.int32))
        visited.append((hit > 0).sum(1))
    key = torch.cat(keys)
    order = torch.argsort(key, stable=True)
    # counts by scatter_add_ (torch.bincount syncs with the host on CUDA)
    send = torch.zeros(ep * c + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    send = send[: ep * c].reshape(ep, c)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # THE host sync of the layer: all_to_all_single needs the split sizes on the host.
    host = torch.cat([send.sum(1), recv.sum(1)]).tolist()
    in_splits, out_splits = host[:ep], host[ep:]
    if stats is not None:
        stats.host_syncs += 1
        stats.add("counts", (ep - 1) * c * send.element_size())
    n_send, m = sum(in_splits), sum(out_splits)

    sel = order[:n_send]
    # rows per (level, token, slot), then the sent ones: the backward sums each token's pair
    # gradients over the slot axis, in an order that does not depend on the EP size
    pairs = torch.cat([x[:, None].expand(n, ids.shape[1], d).reshape(-1, d) for _, ids, _ in levels])
    x_recv = _all_to_all(pairs.index_select(0, sel), out_splits, in_splits, group, ep_rank, stats, "dispatch")

    # received rows arrive per source in (level, local expert) order: their column from the counts
    cols = torch.arange(c, device=dev).repeat(ep)
    col_recv = torch.repeat_interleave(cols, recv.reshape(-1), output_size=m)
    ones = torch.ones(m, 1, dtype=torch.float32, device=dev)
    out = None
    for lvl, (bank, _, _) in enumerate(levels):
        mine = (col_recv >= offs[lvl]) & (col_recv < offs[lvl + 1])
        lid = torch.where(mine, col_recv - offs[lvl], torch.full_like(col_recv, -1)).to(torch.int32)[:, None]
        o = bank(x_recv, lid, ones)  # rows of other levels: id -1, exact zeros
        out = o if out is None else out + o
    back = _all_to_all(out, in_splits, out_splits, group, ep_rank, stats, "combine")

    per_pair = x.new_zeros(key.shape[0], d).index_copy(0, sel, back)
    outputs = []
    p0 = 0
    for bank, ids, w in levels:
        k = ids.shape[1]
        o = per_pair[p0: p0 + n * k].view(n, k, d)
        p0 += n * k
        acc = None
        for s in range(k):  # the fixed slot order
            term = o[:, s].float() * w[:, s, None].float()
            acc = term if acc is None else acc + term
        outputs.append(acc.to(x.dtype) if acc is not None else x.new_zeros(n, d))
    return outputs, visited


class ExpertParallelDASGMoE(DASGMoE):
    """A :class:`DASGMoE` whose routed banks are :class:`ExpertParallelExperts` slices over
    an EP group (made by :func:`apply_expert_parallel`, which swaps the class in place).

    ``forward`` returns what ``DASGMoE.forward`` returns for this rank's tokens, with the aux
    losses and statistics reduced over the EP group (see the module docstring) and the extra
    statistic ``"<level>/mean_ranks_per_token"``. ``ep_comm`` counts the bytes sent.
    """

    ep_group: object
    ep_rank: int
    ep_size: int
    ep_comm: EPCommStats

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEOutput]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = self.router(flat)
        y = self.shared(flat, r.gate, r.deep_mask)
        sh = r.levels["shallow"].routing
        dp = r.levels["deep"].routing
        levels = [
            (self.shallow_experts, sh.expert_ids, sh.weights * self.routed_scale[0]),
            (self.deep_experts, dp.expert_ids, dp.weights * (r.gate * self.routed_scale[1])[:, None]),
        ]
        outs, visited = ep_routed_experts(flat, levels, group=self.ep_group, ep_rank=self.ep_rank,
                                          ep_size=self.ep_size, stats=self.ep_comm)
        for o in outs:
            y = y + o
        aux, stats = self._reduced_aux(r, visited)
        r.aux_losses, r.stats = aux, stats
        return y.reshape(shape), MoEOutput(aux, stats, r)

    def _reduced_aux(self, r, visited) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The router's aux losses and stats over the EP group (one all_reduce)."""
        ep = self.ep_size
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
        nd = local.shape[0]
        buf = torch.cat([local.detach(), torch.cat(stat).detach()]).to(torch.float64)
        dist.all_reduce(buf, group=self.ep_group)
        self.ep_comm.add("aux", buf.numel() * buf.element_size())
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
        return f"ep_rank={self.ep_rank}, ep_size={self.ep_size}"


# --------------------------------------------------------------------------- entry points


def apply_expert_parallel(model: nn.Module, ep_mesh) -> nn.Module:
    """Shard the routed experts of every :class:`DASGMoE` in ``model`` over ``ep_mesh``.

    Args:
        model: a module containing ``DASGMoE`` layers (or one itself), identically
            initialised on every rank (same seed or the same checkpoint).
        ep_mesh: a 1-D ``DeviceMesh`` (e.g. ``mesh["ep"]`` of
            ``init_device_mesh(device, (dp, ep), mesh_dim_names=("dp", "ep"))``), a
            ``ProcessGroup``, or ``None`` for the default group.
    Returns:
        ``model``, changed in place: each ``DASGMoE`` becomes an :class:`ExpertParallelDASGMoE`
        whose ``shallow_experts`` / ``deep_experts`` keep ``E/ep`` experts (this rank's
        slice, :class:`ExpertParallelExperts`). Parameter names are unchanged.
    Raises:
        ValueError: a bank's expert count is not divisible by the EP size (nothing is
            changed then), a multi-dimensional mesh, or a layer that is already EP.
    """
    group, rank, size = _resolve_group(ep_mesh)
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
    for m in layers:
        m.shallow_experts = ExpertParallelExperts(m.shallow_experts, rank, size)
        m.deep_experts = ExpertParallelExperts(m.deep_experts, rank, size)
        m.__class__ = ExpertParallelDASGMoE
        m.ep_group, m.ep_rank, m.ep_size = group, rank, size
        m.ep_comm = EPCommStats()
    return model


def ep_comm_stats(model: nn.Module, reset: bool = False) -> dict[str, int]:
    """The EP bytes this rank sent, summed over the model's layers, by phase, plus
    ``"total"`` and ``"host_syncs"``; ``reset`` zeroes the counters after reading."""
    out: dict[str, int] = {}
    syncs = 0
    for m in model.modules():
        if isinstance(m, ExpertParallelDASGMoE):
            for k, v in m.ep_comm.bytes.items():
                out[k] = out.get(k, 0) + v
            syncs += m.ep_comm.host_syncs
            if reset:
                m.ep_comm.reset()
    out["total"] = sum(out.values())
    out["host_syncs"] = syncs
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
    summed over the ranks holding a replica of its parameter -- expert slices over
    ``dp_mesh`` (their contributions from the whole EP group already arrived through the
    all-to-all backward), everything else over ``dp_mesh`` and ``ep_mesh`` -- and divided by
    the number of data shards ``dp * ep``. The result is the gradient of the mean of the
    ranks' losses. ``dp_mesh`` is a 1-D mesh or group, ``None``, or a sequence of them (every
    replica dimension besides EP, e.g. ``[mesh["dp"], mesh["cp"]]``). A missing gradient
    counts as zeros (so every rank runs the same collectives).
    """
    ep_group, _, ep = _resolve_group(ep_mesh, "allreduce_gradients: ep_mesh")
    if dp_mesh is None:
        dp_mesh = []
    elif not isinstance(dp_mesh, (list, tuple)):
        dp_mesh = [dp_mesh]
    dp_groups = []
    world = ep
    for m in dp_mesh:
        g, _, n = _resolve_group(m, "allreduce_gradients: dp_mesh")
        world *= n
        if n > 1:
            dp_groups.append(g)
    experts = _is_expert_param(model)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        for g in dp_groups:
            dist.all_reduce(p.grad, group=g)
        if id(p) not in experts and ep > 1:
            dist.all_reduce(p.grad, group=ep_group)
        p.grad.div_(world)
