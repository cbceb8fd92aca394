"""Routed experts: dynamic top-p routing, GPU dispatch, grouped SwiGLU expert GEMM, combine."""
from dasg_kernels.moe.interface import dispatch, expert_ffn, moe_ffn, route
from dasg_kernels.moe.types import DispatchPlan, Routing

__all__ = ["DispatchPlan", "Routing", "dispatch", "expert_ffn", "moe_ffn", "route"]
