"""Public attention ops: validation, backend dispatch, autograd.

STUB (foundation): only the ``torch`` backend is wired; the Triton kernels land in
this package (``fwd.py``, ``bwd.py``, ``decode.py``) and are dispatched from here.
"""
from __future__ import annotations

import torch

from dasg_kernels import reference
from dasg_kernels.backend import resolve_backend


def swa_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: tuple[int, int] = (-1, -1),
    causal: bool = True,
    group_size: int | None = None,
    summaries: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`swa_attention`, also returning ``lse [B, Hq, T]`` (fp32)."""
    be = resolve_backend(backend, q, k, v, op="swa_attention")
    if be == "torch":
        return reference.swa_attention_ref(
            q, k, v, window=window, causal=causal, group_size=group_size,
            summaries=summaries, softmax_scale=softmax_scale,
        )
    raise NotImplementedError("swa_attention: the Triton backend is not built yet")


def swa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: tuple[int, int] = (-1, -1),
    causal: bool = True,
    group_size: int | None = None,
    summaries: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Grouped sliding-window attention: ``q [B,T,Hq,D]``, ``k, v [B,T,Hkv,D]`` -> ``[B,T,Hq,D]``."""
    return swa_attention_with_lse(
        q, k, v, window=window, causal=causal, group_size=group_size,
        summaries=summaries, softmax_scale=softmax_scale, backend=backend,
    )[0]
