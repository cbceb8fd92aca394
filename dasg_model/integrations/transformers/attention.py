"""The ``"dasg"`` entry of transformers' ``AttentionInterface``: :func:`dasg_attention_forward`
runs the layout the ``"dasg"`` mask described (plain, valid lengths, rolled rows, packed
documents) through the DASG kernels, or transformers' SDPA / eager path with the cause."""
from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F

from dasg_kernels import swa_attention, swa_attention_varlen, swa_attention_with_kvcache, swa_decode
from dasg_kernels.attention import SUPPORTED_HEAD_DIMS
from dasg_model.integrations.transformers.calls import backend_for, count_call, fall_back
from dasg_model.integrations.transformers.experts import check_experts_bypass
from dasg_model.integrations.transformers.masks import fallback_reason, is_tracing, packed_max_seqlen
from dasg_model.packing import cu_seqlens_from_starts, doc_starts_from_positions, host_int
from dasg_model.padding import roll_rows, run_start

__all__ = ["VALUE_HEAD_DIM_OPS", "dasg_attention_forward"]


_UNSET: Any = object()


class _AmbiguousWindow(Exception):
    pass


def _config_window(module: torch.nn.Module) -> int | None:
    """The window of a layer whose attention call names none, from the model config.

    Some models (e.g. PhiMoE) build a sliding-window *mask* from ``config.sliding_window``
    but pass no ``sliding_window`` to the attention; our mask function returns ``None`` for
    the plain pattern, so the window must come from the config: the layer's entry of
    ``config.layer_types`` when there is one, else the config's window for every layer.
    """
    cfg = getattr(module, "config", None)
    w = getattr(cfg, "sliding_window", None)
    if not isinstance(w, int) or isinstance(w, bool) or w <= 0 or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None:
        return w
    idx = getattr(module, "layer_idx", None)
    if not isinstance(idx, int) or not 0 <= idx < len(layer_types):
        raise _AmbiguousWindow(f"config.layer_types is set but {type(module).__name__} has no layer_idx")
    return w if layer_types[idx] == "sliding_attention" else None


def _sliding_window(module: torch.nn.Module, sliding_window: Any) -> int | None:
    """The layer's window: the ``sliding_window`` the model passed (``None`` included), else
    the module's ``sliding_window`` attribute, else :func:`_config_window`."""
    if sliding_window is not _UNSET:
        w = sliding_window
    elif hasattr(module, "sliding_window"):
        w = module.sliding_window
    else:
        w = _config_window(module)
    if w is None or isinstance(w, bool) or not isinstance(w, int) or w <= 0:
        return None
    return w


def _pattern_mask(query: torch.Tensor, key: torch.Tensor, is_causal: bool, window: int | None) -> torch.Tensor | None:
    """The additive ``[1, 1, Tq, Tk]`` mask of the plain pattern (queries = last ``Tq`` keys)."""
    if not is_causal and window is None:
        return None
    tq, tk = query.shape[2], key.shape[2]
    qp = torch.arange(tq, device=query.device)[:, None] + (tk - tq)  # the queries' key columns
    kp = torch.arange(tk, device=query.device)[None, :]
    keep = torch.ones(tq, tk, dtype=torch.bool, device=query.device)
    if window is not None:  # causal: keys qp - W + 1 .. qp; bidirectional: qp - W .. qp + W
        keep &= kp >= qp - (window - 1 if is_causal else window)
        if not is_causal:
            keep &= kp <= qp + window
    if is_causal:
        keep &= kp <= qp
    return torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~keep, torch.finfo(query.dtype).min
    )[None, None]


# --------------------------------------------------------------------------- attention: layouts


class _Layout:
    """How one attention call runs: ``kind`` in ``plain | lengths | rolled | varlen``."""

    def __init__(self, kind: str, **data: Any) -> None:
        self.kind = kind
        self.__dict__.update(data)


def _read_layout(attention_mask, query, key, kwargs) -> _Layout | str:
    """The layout the ``"dasg"`` mask function (or the keywords) describe, or why not."""
    tq, tk = query.shape[2], key.shape[2]
    fa = [kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if any(x is not None for x in fa):
        if any(x is None for x in fa):
            return "incomplete packed-sequence keywords (need cu_seq_lens_q/k and max_length_q/k)"
        if tq != tk:
            return "packed sequences (cu_seq_lens) with a KV cache"
        # the caller's bounds: checked by the op (one host read in eager mode)
        return _Layout("varlen", cu_q=fa[0], cu_k=fa[1], max_q=fa[2], max_k=fa[3], validate=True)
    m = attention_mask
    if m is None:
        pos = kwargs.get("position_ids")
        if tq == tk and query.shape[0] == 1 and isinstance(pos, torch.Tensor) and pos.dim() == 2 \
                and pos.shape == (1, tq) and tq > 1:
            return _restarts_layout(pos)
        return _Layout("plain")
    ours = m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1 and m.dtype in (torch.int32, torch.uint8)
    if ours and m.dtype == torch.int32 and m.shape[0] == 1 and m.shape[3] != 1:  # packed documents
        if tq != tk:
            return "packed sequences with a KV cache"
        if m.shape[3] == 0:  # compiling: documents from position_ids (none given: one per row)
            pos = kwargs.get("position_ids")
            if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == tq:
                cu, mx = cu_seqlens_from_starts(doc_starts_from_positions(pos, query.shape[0]), sync=False)
                return _Layout("varlen", cu_q=cu, cu_k=cu, max_q=mx, max_k=mx)
            return _Layout("plain")
        mx = packed_max_seqlen(m, tq)
        cu = m.view(-1)
        return _Layout("varlen", cu_q=cu, cu_k=cu, max_q=mx, max_k=mx)
    if ours and m.dtype == torch.int32 and m.shape == (key.shape[0], 1, 1, 1):
        return _Layout("lengths", n=m.view(-1))
    if ours and m.dtype == torch.uint8 and m.shape == (key.shape[0], 1, 1, tk):
        return _Layout("rolled", valid=m.view(m.shape[0], tk).bool())
    if m.dim() == 4:
        return fallback_reason(m) or "a 4-D attention mask (a custom pattern passed by the model or the caller)"
    return f"an attention_mask of shape {tuple(m.shape)} and dtype {m.dtype} the 'dasg' mask function did not build"


_POS_SEEN: list = [None, None]  # (weakref to the last position_ids seen, its layout)


def _restarts_layout(pos: torch.Tensor) -> _Layout:
    """One row whose ``position_ids`` may restart (packed documents while transformers' mask
    did not say so, e.g. with a cache, as in its flash-attention path, which looks only at
    batch size 1): varlen over the documents. Eager: one host read per ``position_ids``
    tensor (the layers share it); compiling: no read, ``T + 1`` slots."""
    import weakref

    start = doc_starts_from_positions(pos, 1)
    if is_tracing():
        cu, mx = cu_seqlens_from_starts(start, sync=False)
        return _Layout("varlen", cu_q=cu, cu_k=cu, max_q=mx, max_k=mx)
    ref, layout = _POS_SEEN
    if ref is not None and ref() is pos:
        return layout
    cu, mx = cu_seqlens_from_starts(start, sync=True)
    layout = _Layout("plain") if cu.numel() == 2 else _Layout("varlen", cu_q=cu, cu_k=cu, max_q=mx, max_k=mx)
    _POS_SEEN[:] = [weakref.ref(pos), layout]
    return layout


# --------------------------------------------------------------------------- attention: capabilities

#: Ops of dasg_kernels that take a value head dim other than the query / key one (DeepSeek
#: MLA: 192 / 128): every attention op but the bounded-cache one.
VALUE_HEAD_DIM_OPS = frozenset({"swa_attention", "swa_decode", "swa_attention_varlen"})


def _value_dim_ok(op: str) -> bool:
    """Whether ``op`` takes a value head dim other than the query / key one (static: no probe
    launch, the same answer while compiling)."""
    return op in VALUE_HEAD_DIM_OPS


# --------------------------------------------------------------------------- attention: runs


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, left, causal, scale, backend, validate):
    """:func:`dasg_kernels.swa_attention_varlen` (flash-attn varlen layout ``[total, H, D]``);
    ``validate=False`` for the ``cu_seqlens`` built here (no host read per layer)."""
    return swa_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window=(left, 0 if causal else -1), causal=causal,
                                softmax_scale=scale, backend=backend, validate=validate)


def _cache_attention(q, k, v, n, left, scale, backend, *, append: bool):
    """Causal attention of ``q [B, Tq, Hq, D]``, the last ``Tq`` of each row's ``n[b]`` valid
    keys ``k, v [B, Tk, Hkv, D]`` (columns ``< n[b]``), through the bounded-cache op (the
    cache is a ring of ``Tk`` slots; nothing wraps since ``n <= Tk``). ``append`` (``k, v``
    are our own copies): query positions may be negative (padding queries, output 0)."""
    tq, c = q.shape[1], k.shape[1]
    if left >= 0 and c < left + tq:  # the op wants room for the whole window of every query
        extra = left + tq - c
        k, v = F.pad(k, (0, 0, 0, 0, 0, extra)), F.pad(v, (0, 0, 0, 0, 0, extra))
        append = True  # copies now
    if not append:
        return swa_attention_with_kvcache(q, k, v, n.to(torch.int32), window=left, softmax_scale=scale,
                                          backend=backend)
    first = n.long() - tq
    idx = (first[:, None] + torch.arange(tq, device=q.device)) % k.shape[1]
    k_new = k.gather(1, idx[:, :, None, None].expand(-1, -1, *k.shape[2:]))
    v_new = v.gather(1, idx[:, :, None, None].expand(-1, -1, *v.shape[2:]))
    return swa_attention_with_kvcache(q, k, v, first.to(torch.int32), k_new, v_new, window=left, softmax_scale=scale,
                                      backend=backend)


def _row_mask(out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return out * keep[:, :, None, None].to(out.dtype)


def _run(layout: _Layout, query, key, value, is_causal, window, scale, backend) -> torch.Tensor:
    """``query [B, Hq, Tq, D]``, ``key, value [B, Hkv, Tk, D]`` -> ``[B, Tq, Hq, Dv]``."""
    b, _, tq, _ = query.shape
    tk = key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    left = -1 if window is None else window - 1
    tracing = is_tracing()
    if layout.kind == "varlen":
        flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
        out = _varlen(*flat, layout.cu_q, layout.cu_k, host_int(layout.max_q, tq), host_int(layout.max_k, tk),
                      left, bool(is_causal), scale, backend, getattr(layout, "validate", False))
        return out.view(b, tq, *out.shape[1:])
    if layout.kind == "plain":
        if tq == tk:
            return swa_attention(q, k, v, window=(left, -1), causal=bool(is_causal), softmax_scale=scale,
                                 backend=backend)
        if not tracing:
            return swa_decode(q, k, v, window=(left, -1), causal=bool(is_causal), softmax_scale=scale,
                              backend=backend)
        n = torch.full((b,), tk, dtype=torch.int32, device=q.device)
        return _cache_attention(q, k, v, n, left, scale, backend, append=False)
    if layout.kind == "lengths":
        n = layout.n
        if tq == tk:  # right padding: the pads come last, a causal query never sees them
            out = swa_attention(q, k, v, window=(left, 0), causal=True, softmax_scale=scale, backend=backend)
            return _row_mask(out, torch.arange(tq, device=q.device)[None] < n[:, None])
        return _cache_attention(q, k, v, n, left, scale, backend, append=False)
    # rolled: each row's valid run moved to column 0
    valid = layout.valid
    start = run_start(valid)
    k, v = roll_rows(k, start), roll_rows(v, start)
    if tq == tk:
        out = swa_attention(roll_rows(q, start), k, v, window=(left, 0), causal=True, softmax_scale=scale,
                            backend=backend)
        return _row_mask(roll_rows(out, -start), valid)
    return _cache_attention(q, k, v, valid.sum(1), left, scale, backend, append=True)


def _layout_mask(layout: _Layout, query, key, is_causal, window) -> torch.Tensor | None:
    """The additive ``[B or 1, 1, Tq, Tk]`` mask of ``layout`` for the fallback (output_attentions
    etc.): same documents, same causal / sliding pattern, same valid keys."""
    if layout.kind == "plain":
        return _pattern_mask(query, key, is_causal, window)
    b, tq, tk, dev = query.shape[0], query.shape[2], key.shape[2], query.device
    cols = torch.arange(tk, device=dev)
    if layout.kind == "varlen":
        def docs(cu, t):
            idx = torch.arange(b * t, device=dev)
            d = torch.searchsorted(cu.long(), idx, right=True) - 1
            return d.view(b, t), (idx - cu.long()[d]).view(b, t)
        qd, qp = docs(layout.cu_q, tq)
        kd, kp = docs(layout.cu_k, tk)
        keep = qd[:, :, None] == kd[:, None, :]
    else:
        valid = cols[None] < layout.n[:, None] if layout.kind == "lengths" else layout.valid
        start = run_start(valid) if layout.kind == "rolled" else torch.zeros(b, dtype=torch.long, device=dev)
        n = valid.sum(1)
        kp = cols[None] - start[:, None]
        qp = (n - tq)[:, None] + torch.arange(tq, device=dev)[None]
        keep = valid[:, None, :].expand(b, tq, tk)
    if is_causal:
        keep = keep & (kp[:, None, :] <= qp[:, :, None])
    if window is not None:
        keep = keep & (kp[:, None, :] > qp[:, :, None] - window)
    return torch.zeros(keep.shape, dtype=query.dtype, device=dev).masked_fill(
        ~keep, torch.finfo(query.dtype).min)[:, None]


def _attention_unsupported(layout, query, key, value, dropout, softcap, is_causal, window, backend,
                           kwargs) -> str | None:
    if not isinstance(layout, _Layout):
        return layout
    if kwargs.get("output_attentions", False):
        return "output_attentions=True"
    if dropout and dropout > 0:
        return "attention dropout > 0"
    if softcap is not None:
        return "logit softcap"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sinks"
    if kwargs.get("position_bias") is not None:
        return "a position bias"
    tq, tk = query.shape[2], key.shape[2]
    if tq > tk:
        return "more queries than keys"
    if layout.kind in ("lengths", "rolled") and not is_causal:
        return "padding with bidirectional attention"
    if tq < tk and layout.kind != "varlen" and torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value)
    ):
        return "gradients through KV-cache attention (the cache ops are forward-only)"
    if query.shape[-1] != key.shape[-1]:
        return "different query and key head sizes"
    if query.shape[1] % key.shape[1]:
        return "query heads not a multiple of key/value heads"
    if not is_causal and window is not None:
        return "a bidirectional sliding window"
    d = query.shape[-1]
    for what, dd in (("head dim", d), ("value head dim", value.shape[-1])):
        if backend != "torch" and dd not in SUPPORTED_HEAD_DIMS:
            # "auto" would quietly run the PyTorch path: the model's own path is as good
            return f"{what} {dd} (the Triton kernels need a multiple of 8, at most 256)"
    if value.shape[-1] != d:
        op = {"varlen": "swa_attention_varlen", "plain": "swa_attention" if tq == tk else "swa_decode"}.get(
            layout.kind, "swa_attention" if tq == tk else "swa_attention_with_kvcache")
        if op == "swa_decode" and is_tracing():
            op = "swa_attention_with_kvcache"
        if not _value_dim_ok(op):
            return f"a value head dim ({value.shape[-1]}) other than the query / key one ({d}): {op} does not take it"
    return None


def _attention_fallback(module, query, key, value, attention_mask, layout, dropout, scaling, softcap, is_causal,
                        window, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(layout, _Layout):  # one of our descriptions (or none): the real mask of the same pattern
        attention_mask = _layout_mask(layout, query, key, is_causal, window)
    for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    needs_eager = (kwargs.get("output_attentions", False) or softcap is not None
                   or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if needs_eager and eager is not None:
        extra = {"softcap": softcap} if softcap is not None else {}
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


def dasg_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = _UNSET,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"dasg"`` entry of transformers' ``AttentionInterface``.

    ``query [B, Hq, Tq, D]``, ``key [B, Hkv, Tk, D]``, ``value [B, Hkv, Tk, Dv]`` ->
    ``(out [B, Tq, Hq, Dv], None)``. The sliding window is the one the model passes, else the
    module's attribute, else the model config's (see :func:`_config_window`); a layer whose
    window cannot be told is an error, never a silently different pattern.
    """
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    try:
        window = _sliding_window(module, sliding_window)
    except _AmbiguousWindow as e:
        raise RuntimeError(f"attn_implementation='dasg': cannot tell this layer's sliding window ({e}); "
                           f"use another attn_implementation for this model") from None
    if not is_tracing():
        check_experts_bypass(module)
    backend = backend_for(module)
    layout = _read_layout(attention_mask, query, key, kwargs)
    reason = _attention_unsupported(layout, query, key, value, dropout, softcap, is_causal, window, backend, kwargs)
    if reason is not None:
        fall_back("attention", reason)
        return _attention_fallback(module, query, key, value, attention_mask, layout, dropout, scaling, softcap,
                                   is_causal, window, dict(kwargs))
    count_call("attention")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    return _run(layout, query, key, value, is_causal, window, scale, backend), None
