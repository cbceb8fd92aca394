"""The ``"dasg"`` entry of transformers' ``ExpertsInterface`` (:func:`dasg_experts_forward`:
:func:`dasg_kernels.expert_ffn` on the experts' own weights, or transformers' path with the
cause), and the check for models whose experts bypass that interface."""
from __future__ import annotations

import inspect
import sys
from typing import Any

import torch

from dasg_kernels import expert_ffn
from dasg_kernels.backend import resolve_backend
from dasg_model.experts import is_silu
from dasg_model.integrations.transformers.calls import NAME, backend_for, count_call, fall_back, warn_once

__all__ = ["check_experts_bypass", "dasg_experts_forward", "experts_bypass_reason"]

# --------------------------------------------------------------------------- experts that bypass the interface

_BYPASS_CHECKED: set[str] = set()


def experts_bypass_reason(modeling_module: Any) -> str | None:
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


def check_experts_bypass(module: torch.nn.Module) -> None:
    """Warn once per modeling module when ``experts_implementation='dasg'`` was asked for and
    its experts bypass the interface (checked from the attention, the one hook that runs)."""
    name, cfg = type(module).__module__, getattr(module, "config", None)
    key = f"{name}:{id(cfg)}"
    if key in _BYPASS_CHECKED:
        return
    _BYPASS_CHECKED.add(key)
    if getattr(cfg, "_experts_implementation", None) != NAME:
        return
    reason = experts_bypass_reason(sys.modules.get(name))
    if reason is not None:
        warn_once("experts", reason, fallback=False)


# --------------------------------------------------------------------------- experts


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
    elif not is_silu(getattr(experts, "act_fn", None)):
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
    backend = backend_for(experts)
    reason = _experts_unsupported(experts)
    if reason is None and getattr(experts, "_is_expert_parallel", False):
        reason = "expert parallelism"
    if reason is None and resolve_backend(backend, hidden_states, op="expert_ffn") == "triton":
        d, f = experts.down_proj.shape[1], experts.down_proj.shape[2]
        if d % 16 or f % 16:
            reason = f"hidden size {d} / expert size {f} not multiples of 16 (Triton kernels)"
    if reason is not None:
        fall_back("experts", reason)
        return _experts_fallback(experts, hidden_states, top_k_index, top_k_weights)
    count_call("experts")
    return expert_ffn(
        hidden_states, experts.gate_up_proj, experts.down_proj,
        (top_k_index.to(torch.int32), top_k_weights.to(torch.float32)),
        backend=backend,
    )
