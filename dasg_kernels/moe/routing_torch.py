"""The ``backend="torch"`` routing: softmax, group-limited dynamic top-p, with static shapes.

:func:`route_torch` is the torch backend of :func:`dasg_kernels.moe.route`. It ranks the
probabilities with a stable descending sort (ties to the lower index, NaN first, as the
Triton kernel of :mod:`dasg_kernels.moe.routing` ranks them) and counts the experts with a
scatter-add, so every size follows from the input shapes and ``torch.compile`` traces it
without a graph break. :func:`dasg_kernels.reference.route_ref` is the oracle the tests
hold it to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dasg_kernels.moe.types import Routing


def topk_group_mask(probs: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Bool ``[N, E]``: the experts inside each token's best ``topk_group`` of ``n_group``
    equal groups of ``probs [N, E]``, a group scored by its best expert (ties to the lower
    group index)."""
    n, e = probs.shape
    group_scores = probs.view(n, n_group, e // n_group).amax(-1)
    best = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    keep = torch.zeros(n, n_group, dtype=torch.bool, device=probs.device).scatter_(1, best, True)
    return keep.repeat_interleave(e // n_group, dim=1)


def route_torch(
    logits: torch.Tensor,
    *,
    top_p: float,
    k_max: int,
    min_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
) -> Routing:
    """Route ``logits [N, E]`` (arguments validated by :func:`dasg_kernels.moe.route`).

    ``probs = softmax(logits.float())``; eligible experts (those of the token's best
    ``topk_group`` groups when ``n_group > 1``) by descending probability; a token takes
    expert ``j`` of that order while the mass before it is ``< top_p``, at least ``min_k``
    and at most ``min(k_max, eligible)`` of them (``top_p >= 1``: exactly that many).

    Returns:
        :class:`Routing`: ``expert_ids [N, k_max]`` int32 (``-1`` padded), ``weights
        [N, k_max]`` fp32 (the chosen probabilities, divided by their sum when
        ``renormalize``; differentiable w.r.t. ``logits``), ``num_selected [N]`` int32,
        ``tokens_per_expert [E]`` int32.
    """
    n, e = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    eligible = e
    ranked = probs.detach()
    if n_group > 1:
        ranked = ranked.masked_fill(~topk_group_mask(ranked, n_group, topk_group), -1.0)
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
