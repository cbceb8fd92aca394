"""Expert parallelism for DASGMoE (placeholder: being written)."""
from __future__ import annotations

from torch import nn


def apply_expert_parallel(model: nn.Module, ep_mesh) -> nn.Module:
    raise NotImplementedError("apply_expert_parallel is not written yet")
