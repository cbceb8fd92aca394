"""Readable PyTorch references: the semantics every backend must meet.

These are written for clarity, not speed (masks are materialised). They are the
ground truth of the tests and benchmarks, and no module of the package imports them:
the ``torch`` backends are separate code held to these (attention:
:mod:`dasg_kernels.attention.blockwise`, the same semantics without the ``[T, T]``
scores; routing: :mod:`dasg_kernels.moe.routing_torch`; routed experts:
:mod:`dasg_kernels.moe.experts_torch`, the same sum with static shapes, so
``torch.compile`` traces it without a graph break).

Attention (GMHA)
----------------
``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]``, ``Hq % Hkv == 0``. Query row ``r``
sits at position ``i = q_offset + r`` (default ``q_offset = Tk - Tq``: the queries
are the last ``Tq`` positions, as in decoding against a KV cache). With
``window=(left, right)`` (flash-attn's ``window_size``; ``-1`` = unbounded;
``causal=True`` forces ``right = 0``) query ``i`` sees key ``j`` when
``i - left <= j <= i + right``.

With ``group_size=G, summaries=True`` the keys are cut into groups
``[g*G, (g+1)*G)``; each group contributes one summary key and value, the mean of
``k`` and ``v`` over the group's positions (the last group may be partial: the
mean over its ``Tk - g*G`` positions). Query ``i`` sees summary ``g`` when the
group lies wholly before its window, ``(g+1)*G - 1 < i - left`` (needs
``left >= 0``), or, with ``causal=False`` and ``right >= 0``, wholly after it,
``g*G > i + right``. Local and summary keys share one softmax. A query that sees
no key outputs zeros and lse ``-inf``.

Routed experts (ADR)
--------------------
See :func:`route_ref` and :func:`expert_ffn_ref`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dasg_kernels.moe.types import Routing

# --------------------------------------------------------------------------- attention


def normalize_window(window: tuple[int, int], causal: bool) -> tuple[int, int]:
    """Return ``(left, right)`` with ``causal`` applied (``right = 0``); ``-1`` = unbounded."""
    left, right = int(window[0]), int(window[1])
    if causal:
        right = 0
    return left, right


def num_groups(t: int, group_size: int) -> int:
    """Number of summary groups over ``t`` positions (the last may be partial)."""
    return (t + group_size - 1) // group_size


def local_mask(
    tq: int, tk: int, window: tuple[int, int], causal: bool, q_offset: int | None = None, device=None
) -> torch.Tensor:
    """Bool ``[tq, tk]``: query row ``r`` (position ``q_offset + r``) sees key ``j``."""
    left, right = normalize_window(window, causal)
    q_offset = tk - tq if q_offset is None else q_offset
    i = torch.arange(tq, device=device)[:, None] + q_offset
    j = torch.arange(tk, device=device)[None, :]
    mask = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def summary_mask(
    tq: int,
    tk: int,
    window: tuple[int, int],
    causal: bool,
    group_size: int,
    q_offset: int | None = None,
    device=None,
) -> torch.Tensor:
    """Bool ``[tq, num_groups(tk, G)]``: query row ``r`` sees the summary of group ``g``."""
    left, right = normalize_window(window, causal)
    q_offset = tk - tq if q_offset is None else q_offset
    i = torch.arange(tq, device=device)[:, None] + q_offset
    g = torch.arange(num_groups(tk, group_size), device=device)[None, :]
    mask = torch.zeros(tq, g.shape[1], dtype=torch.bool, device=device)
    if left >= 0:
        mask |= (g + 1) * group_size - 1 < i - left
    if not causal and right >= 0:
        mask |= g * group_size > i + right
    return mask


def group_means_ref(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean of ``x [B, T, H, D]`` over each group of ``group_size`` positions.

    Returns ``[B, ceil(T/G), H, D]`` in ``x.dtype`` (accumulated in fp32); the last,
    possibly partial, group is averaged over the positions it has.
    """
    b, t, h, d = x.shape
    full = t // group_size  # whole groups; the partial tail is summed on its own
    xf = x.float()  # never padded to ng * G: memory O(T) even when G >> T
    means = [xf[:, : full * group_size].reshape(b, full, group_size, h, d).mean(2)]
    if full * group_size < t:
        means.append(xf[:, full * group_size :].mean(1, keepdim=True))
    return torch.cat(means, dim=1).to(x.dtype)


def swa_attention_ref(
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
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped sliding-window attention with optional group summaries.

    Args:
        q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]``.
        upcast: compute in fp32 (the ground truth); ``False`` computes in the input
            dtype, which measures the error a low-precision reference makes.

    Returns:
        ``out [B, Tq, Hq, D]`` in ``q.dtype`` and ``lse [B, Hq, Tq]`` in fp32
        (natural log; ``-inf`` for rows that see no key, whose output is 0). NaN in
        ``q`` or in a key a row sees propagates to that row (as SDPA and the kernels).

    This materialises ``[B, Hq, Tq, Tk + Tk/G]`` scores: the oracle of the tests. The
    ``torch`` backend runs :func:`dasg_kernels.attention.blockwise.swa_attention_blockwise`
    (same semantics, ``O(T * (W + T/G))``).
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cdt = torch.float32 if upcast else q.dtype
    mask = local_mask(tq, tk, window, causal, q_offset, q.device)
    keys, vals = k, v
    if summaries:
        if group_size is None:
            raise ValueError("swa_attention_ref: summaries=True needs group_size")
        keys = torch.cat([k, group_means_ref(k, group_size)], dim=1)
        vals = torch.cat([v, group_means_ref(v, group_size)], dim=1)
        mask = torch.cat([mask, summary_mask(tq, tk, window, causal, group_size, q_offset, q.device)], dim=1)
    rep = hq // hkv
    qh = q.to(cdt).transpose(1, 2)  # [B, Hq, Tq, D]
    kh = keys.to(cdt).transpose(1, 2).repeat_interleave(rep, dim=1)
    vh = vals.to(cdt).transpose(1, 2).repeat_interleave(rep, dim=1)
    s = (qh @ kh.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hq, Tq]
    # A row that sees no key has lse = -inf: subtract 0 there, so its p is exp(-inf) = 0
    # (not exp(-inf - -inf) = nan). NaN in q or a visible key stays NaN, as in SDPA.
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    out = (p.to(cdt) @ vh).transpose(1, 2)
    return out.to(q.dtype), lse


# --------------------------------------------------------------------------- routing


def _topk_group_mask(probs: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Bool ``[N, E]``: experts inside each token's best ``topk_group`` groups.

    A group is scored by its best expert; ties go to the lower group index.
    """
    n, e = probs.shape
    group_scores = probs.view(n, n_group, e // n_group).amax(-1)
    best = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    keep = torch.zeros(n, n_group, dtype=torch.bool, device=probs.device).scatter_(1, best, True)
    return keep.repeat_interleave(e // n_group, dim=1)


def route_ref(
    logits: torch.Tensor,
    *,
    top_p: float = 1.0,
    k_max: int = 2,
    min_k: int = 1,
    n_group: int = 1,
    topk_group: int | None = None,
    renormalize: bool = True,
) -> Routing:
    """Dynamic top-p routing with a ``k_max`` cap and group-limited selection.

    ``probs = softmax(logits.float())``. With ``n_group > 1`` only experts in the
    token's best ``topk_group`` groups (scored by their best expert) are eligible.
    Eligible experts are sorted by descending probability (ties to the lower index);
    the token takes the smallest prefix whose probability mass (of the full softmax)
    reaches ``top_p`` -- expert ``j`` of the order is taken when the mass before it is
    ``< top_p`` -- at least ``min_k`` and at most ``min(k_max, eligible)``.
    ``top_p >= 1`` is plain top-k. ``weights`` are the chosen probabilities,
    divided by their sum when ``renormalize``; they carry gradients to ``logits``.

    Args:
        logits: ``[N, E]``.
    Returns:
        :class:`Routing` with ``expert_ids [N, k_max]`` int32 (``-1`` padded),
        ``weights [N, k_max]`` fp32, ``num_selected [N]`` int32, ``tokens_per_expert [E]`` int32.
    """
    n, e = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    eligible = e
    ranked = probs.detach()
    if n_group > 1:
        topk_group = n_group if topk_group is None else topk_group
        allowed = _topk_group_mask(ranked, n_group, topk_group)
        ranked = ranked.masked_fill(~allowed, -1.0)
        eligible = topk_group * (e // n_group)
    k_cap = min(k_max, eligible)
    sorted_p, order = torch.sort(ranked, dim=-1, descending=True, stable=True)
    sorted_p, order = sorted_p[:, :k_cap], order[:, :k_cap]
    if top_p >= 1.0:
        num = torch.full((n,), k_cap, dtype=torch.long, device=logits.device)
    else:
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        num = (before < top_p).sum(-1).clamp(min=min(min_k, k_cap), max=k_cap)
    used = torch.arange(k_cap, device=logits.device)[None, :] < num[:, None]
    w = probs.gather(1, order) * used
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    ids = torch.where(used, order, torch.full_like(order, -1))
    pad = k_max - k_cap
    if pad:
        ids = F.pad(ids, (0, pad), value=-1)
        w = F.pad(w, (0, pad), value=0.0)
    # histogram of the used slots (a scatter-add: static shapes, so torch.compile traces it)
    counts = torch.zeros(e, dtype=torch.long, device=logits.device).scatter_add_(
        0, ids.clamp(min=0).flatten(), (ids >= 0).flatten().long())
    return Routing(ids.to(torch.int32), w, num.to(torch.int32), counts.to(torch.int32))


# --------------------------------------------------------------------------- experts


def swiglu_ref(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU FFN: ``x [n, D]``, ``gate_up [2F, D]`` (gate rows first), ``down [D, F]`` -> ``[n, D]``."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def expert_ffn_ref(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """Routed SwiGLU experts, one expert at a time (as transformers' eager experts).

    Args:
        x: ``[N, D]``; gate_up_proj: ``[E, 2F, D]``; down_proj: ``[E, D, F]``;
        expert_ids: ``[N, k]`` int (``-1`` = unused slot); weights: ``[N, k]``.
        upcast: compute in fp32 (ground truth) or in ``x.dtype`` (the eager path).
    Returns:
        ``y [N, D]`` in ``x.dtype``: ``sum_slots weight * down(silu(gate(x)) * up(x))``.

    The oracle: each expert's tokens are gathered with ``torch.where``, a size that
    depends on the routing (a graph break under ``torch.compile``, a host sync on CUDA).
    ``backend="torch"`` runs :func:`dasg_kernels.moe.experts_torch.expert_ffn_torch`.
    """
    cdt = torch.float32 if upcast else x.dtype
    out = torch.zeros(x.shape, dtype=cdt, device=x.device)
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(expert_ids == e)
        if not torch.compiler.is_compiling() and token.numel() == 0:  # (no data-dependent branch
            continue  # under torch.compile: an expert without tokens adds an empty index_add)
        y = swiglu_ref(x[token].to(cdt), gate_up_proj[e].to(cdt), down_proj[e].to(cdt))
        out = out.index_add(0, token, y * weights[token, slot, None].to(cdt))
    if torch.compiler.is_compiling() or not (expert_ids >= 0).any():
        # nothing routed: keep every input in the graph (adding the sum of an empty slice,
        # exactly 0) so its gradient is zeros, as on the Triton path, not None (DDP needs it)
        out = out + sum(t[:0].sum().to(cdt) for t in (x, gate_up_proj, down_proj, weights))
    return out.to(x.dtype)
