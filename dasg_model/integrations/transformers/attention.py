"""Run the DASG kernels inside Hugging Face transformers models.

``register()`` adds ``"dasg"`` to transformers' ``AttentionInterface`` (and the matching
``AttentionMaskInterface``) and to its ``ExpertsInterface``, so that existing models run our
kernels with their existing weights::

    from dasg_model.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="dasg", experts_implementation="dasg")

(or ``model.set_attn_implementation("dasg")`` / ``model.set_experts_implementation("dasg")`` on
a loaded model).

Attention (``q, k, v [B, H, T, D]`` from transformers, passed to the kernels as transposed
views): honours ``is_causal``, GQA, ``scaling`` and the causal ``sliding_window``
(transformers' window ``W`` lets query ``i`` see keys ``i - W + 1 .. i``, i.e. our
``window=(W - 1, 0)``); the window comes from the ``sliding_window`` keyword, else the
module's ``sliding_window`` attribute (Qwen2), else the config (see :func:`_config_window`).

The ``"dasg"`` mask function never builds a ``T x T`` mask for a pattern the kernels cover.
It hands the attention a small description instead (private; see :func:`dasg_mask`), a
4-D tensor with two unit dims in a dtype no transformers mask uses, so that transformers
passes it on unchanged (``generate`` builds the mask once, then the forward gets it again):

- nothing (``None``): plain causal / sliding causal, the queries are the last keys;
  dense :func:`dasg_kernels.swa_attention`, or :func:`dasg_kernels.swa_decode` against a
  KV cache;
- a ``[B, 1, 1, Tk]`` uint8 mask of the valid keys (padding; a static cache's unwritten tail), one
  run of tokens per row (left or right padding): each row is rolled so its run starts at
  column 0 (a gather), the kernels run, the rows are rolled back; padding rows are 0. Windows
  follow each row's first real token, as in transformers (its RoPE positions are the model's
  own, applied before the attention); padding is never attended;
- ``[B, 1, 1, 1]`` int32 valid lengths (a ``StaticCache`` / ``StaticSlidingWindowLayer`` without
  padding): :func:`dasg_kernels.swa_attention_with_kvcache` on each row's valid length;
- ``[1, 1, 1, N + 1]`` int32 ``cu_seqlens`` (packed sequences: ``position_ids`` that restart, e.g.
  ``DataCollatorWithFlattening``): :func:`dasg_kernels.swa_attention_varlen`, a restart
  being a document boundary as in transformers' flash-attention path. The
  ``cu_seq_lens_q/k`` + ``max_length_q/k`` keywords, when the model passes them, are used as
  they are.

Under ``torch.compile`` the decision reads only the config, the keywords, the shapes and
the mask function's identity (never mask values, never closures, which dynamo cannot read):
a 2-D ``attention_mask`` is taken to be one run per row, and a full-sequence call without
one whose mask function may hold a packed-sequence overlay takes its documents from the
``position_ids`` keyword (``cu_seqlens`` sized for the worst case of ``B * T`` documents,
``max_seqlen = T``: no host sync).

Everything else runs transformers' own SDPA (or the model's eager) path, with a one-time
:class:`DASGFallbackWarning` naming the real cause: chunked attention, ``or``/``and`` mask
overlays (e.g. bidirectional image tokens), padding with holes or with bidirectional
attention, ``output_attentions``, attention dropout, softcap, attention sinks, gradients
through KV-cache attention, a head dim the Triton kernels lack (with ``backend="triton"``;
``"auto"`` also falls back there), query / value head dims that differ while the kernels do
not take them, and for experts biases, non-SwiGLU or transposed / interleaved layouts,
post-expert norms, expert parallelism and sizes that are not multiples of 16 on the Triton
path. A model whose experts bypass transformers' ``ExpertsInterface`` (Llama-4's
``Llama4TextExperts``) gets a one-time warning that ``experts_implementation="dasg"`` has no
effect.

:func:`call_counts` tells how many calls ran our kernels and how many fell back, and why.

Host synchronisations kept (outside ``torch.compile``; none under it): the mask function
reads the 2-D padding mask (all ones? one run per row?) and, for packed sequences, the
number of documents and ``max_seqlen`` in one read, once per mask built by the model (one
per forward and attention type), not per layer; a one-row full-sequence call without a
mask reads its ``position_ids`` once per forward for restarts (packed documents the mask
did not flag, e.g. with a cache: transformers' flash-attention semantics); ``max_length_q/k``
keywords given as tensors are read once per layer; the experts path adds none.

Under compile, packed documents from ``position_ids`` get ``cu_seqlens`` with ``B*T + 1``
entries (trailing empty documents) and ``max_seqlen = T``; pass the collator's
``cu_seq_lens_q/k`` + ``max_length_q/k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``)
to give the exact ones.
"""
from __future__ import annotations

import inspect
import math
import sys
import warnings
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from dasg_kernels import expert_ffn, swa_attention, swa_attention_varlen, swa_attention_with_kvcache, swa_decode
from dasg_kernels.attention import SUPPORTED_HEAD_DIMS
from dasg_kernels.backend import BACKENDS, resolve_backend
from dasg_kernels.reference import local_mask
from dasg_model.packing import cu_seqlens_from_starts as _cu_seqlens_from_starts
from dasg_model.packing import doc_starts_from_positions as _doc_starts_from_positions
from dasg_model.packing import host_int as _host_int
from dasg_model.padding import roll_rows, run_start

__all__ = [
    "DASGFallbackWarning",
    "call_counts",
    "dasg_attention_forward",
    "dasg_experts_forward",
    "dasg_mask",
    "enable",
    "register",
    "reset_call_counts",
]

NAME = "dasg"
_SETTINGS: dict[str, Any] = {"backend": "auto"}


def _backend(module: torch.nn.Module) -> str:
    """The backend :func:`enable` set on this model's modules, else :func:`register`'s."""
    return module.__dict__.get("_dasg_backend", _SETTINGS["backend"])


_CALLS: Counter = Counter()
_REASONS: dict[str, Counter] = {"attention": Counter(), "experts": Counter()}
_WARNED: set[str] = set()


class DASGFallbackWarning(UserWarning):
    """A call was routed to transformers' own implementation (the message says why)."""


def call_counts() -> dict[str, Any]:
    """Calls so far: ``attention``, ``attention_fallback``, ``experts``, ``experts_fallback``
    (ints), and ``attention_fallback_reasons`` / ``experts_fallback_reasons``: ``{reason: calls}``."""
    out: dict[str, Any] = {k: _CALLS[k] for k in ("attention", "attention_fallback", "experts", "experts_fallback")}
    for kind, reasons in _REASONS.items():
        out[f"{kind}_fallback_reasons"] = dict(reasons)
    return out


def reset_call_counts() -> None:
    _CALLS.clear()
    for reasons in _REASONS.values():
        reasons.clear()


def _warn_once(kind: str, reason: str, *, fallback: bool = True) -> None:
    key = f"{kind}: {reason}"
    if key in _WARNED:
        return
    _WARNED.add(key)
    msg = (f"dasg {kind}: not covered by the DASG kernels: {reason}; this call (and later ones like it) "
           f"runs transformers' own implementation instead") if fallback else f"dasg {kind}: {reason}"
    warnings.warn(msg, DASGFallbackWarning, stacklevel=4)


def _fall_back(kind: str, reason: str) -> None:
    _CALLS[f"{kind}_fallback"] += 1
    _REASONS[kind][reason] += 1
    _warn_once(kind, reason)


# --------------------------------------------------------------------------- masks


def _is_tracing() -> bool:
    """Under tracing / compilation mask values (and closures) cannot be read."""
    if torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _probe_rows(q_length: int) -> list[int]:
    rows = {0, 1, q_length // 4, q_length // 2, (3 * q_length) // 4, q_length - 2, q_length - 1}
    return sorted(r for r in rows if 0 <= r < q_length)


def _plain_pattern(mask_function, q_length: int, kv_length: int, q_offset: int, kv_offset: int,
                   local_size: int | None, device) -> bool:
    """True when ``mask_function`` is plain causal (sliding, if ``local_size``) on probe rows
    (reads values: only for a mask function :func:`_read_pattern` does not know, outside
    compilation). Also requires the queries to be the last ``q_length`` key positions."""
    if not isinstance(q_offset, int) or not isinstance(kv_offset, int):
        return False
    if q_offset - kv_offset != kv_length - q_length:
        return False
    q = torch.tensor(_probe_rows(q_length), device=device) + q_offset
    kv = torch.arange(kv_length, device=device) + kv_offset
    zero = torch.zeros((), dtype=torch.long, device=device)
    try:
        got = mask_function(zero, zero, q[:, None], kv[None, :])
        got = torch.as_tensor(got, device=device).expand(q.shape[0], kv.shape[0])
    except Exception:  # an exotic mask function: build the real mask
        return False
    want = kv[None, :] <= q[:, None]
    if local_size is not None:
        want = want & (kv[None, :] > q[:, None] - local_size)
    return bool(torch.equal(got.bool(), want))


class _Pattern:
    """What a transformers mask function says: causal or not, a window, packed documents,
    or why our kernels cannot run it (``reason``)."""

    def __init__(self) -> None:
        self.causal = False
        self.bidirectional = False
        self.window: int | None = None
        self.packed: Any = None  # the [B, T] document ids; "maybe" under compile
        self.reason: str | None = None


_OVERLAY_REASONS = {
    "chunked_overlay": "chunked attention (attention_chunk_size)",
    "blockwise_overlay": "bidirectional blocks inside a causal mask (block_sequence_ids, e.g. image tokens)",
    "or_masks": "an or-mask overlay on the causal pattern (or_mask_function / block_sequence_ids, e.g. "
                "bidirectional image tokens)",
    "sliding_window_bidirectional_overlay": "a bidirectional sliding window",
}


def _cells(fn) -> dict[str, Any]:
    closure = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in closure)))


def _parse(fn, out: _Pattern) -> bool:
    """Read ``fn`` (eager only: reads closures) into ``out``; False for a function we do not know."""
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        out.causal = True
        return True
    if fn is getattr(mu, "bidirectional_mask_function", None):
        out.bidirectional = True
        return True
    outer = getattr(fn, "__qualname__", "").split(".<locals>.")[0]
    try:
        cells = _cells(fn)
    except Exception:
        return False
    if outer == "and_masks" and "mask_functions" in cells:
        return all(_parse(g, out) for g in cells["mask_functions"])
    if outer == "sliding_window_overlay" and isinstance(cells.get("sliding_window"), int):
        w = cells["sliding_window"]
        out.window = w if out.window is None else min(out.window, w)
        return True
    if outer == "packed_sequence_mask_function" and isinstance(cells.get("packed_sequence_mask"), torch.Tensor):
        out.packed = cells["packed_sequence_mask"]
        return True
    if outer == "remap_positions_for_packed_sequence" and callable(cells.get("mask_function")):
        # positions restart per document; within one they step by 1, so windows are the
        # document-local ones the varlen op applies
        return _parse(cells["mask_function"], out)
    if outer in _OVERLAY_REASONS:
        out.reason = out.reason or _OVERLAY_REASONS[outer]
        return True
    return False


def _read_pattern(mask_function, *, q_length, kv_length, q_offset, kv_offset, local_size, attention_mask,
                  config, use_vmap, device) -> _Pattern:
    """The pattern of ``mask_function``: from its closures outside compilation (exact); under
    ``torch.compile`` from its identity, ``local_size``, ``use_vmap`` and the config."""
    from transformers import masking_utils as mu

    p = _Pattern()
    fn = mu.causal_mask_function if mask_function is None else mask_function
    if not _is_tracing():
        if _parse(fn, p):
            if not p.causal and not p.bidirectional and p.reason is None:
                p.reason = "a mask function without a causal or bidirectional base"
            return p
        p = _Pattern()
        if _plain_pattern(fn, q_length, kv_length, q_offset, kv_offset, local_size, device):
            p.causal, p.window = True, local_size
        else:
            p.reason = "a custom mask function (a pattern other than causal / sliding causal / packed)"
        return p
    # compiling: closures cannot be read; identity, keywords and config decide
    if fn is mu.causal_mask_function:
        p.causal = True
        return p
    if fn is getattr(mu, "bidirectional_mask_function", None):
        p.bidirectional = True
        return p
    try:  # (dynamo answers getattr(fn, "__qualname__", "") with "" for some closures)
        name = fn.__qualname__.split(".<locals>.")[0]
    except AttributeError:
        name = ""
    if use_vmap:
        p.reason = "an and/or_mask_function overlay on the causal pattern (e.g. bidirectional image tokens)"
    elif name == "or_masks":
        p.reason = _OVERLAY_REASONS["or_masks"]
    elif name == "and_masks":
        chunk = getattr(config, "attention_chunk_size", None)
        if local_size is not None and chunk is not None and local_size == chunk \
                and local_size != getattr(config, "sliding_window", None):
            p.reason = _OVERLAY_REASONS["chunked_overlay"]
        elif getattr(config, "is_causal", True) is False:
            p.reason = "a bidirectional mask with an overlay (cannot be read under torch.compile)"
        else:
            p.causal, p.window = True, local_size
            # transformers adds a packed-sequence overlay under compile whenever position_ids
            # are given without a 2-D mask and a cache: the attention reads position_ids
            if attention_mask is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 \
                    and isinstance(kv_offset, int) and kv_offset == 0:
                p.packed = "maybe"
    else:
        p.reason = "a custom mask function (cannot be read under torch.compile)"
    return p


_LAST_MASK_REASON: dict[str, str] = {}


def _fallback_mask(reason: str, **kw) -> torch.Tensor:
    """transformers' eager (additive) mask: the attention then falls back, naming ``reason``."""
    from transformers.masking_utils import eager_mask

    kw.pop("local_size", None)
    if "cache_position" in kw and "cache_position" not in inspect.signature(eager_mask).parameters:
        pos = kw.pop("cache_position")
        kw.update(q_length=pos.shape[0], q_offset=pos[0] if _is_tracing() else int(pos[0]), device=pos.device)
    mask = eager_mask(**kw)
    _LAST_MASK_REASON["reason"] = reason
    if not _is_tracing():
        mask._dasg_reason = reason
    return mask


def _one_run_per_row(valid: torch.Tensor) -> bool:
    """Whether every row's True entries form one contiguous run (reads values: eager only)."""
    cols = torch.arange(valid.shape[1], device=valid.device)
    start = run_start(valid)
    want = (cols[None] >= start[:, None]) & (cols[None] < (start + valid.sum(1))[:, None])
    return bool(torch.equal(valid, want))


def _valid_marker(valid: torch.Tensor) -> torch.Tensor:
    return valid.to(torch.uint8)[:, None, None, :]


def dasg_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The ``"dasg"`` entry of transformers' ``AttentionMaskInterface``.

    Takes both call conventions: ``q_length, kv_length, q_offset, kv_offset`` (recent 5.x)
    and ``cache_position, kv_length, kv_offset`` (earlier releases).

    Returns what the ``"dasg"`` attention needs to run the pattern without a ``T x T`` mask
    (see the module doc): ``None``; a ``[B, 1, 1, Tk]`` uint8 mask of the valid keys (one
    run per row); ``[B, 1, 1, 1]`` int32 valid lengths; ``[1, 1, 1, N + 1]`` int32
    ``cu_seqlens`` (packed documents; ``N + 1 = 0`` under compile: documents from
    ``position_ids``). For a pattern our kernels lack it
    returns transformers' eager (additive float) mask, which sends the attention call to the
    fallback with the cause.
    """
    from transformers.masking_utils import causal_mask_function

    fn = causal_mask_function if mask_function is None else mask_function
    cache_position = kwargs.pop("cache_position", None)
    if cache_position is not None:  # transformers before q_length / q_offset: the queries' positions
        kw = dict(batch_size=batch_size, cache_position=cache_position, kv_length=kv_length, kv_offset=kv_offset,
                  mask_function=fn, attention_mask=attention_mask, **kwargs)
        q_length = cache_position.shape[0]
        q_offset = cache_position[0] if _is_tracing() else int(cache_position[0])
        device = cache_position.device if device is None else device
    else:
        device = "cpu" if device is None else device
        kw = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                  kv_offset=kv_offset, mask_function=fn, attention_mask=attention_mask, device=device, **kwargs)
    tracing = _is_tracing()
    p = _read_pattern(mask_function, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                      local_size=local_size, attention_mask=attention_mask, config=kwargs.get("config"),
                      use_vmap=kwargs.get("use_vmap", False), device=device)
    if p.reason is not None:
        return _fallback_mask(p.reason, **kw)
    if p.packed is not None:
        if isinstance(p.packed, str):  # compiling: the attention takes documents from position_ids
            return torch.zeros(1, 1, 1, 0, dtype=torch.int32, device=device)
        ids = p.packed.to(device)
        start = torch.ones(ids.shape, dtype=torch.bool, device=device)
        start[:, 1:] = ids[:, 1:] != ids[:, :-1]
        cu, max_seqlen = _cu_seqlens_from_starts(start, sync=True)
        cu = cu.view(1, 1, 1, -1)
        cu._dasg_max_seqlen = max_seqlen
        return cu
    qo = q_offset - kv_offset  # the first query's column among the keys (an int, or a tensor: StaticLayer)
    queries_last = isinstance(qo, int) and qo == kv_length - q_length
    pad = None
    if attention_mask is not None and attention_mask.dim() == 2:
        pad = attention_mask.to(device=device, dtype=torch.bool)
        need = kv_offset + kv_length
        if pad.shape[1] < need:
            pad = F.pad(pad, (0, need - pad.shape[1]), value=False)
        pad = pad[:, kv_offset:kv_offset + kv_length]
    elif attention_mask is not None:
        return _fallback_mask(f"a {attention_mask.dim()}-D attention_mask", **kw)
    if pad is None and queries_last:
        return None
    if not p.causal:
        if queries_last and pad is not None and not tracing and bool(pad.all()):
            return None
        return _fallback_mask("padding (or a static cache) with bidirectional attention", **kw)
    cols = torch.arange(kv_length, device=device)
    if isinstance(qo, torch.Tensor):
        qo = qo.to(device)
    end = qo + q_length  # keys at columns >= end are not written yet (a static cache)
    if pad is None:
        n = torch.as_tensor(end, device=device).clamp(max=kv_length).to(torch.int32).reshape(1, 1)
        return n.expand(batch_size, 1).reshape(batch_size, 1, 1, 1)
    valid = pad & (cols < end)[None] if not queries_last else pad
    if tracing:
        return _valid_marker(valid)
    if not _one_run_per_row(valid):
        return _fallback_mask("padding that is not one run of tokens per row (holes in attention_mask)", **kw)
    if bool(run_start(valid).eq(0).all()):  # no left padding: lengths, no roll
        if queries_last and bool(valid.all()):
            return None
        return valid.sum(1, dtype=torch.int32).view(-1, 1, 1, 1)
    return _valid_marker(valid)


# --------------------------------------------------------------------------- attention


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
    left = -1 if window is None else (window - 1 if is_causal else window)
    right = 0 if is_causal else (-1 if window is None else window)
    keep = local_mask(query.shape[2], key.shape[2], (left, right), is_causal, device=query.device)
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
                cu, mx = _cu_seqlens_from_starts(_doc_starts_from_positions(pos, query.shape[0]), sync=False)
                return _Layout("varlen", cu_q=cu, cu_k=cu, max_q=mx, max_k=mx)
            return _Layout("plain")
        mx = m.__dict__.get("_dasg_max_seqlen", tq) if not _is_tracing() else tq
        cu = m.view(-1)
        return _Layout("varlen", cu_q=cu, cu_k=cu, max_q=mx, max_k=mx)
    if ours and m.dtype == torch.int32 and m.shape == (key.shape[0], 1, 1, 1):
        return _Layout("lengths", n=m.view(-1))
    if ours and m.dtype == torch.uint8 and m.shape == (key.shape[0], 1, 1, tk):
        return _Layout("rolled", valid=m.view(m.shape[0], tk).bool())
    if m.dim() == 4:
        reason = None if _is_tracing() else m.__dict__.get("_dasg_reason")
        if reason is None:
            reason = _LAST_MASK_REASON.get("reason") if _is_tracing() else None
        return reason or "a 4-D attention mask (a custom pattern passed by the model or the caller)"
    return f"an attention_mask of shape {tuple(m.shape)} and dtype {m.dtype} the 'dasg' mask function did not build"


_POS_SEEN: list = [None, None]  # (weakref to the last position_ids seen, its layout)


def _restarts_layout(pos: torch.Tensor) -> _Layout:
    """One row whose ``position_ids`` may restart (packed documents while transformers' mask
    did not say so, e.g. with a cache, as in its flash-attention path, which looks only at
    batch size 1): varlen over the documents. Eager: one host read per ``position_ids``
    tensor (the layers share it); compiling: no read, ``T + 1`` slots."""
    import weakref

    start = _doc_starts_from_positions(pos, 1)
    if _is_tracing():
        cu, mx = _cu_seqlens_from_starts(start, sync=False)
        return _Layout("varlen", cu_q=cu, cu_k=cu, max_q=mx, max_k=mx)
    ref, layout = _POS_SEEN
    if ref is not None and ref() is pos:
        return layout
    cu, mx = _cu_seqlens_from_starts(start, sync=True)
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
    tracing = _is_tracing()
    if layout.kind == "varlen":
        flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
        out = _varlen(*flat, layout.cu_q, layout.cu_k, _host_int(layout.max_q, tq), _host_int(layout.max_k, tk),
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
        if op == "swa_decode" and _is_tracing():
            op = "swa_attention_with_kvcache"
        if not _value_dim_ok(op):
            return f"a value head dim ({value.shape[-1]}) other than the query / key one ({d}): {op} does not take it yet"
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
    if not _is_tracing():
        _check_experts_bypass(module)
    backend = _backend(module)
    layout = _read_layout(attention_mask, query, key, kwargs)
    reason = _attention_unsupported(layout, query, key, value, dropout, softcap, is_causal, window, backend, kwargs)
    if reason is not None:
        _fall_back("attention", reason)
        return _attention_fallback(module, query, key, value, attention_mask, layout, dropout, scaling, softcap,
                                   is_causal, window, dict(kwargs))
    _CALLS["attention"] += 1
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    return _run(layout, query, key, value, is_causal, window, scale, backend), None


# --------------------------------------------------------------------------- experts that bypass the interface

_BYPASS_CHECKED: set[str] = set()


def _experts_bypass_reason(modeling_module: Any) -> str | None:
    """Why ``experts_implementation`` cannot reach a modeling module's experts, or ``None``:
    it defines an ``...Experts`` module but none uses ``@use_experts_implementation`` (the
    test transformers itself makes, e.g. Llama-4's ``Llama4TextExperts``)."""
    if modeling_module is None:
        return None
    experts = [n for n, c in vars(modeling_module).items()
               if isinstance(c, type) and n.endswith("Experts") and issubclass(c, torch.nn.Module)
               and getattr(c, "__module__", None) == modeling_module.__name__]
    if not experts:
        return None
    try:
        src = inspect.getsource(modeling_module)
    except (OSError, TypeError):
        return None
    if "@use_experts_implementation" in src:
        return None
    return (f"experts_implementation='dasg' has no effect on this model: its experts ({', '.join(sorted(experts))}) "
            f"do not go through transformers' ExpertsInterface, so they run their own forward")


def _check_experts_bypass(module: torch.nn.Module) -> None:
    """Warn once per modeling module when ``experts_implementation='dasg'`` was asked for and
    its experts bypass the interface (checked from the attention, the one hook that runs)."""
    name, cfg = type(module).__module__, getattr(module, "config", None)
    key = f"{name}:{id(cfg)}"
    if key in _BYPASS_CHECKED:
        return
    _BYPASS_CHECKED.add(key)
    if getattr(cfg, "_experts_implementation", None) != NAME:
        return
    reason = _experts_bypass_reason(sys.modules.get(name))
    if reason is not None:
        _warn_once("experts", reason, fallback=False)


# --------------------------------------------------------------------------- experts


def _is_silu(act: Any) -> bool:
    if isinstance(act, torch.nn.SiLU) or act is F.silu:
        return True
    if act is None or not callable(act):
        return False
    probe = torch.linspace(-4.0, 4.0, 9)
    try:
        return bool(torch.allclose(act(probe), F.silu(probe), atol=1e-6))
    except Exception:
        return False


def _experts_unsupported(experts: torch.nn.Module) -> str | None:
    cached = experts.__dict__.get("_dasg_unsupported", False)
    if cached is not False:
        return cached
    reason = None
    from transformers.integrations import moe as hf_moe

    gu, dp = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if getattr(experts, "has_bias", False):
        reason = "biases in experts"
    elif not getattr(experts, "has_gate", True):
        reason = "experts without a gate (non-gated MLP)"
    elif getattr(experts, "is_transposed", False):
        reason = "transposed expert weights"
    elif not getattr(experts, "is_concatenated", True):
        reason = "interleaved gate/up expert weights"
    elif getattr(experts, "has_post_expert_norm", False):
        reason = "a post-expert norm"
    elif getattr(type(experts), "_apply_gate", None) not in (None, getattr(hf_moe, "_default_apply_gate", None)):
        reason = "a custom gating function (_apply_gate)"
    elif not isinstance(gu, torch.Tensor) or not isinstance(dp, torch.Tensor) or gu.dim() != 3 or dp.dim() != 3:
        reason = "expert weights not in the [E, 2F, D] / [E, D, F] layout"
    elif gu.shape[1] != 2 * dp.shape[2] or gu.shape[2] != dp.shape[1] or gu.shape[0] != dp.shape[0]:
        reason = "expert weights not in the [E, 2F, D] / [E, D, F] layout"
    elif not _is_silu(getattr(experts, "act_fn", None)):
        reason = "an expert activation other than SiLU"
    experts.__dict__["_dasg_unsupported"] = reason
    return reason


def _experts_fallback(experts, hidden_states, top_k_index, top_k_weights):
    eager = getattr(type(experts).forward, "__wrapped__", None)
    if eager is None:
        from transformers.integrations.moe import batched_mm_experts_forward as eager
    return eager(experts, hidden_states, top_k_index, top_k_weights)


def dasg_experts_forward(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``"dasg"`` entry of transformers' ``ExpertsInterface``.

    ``hidden_states [N, D]``, ``top_k_index [N, k]``, ``top_k_weights [N, k]`` with the
    experts' ``gate_up_proj [E, 2F, D]`` and ``down_proj [E, D, F]`` -> ``[N, D]``.
    """
    backend = _backend(experts)
    reason = _experts_unsupported(experts)
    if reason is None and getattr(experts, "_is_expert_parallel", False):
        reason = "expert parallelism"
    if reason is None and resolve_backend(backend, hidden_states, op="expert_ffn") == "triton":
        d, f = experts.down_proj.shape[1], experts.down_proj.shape[2]
        if d % 16 or f % 16:
            reason = f"hidden size {d} / expert size {f} not multiples of 16 (Triton kernels)"
    if reason is not None:
        _fall_back("experts", reason)
        return _experts_fallback(experts, hidden_states, top_k_index, top_k_weights)
    _CALLS["experts"] += 1
    return expert_ffn(
        hidden_states, experts.gate_up_proj, experts.down_proj,
        (top_k_index.to(torch.int32), top_k_weights.to(torch.float32)),
        backend=backend,
    )


# --------------------------------------------------------------------------- registration


def register(name: str = NAME, *, backend: str = "auto", attention: bool = True, experts: bool = True) -> None:
    """Register ``name`` (default ``"dasg"``) as a transformers attention and experts implementation.

    ``backend`` (``"auto" | "triton" | "torch"``) is passed to every kernel call. Safe to call
    more than once (the last ``backend`` wins). Needs ``transformers`` (the ``hf`` extra);
    the experts interface needs transformers >= 5 (skipped with a warning before).
    """
    if backend not in BACKENDS:
        raise ValueError(f"register: backend must be one of {BACKENDS}, got {backend!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("dasg_model.integrations.transformers needs transformers: pip install 'dasg-kernels[hf]'") from e
    _SETTINGS["backend"] = backend
    if attention:
        AttentionInterface.register(name, dasg_attention_forward)
        AttentionMaskInterface.register(name, dasg_mask)
    if experts:
        try:
            from transformers.integrations.moe import ExpertsInterface
        except ImportError:  # pragma: no cover - transformers < 5
            warnings.warn("this transformers version has no ExpertsInterface; only attention was registered",
                          stacklevel=2)
            return
        ExpertsInterface.register(name, dasg_experts_forward)


def enable(model: torch.nn.Module, *, backend: str = "auto", attention: bool = True, experts: bool = True):
    """``register()`` and switch a loaded transformers ``model`` to ``"dasg"`` in place; returns it.

    ``backend`` applies to this model only (it is recorded on its modules): enabling a
    second model with another backend leaves this one as it is.
    """
    register(backend=backend, attention=attention, experts=experts)
    for m in model.modules():
        m.__dict__["_dasg_backend"] = backend
    if attention:
        model.set_attn_implementation(NAME)
    if experts and hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation():
        model.set_experts_implementation(NAME)
    elif experts:
        reason = _experts_bypass_reason(sys.modules.get(type(model).__module__))
        if reason is not None:
            _warn_once("experts", reason, fallback=False)
    return model
