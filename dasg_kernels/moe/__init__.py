"""Routed experts: dynamic top-p routing, GPU dispatch, grouped SwiGLU expert GEMM, combine."""
from dasg_kernels.moe.interface import expert_ffn, route
from dasg_kernels.moe.types import Routing

__all__ = ["Routing", "expert_ffn", "route"]
