"""Public op: decode / chunked prefill against a bounded cache (``swa_attention_with_kvcache``).

GMHA's promise for inference: a query needs only the last ``left`` keys and one mean per
finished group, so a layer's cache can hold ``O(W + T/G)`` entries per sequence. The cache
of one layer (modelled on flash-attn's ``flash_attn_with_kvcache``):

- ``k_cache, v_cache [B, C, Hkv, D]``: a ring of the last ``C`` positions (position ``p`` in
  slot ``p % C``), ``C >= left + Tq``;
- ``k_means, v_means [B, NG, Hkv, D]`` (cache dtype): the mean of every finished group
  (``NG > (longest length) // G``: the row of the unfinished group is scratch);
- ``k_sum, v_sum [B, Hkv, D]`` fp32: each row's running sum of its unfinished group;
- ``cache_seqlens [B]`` int32: how many positions each row holds (rows may differ). A
  negative value ``-p`` marks left padding: the next ``p`` appended positions are negative,
  never attended and never averaged, and the row's real tokens start at position 0.

:func:`alloc_kvcache` allocates them. One call appends the new ``k, v`` (when given) into
the ring, folds them into the group sums and writes the means of the groups they finish,
in place, with static shapes and no host synchronisation (CUDA-graph capturable); then the
queries attend (Triton kernel :mod:`.bounded_cache`, or the PyTorch path here). ``cache_seqlens``
is not advanced: the caller adds ``Tq`` after the call, as with flash-attn.
"""
from __future__ import annotations

import torch

from dasg_kernels.attention import host, ops
from dasg_kernels.attention.blockwise import softmax_lse_
from dasg_kernels.attention.checks import check_window, validate_attention
from dasg_kernels.backend import bf16_via_fp32, interpreted_bf16, resolve_backend
from dasg_kernels.validation import check_last_dim_contiguous, check_tensor

OP = "swa_attention_with_kvcache"


def alloc_kvcache(
    batch: int,
    capacity: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    group_size: int | None = None,
    max_seqlen: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Zeroed cache tensors for one layer, as keyword arguments of :func:`swa_attention_with_kvcache`.

    ``capacity`` is ``C`` (at least ``left + Tq`` of the largest call). With ``group_size``
    and ``max_seqlen`` the summary tensors are included (``NG = max_seqlen // G + 1``).
    Returns ``{"k_cache", "v_cache", "cache_seqlens"[, "k_means", "v_means", "k_sum", "v_sum"]}``.
    """
    kv = (batch, capacity, num_kv_heads, head_dim)
    out = {"k_cache": torch.zeros(kv, dtype=dtype, device=device),
           "v_cache": torch.zeros(kv, dtype=dtype, device=device),
           "cache_seqlens": torch.zeros(batch, dtype=torch.int32, device=device)}
    if group_size is not None:
        if max_seqlen is None:
            raise ValueError("alloc_kvcache: group_size needs max_seqlen (the summary rows to hold)")
        ng = max_seqlen // group_size + 1
        for name in ("k_means", "v_means"):
            out[name] = torch.zeros((batch, ng, num_kv_heads, head_dim), dtype=dtype, device=device)
        for name in ("k_sum", "v_sum"):
            out[name] = torch.zeros((batch, num_kv_heads, head_dim), dtype=torch.float32, device=device)
    return out


# --------------------------------------------------------------------------- cache update


def _append_ring(ring: torch.Tensor, x: torch.Tensor, pos: torch.Tensor) -> None:
    """Write ``x [B, Tq, H, D]`` at positions ``pos [B, Tq]`` of the ring ``[B, C, H, D]``."""
    idx = (pos % ring.shape[1])[:, :, None, None].expand_as(x)
    ring.scatter_(1, idx, x.to(ring.dtype))


def _update_groups(x: torch.Tensor, means: torch.Tensor, run_sum: torch.Tensor, first: torch.Tensor,
                   group_size: int) -> None:
    """Fold ``x [B, Tq, H, D]`` (positions ``first[b] + j``) into the running group sums and
    write the mean of each group it finishes into ``means [B, NG, H, D]``, in place.
    Negative positions (left padding) add nothing and finish no group.

    Static shapes: the chunk is laid out on the absolute group grid (row ``b`` shifted by
    ``first[b] % G``) in ``n_loc = ceil(Tq / G) + 1`` local groups, summed over ``G`` as the
    reference pools; each finished group's mean goes into its row of ``means``.
    """
    b, tq, h, d = x.shape
    g = group_size
    n_loc = -(-tq // g) + 1
    dev = x.device
    first = first.long()
    g0 = first // g
    shift = first - g0 * g
    grid = torch.zeros((b, n_loc * g, h, d), dtype=torch.float32, device=dev)
    idx = (shift[:, None] + torch.arange(tq, device=dev))[:, :, None, None].expand(b, tq, h, d)
    real = (first[:, None] + torch.arange(tq, device=dev) >= 0)[:, :, None, None]
    grid.scatter_(1, idx, torch.where(real, x.float(), torch.zeros((), device=dev)))
    sums = grid.view(b, n_loc, g, h, d).sum(2)
    sums[:, 0] += run_sum
    end = first + tq
    # each finished group's mean into its row, by one select over all rows of ``means``
    rows = torch.arange(means.shape[1], device=dev)[None, :]
    local = rows - g0[:, None]  # [B, NG]: each row's local group in this chunk
    finished = (local >= 0) & (local < n_loc) & ((rows + 1) * g <= end[:, None])
    mean = sums.gather(1, local.clamp(0, n_loc - 1)[:, :, None, None].expand(b, -1, h, d)) / g
    means.copy_(torch.where(finished[:, :, None, None], mean.to(means.dtype), means))
    cur_local = (end.clamp(min=0) // g - g0).clamp(max=n_loc - 1)  # a row still all padding: sum stays 0
    run_sum.copy_(sums.gather(1, cur_local[:, None, None, None].expand(b, 1, h, d))[:, 0])


# --------------------------------------------------------------------------- attention (torch)


def _slot_positions(total: torch.Tensor, c: int) -> torch.Tensor:
    """``[B, C]``: the position each ring slot holds (``< 0``: empty), ``total [B]`` positions in all."""
    last = (total.long() - 1)[:, None]
    return last - (last - torch.arange(c, device=total.device)) % c


def _attend_torch(q, k_cache, v_cache, means, first, left, group_size, scale):
    """The ring + means attention in fp32 PyTorch: ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``,
    with the softmax of the blockwise core (:func:`~dasg_kernels.attention.blockwise.softmax_lse_`).

    The ring and the means are scored as two blocks whose scores are joined; the cache
    tensors themselves are never concatenated: under inductor (torch 2.13, CPU) a ``cat``
    reading ``k_cache`` right after the ring's ``scatter_`` makes the scatter's result an
    alias into the cat's buffer, which ``v_cache``'s cat reuses before the result is copied
    back, so ``k_cache`` receives ``v_cache``'s rows (and a ``scatter_`` into ``k_means``
    loses its rows the same way);
    ``tests/model/test_generation.py::test_compiled_decode_equals_eager_at_every_batch_size`` checks it.
    """
    b, tq, hq, d = q.shape
    c, hkv = k_cache.shape[1], k_cache.shape[2]
    dev = q.device
    pos = first.long()[:, None] + torch.arange(tq, device=dev)  # [B, Tq]
    p = _slot_positions(first + tq, c)  # [B, C]
    vis = (p[:, None, :] >= 0) & (p[:, None, :] <= pos[:, :, None]) & (p[:, None, :] >= pos[:, :, None] - left)
    blocks = [(k_cache, v_cache, vis)]  # (keys, values [B, K, Hkv, D], visible [B, Tq, K])
    if means is not None:
        n_vis = (pos - left).clamp(min=0) // group_size  # groups wholly before the window
        blocks.append((*means, torch.arange(means[0].shape[1], device=dev)[None, None, :] < n_vis[:, :, None]))
    rep = hq // hkv
    qh = q.float().view(b, tq, hkv, rep, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, rep, Tq, D]

    def heads(x):  # [B, K, Hkv, D] -> [B, Hkv, 1, K, D] fp32
        return x.float().permute(0, 2, 1, 3)[:, :, None]

    s = torch.cat([((qh @ heads(keys).transpose(-1, -2)) * scale).masked_fill(~m[:, None, None], float("-inf"))
                   for keys, _, m in blocks], dim=-1)  # [B, Hkv, rep, Tq, K in all]: scores, not the cache
    p, lse = softmax_lse_(s)  # the blockwise core's softmax: lse [B, Hkv, rep, Tq]
    out = p[..., :c] @ heads(v_cache)
    if means is not None:
        out = out + p[..., c:] @ heads(means[1])
    out = out.permute(0, 3, 1, 2, 4).reshape(b, tq, hq, d)
    return out.to(q.dtype), lse.reshape(b, hq, tq)


# --------------------------------------------------------------------------- checks


def _check_cache(q, k_cache, k, v, cache_seqlens, means, sums, left, group_size, summaries):
    b, tq, _, d = q.shape
    c, hkv = k_cache.shape[1], k_cache.shape[2]
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), op=OP)
    if cache_seqlens.shape[0] != b or cache_seqlens.device != q.device:
        raise ValueError(f"{OP}: cache_seqlens must be an int32 [B={b}] tensor on {q.device}, "
                         f"got {tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
    if (k is None) != (v is None):
        raise ValueError(f"{OP}: pass both k and v (the new positions) or neither")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, ndim=4, op=OP)
            if tuple(t.shape) != (b, tq, hkv, d):
                raise ValueError(f"{OP}: {name} must have shape {(b, tq, hkv, d)} ([B, Tq, Hkv, D]), "
                                 f"got {tuple(t.shape)}")
            if t.dtype != k_cache.dtype or t.device != k_cache.device:
                raise TypeError(f"{OP}: {name} must match k_cache's dtype and device")
    if d > 256:
        raise ValueError(f"{OP}: head dim D must be <= 256, got {d}")
    if left >= 0 and c < left + tq:
        raise ValueError(f"{OP}: the ring holds C={c} positions but a window of left={left} over "
                         f"Tq={tq} new queries needs C >= left + Tq = {left + tq}")
    if summaries:
        if group_size is None:
            raise ValueError(f"{OP}: summaries=True needs group_size")
        if left < 0:
            raise ValueError(f"{OP}: summaries=True needs a finite window (left >= 0)")
        if means[0] is None or means[1] is None:
            raise ValueError(f"{OP}: summaries=True needs k_means and v_means ([B, NG, Hkv, D])")
        for name, t in zip(("k_means", "v_means"), means):
            check_tensor(name, t, ndim=4, op=OP)
            if t.shape[0] != b or tuple(t.shape[2:]) != (hkv, d) or t.dtype != k_cache.dtype:
                raise ValueError(f"{OP}: {name} must be [B={b}, NG, Hkv={hkv}, D={d}] in {k_cache.dtype}, "
                                 f"got {tuple(t.shape)} {t.dtype}")
        if k is not None:
            for name, t in zip(("k_sum", "v_sum"), sums):
                if t is None:
                    raise ValueError(f"{OP}: appending with summaries=True needs {name} ([B, Hkv, D] fp32)")
                check_tensor(name, t, ndim=3, dtypes=(torch.float32,), op=OP)
                if tuple(t.shape) != (b, hkv, d):
                    raise ValueError(f"{OP}: {name} must have shape {(b, hkv, d)}, got {tuple(t.shape)}")
    if cache_seqlens.device.type != "cuda" and not torch.compiler.is_compiling():
        _check_seqlen_values(cache_seqlens, tq, c, left, k is not None, means[0] if summaries else None,
                             group_size)


def _check_seqlen_values(seqlens, tq, c, left, append, k_means, group_size) -> None:
    """Value checks that read the tensor: off CUDA only (on CUDA they would synchronise)."""
    lo, hi = int(seqlens.min()), int(seqlens.max())
    if not append and lo < 0:
        raise ValueError(f"{OP}: cache_seqlens must be >= 0 without k, v (negative = left padding "
                         f"still to append), got {lo}")
    if not append and lo < tq:
        raise ValueError(f"{OP}: without k, v the {tq} queries are the last positions of the cache, "
                         f"so cache_seqlens must be >= Tq={tq}, got {lo}")
    total = hi + (tq if append else 0)
    if left < 0 and total > c:
        raise ValueError(f"{OP}: with an unbounded window the ring must hold every position: "
                         f"C={c} < {total}")
    if k_means is not None and total // group_size >= k_means.shape[1]:
        raise ValueError(f"{OP}: k_means has {k_means.shape[1]} rows but {total} positions need "
                         f"{total // group_size + 1} (NG > length // G)")


# --------------------------------------------------------------------------- public op


def swa_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    k_means: torch.Tensor | None = None,
    v_means: torch.Tensor | None = None,
    k_sum: torch.Tensor | None = None,
    v_sum: torch.Tensor | None = None,
    window: int | tuple[int, int] = -1,
    group_size: int | None = None,
    summaries: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal GMHA of ``Tq`` new queries against a bounded cache (decode, chunked prefill).

    Args:
        q: ``[B, Tq, Hq, D]``. With ``k, v`` (``[B, Tq, Hkv, D]``) the queries are at
            positions ``cache_seqlens[b] + j`` and ``k, v`` are appended there first; without
            them the queries are the last ``Tq`` positions already in the cache.
        k_cache, v_cache: ``[B, C, Hkv, D]`` rings (see the module doc), updated in place.
        cache_seqlens: ``[B]`` int32, positions each row holds before the call (not advanced;
            ``-p``: the first ``p`` of the appended positions are left padding).
        k_means, v_means, k_sum, v_sum: the summary cache (``summaries=True``), updated in place.
        window: ``left`` or ``(left, 0)``: query ``i`` sees positions ``i - left .. i``
            (``-1``: unbounded, then ``C`` must hold every position).
        group_size, summaries, softmax_scale, backend: as in :func:`dasg_kernels.swa_attention`.
        return_lse: also return ``lse [B, Hq, Tq]`` fp32.

    Returns:
        ``out [B, Tq, Hq, D]`` in ``q.dtype``, equal to ``swa_attention`` over each row's
        whole history (same window, groups and summaries). Forward only (no autograd).
    """
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window, 0)
    left, right = check_window(OP, window)
    if right not in (0, -1):
        raise ValueError(f"{OP}: a cache holds no future keys: window[1] must be 0, got {right}")
    _, _, scale = validate_attention(OP, q, k_cache, v_cache, window=(left, 0), causal=True,
                                     group_size=group_size, summaries=summaries, softmax_scale=softmax_scale,
                                     decode=True)
    if v_cache.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"{OP}: the bounded cache needs one head dim for keys and values, got k_cache "
                         f"{k_cache.shape[-1]} and v_cache {v_cache.shape[-1]} (swa_decode takes a value head "
                         f"dim of its own)")
    means, sums = (k_means, v_means), (k_sum, v_sum)
    _check_cache(q, k_cache, k, v, cache_seqlens, means, sums, left, group_size, summaries)
    be = resolve_backend(backend, q, k_cache, v_cache, op=OP)  # the ring kernel takes any D <= 256
    tq = q.shape[1]
    with torch.no_grad():
        if k is not None:
            first = cache_seqlens
            pos = first.long()[:, None] + torch.arange(tq, device=q.device)
            _append_ring(k_cache, k, pos)
            _append_ring(v_cache, v, pos)
            if summaries:
                _update_groups(k, k_means, k_sum, first, group_size)
                _update_groups(v, v_means, v_sum, first, group_size)
        else:
            first = cache_seqlens - tq
        lft = left if left >= 0 else k_cache.shape[1] + tq  # unbounded: every slot of the ring
        summary = means if summaries else None
        if be == "torch":
            out, lse = _attend_torch(q, k_cache, v_cache, summary, first, lft, group_size, scale)
        else:
            out, lse = _attend_triton(q, k_cache, v_cache, summary, cache_seqlens, -tq if k is None else 0,
                                      lft, group_size, scale)
    return (out, lse) if return_lse else out


def _attend_triton(q, k_cache, v_cache, summary, cache_seqlens, seq_offset, left, group_size, scale):
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if summary is not None:
        tensors.update(k_means=summary[0], v_means=summary[1])
    check_last_dim_contiguous(OP, **tensors)
    host.check_row_stride(OP, **tensors)

    def fwd(q, k_cache, v_cache, k_means, v_means):
        return ops.bounded_cache_attention(q, k_cache, v_cache, k_means, v_means, cache_seqlens, seq_offset, left,
                                           group_size or 1, scale)

    tensors = (q, k_cache, v_cache, *(summary or (None, None)))
    # the interpreter's bf16 dots are wrong: fp32 kernels, output rounded
    return bf16_via_fp32(fwd, *tensors) if interpreted_bf16(q) else fwd(*tensors)
