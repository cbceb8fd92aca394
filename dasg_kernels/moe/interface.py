"""Public routed-expert ops: validation, backend dispatch, autograd.

STUB (foundation): only the ``torch`` backend is wired; the Triton kernels land in
this package and are dispatched from here.
"""
from __future__ import annotations

import torch

from dasg_kernels import reference
from dasg_kernels.backend import resolve_backend
from dasg_kernels.moe.types import Routing


def route(
    logits: torch.Tensor,
    *,
    top_p: float = 1.0,
    k_max: int = 2,
    min_k: int = 1,
    n_group: int = 1,
    topk_group: int | None = None,
    renormalize: bool = True,
    backend: str = "auto",
) -> Routing:
    """Dynamic top-p routing of ``logits [N, E]``; see :func:`dasg_kernels.reference.route_ref`."""
    be = resolve_backend(backend, logits, op="route")
    if be == "torch":
        return reference.route_ref(
            logits, top_p=top_p, k_max=k_max, min_k=min_k, n_group=n_group,
            topk_group=topk_group, renormalize=renormalize,
        )
    raise NotImplementedError("route: the Triton backend is not built yet")


def expert_ffn(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: Routing | tuple[torch.Tensor, torch.Tensor],
    *,
    activation: str = "swiglu",
    backend: str = "auto",
) -> torch.Tensor:
    """Routed SwiGLU experts: ``x [N,D]``, ``gate_up_proj [E,2F,D]``, ``down_proj [E,D,F]`` -> ``[N,D]``."""
    expert_ids, weights = routing[0], routing[1]
    be = resolve_backend(backend, x, gate_up_proj, down_proj, op="expert_ffn")
    if be == "torch":
        return reference.expert_ffn_ref(x, gate_up_proj, down_proj, expert_ids, weights)
    raise NotImplementedError("expert_ffn: the Triton backend is not built yet")
