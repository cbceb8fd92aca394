"""Grouped sliding-window attention with group summaries (GMHA).

- :func:`swa_attention` / :func:`swa_attention_with_lse`: training (forward + backward).
- :func:`swa_attention_varlen`: packed batches (flash-attn's ``cu_seqlens`` layout).
- :func:`swa_decode`: a few new queries against a KV cache (forward only).
- :func:`swa_attention_with_kvcache`: decode / chunked prefill against a bounded cache
  (a ring of the last ``C`` keys + the finished groups' means), updated in place.

Kernels: :mod:`.fwd` (forward), :mod:`.bwd` (backward), :mod:`.pool` (group means),
:mod:`.decode`, :mod:`.bounded_cache` (bounded cache); tile sizes and autotuning in :mod:`.configs`;
custom ops (the layer the public functions call) in :mod:`.ops`; host helpers in :mod:`.host`,
argument checks in :mod:`.checks`; the PyTorch backend in :mod:`.blockwise`.
"""
from dasg_kernels.attention.checks import SUPPORTED_HEAD_DIMS
from dasg_kernels.attention.interface import (
    swa_attention,
    swa_attention_with_lse,
    swa_decode,
)
from dasg_kernels.attention.kvcache import alloc_kvcache, swa_attention_with_kvcache
from dasg_kernels.attention.varlen import swa_attention_varlen

__all__ = ["alloc_kvcache", "swa_attention", "swa_attention_varlen", "swa_attention_with_kvcache",
           "swa_attention_with_lse", "swa_decode"]
