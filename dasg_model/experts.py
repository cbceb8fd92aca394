"""Expert banks (Hugging Face layout) and DSSE, the dual-scale shared experts."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dasg_kernels import expert_ffn
from dasg_model.config import DASGConfig


def is_silu(act: Any) -> bool:
    """Whether the activation ``act`` (a module or a function) is SiLU: ``nn.SiLU`` or
    ``F.silu`` itself, else equal to it within 1e-6 on nine points of ``[-4, 4]`` (an
    activation that raises there is not)."""
    if isinstance(act, torch.nn.SiLU) or act is F.silu:
        return True
    if act is None or not callable(act):
        return False
    probe = torch.linspace(-4.0, 4.0, 9)
    try:
        return bool(torch.allclose(act(probe), F.silu(probe), atol=1e-6))
    except Exception:
        return False


class SwiGLUExperts(nn.Module):
    """A bank of ``E`` SwiGLU experts in the transformers layout.

    ``gate_up_proj [E, 2F, D]`` (gate rows first, then up rows) and ``down_proj [E, D, F]``;
    expert ``e`` computes ``down_proj[e] @ (silu(gate) * up)``. :meth:`forward` runs the
    rows named by ``expert_ids [N, k]`` (``-1`` = unused slot) through
    :func:`dasg_kernels.expert_ffn` and sums them weighted by ``weights [N, k]``.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, backend: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, self.gate_up_proj, self.down_proj, (expert_ids, weights), backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_size}, ffn={self.ffn_size}"


def single_expert_routing(
    n: int, weight: torch.Tensor, active: torch.Tensor | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert_ids [n, 1], weights [n, 1])`` sending rows to expert 0 of a one-expert bank.

    ``weight`` is a scalar or an ``[n]`` tensor; rows outside ``active`` get id ``-1`` and
    weight 0, so :func:`expert_ffn` never computes them.
    """
    device = weight.device if device is None else device
    w = weight.to(torch.float32).expand(n).reshape(n, 1)
    if active is None:
        ids = torch.zeros(n, 1, dtype=torch.int32, device=device)
        return ids, w
    ids = torch.where(active, 0, -1).to(torch.int32).reshape(n, 1)
    return ids, w * active.reshape(n, 1)


class DualScaleSharedExperts(nn.Module):
    """DSSE: a shallow shared expert on every token, a deep one on the deep-level tokens.

    ``y = shallow_scale * shallow(x) + [c >= tau] * c * deep(x)`` for ``x [N, hidden]``,
    with the gate ``c [N]`` and ``deep_mask = c >= tau`` from :class:`AdaptiveDynamicRouter`.
    The deep expert is computed only on the deep rows: non-deep rows are sent to expert
    ``-1`` of a one-expert :func:`expert_ffn` call (no gather, no host synchronisation).
    ``shallow_scale`` is a learnable scalar (1 by default; ``from_dense`` starts it at 0).
    """

    def __init__(self, config: DASGConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.shallow = SwiGLUExperts(1, d, config.shallow_shared_size, backend=config.backend)
        self.deep = SwiGLUExperts(1, d, config.deep_shared_size, backend=config.backend)
        self.shallow_scale = nn.Parameter(torch.ones(()))

    def forward(
        self, x: torch.Tensor, gate: torch.Tensor | None = None, deep_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x [N, hidden]``; ``gate [N]`` and ``deep_mask [N]`` (default: every row deep, weight 1)."""
        n = x.shape[0]
        y = self.shallow(x, *single_expert_routing(n, self.shallow_scale, device=x.device))
        if gate is None:
            gate = torch.ones(n, device=x.device)
        y = y + self.deep(x, *single_expert_routing(n, gate, deep_mask, device=x.device))
        return y
