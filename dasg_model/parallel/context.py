"""Context parallelism for DASGForCausalLM (placeholder: being written)."""
from __future__ import annotations

from torch import nn


def apply_context_parallel(model: nn.Module, cp_mesh) -> nn.Module:
    raise NotImplementedError("apply_context_parallel is not written yet")
