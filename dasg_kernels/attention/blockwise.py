"""Blockwise PyTorch attention: the ``torch`` backend of the attention ops.

Same semantics as :func:`dasg_kernels.reference.swa_attention_ref` (the readable oracle,
which materialises ``[B, Hq, Tq, Tk + Tk/G]`` scores), computed one block of query rows
at a time: each block of positions ``[i0, i1)`` is scored only against

- the keys of its window, ``[i0 - left, i1 - 1 + right]`` clipped to ``[0, Tk)``, and
- the summaries (group means) some row of the block may see: the groups wholly before
  the last row's window (``g < (i1 - 1 - left) // G``) and, with ``causal=False``,
  wholly after the first row's (``g > (i0 + right) // G``),

with a small per-block boolean mask ``[blk, keys + summaries]`` for the rows whose
window or visible summaries differ inside the block. Local and summary keys share one
softmax. Time and memory are ``O(T * (W + T/G))``, never ``O(T^2)`` for a bounded window.

- GQA without copying ``k, v`` per q head: a block of queries is viewed as
  ``[B, Hkv, rep * blk, D]`` (the ``rep = Hq / Hkv`` heads of a kv head stacked), so
  one matmul serves every q head of a kv head and the key/value gradients of the GQA
  heads are summed inside the matmul.
- fp32 compute for every input dtype (as the reference), output in ``q.dtype``,
  ``lse [B, Hq, Tq]`` fp32. A row that sees no key outputs 0 with ``lse = -inf``;
  NaN in ``q`` or in a key a row sees propagates to that row (as SDPA).
- Autograd: a ``torch.autograd.Function`` that saves only ``q, k, v``, the summaries
  and ``lse`` (``O(T)``) and recomputes each block's probabilities in the backward
  (FA2-style: ``ds = p * (dp - rowsum(p * dp))``). The summaries are :func:`group_means`
  (in the input dtype, as the reference), computed outside the function, so autograd
  carries their gradient back to ``k, v``.
- :func:`softmax_lse_` (the masked softmax and its lse) is shared with the bounded
  cache's PyTorch path (:mod:`.kvcache`).
- No host synchronisation: every block bound is a Python int from the shapes and the
  window, so this also runs on CUDA (the fallback for shapes the kernels lack) and
  under ``torch.compile``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["default_block_size", "group_means", "softmax_lse_", "swa_attention_blockwise"]

_NEG_INF = float("-inf")
# score elements (fp32) one block may hold: bounds the transient memory per block
_BLOCK_BUDGET = 1 << 24


def group_means(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The summaries: the mean of ``x [B, T, H, D]`` over each group ``[g*G, (g+1)*G)``.

    Returns ``[B, ceil(T/G), H, D]`` in ``x.dtype`` (accumulated in fp32); the last,
    possibly partial, group is averaged over the positions it has (the semantics of
    ``reference.group_means_ref``). Memory ``O(T)`` even when ``G >> T`` (never padded).
    """
    b, t, h, d = x.shape
    full = t // group_size  # whole groups; the partial tail is averaged on its own
    xf = x.float()
    means = [xf[:, : full * group_size].reshape(b, full, group_size, h, d).mean(2)]
    if full * group_size < t:
        means.append(xf[:, full * group_size :].mean(1, keepdim=True))
    return torch.cat(means, dim=1).to(x.dtype)


def softmax_lse_(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of masked fp32 scores ``s [..., K]`` (``-inf``: not visible),
    in place: returns ``(p, lse)`` with ``p`` the storage of ``s`` and ``lse [...]`` the natural
    log-sum-exp. A row that sees no key gets ``p = 0`` and ``lse = -inf`` (its max is taken as 0,
    so ``exp(-inf - -inf) = nan`` never occurs); NaN scores stay NaN."""
    m = s.amax(dim=-1)  # one exp per score: p = exp(s - m) / l, lse = m + log(l)
    m = torch.where(m == _NEG_INF, 0.0, m)
    s.sub_(m[..., None]).exp_()
    denom = s.sum(dim=-1)
    lse = m + denom.log()  # -inf where denom = 0
    s.mul_(torch.where(denom == 0, 0.0, denom.reciprocal())[..., None])
    return s, lse


def default_block_size(tq: int, tk: int, left: int, right: int, n_summaries: int, heads: int) -> int:
    """Query rows per block: a quarter of the window width as a power of two in 32..256
    (a block scores ``blk + W`` local keys per row, so small blocks waste less; 64 rows
    for ``W = 256`` measured fastest on a CPU), halved while one block's scores
    ``heads * blk * (blk + W + n_summaries)`` exceed 16M fp32."""
    width = (left if left >= 0 else tk) + (right if right >= 0 else tk) + 1
    blk = 32
    while blk < 256 and 4 * blk < width:
        blk *= 2
    while blk > 16 and heads * blk * (blk + min(width, tk) + n_summaries) > _BLOCK_BUDGET:
        blk //= 2
    return max(1, min(blk, tq))


def _block_keys(i0: int, i1: int, tk: int, left: int, right: int, causal: bool, group_size: int, ng: int,
                pos0: int = 0):
    """For query rows at key positions ``[i0, i1)``: the local key range ``[lo, hi)`` and the
    summary column ranges ``[(a, b), ...]`` that some row of the block sees (``pos0``: the
    position of key 0 in the groups' coordinates)."""
    lo = 0 if left < 0 else min(max(i0 - left, 0), tk)
    hi = tk if right < 0 else min(max(i1 + right, 0), tk)
    hi = max(hi, lo)
    ranges: list[tuple[int, int]] = []
    if ng:
        g0, g1 = i0 + pos0, i1 + pos0
        nb = 0 if left < 0 else min(max((g1 - 1 - left) // group_size, 0), ng)  # g < nb: before
        na = ng if (causal or right < 0) else min(max((g0 + right) // group_size + 1, 0), ng)  # g >= na: after
        if nb >= na:
            ranges = [(0, ng)]
        else:
            ranges = [r for r in ((0, nb), (na, ng)) if r[1] > r[0]]
    return lo, hi, ranges


def _block_mask(i0, i1, lo, hi, ranges, left, right, causal, group_size, device, pos0: int = 0) -> torch.Tensor:
    """Bool ``[i1 - i0, (hi - lo) + summaries]``: the reference's local / summary masks
    restricted to this block's rows and columns (summaries at positions shifted by ``pos0``)."""
    i = torch.arange(i0, i1, device=device)[:, None]
    j = torch.arange(lo, hi, device=device)[None, :]
    local = torch.ones(i1 - i0, hi - lo, dtype=torch.bool, device=device)
    if left >= 0:
        local &= j >= i - left
    if right >= 0:
        local &= j <= i + right
    parts = [local]
    i = i + pos0
    for a, b in ranges:
        g = torch.arange(a, b, device=device)[None, :]
        vis = torch.zeros(i1 - i0, b - a, dtype=torch.bool, device=device)
        if left >= 0:
            vis |= (g + 1) * group_size - 1 < i - left
        if not causal and right >= 0:
            vis |= g * group_size > i + right
        parts.append(vis)
    return torch.cat(parts, dim=1) if len(parts) > 1 else local


class _Problem:
    """Shapes, bounds and head-major fp32 views shared by the forward and the backward."""

    def __init__(self, q, k, v, ks, vs, scale, left, right, causal, group_size, q_offset, block, pos0=0):
        self.b, self.tq, self.hq, self.d = q.shape
        self.tk, self.hkv = k.shape[1], k.shape[2]
        self.dv = v.shape[3]
        self.rep = self.hq // self.hkv
        self.scale, self.left, self.right, self.causal = scale, left, right, causal
        self.group_size = group_size
        self.pos0 = pos0
        self.ng = 0 if ks is None else ks.shape[1]
        self.q_offset = self.tk - self.tq if q_offset is None else q_offset
        self.block = block or default_block_size(self.tq, self.tk, left, right, self.ng, self.b * self.hq)
        # [B, Hkv, T, D] fp32 views (a copy only for 16-bit inputs: O(T))
        self.kh = k.float().transpose(1, 2)
        self.vh = v.float().transpose(1, 2)
        self.ksh = None if ks is None else ks.float().transpose(1, 2)
        self.vsh = None if vs is None else vs.float().transpose(1, 2)

    def blocks(self):
        for r0 in range(0, self.tq, self.block):
            r1 = min(r0 + self.block, self.tq)
            i0, i1 = self.q_offset + r0, self.q_offset + r1
            lo, hi, ranges = _block_keys(i0, i1, self.tk, self.left, self.right, self.causal,
                                         self.group_size or 1, self.ng, self.pos0)
            yield r0, r1, lo, hi, ranges, i0, i1

    def rows(self, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """``x[:, r0:r1]`` of ``[B, Tq, Hq, E]`` as fp32 ``[B, Hkv, rep * blk, E]``."""
        e = x.shape[-1]
        xb = x[:, r0:r1].reshape(self.b, r1 - r0, self.hkv, self.rep, e).permute(0, 2, 3, 1, 4)
        return xb.float().reshape(self.b, self.hkv, self.rep * (r1 - r0), e)

    def unrows(self, xb: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Inverse of :meth:`rows`: ``[B, blk, Hq, E]``."""
        e = xb.shape[-1]
        return xb.view(self.b, self.hkv, self.rep, r1 - r0, e).permute(0, 3, 1, 2, 4).reshape(
            self.b, r1 - r0, self.hq, e)

    def keys(self, lo, hi, ranges):
        if not ranges:
            return self.kh[:, :, lo:hi], self.vh[:, :, lo:hi]
        kb = torch.cat([self.kh[:, :, lo:hi]] + [self.ksh[:, :, a:b] for a, b in ranges], dim=2)
        vb = torch.cat([self.vh[:, :, lo:hi]] + [self.vsh[:, :, a:b] for a, b in ranges], dim=2)
        return kb, vb

    def probs(self, qb, kb, lo, hi, ranges, i0, i1, lse=None):
        """Masked probabilities ``p [B, Hkv, rep*blk, keys]`` (and the rows' lse)."""
        blk = i1 - i0
        s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(self.scale)
        mask = _block_mask(i0, i1, lo, hi, ranges, self.left, self.right, self.causal,
                           self.group_size or 1, qb.device, self.pos0)
        s5 = s.view(self.b, self.hkv, self.rep, blk, s.shape[-1]).masked_fill_(~mask, _NEG_INF)
        # Rows that see no key (max or lse = -inf) subtract 0, so their p is exp(-inf) = 0,
        # never exp(-inf - -inf) = nan; NaN scores stay NaN.
        if lse is not None:  # backward: p = exp(s - lse), one exp
            s5.sub_(torch.where(lse == _NEG_INF, 0.0, lse)[..., None]).exp_()
            return s, lse
        _, lse = softmax_lse_(s5)  # forward: lse [B, Hkv, rep, blk]
        return s, lse


def _forward(pb: _Problem, q: torch.Tensor):
    out = q.new_zeros(pb.b, pb.tq, pb.hq, pb.dv)
    lse = torch.full((pb.b, pb.hkv, pb.rep, pb.tq), _NEG_INF, dtype=torch.float32, device=q.device)
    for r0, r1, lo, hi, ranges, i0, i1 in pb.blocks():
        kb, vb = pb.keys(lo, hi, ranges)
        if kb.shape[2] == 0:
            continue  # no key at all: rows stay 0 / -inf
        p, lse_b = pb.probs(pb.rows(q, r0, r1), kb, lo, hi, ranges, i0, i1)
        out[:, r0:r1] = pb.unrows(torch.matmul(p, vb), r0, r1)
        lse[..., r0:r1] = lse_b
    return out, lse.view(pb.b, pb.hq, pb.tq)


def _backward(pb: _Problem, q, lse, dout):
    dq = torch.zeros(pb.b, pb.tq, pb.hq, pb.d, dtype=torch.float32, device=q.device)
    dkh = torch.zeros_like(pb.kh)
    dvh = torch.zeros_like(pb.vh)
    dksh = None if pb.ksh is None else torch.zeros_like(pb.ksh)
    dvsh = None if pb.vsh is None else torch.zeros_like(pb.vsh)
    lse5 = lse.view(pb.b, pb.hkv, pb.rep, pb.tq)
    for r0, r1, lo, hi, ranges, i0, i1 in pb.blocks():
        kb, vb = pb.keys(lo, hi, ranges)
        if kb.shape[2] == 0:
            continue
        qb = pb.rows(q, r0, r1)
        p, _ = pb.probs(qb, kb, lo, hi, ranges, i0, i1, lse=lse5[..., r0:r1])
        dob = pb.rows(dout, r0, r1)
        dvb = torch.matmul(p.transpose(-1, -2), dob)  # GQA heads summed in the matmul
        dp = torch.matmul(dob, vb.transpose(-1, -2))
        delta = (p * dp).sum(-1, keepdim=True)
        ds = dp.sub_(delta).mul_(p).mul_(pb.scale)
        dq[:, r0:r1] = pb.unrows(torch.matmul(ds, kb), r0, r1)
        dkb = torch.matmul(ds.transpose(-1, -2), qb)
        nk = hi - lo
        dkh[:, :, lo:hi] += dkb[:, :, :nk]
        dvh[:, :, lo:hi] += dvb[:, :, :nk]
        off = nk
        for a, b in ranges:
            dksh[:, :, a:b] += dkb[:, :, off:off + b - a]
            dvsh[:, :, a:b] += dvb[:, :, off:off + b - a]
            off += b - a
    return dq, dkh, dvh, dksh, dvsh


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ks, vs, scale, left, right, causal, group_size, q_offset, block, pos0):
        pb = _Problem(q, k, v, ks, vs, scale, left, right, causal, group_size, q_offset, block, pos0)
        out, lse = _forward(pb, q)
        ctx.save_for_backward(q, k, v, ks, vs, lse)
        ctx.args = (scale, left, right, causal, group_size, q_offset, block, pos0)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, ks, vs, lse = ctx.saved_tensors
        pb = _Problem(q, k, v, ks, vs, *ctx.args)
        if dout is None:
            dout = torch.zeros(pb.b, pb.tq, pb.hq, pb.dv, dtype=q.dtype, device=q.device)
        dq, dkh, dvh, dksh, dvsh = _backward(pb, q, lse, dout)
        dks = None if dksh is None else dksh.transpose(1, 2).to(ks.dtype)
        dvs = None if dvsh is None else dvsh.transpose(1, 2).to(vs.dtype)
        return (dq.to(q.dtype), dkh.transpose(1, 2).to(k.dtype), dvh.transpose(1, 2).to(v.dtype), dks, dvs,
                None, None, None, None, None, None, None, None)


def swa_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: tuple[int, int] = (-1, -1),
    causal: bool = True,
    group_size: int | None = None,
    summaries: bool = False,
    softmax_scale: float | None = None,
    q_offset: int | None = None,
    block_size: int | None = None,
    summary_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    position_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped sliding-window attention with summaries, one query block at a time.

    Arguments and results as :func:`dasg_kernels.reference.swa_attention_ref` (``q [B,
    Tq, Hq, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]``; query row ``r`` at position
    ``q_offset + r``, default ``Tk - Tq``): ``out [B, Tq, Hq, Dv]`` in ``q.dtype`` and
    ``lse [B, Hq, Tq]`` fp32 (``-inf`` and output 0 for rows that see no key; not
    differentiable). ``out`` is differentiable w.r.t. ``q, k, v`` (through the group
    means too). ``block_size``: query rows per block (default :func:`default_block_size`).
    Computes in fp32 whatever the input dtype. Inputs are not validated here (the public
    ops do that).

    External summaries (a shard of a longer sequence, e.g. context parallelism):
    ``summary_kv=(ks [B, n, Hkv, D], vs [B, n, Hkv, Dv])`` are used as the summary keys/values
    instead of the group means of ``k, v`` (``summaries=True`` needed), and key ``j`` sits
    at position ``position_offset + j`` of the groups' coordinates: summary ``g`` stands for
    the positions ``[g*G, (g+1)*G)`` there, and the query at key position ``i`` sees it when
    ``(g+1)*G - 1 < position_offset + i - left``. The local window depends only on
    ``i - j``. ``out`` is then also differentiable w.r.t. ``ks, vs``.
    """
    left, right = int(window[0]), int(window[1])
    if causal:
        right = 0
    d = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    ks = vs = None
    if summaries:
        if group_size is None:
            raise ValueError("swa_attention_blockwise: summaries=True needs group_size")
        if summary_kv is not None:
            ks, vs = summary_kv
            if ks.shape[1] == 0:
                ks = vs = None
        elif k.shape[1]:
            ks, vs = group_means(k, group_size), group_means(v, group_size)
    elif summary_kv is not None:
        raise ValueError("swa_attention_blockwise: summary_kv needs summaries=True")
    if block_size is not None and block_size < 1:
        raise ValueError(f"swa_attention_blockwise: block_size must be >= 1, got {block_size}")
    # the same tensor twice (self-attention of one tensor, k is v) would be a duplicate
    # input of the autograd.Function, which torch.compile rejects: pass views instead
    k = k.view_as(k) if k is q else k
    v = v.view_as(v) if v is q or v is k else v
    return _BlockwiseAttention.apply(q, k, v, ks, vs, scale, left, right, causal, group_size, q_offset, block_size,
                                     int(position_offset))
