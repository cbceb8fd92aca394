"""dasg-kernels: Triton kernels for long-sequence Mixture-of-Experts transformers.

Public ops (each takes ``backend="auto" | "triton" | "torch"``; see
:mod:`dasg_kernels.backend`):

- :func:`swa_attention` / :func:`swa_attention_with_lse`: grouped sliding-window
  attention with optional group summaries (GMHA).
- :mod:`dasg_kernels.moe`: :func:`route`, :func:`expert_ffn` (and friends): routed experts.
"""
from dasg_kernels import moe, reference
from dasg_kernels.attention import swa_attention, swa_attention_with_lse
from dasg_kernels.backend import interpreter_enabled, resolve_backend
from dasg_kernels.moe import Routing, expert_ffn, route

__version__ = "0.1.0"

__all__ = [
    "Routing",
    "expert_ffn",
    "interpreter_enabled",
    "moe",
    "reference",
    "resolve_backend",
    "route",
    "swa_attention",
    "swa_attention_with_lse",
]
