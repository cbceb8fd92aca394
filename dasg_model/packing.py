"""Packed documents: several documents in one row of tokens, kept apart by the attention.

A packed batch (transformers' ``DataCollatorWithFlattening``) marks its documents in one of
three ways: ``position_ids`` that restart at each document (the default), ``cu_seq_lens_q/k``
offsets with ``max_length_q/k`` (``return_flash_attn_kwargs=True``), or ``seq_idx``, the
document index of every token (``return_seq_idx=True``). The functions here turn each into
the ``cu_seqlens`` / ``max_seqlen`` of :func:`dasg_kernels.swa_attention_varlen` and into a
``[B, T]`` mask of document starts (for RoPE positions and the loss). They are shared by the
native model (:class:`dasg_model.DASGModel`) and the transformers drop-in
(:mod:`dasg_model.integrations.transformers`).

Host reads: only where ``sync=True`` / outside ``torch.compile`` (:func:`cu_seqlens_from_starts`,
:func:`host_int`); under compile ``cu_seqlens`` has a slot per token instead (trailing empty
documents) and ``max_seqlen`` is the row length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def host_int(x: Any, bound: int) -> int:
    """A max length as a Python int: a tensor is read once (eager), else the static ``bound``
    (under tracing / compile, where a read is impossible)."""
    if isinstance(x, torch.Tensor):
        return bound if _tracing() else int(x)
    return int(x)


def cu_seqlens_from_starts(start: torch.Tensor, *, sync: bool) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` (int32) of the documents of ``[B, T]`` rows, ``start`` True at each
    document's first token (column 0 always). With ``sync`` (eager) one host read gives the
    number of documents and ``max_seqlen``; without it (compile) ``cu_seqlens`` has ``B*T + 1``
    entries (empty documents at the end) and ``max_seqlen = T``."""
    b, t = start.shape
    total = b * t
    flat = start.reshape(-1)
    idx = torch.arange(total, device=start.device)
    cu = torch.cat([torch.sort(torch.where(flat, idx, torch.full_like(idx, total))).values,
                    torch.full((1,), total, dtype=idx.dtype, device=idx.device)])
    if not sync:
        return cu.to(torch.int32), t
    n, mx = torch.stack([flat.sum(), cu.diff().max()]).tolist()
    return torch.cat([cu[:n], cu[-1:]]).to(torch.int32), int(mx)


def doc_starts_from_positions(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``[batch, T]`` bool, True at column 0 and wherever ``position_ids [B or 1, T]`` does not
    step by exactly 1 (a restart: a new document, as in transformers' packed-sequence masks)."""
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    start = torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
    start[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    return start


def doc_starts_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool, True at column 0 and wherever the document index ``seq_idx [B, T]`` changes."""
    start = torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return start


def doc_starts_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total]`` bool, True at the first token of each document of ``cu_seqlens [N + 1]``
    (empty documents mark nothing; offsets are clamped to ``[0, total]``, no host read)."""
    mark = torch.zeros(total + 1, dtype=torch.bool, device=cu_seqlens.device)
    mark.index_fill_(0, cu_seqlens[:-1].long().clamp(0, total), True)
    return mark[:total]


def positions_in_documents(start: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` int64: each token's offset from the start of its document (``start [B, T]``)."""
    idx = torch.arange(start.shape[1], device=start.device).expand(start.shape)
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


@dataclass
class PackedDocuments:
    """The documents of a packed batch, as :func:`dasg_kernels.swa_attention_varlen` takes them.

    Attributes:
        cu_seqlens_q, cu_seqlens_k: int32 ``[N + 1]`` offsets into the ``B * T`` flattened
            tokens (equal for self-attention; trailing empty documents allowed).
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest document.
        start: ``[B, T]`` bool, True at each document's first token.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    start: torch.Tensor

    @classmethod
    def from_starts(cls, start: torch.Tensor) -> PackedDocuments:
        """From a ``[B, T]`` start mask: one host read in eager mode, none under compile."""
        cu, mx = cu_seqlens_from_starts(start, sync=not _tracing())
        return cls(cu, cu, mx, mx, start)
