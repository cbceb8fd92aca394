"""Grouped sliding-window attention with group summaries (GMHA)."""
from dasg_kernels.attention.interface import swa_attention, swa_attention_with_lse

__all__ = ["swa_attention", "swa_attention_with_lse"]
