"""Grouped sliding-window attention with group summaries (GMHA).

- :func:`swa_attention` / :func:`swa_attention_with_lse`: training (forward + backward).
- :func:`swa_decode`: a few new queries against a KV cache (forward only).

Kernels: :mod:`.fwd` (forward), :mod:`.bwd` (backward), :mod:`.pool` (group means),
:mod:`.decode`; tile sizes and autotuning in :mod:`.configs`.
"""
from dasg_kernels.attention.interface import (
    SUPPORTED_HEAD_DIMS,
    swa_attention,
    swa_attention_with_lse,
    swa_decode,
)

__all__ = ["swa_attention", "swa_attention_with_lse", "swa_decode"]
