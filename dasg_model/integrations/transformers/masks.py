"""The ``"dasg"`` entry of transformers' ``AttentionMaskInterface``: :func:`dasg_mask` reads
the pattern of the model's mask function and returns a small description of it for
:func:`~.attention.dasg_attention_forward` (see the package docstring), or transformers'
eager mask with the cause when the kernels lack the pattern."""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from dasg_model.packing import cu_seqlens_from_starts
from dasg_model.padding import run_start

__all__ = ["dasg_mask", "fallback_reason", "is_tracing", "packed_max_seqlen"]


def is_tracing() -> bool:
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
    if not is_tracing():
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
        kw.update(q_length=pos.shape[0], q_offset=pos[0] if is_tracing() else int(pos[0]), device=pos.device)
    mask = eager_mask(**kw)
    _LAST_MASK_REASON["reason"] = reason
    if not is_tracing():
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
    (see the package doc): ``None``; a ``[B, 1, 1, Tk]`` uint8 mask of the valid keys (one
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
        q_offset = cache_position[0] if is_tracing() else int(cache_position[0])
        device = cache_position.device if device is None else device
    else:
        device = "cpu" if device is None else device
        kw = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                  kv_offset=kv_offset, mask_function=fn, attention_mask=attention_mask, device=device, **kwargs)
    tracing = is_tracing()
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
        cu, max_seqlen = cu_seqlens_from_starts(start, sync=True)
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


def fallback_reason(mask: torch.Tensor) -> str | None:
    """Why :func:`dasg_mask` returned transformers' eager ``mask`` (the cause it found), or
    ``None`` for a mask it did not build (under tracing: the cause of the last mask built)."""
    if is_tracing():
        return _LAST_MASK_REASON.get("reason")
    return mask.__dict__.get("_dasg_reason")


def packed_max_seqlen(mask: torch.Tensor, default: int) -> int:
    """The longest document of the packed-sequence ``cu_seqlens`` mask :func:`dasg_mask`
    built (read when it built it), else ``default`` (always under tracing)."""
    return default if is_tracing() else mask.__dict__.get("_dasg_max_seqlen", default)
