"""Run the DASG kernels inside Hugging Face transformers models.

``register()`` adds ``"dasg"`` to transformers' ``AttentionInterface`` (and the matching
``AttentionMaskInterface``) and to its ``ExpertsInterface``, so that existing models run our
kernels with their existing weights::

    from dasg_model.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="dasg", experts_implementation="dasg")

(or ``model.set_attn_implementation("dasg")`` / ``model.set_experts_implementation("dasg")`` on
a loaded model).

Attention (``q, k, v [B, H, T, D]`` from transformers, passed to
:func:`dasg_kernels.swa_attention` as transposed views): honours ``is_causal``, GQA,
``scaling`` and the causal ``sliding_window`` (transformers' window ``W`` lets query ``i``
see keys ``i - W + 1 .. i``, i.e. our ``window=(W - 1, 0)``); the sliding window comes from
the ``sliding_window`` keyword or the module's ``sliding_window`` attribute (Qwen2).

The ``"dasg"`` mask function returns no mask when the pattern is plain causal / sliding
causal without padding (checked on a few probe rows of the model's own mask function), so
no ``T x T`` mask is ever built on that path. Everything our kernels do not cover is routed
to transformers' own SDPA (or the model's eager) path with a one-time warning naming the
reason, never to a wrong answer: a mask with real padding or a custom pattern,
``output_attentions``, attention dropout, softcap, attention sinks, gradients through
KV-cache attention, a head dim the Triton kernels lack (with ``backend="triton"``; ``"auto"``
uses the PyTorch reference there) and, for experts, biases, non-SwiGLU or transposed /
interleaved layouts, post-expert norms, expert parallelism and sizes that are not multiples
of 16 on the Triton path. KV-cache decoding (fewer queries than keys, no gradients) runs
:func:`dasg_kernels.swa_decode`.

:func:`call_counts` tells how many calls ran our kernels and how many fell back.

Host synchronisations kept: the ``"dasg"`` mask function reads the 2D padding mask
(``.all()``) and compares the probe rows on the host, once per mask built by the model (one
per forward and attention type), not per layer; the experts path adds none.
"""
from __future__ import annotations

import math
import sys
import warnings
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from dasg_kernels import expert_ffn, swa_attention, swa_decode
from dasg_kernels.attention import SUPPORTED_HEAD_DIMS
from dasg_kernels.backend import BACKENDS, resolve_backend
from dasg_kernels.reference import local_mask

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
_WARNED: set[str] = set()


class DASGFallbackWarning(UserWarning):
    """A call was routed to transformers' own implementation (the message says why)."""


def call_counts() -> dict[str, int]:
    """Calls so far: ``attention``, ``attention_fallback``, ``experts``, ``experts_fallback``."""
    return {k: _CALLS[k] for k in ("attention", "attention_fallback", "experts", "experts_fallback")}


def reset_call_counts() -> None:
    _CALLS.clear()


def _warn_once(kind: str, reason: str) -> None:
    key = f"{kind}: {reason}"
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"dasg {kind}: not covered by the DASG kernels: {reason}; this call (and later ones like it) "
        f"runs transformers' own implementation instead",
        DASGFallbackWarning,
        stacklevel=4,
    )


# --------------------------------------------------------------------------- masks


def _is_tracing() -> bool:
    """Under tracing / compilation the mask values cannot be inspected: always build the mask."""
    if torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _probe_rows(q_length: int) -> list[int]:
    rows = {0, 1, q_length // 4, q_length // 2, (3 * q_length) // 4, q_length - 2, q_length - 1}
    return sorted(r for r in rows if 0 <= r < q_length)


def _plain_pattern(mask_function, q_length: int, kv_length: int, q_offset: int, kv_offset: int,
                   local_size: int | None, device) -> bool:
    """True when ``mask_function`` is plain causal (sliding, if ``local_size``) on probe rows.

    Also requires the queries to be the last ``q_length`` key positions (the convention of
    :func:`dasg_kernels.swa_attention`).
    """
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


def dasg_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> torch.Tensor | None:
    """The ``"dasg"`` entry of transformers' ``AttentionMaskInterface``.

    Returns ``None`` (our kernels apply the causal / sliding pattern themselves) when there
    is no padding and the pattern is plain; otherwise transformers' eager (additive float)
    mask, which sends the attention call to the fallback.
    """
    from transformers.masking_utils import causal_mask_function, eager_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    if allow_is_causal_skip and not _is_tracing():
        # a 2D padding mask covers positions [0, len); positions beyond it are not padding
        no_padding = attention_mask is None or bool(attention_mask[:, kv_offset:kv_offset + kv_length].all())
        if no_padding and _plain_pattern(mask_function, q_length, kv_length, q_offset, kv_offset, local_size, device):
            return None
    return eager_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, device=device, **kwargs,
    )


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


def _attention_unsupported(query, key, value, attention_mask, dropout, softcap, is_causal, window, backend,
                           kwargs) -> str | None:
    if attention_mask is not None:
        return "an attention mask with real padding or a custom pattern"
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
    if any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")):
        return "packed sequences (cu_seq_lens)"
    if query.shape[2] > key.shape[2]:
        return "more queries than keys"
    if query.shape[2] < key.shape[2] and torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value)
    ):
        return "gradients through KV-cache attention (swa_decode is forward-only)"
    if query.shape[-1] != key.shape[-1] or key.shape[-1] != value.shape[-1]:
        return "different query / key / value head sizes"
    if query.shape[1] % key.shape[1]:
        return "query heads not a multiple of key/value heads"
    if not is_causal and window is not None:
        return "a bidirectional sliding window"
    if backend != "torch" and query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        # "auto" would quietly run our PyTorch reference: the model's own path is faster
        return f"head dim {query.shape[-1]} (the Triton kernels need a multiple of 8, at most 256)"
    return None


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


def _attention_fallback(module, query, key, value, attention_mask, dropout, scaling, softcap, is_causal, window, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None:
        attention_mask = _pattern_mask(query, key, is_causal, window)
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

    ``query [B, Hq, T, D]``, ``key, value [B, Hkv, T, D]`` -> ``(out [B, T, Hq, D], None)``.
    The sliding window is the one the model passes, else the module's attribute, else the
    model config's (see :func:`_config_window`); a layer whose window cannot be told is an
    error, never a silently different pattern.
    """
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    try:
        window = _sliding_window(module, sliding_window)
    except _AmbiguousWindow as e:
        raise RuntimeError(f"attn_implementation='dasg': cannot tell this layer's sliding window ({e}); "
                           f"use another attn_implementation for this model") from None
    backend = _backend(module)
    reason = _attention_unsupported(query, key, value, attention_mask, dropout, softcap, is_causal, window, backend,
                                    kwargs)
    if reason is not None:
        _CALLS["attention_fallback"] += 1
        _warn_once("attention", reason)
        return _attention_fallback(module, query, key, value, attention_mask, dropout, scaling, softcap,
                                   is_causal, window, kwargs)
    _CALLS["attention"] += 1
    op = swa_attention if query.shape[2] == key.shape[2] else swa_decode  # decode: queries = last Tq keys
    out = op(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        window=(-1 if window is None else window - 1, -1),
        causal=bool(is_causal),
        softmax_scale=scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1]),
        backend=backend,
    )
    return out, None


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
        _CALLS["experts_fallback"] += 1
        _warn_once("experts", reason)
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
    return model
