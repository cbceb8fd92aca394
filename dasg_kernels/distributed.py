"""Context parallelism for GMHA on ``torch.distributed`` (no communication layer of our own).

:func:`swa_attention_cp` runs :func:`dasg_kernels.swa_attention` on a sequence that is
sharded over the ranks of a process group: rank ``r`` of ``W`` holds the contiguous
positions ``[r * T_local, (r + 1) * T_local)`` of every sequence of the batch (rank
order = sequence order, equal shards). Per call and rank it receives

- the **halo**: the last ``left`` keys/values before its shard, from the preceding
  rank(s) (several ranks when ``left > T_local``; the whole prefix when ``left = -1``),
  with one ``all_to_all_single`` that moves only the rows some rank needs;
- the **summaries** (``summaries=True``): one ``all_gather`` of every shard's partial group
  means (``ceil((T_local - 1) / G) + 1`` rows per rank and kv head), combined with global
  group indices, so a group that straddles a shard boundary gets its mean from the partial
  sums of both shards;

then attends its queries to ``[halo + local]`` keys and the summaries at its global
position offset. Both collectives form one autograd node (:class:`_Exchange`) whose
backward returns the gradients of the halo and of the summaries to the ranks that own
those keys/values, running the same reverse collectives in the same order on every rank.
Output and gradients equal ``swa_attention`` on the whole sequence (the tests check it
with gloo on CPU).

Also :func:`shift_labels_cp`: next-token targets of a sequence-sharded batch (the target of
a shard's last position is the next shard's first label).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dasg_kernels import reference
from dasg_kernels.attention import ops
from dasg_kernels.attention.interface import _pick_backend, _validate
from dasg_kernels.attention.interface import swa_attention as _swa_attention
from dasg_kernels.backend import interpreted_bf16


__all__ = ["cp_comm_stats", "resolve_group", "shift_labels_cp", "swa_attention_cp"]

_OP = "swa_attention_cp"


# --------------------------------------------------------------------------- byte counter

_SENT: dict[str, int] = {}


def _count(phase: str, nbytes: int) -> None:
    _SENT[phase] = _SENT.get(phase, 0) + int(nbytes)


def cp_comm_stats(reset: bool = False) -> dict[str, int]:
    """Bytes this process sent to *other* ranks in :func:`swa_attention_cp`'s collectives
    since the last reset, by phase, plus ``"total"``; ``reset`` zeroes the counters.

    Phases: ``"halo"`` / ``"halo_bwd"`` (the ``all_to_all_single`` rows and their gradients),
    ``"summaries"`` (the ``all_gather``: this rank's partial means once per other rank),
    ``"summaries_bwd"`` (the ``all_reduce`` that stands in for a reduce-scatter: ``2 (W-1)/W``
    of its buffer, as a ring all-reduce sends) and ``"validate"`` (the argument check).
    Counted on the host from the split sizes at each call (no device sync); calls traced by
    ``torch.compile`` are counted when traced, not when replayed.
    """
    out = dict(_SENT)
    out["total"] = sum(_SENT.values())
    if reset:
        _SENT.clear()
    return out


# --------------------------------------------------------------------------- group handling


def resolve_group(group: object, op: str = _OP, name: str = "group") -> dist.ProcessGroup:
    """Return the ``ProcessGroup`` of ``group`` (a ``ProcessGroup`` or a 1-D ``DeviceMesh``).

    Raises ``ValueError`` when ``torch.distributed`` is not initialised or the mesh is not
    1-D, ``TypeError`` for anything else.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: {name} needs an initialised torch.distributed "
                         f"(call torch.distributed.init_process_group first)")
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - old torch
        DeviceMesh = ()  # type: ignore[assignment]
    if DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"{op}: {name} must be a 1-D DeviceMesh (slice it, e.g. mesh['cp']), "
                             f"got a {group.ndim}-D mesh")
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: {name} must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{op}: this process (global rank {dist.get_rank()}) is not a member of {name}")
    return group


def _check_same_on_all_ranks(op: str, group: dist.ProcessGroup, device: torch.device, **values: int) -> None:
    """All-gather a few ints and raise ``ValueError`` naming the first one that differs."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    names = list(values)
    mine = torch.tensor([int(values[n]) for n in names], dtype=torch.int64, device=device)
    bufs = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(bufs, mine, group=group)
    _count("validate", (world - 1) * mine.numel() * mine.element_size())
    allv = torch.stack(bufs).cpu()
    for j, n in enumerate(names):
        col = allv[:, j].tolist()
        if len(set(col)) > 1:
            raise ValueError(f"{op}: {n} must be the same on every rank of the group (equal, contiguous "
                             f"shards), got {col} by rank")


# --------------------------------------------------------------------------- communication


def _halo_len(rank: int, t_local: int, left: int) -> int:
    """Number of keys before shard ``rank`` that its first query's window reaches."""
    start = rank * t_local
    return start if left < 0 else min(left, start)


def _halo_splits(rank: int, world: int, t_local: int, left: int) -> tuple[list[int], list[int]]:
    """``(send, recv)``: rows this shard sends to / receives from each rank for the halos
    (what rank ``p > rank`` needs is a suffix of this shard)."""
    start = rank * t_local
    send, recv = [], []
    for p in range(world):
        if p > rank:
            sp = p * t_local
            send.append(max(0, min(sp, start + t_local) - max(sp - _halo_len(p, t_local, left), start)))
        else:
            send.append(0)
        if p < rank:
            recv.append(max(0, min(start, (p + 1) * t_local) - max(start - _halo_len(rank, t_local, left), p * t_local)))
        else:
            recv.append(0)
    return send, recv


def _remote(splits: list[int], rank: int) -> int:
    """Rows of ``splits`` that go to (or come from) ranks other than ``rank``."""
    return sum(n for p, n in enumerate(splits) if p != rank)


class _Exchange(torch.autograd.Function):
    """The halo ``all_to_all_single`` and the summary ``all_gather`` of one call as one
    autograd node.

    Its backward runs both reverse collectives, always in the same order, on every rank: the
    node's first output holds the local keys (always used), so it runs even on a rank whose
    queries see no summary (its gathered parts then get zero gradients). With two separate
    autograd collectives, such a rank skipped the gather's backward while the others waited
    in it (a hang with 4 ranks, seen in CI), and ranks could also reach the two backwards in
    different orders.

    ``rows [T_local, B, F]`` (one row per position: every kv head's ``k | v``) ->
    ``[halo + T_local, B, F]``; ``pmeans [B, n_slot, F]`` -> one such tensor per rank.
    """

    @staticmethod
    def forward(ctx, group, send: list[int], recv: list[int], halo: bool, gather: bool,
                rows: torch.Tensor, pmeans: torch.Tensor):
        ctx.group, ctx.send, ctx.recv, ctx.halo, ctx.gather = group, send, recv, halo, gather
        ctx.rank, ctx.t_local = dist.get_rank(group), rows.shape[0]
        ctx.row_bytes = rows[:1].numel() * rows.element_size()
        if halo:
            inp = torch.cat([rows[rows.shape[0] - n:] for n in send], 0) if sum(send) else rows[:0]
            got = rows.new_empty((sum(recv),) + tuple(rows.shape[1:]))
            dist.all_to_all_single(got, inp.contiguous(), recv, send, group=group)
            _count("halo", _remote(send, ctx.rank) * ctx.row_bytes)
            ext = torch.cat([got, rows], 0)
        else:
            ext = rows.clone()
        if not gather:
            return (ext,)
        parts = [torch.empty_like(pmeans) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, pmeans.contiguous(), group=group)
        _count("summaries", (len(parts) - 1) * pmeans.numel() * pmeans.element_size())
        return (ext, *parts)

    @staticmethod
    def backward(ctx, g_ext: torch.Tensor, *g_parts: torch.Tensor):
        h = g_ext.shape[0] - ctx.t_local
        g_rows = g_ext[h:].clone()
        if ctx.halo:  # each halo row's gradient goes back to the rank that sent it
            g_sent = g_ext.new_empty((sum(ctx.send),) + tuple(g_ext.shape[1:]))
            dist.all_to_all_single(g_sent, g_ext[:h].contiguous(), ctx.send, ctx.recv, group=ctx.group)
            _count("halo_bwd", _remote(ctx.recv, ctx.rank) * g_ext[:1].numel() * g_ext.element_size())
            off = 0
            for n in ctx.send:
                if n:
                    g_rows[ctx.t_local - n:] += g_sent[off:off + n]
                off += n
        g_pmeans = None
        if ctx.gather:  # reduce_scatter as all_reduce + slice (gloo has no reduce_scatter)
            g = torch.stack([gp.contiguous() for gp in g_parts])
            dist.all_reduce(g, group=ctx.group)
            w = g.shape[0]
            _count("summaries_bwd", 2 * (w - 1) * g.numel() * g.element_size() // w)
            g_pmeans = g[ctx.rank]
        return None, None, None, None, None, g_rows, g_pmeans


def _rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``k [B, T, Hkv, D]``, ``v [B, T, Hkv, Dv]`` -> ``[B, T, Hkv * (D + Dv)]``."""
    b, t = k.shape[:2]
    return torch.cat([k.reshape(b, t, -1), v.reshape(b, t, -1)], dim=-1)


def _split_rows(x: torch.Tensor, hkv: int, d: int, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_rows` for ``x [B, T, Hkv * (D + Dv)]``."""
    b, t = x.shape[:2]
    return x[..., : hkv * d].reshape(b, t, hkv, d), x[..., hkv * d:].reshape(b, t, hkv, dv)


def _group_slots(t_local: int, group_size: int) -> int:
    """Most groups a span of ``t_local`` positions touches (the all-gather's rows per rank)."""
    return (t_local + group_size - 2) // group_size + 1


def _slot_counts(r: int, t_local: int, group_size: int) -> torch.Tensor:
    """Positions of shard ``r`` in each of its group slots (slot ``j`` = global group ``r*T_local // G + j``)."""
    pos = torch.arange(r * t_local, (r + 1) * t_local)
    slot = pos // group_size - (r * t_local) // group_size
    return torch.bincount(slot, minlength=_group_slots(t_local, group_size)).to(torch.float32)


def _partial_means(rows: torch.Tensor, group_size: int, rank: int) -> torch.Tensor:
    """This shard's partial mean per group slot, ``[B, n_slot, F]`` in the input dtype
    (summed in fp32) from ``rows [B, T_local, F]``."""
    b, tl, f = rows.shape
    g = group_size
    start = rank * tl
    slot = (torch.arange(start, start + tl, device=rows.device) // g) - start // g
    sums = rows.new_zeros((b, _group_slots(tl, g), f), dtype=torch.float32).index_add(1, slot, rows.float())
    cnt = _slot_counts(rank, tl, g).to(rows.device)
    return (sums / cnt.clamp(min=1)[None, :, None]).to(rows.dtype)


def _combine_means(parts: tuple[torch.Tensor, ...], t_local: int, group_size: int, n_groups: int) -> torch.Tensor:
    """Means ``[B, n_groups, F]`` of the first ``n_groups`` global groups from every shard's
    partial means: the count-weighted sum over the shards a group touches (fp32), so
    straddling groups come out right."""
    g, world = group_size, len(parts)
    b, n_slot, f = parts[0].shape
    n_total = reference.num_groups(world * t_local, g)
    acc = parts[0].new_zeros((b, n_total + n_slot, f), dtype=torch.float32)  # slack: slots past the end
    group_count = torch.clamp(world * t_local - torch.arange(n_total) * g, max=g).to(torch.float32)
    for r, part in enumerate(parts):
        g0 = (r * t_local) // g
        idx = torch.arange(g0, g0 + n_slot)
        w = _slot_counts(r, t_local, g) / group_count[idx.clamp(max=n_total - 1)]
        acc = acc.index_add(1, idx.to(part.device), part.float() * w.to(part.device)[None, :, None])
    return acc[:, :n_groups].to(parts[0].dtype)


def _exchange(k: torch.Tensor, v: torch.Tensor, *, left: int, group_size: int | None, n_groups: int | None,
              group: dist.ProcessGroup, rank: int, world: int):
    """``(k_ext, v_ext, ks, vs)``: the local keys/values behind their halo (``[B, h + T_local,
    Hkv, D | Dv]``) and, when ``n_groups`` is not ``None``, the means of the first
    ``n_groups`` global groups (``[B, n_groups, Hkv, D | Dv]``), from one :class:`_Exchange`."""
    b, tl, hkv, d = k.shape
    dv = v.shape[-1]
    halo = left != 0 and world > 1
    gather = n_groups is not None
    if not halo and not gather:
        return k, v, None, None
    rows = _rows(k, v)  # [B, T_local, F]
    pm = _partial_means(rows, group_size, rank) if gather else rows.new_empty((0,))
    send, recv = _halo_splits(rank, world, tl, left)
    ext, *parts = _Exchange.apply(group, send, recv, halo, gather, rows.transpose(0, 1), pm)
    k_ext, v_ext = _split_rows(ext.transpose(0, 1), hkv, d, dv)
    if not gather:
        return k_ext, v_ext, None, None
    ks, vs = _split_rows(_combine_means(tuple(parts), tl, group_size, n_groups), hkv, d, dv)
    return k_ext, v_ext, ks, vs


# --------------------------------------------------------------------------- shard attention


def _summary_mask(tq: int, n_groups: int, q_start: int, left: int, group_size: int, device) -> torch.Tensor:
    """Bool ``[tq, n_groups]``: query row ``a`` (global position ``q_start + a``) sees group ``g``."""
    i = torch.arange(tq, device=device)[:, None] + q_start
    g = torch.arange(n_groups, device=device)[None, :]
    return (g + 1) * group_size - 1 < i - left


def _shard_attention_torch(q, k_ext, v_ext, ks, vs, *, h, left, group_size, q_start, scale):
    """Reference math (fp32) for one shard: ``q [B,Tl,Hq,D]`` at ``[halo + local]`` keys and
    the summary keys ``ks`` (or ``None``); differentiable by autograd."""
    b, tl, hq, d = q.shape
    tk, hkv = k_ext.shape[1], k_ext.shape[2]
    mask = reference.local_mask(tl, tk, (left, 0), True, q_offset=h, device=q.device)
    keys, vals = k_ext, v_ext
    if ks is not None:
        keys, vals = torch.cat([k_ext, ks], dim=1), torch.cat([v_ext, vs], dim=1)
        mask = torch.cat([mask, _summary_mask(tl, ks.shape[1], q_start, left, group_size, q.device)], dim=1)
    rep = hq // hkv
    qh = q.float().transpose(1, 2)
    kh = keys.float().transpose(1, 2).repeat_interleave(rep, dim=1)
    vh = vals.float().transpose(1, 2).repeat_interleave(rep, dim=1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])  # empty row: p = 0, not nan
    return (p @ vh).transpose(1, 2).to(q.dtype)


class _ShardAttentionTriton(torch.autograd.Function):
    """Local window through the Triton kernels, summaries in PyTorch, one softmax.

    The forward merges the kernel's ``(out, lse)`` over ``[halo + local]`` keys (queries
    left-padded with ``h`` zero rows, so query row ``a`` sits at key row ``h + a``) with
    the summary attention by their log-sum-exps. The backward uses the ring-attention
    identity: the kernel's backward run with the *merged* ``out`` and ``lse`` gives the
    exact gradients of the merged softmax w.r.t. the local ``q, k, v``; the summary part's
    gradients are computed here from the same ``lse``.
    """

    @staticmethod
    def forward(ctx, q, k_ext, v_ext, ks, vs, h, left, group_size, q_start, scale):
        b, tl, hq, d = q.shape
        hkv = k_ext.shape[2]
        q_pad = torch.cat([q.new_zeros((b, h, hq, d)), q], dim=1) if h else q.contiguous()
        out1, lse1, _, _ = ops.swa_attention_fwd(q_pad, k_ext.contiguous(), v_ext.contiguous(),
                                                 left, 0, True, None, False, scale)
        o1, l1 = out1[:, h:].float(), lse1[:, :, h:]  # [B,Tl,Hq,Dv], [B,Hq,Tl]
        rep = hq // hkv
        qh = q.float().transpose(1, 2)  # [B,Hq,Tl,D]
        ksh = ks.float().transpose(1, 2).repeat_interleave(rep, dim=1)  # [B,Hq,ng,D]
        vsh = vs.float().transpose(1, 2).repeat_interleave(rep, dim=1)
        mask = _summary_mask(tl, ks.shape[1], q_start, left, group_size, q.device)
        s2 = (qh @ ksh.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        l2 = torch.logsumexp(s2, dim=-1)
        lse = torch.logaddexp(l1, l2)
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        w1 = torch.exp(l1 - lse_safe).nan_to_num(0.0)  # [B,Hq,Tl]
        p2 = torch.exp(s2 - lse_safe[..., None])  # masked entries: exp(-inf) = 0
        out = o1 * w1.transpose(1, 2)[..., None] + (p2 @ vsh).transpose(1, 2)
        out = out.to(q.dtype)
        ctx.save_for_backward(q_pad, k_ext, v_ext, ks, vs, out, lse1, lse, p2)
        ctx.args = (h, left, group_size, q_start, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q_pad, k_ext, v_ext, ks, vs, out, lse1, lse, p2 = ctx.saved_tensors
        h, left, group_size, q_start, scale = ctx.args
        b, hq, d = out.shape[0], q_pad.shape[2], q_pad.shape[3]
        hkv = k_ext.shape[2]
        rep = hq // hkv
        dout = dout.contiguous()
        if h:
            dout_pad = torch.cat([dout.new_zeros((b, h) + tuple(dout.shape[2:])), dout], dim=1)
            out_pad = torch.cat([out.new_zeros((b, h) + tuple(out.shape[2:])), out], dim=1)
            lse_pad = torch.cat([lse1[:, :, :h], lse], dim=2).contiguous()  # padded rows: dout = 0
        else:
            dout_pad, out_pad, lse_pad = dout, out, lse.contiguous()
        empty = q_pad.new_empty((0,))
        dq_pad, dk_ext, dv_ext = ops.swa_attention_bwd(dout_pad, q_pad, k_ext.contiguous(), v_ext.contiguous(),
                                                       out_pad, lse_pad, empty, empty,
                                                       left, 0, True, None, False, scale)
        # summary part: dS = P * (dP - delta), delta = rowsum(dout * out)
        do = dout.float().transpose(1, 2)  # [B,Hq,Tl,Dv]
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # [B,Hq,Tl]
        ksh = ks.float().transpose(1, 2).repeat_interleave(rep, dim=1)
        vsh = vs.float().transpose(1, 2).repeat_interleave(rep, dim=1)
        dp = do @ vsh.transpose(-1, -2)  # [B,Hq,Tl,ng]
        ds = p2 * (dp - delta[..., None])
        qh = q_pad[:, h:].float().transpose(1, 2)
        dq = dq_pad[:, h:].float() + (scale * (ds @ ksh)).transpose(1, 2)
        dks = (scale * ds.transpose(-1, -2) @ qh).view(b, hkv, rep, -1, d).sum(2).transpose(1, 2)
        dvs = (p2.transpose(-1, -2) @ do).view(b, hkv, rep, -1, do.shape[-1]).sum(2).transpose(1, 2)
        return (dq.to(q_pad.dtype), dk_ext, dv_ext, dks.to(ks.dtype), dvs.to(vs.dtype),
                None, None, None, None, None)


def _shard_attention_triton(q, k_ext, v_ext, ks, vs, *, h, left, group_size, q_start, scale, backend):
    if interpreted_bf16(q):  # the interpreter's bf16 dots are wrong: run fp32, round
        args = [t.float() if t is not None else None for t in (q, k_ext, v_ext, ks, vs)]
        return _shard_attention_triton(*args, h=h, left=left, group_size=group_size, q_start=q_start,
                                       scale=scale, backend=backend).to(q.dtype)
    if ks is None or ks.shape[1] == 0:
        b, _, hq, d = q.shape
        q_pad = torch.cat([q.new_zeros((b, h, hq, d)), q], dim=1) if h else q
        out = _swa_attention(q_pad, k_ext, v_ext, window=(left, 0), causal=True, softmax_scale=scale,
                             backend=backend)
        return out[:, h:]
    return _ShardAttentionTriton.apply(q, k_ext, v_ext, ks, vs, h, left, group_size, q_start, scale)


# --------------------------------------------------------------------------- public op


def swa_attention_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: object,
    window: tuple[int, int] = (-1, -1),
    causal: bool = True,
    group_size: int | None = None,
    summaries: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """:func:`dasg_kernels.swa_attention` over a sequence sharded across the ranks of ``group``.

    Args:
        q: ``[B, T_local, Hq, D]``; k, v: ``[B, T_local, Hkv, D]``: this rank's shard, the
            global positions ``[rank * T_local, (rank + 1) * T_local)`` (``rank`` in
            ``group``; every rank holds an equal shard, rank order = sequence order).
        group: a ``torch.distributed`` ``ProcessGroup`` or a 1-D ``DeviceMesh``; every rank of
            it must call this op (it runs collectives).
        window, group_size, summaries, softmax_scale: as in :func:`~dasg_kernels.swa_attention`,
            in global positions (groups ``[g*G, (g+1)*G)`` counted from the sequence start,
            not the shard start; ``T_local`` need not be a multiple of ``G`` or of the window).
        causal: must be ``True`` (or the window's right side 0 without summaries): only
            causal attention is supported, a non-causal call is a ``ValueError``.
        backend: ``"auto" | "triton" | "torch"``. ``torch`` computes the shard with the
            reference math; ``triton`` runs the local window through the Triton kernels
            (queries left-padded by the halo length) and merges the summary attention by
            log-sum-exp (``auto`` picks as :func:`dasg_kernels.resolve_backend` does).
        validate: check with one small all-gather (a host sync) that every rank passed the
            same shapes and arguments; pass ``False`` once a training loop is known good.

    Returns:
        ``out [B, T_local, Hq, D]``, this shard of ``swa_attention`` on the whole sequence;
        differentiable w.r.t. ``q, k, v`` (the gradients of keys/values other ranks used, as
        halo or through the summaries, come back through the collectives' backward).

    Communication per call and rank (forward; the backward sends the same back): the halo,
    ``min(left, rank * T_local)`` rows of ``Hkv * (D + Dv)`` elements (one
    ``all_to_all_single``), and with summaries the partial group means of every shard,
    ``W * (ceil((T_local - 1) / G) + 1)`` rows of ``Hkv * (D + Dv)`` (one ``all_gather``),
    in the input dtype.
    """
    left, right, scale = _validate(_OP, q, k, v, window=window, causal=causal, group_size=group_size,
                                   summaries=summaries, softmax_scale=softmax_scale, decode=False)
    if not causal and (right != 0 or summaries):
        raise ValueError(f"{_OP}: only causal attention is supported (causal=True); got causal=False with "
                         f"window={tuple(window)} and summaries={summaries}")
    if not isinstance(validate, bool):
        raise TypeError(f"{_OP}: validate must be a bool, got {type(validate).__name__}")
    group = resolve_group(group)
    be = _pick_backend("swa_attention", backend, q, k, v)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    b, tl, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    if validate:
        _check_same_on_all_ranks(
            _OP, group, q.device, **{
                "q.shape[0] (batch)": b, "q.shape[1] (shard length T_local)": tl, "q.shape[2] (Hq)": hq,
                "k.shape[2] (Hkv)": hkv, "q.shape[3] (D)": d, "v.shape[3] (Dv)": dv, "window[0] (left)": left,
                "group_size": group_size or 0, "summaries": int(summaries),
            })
    if tl == 0:
        raise ValueError(f"{_OP}: q must hold at least one position (T_local >= 1), got shape {tuple(q.shape)}")

    h = _halo_len(rank, tl, left)
    n_groups = None
    if summaries and left >= 0:
        # groups wholly before the window of some query of this shard / of the last shard
        n_mine = max(0, (rank * tl + tl - 1 - left) // group_size)
        n_any = max(0, (world * tl - 1 - left) // group_size)
        if n_any > 0:  # the same decision on every rank: all of them join the all-gather
            n_groups = n_mine
    k_ext, v_ext, ks, vs = _exchange(k, v, left=left, group_size=group_size, n_groups=n_groups, group=group,
                                     rank=rank, world=world)
    kw = dict(h=h, left=left, group_size=group_size, q_start=rank * tl, scale=scale)
    if be == "torch":
        return _shard_attention_torch(q, k_ext, v_ext, ks, vs, **kw)
    return _shard_attention_triton(q, k_ext, v_ext, ks, vs, backend=be, **kw)


def shift_labels_cp(labels: torch.Tensor, *, group: object, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets of a sequence-sharded batch: ``targets[:, t] = labels[:, t + 1]`` in
    global positions.

    ``labels [B, T_local]`` is this rank's shard (sliced like ``input_ids``); the target of the
    last position comes from the next rank's first label (one all-gather of ``B`` ints), and
    is ``ignore_index`` on the last rank. Not differentiable (labels are integers).
    """
    group = resolve_group(group, op="shift_labels_cp")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"shift_labels_cp: labels must be a [B, T_local] tensor, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if labels.shape[1] == 0:
        raise ValueError("shift_labels_cp: labels must hold at least one position")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    first = labels[:, :1].contiguous()
    bufs = [torch.empty_like(first) for _ in range(world)]
    dist.all_gather(bufs, first, group=group)
    nxt = bufs[rank + 1] if rank + 1 < world else torch.full_like(first, ignore_index)
    return torch.cat([labels[:, 1:], nxt], dim=1)
