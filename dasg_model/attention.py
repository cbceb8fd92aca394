"""GMHA: grouped multi-head attention (RoPE, GQA, sliding window + group summaries)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dasg_kernels import swa_attention, swa_attention_varlen, swa_attention_with_kvcache
from dasg_kernels.context_parallel import cp_positions, swa_attention_cp
from dasg_model.cache import DASGCache
from dasg_model.config import DASGConfig
from dasg_model.packing import PackedDocuments


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (the Llama / Mistral RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE tables ``cos, sin [..., D]`` for ``positions [T]`` or ``[B, T]`` (computed in fp32)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by the tables ``cos, sin`` (``[T, D]``, or ``[B, T, D]`` per row)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos = cos[:, :, None, :].to(x.dtype)
    sin = sin[:, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class GroupedMultiHeadAttention(nn.Module):
    """GMHA: q/k/v/o projections, RoPE, GQA, and :func:`dasg_kernels.swa_attention`.

    Every query attends to the keys of its causal sliding window (``config.attention_window``)
    and, with ``config.use_summaries``, to one summary key/value (the group mean) per earlier
    group of ``config.group_size`` tokens lying wholly before the window.

    Input ``x [B, T, hidden]``, output ``[B, T, hidden]``.

    Context parallel (set by :func:`dasg_model.parallel.apply_context_parallel`): with
    ``cp_group`` set, ``x`` is this rank's sequence shard (in ``cp_layout``), RoPE uses its
    global positions and attention runs through
    :func:`dasg_kernels.context_parallel.swa_attention_cp` (``cp_validate`` is its ``validate``).

    Packed documents (``documents``, see :mod:`dasg_model.packing`): the ``B * T`` tokens go
    through :func:`dasg_kernels.swa_attention_varlen`, so windows, groups and summaries restart
    at each document and no query sees another document.
    """

    cp_group: object | None = None
    cp_validate: bool = True
    cp_layout: str = "contiguous"

    def __init__(self, config: DASGConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.resolved_head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, config.rope_theta)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: DASGCache | None = None,
        layer_idx: int = 0,
        documents: PackedDocuments | None = None,
    ) -> torch.Tensor:
        """``x [B, T, hidden]``; ``rope`` the tables of the positions; with ``cache`` the ``T``
        new positions go through :func:`dasg_kernels.swa_attention_with_kvcache` against layer
        ``layer_idx`` of the cache (inference only: no gradients); with ``documents`` (no cache)
        each packed document attends only to itself (``cu_seqlens`` checked by the op, with its
        one host read in eager mode, at layer 0 only; under context parallelism the offsets are
        into the whole sequence and :func:`~dasg_kernels.context_parallel.swa_attention_cp`
        reads them on every layer)."""
        b, t, _ = x.shape
        if rope is None:
            cp = self.cp_group
            rank, world = (dist.get_rank(cp), dist.get_world_size(cp)) if cp is not None else (0, 1)
            rope = self.rotary(cp_positions(rank, world, t, layout=self.cp_layout, device=x.device))
        cos, sin = rope
        q = apply_rope(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        cfg = self.config
        kw = dict(window=cfg.window, causal=True, group_size=cfg.group_size if cfg.use_summaries else None,
                  summaries=cfg.use_summaries, backend=cfg.backend)
        if documents is not None and self.cp_group is not None:
            if cache is not None:
                raise ValueError("GroupedMultiHeadAttention: a generation cache cannot be used with context parallelism")
            o = swa_attention_cp(q, k, v, group=self.cp_group, validate=self.cp_validate, layout=self.cp_layout,
                                 cu_seqlens=documents.cu_seqlens_q, **kw)
        elif documents is not None:
            if cache is not None:
                raise ValueError("GroupedMultiHeadAttention: packed documents cannot be used with a generation cache")
            d = documents
            o = swa_attention_varlen(q.reshape(b * t, *q.shape[2:]), k.reshape(b * t, *k.shape[2:]),
                                     v.reshape(b * t, *v.shape[2:]), d.cu_seqlens_q, d.cu_seqlens_k,
                                     d.max_seqlen_q, d.max_seqlen_k, validate=layer_idx == 0, **kw)
        elif cache is not None:
            if self.cp_group is not None:
                raise ValueError("GroupedMultiHeadAttention: a generation cache cannot be used with context parallelism")
            kw.pop("causal")
            layer = dict(cache.layer(layer_idx, k))
            o = swa_attention_with_kvcache(q, layer.pop("k_cache"), layer.pop("v_cache"), cache.seqlens, k, v,
                                           **layer, **kw)
        elif self.cp_group is not None:
            o = swa_attention_cp(q, k, v, group=self.cp_group, validate=self.cp_validate, layout=self.cp_layout,
                                 **kw)
        else:
            o = swa_attention(q, k, v, **kw)
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))
