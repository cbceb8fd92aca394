"""Registration with transformers: :func:`register` (the ``"dasg"`` attention, mask and
experts implementations) and :func:`enable` (register and switch a loaded model)."""
from __future__ import annotations

import sys
import warnings

import torch

from dasg_kernels.backend import BACKENDS
from dasg_model.integrations.transformers.attention import dasg_attention_forward
from dasg_model.integrations.transformers.calls import NAME, set_default_backend, warn_once
from dasg_model.integrations.transformers.experts import dasg_experts_forward, experts_bypass_reason
from dasg_model.integrations.transformers.masks import dasg_mask

__all__ = ["enable", "register"]

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
        raise ImportError("dasg_model.integrations.transformers needs transformers: "
                          "pip install 'dasg-kernels[hf]'") from e
    set_default_backend(backend)
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
        reason = experts_bypass_reason(sys.modules.get(type(model).__module__))
        if reason is not None:
            warn_once("experts", reason, fallback=False)
    return model
