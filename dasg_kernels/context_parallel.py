"""Context parallelism (CP) for GMHA on ``torch.distributed`` (no communication layer of our own).

:func:`swa_attention_cp` runs :func:`dasg_kernels.swa_attention` on a sequence that is
sharded over the ranks of a process group. The sequence is cut into equal *chunks*:

- ``layout="contiguous"`` (default): ``W`` chunks, rank ``r`` of ``W`` holds chunk ``r``,
  the positions ``[r * T_local, (r + 1) * T_local)``;
- ``layout="zigzag"``: ``2W`` chunks of ``T_local / 2``, rank ``r`` holds chunks ``r`` and
  ``2W - 1 - r`` (in that order along its shard), so every rank has one early and one late
  chunk: the work per rank is balanced (later queries see more group summaries, and with
  ``window=-1`` more keys).

Each chunk needs the **halo** (the last ``left`` keys/values before it, from the chunks
before it) and, with ``summaries=True``, the means of the groups wholly before some of its
queries' windows. Every chunk computes, per group slot it touches, its *contribution* to
that group's mean (its partial sum divided by the group's size), and the chunks that read
a group add the contributions of the chunks it spans (a group straddling a chunk boundary
gets its mean from both). One ``all_to_all_single`` per call moves exactly the halo rows
and the contributions a later chunk reads, to the rank that reads them (under causal
attention, only later chunks read a chunk's rows); its backward is the transposed
all-to-all, which returns each row's gradient to its owner, summed there (a sparse
reduce-scatter: every gradient row travels once).

The attention of a chunk then runs in one call: its queries are the last ``T_chunk`` of the
keys ``[halo; chunk]`` (a query offset, no padded query rows), and the gathered means are
the summary keys/values at global group indices (the queries' global positions decide
which they see). Saved for the backward: ``q``, the keys/values with their halo, the means,
``out`` and ``lse``: ``O(T_local + halo + n_groups)`` per rank, never a
``[T_local, n_groups]`` tensor. Output and gradients equal ``swa_attention`` on the whole
sequence (the tests check it with gloo on CPU).

Also :func:`cp_shard` (a rank's shard of a whole-sequence tensor), :func:`cp_positions` (the
global positions of a rank's shard, for RoPE), :class:`CPGeometry` (where the chunks sit and
what each reads) with :func:`cp_exchange_plan` and :func:`cp_exchange_rows` (the rows of the
exchange), :func:`resolve_group` and :func:`check_cp_layout` (argument checks shared with
:mod:`dasg_model.parallel`). The next-token targets of a sharded batch are the model's:
:func:`dasg_model.parallel.shift_labels_cp`. ``dasg_kernels.distributed`` is the same
module's compatible import path.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dasg_kernels.attention.checks import pick_backend, validate_attention
from dasg_kernels.backend import bf16_via_fp32, interpreted_bf16

__all__ = ["CP_LAYOUTS", "CPGeometry", "CommCounter", "check_cp_layout", "cp_comm_stats", "cp_exchange_plan",
           "cp_exchange_rows", "cp_positions", "cp_shard", "resolve_group", "swa_attention_cp"]

_OP = "swa_attention_cp"

#: Shard orders :func:`swa_attention_cp` accepts (see the module docstring).
CP_LAYOUTS = ("contiguous", "zigzag")


# --------------------------------------------------------------------------- byte counter


@dataclass
class CommCounter:
    """Bytes a rank sent to *other* ranks, by phase, and (where the caller counts them) the
    rows behind them, by kind, and the host synchronisations. Counted on the host from the
    split sizes of each collective (no device sync). Used by :func:`cp_comm_stats` and by
    the expert-parallel layers (:class:`dasg_model.parallel.expert.EPCommStats`)."""

    bytes: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    host_syncs: int = 0

    def add(self, phase: str, n: int) -> None:
        """Count ``n`` bytes in ``phase`` (a phase counted once stays listed, also at 0)."""
        self.bytes[phase] = self.bytes.get(phase, 0) + int(n)

    def add_rows(self, kind: str, n: int) -> None:
        self.rows[kind] = self.rows.get(kind, 0) + int(n)

    def merge(self, other: CommCounter) -> None:
        """Add ``other``'s counts to these."""
        for phase, n in other.bytes.items():
            self.add(phase, n)
        for kind, n in other.rows.items():
            self.add_rows(kind, n)
        self.host_syncs += other.host_syncs

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.rows.clear()
        self.host_syncs = 0


_SENT = CommCounter()


def _count(phase: str, nbytes: int) -> None:
    if nbytes:
        _SENT.add(phase, nbytes)


def cp_comm_stats(reset: bool = False) -> dict[str, int]:
    """Bytes this process sent to *other* ranks in :func:`swa_attention_cp`'s collectives
    since the last reset, by phase, plus ``"total"``; ``reset`` zeroes the counters.

    Phases: ``"halo"`` / ``"halo_bwd"`` (halo rows of the all-to-all and their gradients),
    ``"summaries"`` / ``"summaries_bwd"`` (the group-mean contributions this rank sends to
    the ranks that read them, and the gradients of those it received, sent back to their
    owners) and ``"validate"`` (the signature all-reduce, counted as a ring all-reduce
    sends: ``2 (W-1)/W`` of its buffer). A phase with no bytes is absent. Counted on the
    host from the split sizes at each call (no device sync); calls traced by
    ``torch.compile`` are counted when traced, not when replayed.
    """
    out = dict(_SENT.bytes)
    out["total"] = _SENT.total
    if reset:
        _SENT.reset()
    return out


# --------------------------------------------------------------------------- group handling


def resolve_group(group: object, op: str = _OP, name: str = "group", *,
                  allow_none: bool = False) -> dist.ProcessGroup:
    """Return the ``ProcessGroup`` of ``group``: a ``ProcessGroup``, a 1-D ``DeviceMesh``, or
    with ``allow_none`` ``None`` (the default group). ``op`` and ``name`` name the caller and
    the argument in the errors.

    Raises ``ValueError`` when ``torch.distributed`` is not initialised, the mesh is not 1-D
    or this process is not a member of the group, ``TypeError`` for anything else.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: {name} needs an initialised torch.distributed "
                         f"(call torch.distributed.init_process_group first)")
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - old torch
        DeviceMesh = ()  # type: ignore[assignment]
    if group is None and allow_none:
        group = dist.group.WORLD
    if DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"{op}: {name} must be a 1-D DeviceMesh (slice it by name, e.g. mesh['cp'] of a "
                             f"dp x cp mesh), got a {group.ndim}-D mesh {group.mesh_dim_names}")
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: {name} must be a torch.distributed ProcessGroup or a 1-D DeviceMesh"
                        f"{', or None' if allow_none else ''}, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{op}: this process (global rank {dist.get_rank()}) is not a member of {name}")
    return group


def check_cp_layout(op: str, layout: object) -> bool:
    """Whether ``layout`` (one of :data:`CP_LAYOUTS`) is ``"zigzag"``: ``True`` for
    ``"zigzag"``, ``False`` for ``"contiguous"``; a ``ValueError`` naming ``op`` otherwise."""
    if layout not in CP_LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {CP_LAYOUTS}, got {layout!r}")
    return layout == "zigzag"


# --------------------------------------------------------------------------- validation


def _check_same_on_all_ranks(op: str, group: dist.ProcessGroup, device: torch.device, **values: int) -> None:
    """One all-reduce (MAX of ``[values, -values]``) of a few ints, before the exchange whose
    sizes follow from them; every rank sees the same result.

    On CPU tensors (gloo) it is waited for and read here, a host operation with no device
    to synchronise: a ``ValueError`` names the first value that differs and its range
    across ranks (gloo would abort the process on the exchange's size mismatch). On CUDA
    the comparison stays on the device: ``torch._assert_async`` (no host sync) stops the
    process at the next synchronisation with this rank's values in the message.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return
    names = list(values)
    mine = [int(values[n]) for n in names]
    sig = torch.tensor(mine, dtype=torch.int64)
    buf = torch.cat([sig, -sig]).to(device, non_blocking=True)
    _count("validate", 2 * (world - 1) * buf.numel() * buf.element_size() // world)
    n = len(names)
    if device.type == "cuda":
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)  # stream-ordered
        torch._assert_async((buf[:n] == -buf[n:]).all(),
                            f"{op}: the ranks of the group passed different shapes or arguments; this rank: "
                            + ", ".join(f"{k} = {m}" for k, m in zip(names, mine)))
        return
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    hi, lo = buf[:n].tolist(), (-buf[n:]).tolist()
    for name, m, a, b in zip(names, mine, hi, lo):
        if a != b:
            raise ValueError(f"{op}: {name} must be the same on every rank of the group (equal shards, the same "
                             f"arguments), got values from {b} to {a} across ranks ({m} on this rank)")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class CPGeometry:
    """Where the chunks of a sharded sequence sit and what each reads from the others.

    ``world`` ranks, ``t_local`` positions per rank, the causal window's ``left`` (``-1``:
    unbounded), ``group_size`` (``None`` or summaries off: no summaries), ``zigzag``
    (:func:`check_cp_layout`). Chunks are numbered along the whole sequence, ``0 ..
    n_chunks - 1``; every method is host arithmetic on ints (the same answer on every rank).
    """

    world: int
    t_local: int
    left: int
    group_size: int | None
    zigzag: bool

    @property
    def n_chunks(self) -> int:
        return 2 * self.world if self.zigzag else self.world

    @property
    def tc(self) -> int:
        """Positions per chunk."""
        return self.t_local // 2 if self.zigzag else self.t_local

    @property
    def total(self) -> int:
        return self.n_chunks * self.tc

    def chunks(self, rank: int) -> tuple[int, ...]:
        """The chunks of ``rank``'s shard, in shard order."""
        return (rank, 2 * self.world - 1 - rank) if self.zigzag else (rank,)

    def owner(self, c: int) -> tuple[int, int]:
        """``(rank, row offset in its shard)`` of chunk ``c``."""
        if not self.zigzag:
            return c, 0
        return (c, 0) if c < self.world else (2 * self.world - 1 - c, self.tc)

    def start(self, c: int) -> int:
        return c * self.tc

    def halo(self, c: int) -> int:
        """Keys before chunk ``c`` that its first query's window reaches."""
        s = self.start(c)
        return s if self.left < 0 else min(self.left, s)

    def n_groups(self, c: int) -> int:
        """Groups wholly before the window of some query of chunk ``c`` (its summaries)."""
        if self.group_size is None or self.left < 0:
            return 0
        return max(0, (self.start(c) + self.tc - 1 - self.left) // self.group_size)

    def slots(self, c: int) -> tuple[int, int]:
        """``(first group, number of groups)`` that chunk ``c`` has positions in."""
        g, s = self.group_size, self.start(c)
        return s // g, (s + self.tc - 1) // g - s // g + 1

    def halo_rows(self, src: int, dst: int) -> int:
        """Rows of chunk ``src`` in chunk ``dst``'s halo (a suffix of ``src``)."""
        if src >= dst:
            return 0
        s, d = self.start(src), self.start(dst)
        return max(0, min(d, s + self.tc) - max(d - self.halo(dst), s))

    def summary_rows(self, src: int, dst: int) -> int:
        """Group contributions of chunk ``src`` that chunk ``dst`` reads (its first slots):
        only ``src <= dst`` (a group seen by ``dst`` ends before ``dst``'s last query)."""
        n = self.n_groups(dst)
        if src > dst or n == 0:
            return 0
        g0, slots = self.slots(src)
        return max(0, min(n - g0, slots))

    def pieces(self, src_rank: int, dst_rank: int) -> list[tuple[str, int, int, int]]:
        """``(kind, src chunk, dst chunk, rows)`` that ``src_rank`` sends ``dst_rank`` (or,
        for ``src_rank == dst_rank``, uses itself), in the order both sides agree on."""
        out = []
        for d in self.chunks(dst_rank):
            for s in self.chunks(src_rank):
                for kind, n in (("halo", self.halo_rows(s, d)), ("summary", self.summary_rows(s, d))):
                    if n:
                        out.append((kind, s, d, n))
        return out

    def exchanges(self) -> bool:
        """Whether any chunk reads rows of another rank (the same answer on every rank)."""
        if self.world == 1:
            return False
        return self.left != 0 or self.n_groups(self.n_chunks - 1) > 0


@functools.lru_cache(maxsize=256)
def cp_exchange_plan(geo: CPGeometry, rank: int):
    """The exchange of ``rank`` in one :func:`swa_attention_cp` call: ``(send, recv, local,
    contrib)``: ``send[p]`` / ``recv[p]`` the pieces ``(kind, src chunk, dst chunk, rows)``
    (``kind`` ``"halo"`` or ``"summary"``, see :meth:`CPGeometry.pieces`) this rank sends to /
    receives from rank ``p`` (empty for itself), ``local`` the pieces it uses itself, and
    ``contrib`` ``{own chunk: group-contribution rows it computes}``. Cached per geometry."""
    send = [geo.pieces(rank, p) if p != rank else [] for p in range(geo.world)]
    recv = [geo.pieces(p, rank) if p != rank else [] for p in range(geo.world)]
    local = geo.pieces(rank, rank)
    # the most contributions any chunk reads from c: summary_rows grows with the reader
    contrib = {c: geo.summary_rows(c, geo.n_chunks - 1) for c in geo.chunks(rank)}
    return send, recv, local, contrib


def cp_exchange_rows(world: int, t_local: int, window: int, group_size: int | None = None, *,
                     layout: str = "contiguous") -> list[dict[str, int]]:
    """Rows each rank sends to / receives from other ranks in one :func:`swa_attention_cp`
    forward (the backward sends the same rows back): a list over ranks of
    ``{"halo_send", "halo_recv", "summary_send", "summary_recv", "n_groups"}`` (one row =
    one position's ``k | v`` of every kv head; ``n_groups``: the most summaries one of the
    rank's chunks reads). ``window`` is the causal window's ``left``, ``group_size=None``:
    no summaries."""
    zig = check_cp_layout("cp_exchange_rows", layout)
    geo = CPGeometry(world, t_local, window, group_size, zig)
    rows = []
    for r in range(world):
        send, recv, _, _ = cp_exchange_plan(geo, r)
        row = {"halo_send": 0, "halo_recv": 0, "summary_send": 0, "summary_recv": 0,
               "n_groups": max(geo.n_groups(c) for c in geo.chunks(r))}
        for pieces, side in ((send, "send"), (recv, "recv")):
            for kind, _, _, n in (x for p in pieces for x in p):
                row[f"{kind}_{side}"] += n
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- communication


class _AllToAll(torch.autograd.Function):
    """One ``all_to_all_single`` of rows ``[n, B, F]`` and its transpose in the backward.

    ``anchor`` (the local keys) is returned as it is, so that this node's backward runs on
    every rank that uses its own keys, i.e. on every rank, also one that received nothing
    (others still send it gradients): with a node whose only output went unused there, that
    rank would skip the reverse collective while the others wait in it.
    """

    @staticmethod
    def forward(ctx, group, send_splits, recv_splits, counts, anchor, send_buf):
        ctx.group, ctx.send_splits, ctx.recv_splits, ctx.counts = group, send_splits, recv_splits, counts
        recv = send_buf.new_empty((sum(recv_splits),) + tuple(send_buf.shape[1:]))
        dist.all_to_all_single(recv, send_buf.contiguous(), recv_splits, send_splits, group=group)
        row = send_buf[:1].numel() * send_buf.element_size() if send_buf.shape[0] else 0
        row = row or recv[:1].numel() * recv.element_size()
        ctx.row = row
        _count("halo", counts[0] * row)
        _count("summaries", counts[1] * row)
        return anchor, recv

    @staticmethod
    def backward(ctx, g_anchor, g_recv):
        g_send = g_recv.new_empty((sum(ctx.send_splits),) + tuple(g_recv.shape[1:]))
        dist.all_to_all_single(g_send, g_recv.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        _count("halo_bwd", ctx.counts[2] * ctx.row)
        _count("summaries_bwd", ctx.counts[3] * ctx.row)
        return None, None, None, None, g_anchor, g_send


class _IndexAdd(torch.autograd.Function):
    """``zeros([n, ...]).index_add(0, index, src.float())`` (fp32) that keeps only ``index`` for
    the backward (``torch.index_add`` also keeps ``src``: ``O(T_local)`` for nothing)."""

    @staticmethod
    def forward(ctx, n: int, index: torch.Tensor, src: torch.Tensor):
        ctx.save_for_backward(index)
        ctx.dtype = src.dtype
        return src.new_zeros((n,) + tuple(src.shape[1:]), dtype=torch.float32).index_add_(0, index, src.float())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return None, None, grad.index_select(0, index).to(ctx.dtype)


def _rows_t(k: torch.Tensor, v: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Positions ``[a, b)`` of ``k [B, T, Hkv, D]``, ``v [B, T, Hkv, Dv]`` as rows
    ``[b - a, B, Hkv * (D + Dv)]``."""
    bs = k.shape[0]
    return torch.cat([k[:, a:b].reshape(bs, b - a, -1), v[:, a:b].reshape(bs, b - a, -1)], dim=-1).transpose(0, 1)


def _split_rows(x: torch.Tensor, hkv: int, d: int, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_rows_t`: rows ``[n, B, F]`` -> ``k [B, n, Hkv, D]``, ``v [B, n, Hkv, Dv]``
    (views)."""
    n, b = x.shape[:2]
    return (x[..., : hkv * d].reshape(n, b, hkv, d).transpose(0, 1),
            x[..., hkv * d:].reshape(n, b, hkv, dv).transpose(0, 1))


def _contributions(k: torch.Tensor, v: torch.Tensor, geo: CPGeometry, c: int, off: int, m: int) -> torch.Tensor:
    """Chunk ``c``'s contributions to its first ``m`` group slots, ``[m, B, F]`` in the
    input dtype: its positions' ``k | v`` summed per group (fp32) over ``G``. (Only groups
    wholly before some query's window are read, so every group read is complete: the
    sequence's last group, which may be shorter, never is.)"""
    g, tc = geo.group_size, geo.tc
    start = geo.start(c)
    g0 = start // g
    n = min(tc, (g0 + m) * g - start)  # the positions that fall in these slots
    rows = _rows_t(k, v, off, off + n)
    slot = (torch.arange(start, start + n, device=k.device) // g - g0).to(torch.int32)
    return (_IndexAdd.apply(m, slot, rows) * (1.0 / g)).to(k.dtype)


def _exchange(k: torch.Tensor, v: torch.Tensor, geo: CPGeometry, rank: int, group: dist.ProcessGroup):
    """Per own chunk ``(k_ext, v_ext, ks, vs)``: the chunk's keys/values behind its halo
    (``[B, halo + T_chunk, Hkv, D | Dv]``) and its summaries (the means of the first
    ``n_groups`` global groups, ``[B, n_groups, Hkv, D | Dv]``, or ``None``), from one
    :class:`_AllToAll`."""
    b, _, hkv, d = k.shape
    dv = v.shape[-1]
    send, recv, local, contrib_rows = cp_exchange_plan(geo, rank)
    contrib = {c: _contributions(k, v, geo, c, geo.owner(c)[1], m) for c, m in contrib_rows.items() if m}

    def piece(kind: str, src: int, n: int) -> torch.Tensor:
        if kind == "summary":
            return contrib[src][:n]
        end = geo.owner(src)[1] + geo.tc
        return _rows_t(k, v, end - n, end)

    if geo.exchanges():
        send_list = [piece(kind, s, n) for p in send for kind, s, _, n in p]
        send_buf = torch.cat(send_list) if send_list else k.new_empty((0, b, hkv * (d + dv)))
        # rows sent (halo, summaries) forward, and received: their gradients go back
        counts = tuple(sum(n for p in pieces for kind, _, _, n in p if kind == want)
                       for pieces in (send, recv) for want in ("halo", "summary"))
        k, got = _AllToAll.apply(group, [sum(x[3] for x in p) for p in send], [sum(x[3] for x in p) for p in recv],
                                 counts, k, send_buf)
    else:
        got = None
    parts: dict[tuple[str, int, int], torch.Tensor] = {}
    off = 0
    for p in recv:
        for kind, s, dst, n in p:
            parts[(kind, s, dst)] = got[off:off + n]
            off += n
    for kind, s, dst, n in local:
        parts[(kind, s, dst)] = piece(kind, s, n)

    out = []
    for c in geo.chunks(rank):
        o = geo.owner(c)[1]
        kc, vc = k[:, o:o + geo.tc], v[:, o:o + geo.tc]
        halo = [parts[("halo", s, c)] for s in range(c) if ("halo", s, c) in parts]
        if halo:
            hk, hv = _split_rows(torch.cat(halo) if len(halo) > 1 else halo[0], hkv, d, dv)
            kc, vc = torch.cat([hk, kc], dim=1), torch.cat([hv, vc], dim=1)
        ks = vs = None
        n = geo.n_groups(c)
        if n:
            srcs = [(s, parts[("summary", s, c)]) for s in range(c + 1) if ("summary", s, c) in parts]
            idx = torch.cat([torch.arange(geo.slots(s)[0], geo.slots(s)[0] + x.shape[0], device=k.device,
                                          dtype=torch.int32) for s, x in srcs])
            rows = torch.cat([x for _, x in srcs]) if len(srcs) > 1 else srcs[0][1]
            means = _IndexAdd.apply(n, idx, rows).to(k.dtype)
            ks, vs = _split_rows(means, hkv, d, dv)
        out.append((kc, vc, ks, vs))
    return out


# --------------------------------------------------------------------------- chunk attention


def _chunk_attention_torch(q, k_ext, v_ext, ks, vs, *, h, pos0, left, group_size, scale):
    """One chunk through the blockwise PyTorch core: ``q [B, Tc, Hq, D]`` are the last ``Tc``
    rows of the keys ``k_ext``; summaries ``ks, vs`` at global groups (key 0 at global
    position ``pos0``)."""
    from dasg_kernels.attention.blockwise import swa_attention_blockwise

    summ = ks is not None
    out, _ = swa_attention_blockwise(q, k_ext, v_ext, window=(left, 0), causal=True, group_size=group_size,
                                     summaries=summ, softmax_scale=scale, q_offset=h,
                                     summary_kv=(ks, vs) if summ else None, position_offset=pos0)
    return out


class _ChunkAttentionTriton(torch.autograd.Function):
    """One chunk through the Triton kernels: queries at key offset ``h``, external summaries
    at global groups (key 0 at global position ``pos0``); the backward returns the
    summaries' gradients (sent back to the chunks that contributed to them)."""

    @staticmethod
    def forward(ctx, q, k_ext, v_ext, ks, vs, h, pos0, left, group_size, scale):
        from dasg_kernels.attention.fwd import swa_fwd

        summ = ks is not None
        out, lse, _, _ = swa_fwd(q, k_ext, v_ext, left=left, right=0, causal=True, group_size=group_size,
                                 summaries=summ, scale=scale, q_offset=h,
                                 summary_kv=(ks, vs) if summ else None, pos_offset=pos0)
        ctx.save_for_backward(q, k_ext, v_ext, ks, vs, out, lse)
        ctx.args = (h, pos0, left, group_size, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        from dasg_kernels.attention.bwd import swa_bwd

        q, k_ext, v_ext, ks, vs, out, lse = ctx.saved_tensors
        h, pos0, left, group_size, scale = ctx.args
        summ = ks is not None
        dq, dk, dv, dks, dvs = swa_bwd(dout, q, k_ext, v_ext, out, lse, ks, vs, left=left, right=0, causal=True,
                                       group_size=group_size, summaries=summ, scale=scale, q_offset=h,
                                       pos_offset=pos0, summary_grads=True)
        return dq, dk, dv, dks, dvs, None, None, None, None, None


def _chunk_attention_triton(q, k_ext, v_ext, ks, vs, *, h, pos0, left, group_size, scale):
    """:class:`_ChunkAttentionTriton` (bf16 under the interpreter: in fp32, rounded)."""
    def run(*t):
        return _ChunkAttentionTriton.apply(*t, h, pos0, left, group_size, scale)

    if interpreted_bf16(q):
        return bf16_via_fp32(run, q, k_ext, v_ext, ks, vs)
    return run(q, k_ext, v_ext, ks, vs)


# --------------------------------------------------------------------------- packed documents


def _check_cp_cu_seqlens(cu_seqlens: object, q: torch.Tensor, total: int) -> list[int]:
    """The document bounds of :func:`swa_attention_cp` as a list (one host read), checked."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{_OP}: cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{_OP}: cu_seqlens must be a 1-D int32 tensor of at least 2 offsets, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{_OP}: cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"{_OP}: packed documents (cu_seqlens) need batch size 1 (one packed row), "
                         f"got q.shape[0] = {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{_OP}: cu_seqlens must start at 0, never decrease and end at the whole sequence's "
                         f"length (world size x T_local = {total}); got {bounds if len(bounds) <= 12 else '...'}")
    return bounds


def _documents_signature(bounds: list[int] | None) -> dict[str, int]:
    """Two ints of the argument check that differ (with near certainty) when ranks pass
    different ``cu_seqlens`` (``-1, 0`` without documents)."""
    if bounds is None:
        return {"cu_seqlens (documents)": -1, "cu_seqlens (checksum)": 0}
    chk = 0
    for i, x in enumerate(bounds):
        chk = (chk * 1000003 + x * (i + 1)) % (2**31 - 1)
    return {"cu_seqlens (documents)": len(bounds) - 1, "cu_seqlens (checksum)": chk}


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` of ``x`` whose backward is the same all-reduce of the gradient.

    ``anchor`` (the local keys) is returned as it is, so that the backward runs on every
    rank, also on one that used none of the sums (see :class:`_AllToAll`)."""

    @staticmethod
    def forward(ctx, group, anchor, x):
        ctx.group, ctx.shape, ctx.dtype = group, x.shape, x.dtype
        x = x.clone()
        dist.all_reduce(x, group=group)
        world = dist.get_world_size(group)
        _count("summaries", x.numel() * x.element_size() * 2 * (world - 1) // world)
        return anchor, x

    @staticmethod
    def backward(ctx, g_anchor, grad):
        grad = grad.clone() if grad is not None else torch.zeros(ctx.shape, dtype=ctx.dtype, device=g_anchor.device)
        dist.all_reduce(grad, group=ctx.group)
        world = dist.get_world_size(ctx.group)
        _count("summaries_bwd", grad.numel() * grad.element_size() * 2 * (world - 1) // world)
        return None, g_anchor, grad


def _document_means(k: torch.Tensor, v: torch.Tensor, geo: CPGeometry, rank: int, bounds: list[int],
                    group: dist.ProcessGroup) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
    """Every document's group means from every rank: ``(k, first row of each document, ks, vs)``
    (``k`` anchored to the all-reduce's backward: use it from here on)
    with ``ks [1, n_rows, Hkv, D]`` (document ``d``'s group ``j``, counted from its start, at
    row ``first[d] + j``). Each rank sums its own positions per (document, group) over ``G``
    (fp32), one all-reduce adds the ranks' parts."""
    g = geo.group_size
    first = [0]
    for a, b in zip(bounds, bounds[1:]):
        first.append(first[-1] + -(-(b - a) // g))
    hkv, d, dv = k.shape[2], k.shape[3], v.shape[3]
    pos = torch.cat([torch.arange(geo.start(c), geo.start(c) + geo.tc, device=k.device) for c in geo.chunks(rank)])
    cu = torch.tensor(bounds, device=k.device)
    doc = torch.searchsorted(cu, pos, right=True) - 1
    row = (torch.tensor(first[:-1], device=k.device)[doc] + (pos - cu[doc]) // g).to(torch.int32)
    rows = _rows_t(k, v, 0, k.shape[1])  # [T_local, 1, F]
    sums = _IndexAdd.apply(first[-1], row, rows) * (1.0 / g)
    if dist.get_world_size(group) > 1:
        k, sums = _AllReduceSum.apply(group, k, sums)
    ks, vs = _split_rows(sums.to(k.dtype), hkv, d, dv)
    return k, first, ks, vs


def _packed_attention(q, k, v, bounds: list[int], attend, *, world: int, rank: int, group, left: int,
                      group_size: int | None, scale: float, zig: bool) -> torch.Tensor:
    """:func:`swa_attention_cp` with packed documents: every (chunk, document) piece is one
    chunk attention whose "sequence" is its document (positions from the document's start)."""
    geo = CPGeometry(world, q.shape[1], left, None, zig)
    if group_size is not None and left >= 0:
        k, first, ks_all, vs_all = _document_means(k, v, CPGeometry(world, q.shape[1], left, group_size, zig),
                                                   rank, bounds, group)
    chunks = _exchange(k, v, geo, rank, group)  # keys behind each chunk's halo (no summaries)
    outs = []
    for c, (k_ext, v_ext, _, _) in zip(geo.chunks(rank), chunks):
        o, s, h = geo.owner(c)[1], geo.start(c), geo.halo(c)
        base = s - h  # global position of k_ext's first row
        for di, (ds, de) in enumerate(zip(bounds, bounds[1:])):
            a, b = max(s, ds), min(s + geo.tc, de)
            if a >= b:
                continue
            lo = ds if left < 0 else max(a - left, ds)  # the piece's first key (its document's)
            ks = vs = None
            if group_size is not None and left >= 0:
                n = max(0, (b - 1 - ds - left) // group_size)  # groups some query of the piece sees
                if n:
                    ks = ks_all[:, first[di]:first[di] + n]
                    vs = vs_all[:, first[di]:first[di] + n]
            outs.append(attend(q[:, o + a - s:o + b - s], k_ext[:, lo - base:b - base], v_ext[:, lo - base:b - base],
                               ks, vs, h=a - lo, pos0=lo - ds, left=left, group_size=group_size, scale=scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


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
    layout: str = "contiguous",
    seq_len: int | None = None,
    validate: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dasg_kernels.swa_attention` over a sequence sharded across the ranks of ``group``.

    Args:
        q: ``[B, T_local, Hq, D]``; k: ``[B, T_local, Hkv, D]``, v: ``[B, T_local, Hkv, Dv]``:
            this rank's shard (every rank holds an equal shard): with
            ``layout="contiguous"`` the global positions ``[rank * T_local, (rank + 1) *
            T_local)``; with ``layout="zigzag"`` the two chunks ``rank`` and ``2W - 1 - rank``
            of ``T_local / 2`` positions (:func:`cp_shard` cuts a whole sequence either way).
        group: a ``torch.distributed`` ``ProcessGroup`` or a 1-D ``DeviceMesh``; every rank of
            it must call this op (it runs collectives).
        window, group_size, summaries, softmax_scale: as in :func:`~dasg_kernels.swa_attention`,
            in global positions (groups ``[g*G, (g+1)*G)`` counted from the sequence start;
            ``T_local`` need not be a multiple of ``G`` or of the window). An unbounded
            window (``window[0] = -1``) needs ``layout="zigzag"``: with contiguous shards
            the last rank would attend to the whole sequence, ``W`` times the first rank's
            work, and receive every other rank's keys.
        causal: must be ``True`` (or the window's right side 0 without summaries): only
            causal attention is supported, a non-causal call is a ``ValueError``.
        backend: ``"auto" | "triton" | "torch"``. ``triton`` runs each chunk through the
            Triton kernels (queries offset into ``[halo; chunk]`` keys, the gathered means
            as their summary keys); ``torch`` through the blockwise PyTorch core
            (:mod:`dasg_kernels.attention.blockwise`, the same arguments); ``auto`` picks
            as :func:`dasg_kernels.resolve_backend` does.
        layout: ``"contiguous"`` or ``"zigzag"`` (balanced work per rank; ``T_local`` even).
        seq_len: the whole sequence's length, if the caller knows it: checked against
            ``W * T_local`` on this rank before any collective (a clear ``ValueError`` even
            with ``validate=False``).
        validate: check that every rank passed the same shapes and arguments, with one
            all-reduce of 13 ints (26 elements) before the exchange: on CPU tensors (gloo) read on the host
            (no device to synchronise; a ``ValueError`` names the argument), on CUDA compared
            on the device (``torch._assert_async``: no host sync; a mismatch stops the process
            at its next synchronisation, with this rank's values in the message). ``False``
            skips it; pass ``seq_len`` for a local check of the shard length.
        cu_seqlens: packed documents: int32 ``[n_docs + 1]`` offsets of the documents in the
            *whole* sequence (flash-attn's varlen layout, ``0 = cu[0] <= ... <= cu[-1] = W *
            T_local``; the same tensor on every rank), with ``B = 1``. Each document is then
            attended as :func:`~dasg_kernels.swa_attention_varlen` does: no key of another
            document, positions, windows and groups restarting at the document's start. A
            document may span chunks and ranks. Costs: one host read of ``cu_seqlens`` (a
            sync on CUDA; eager use), one kernel call per (chunk, document) piece, and the
            documents' group contributions summed with one ``all_reduce`` of
            ``sum_d ceil(len_d / G)`` rows (every rank gets every document's means) instead
            of the targeted exchange of a single sequence.

    Returns:
        ``out [B, T_local, Hq, Dv]``, this shard of ``swa_attention`` on the whole sequence;
        differentiable w.r.t. ``q, k, v`` (the gradients of keys/values other ranks used, as
        halo or through the summaries, come back through the exchange's backward).

    Communication per call (forward; the backward sends the same rows back): one
    ``all_to_all_single`` of rows of ``Hkv * (D + Dv)`` elements in the input dtype: each
    chunk's halo (``min(left, start)`` keys before it) from the chunks before it, and to
    each chunk the contributions of the earlier chunks to the groups it sees (at most
    ``ceil((T_chunk - 1) / G) + 1`` rows per earlier chunk). :func:`cp_exchange_rows` gives
    the rows per rank.
    """
    left, right, scale = validate_attention(_OP, q, k, v, window=window, causal=causal, group_size=group_size,
                                            summaries=summaries, softmax_scale=softmax_scale, decode=False)
    if not causal and (right != 0 or summaries):
        raise ValueError(f"{_OP}: only causal attention is supported (causal=True); got causal=False with "
                         f"window={tuple(window)} and summaries={summaries}")
    if not isinstance(validate, bool):
        raise TypeError(f"{_OP}: validate must be a bool, got {type(validate).__name__}")
    zig = check_cp_layout(_OP, layout)
    group = resolve_group(group)
    be = pick_backend("swa_attention", backend, q, k, v)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    b, t_local, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    if t_local == 0:
        raise ValueError(f"{_OP}: q must hold at least one position (T_local >= 1), got shape {tuple(q.shape)}")
    if zig and t_local % 2:
        raise ValueError(f"{_OP}: layout='zigzag' needs an even shard length T_local (two chunks of T_local/2), "
                         f"got q.shape[1] = {t_local}")
    if left < 0 and not zig and world > 1:
        raise ValueError(f"{_OP}: window[0] = -1 (unbounded) needs layout='zigzag': with contiguous shards the "
                         f"last of the {world} ranks attends to the whole sequence ({world}x the first rank's "
                         f"work) and receives every other rank's keys; shard with cp_shard(x, group=..., "
                         f"layout='zigzag') or bound the window")
    if seq_len is not None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int):
            raise TypeError(f"{_OP}: seq_len must be an int or None, got {type(seq_len).__name__}")
        if seq_len != world * t_local:
            raise ValueError(f"{_OP}: q.shape[1] (shard length T_local) = {t_local} on rank {rank}, but seq_len = "
                             f"{seq_len} over {world} ranks needs T_local = seq_len / {world} "
                             f"{'= ' + str(seq_len // world) if seq_len % world == 0 else '(not an integer)'}")
    bounds = _check_cp_cu_seqlens(cu_seqlens, q, world * t_local) if cu_seqlens is not None else None
    if validate:
        _check_same_on_all_ranks(
            _OP, group, q.device, **_documents_signature(bounds), **{
                "q.shape[0] (batch)": b, "q.shape[1] (shard length T_local)": t_local, "q.shape[2] (Hq)": hq,
                "k.shape[2] (Hkv)": hkv, "q.shape[3] (D)": d, "v.shape[3] (Dv)": dv, "window[0] (left)": left,
                "group_size": group_size or 0, "summaries": int(summaries), "layout": int(zig),
                "softmax_scale (float bits)": int(torch.tensor(scale, dtype=torch.float64).view(torch.int64)),
            })

    attend = _chunk_attention_torch if be == "torch" else _chunk_attention_triton
    if bounds is not None:
        return _packed_attention(q, k, v, bounds, attend, world=world, rank=rank, group=group, left=left,
                                 group_size=group_size if summaries else None, scale=scale, zig=zig)
    geo = CPGeometry(world, t_local, left, group_size if summaries else None, zig)
    chunks = _exchange(k, v, geo, rank, group)
    outs = []
    for c, (k_ext, v_ext, ks, vs) in zip(geo.chunks(rank), chunks):
        o = geo.owner(c)[1]
        h = geo.halo(c)
        outs.append(attend(q[:, o:o + geo.tc], k_ext, v_ext, ks, vs, h=h, pos0=geo.start(c) - h, left=left,
                           group_size=group_size, scale=scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


# --------------------------------------------------------------------------- shards, positions


def cp_positions(rank: int, world: int, t_local: int, *, layout: str = "contiguous",
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions ``[T_local]`` (int64) of rank ``rank``'s shard of ``world`` (for RoPE)."""
    zig = check_cp_layout("cp_positions", layout)
    geo = CPGeometry(world, t_local, 0, None, zig)
    return torch.cat([torch.arange(geo.start(c), geo.start(c) + geo.tc, device=device) for c in geo.chunks(rank)])


def cp_shard(x: torch.Tensor, *, group: object, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's shard of the whole-sequence tensor ``x`` (sequence along ``dim``, whose
    length must be a multiple of the group size, and of twice it for ``"zigzag"``)."""
    group = resolve_group(group, op="cp_shard")
    zig = check_cp_layout("cp_shard", layout)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    t = x.shape[dim]
    n = 2 * world if zig else world
    if t % n:
        raise ValueError(f"cp_shard: x.shape[{dim}] = {t} must be a multiple of {n} "
                         f"({'2 x ' if zig else ''}the {world} ranks) for layout={layout!r}")
    geo = CPGeometry(world, t // world, 0, None, zig)
    parts = [x.narrow(dim, geo.start(c), geo.tc) for c in geo.chunks(rank)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
