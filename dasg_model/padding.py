"""Padded batches without a ``[T, T]`` mask: each row's real tokens are one contiguous run.

A 2-D ``attention_mask [B, T]`` (1 = real token) whose ones form one run per row covers
left padding, right padding and both. Without a cache the model rolls each row so that its
run starts at column 0 (:func:`roll_rows`): the real tokens sit at positions ``0 .. n - 1``
(RoPE and groups start at the first real token) and the padding after them, where a causal
query never sees it and no group a query can see contains it. The outputs are rolled back.
With a cache the left padding becomes negative positions instead (see ``DASGCache``).

No host synchronisation: the checks that read mask values run only off CUDA and outside
``torch.compile`` (on CUDA a mask that is not one run per row gives undefined padding rows,
never wrong real rows of a left- or right-padded batch).
"""
from __future__ import annotations

import torch


def run_start(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64: the column of each row's first real token (``T`` for an all-padding row)."""
    return (mask.long().cumsum(1) == 0).sum(1)


def check_one_run(mask: torch.Tensor, *, what: str = "attention_mask", left_only: bool = False) -> None:
    """``ValueError`` unless every row's ones are one contiguous run (only left padding with
    ``left_only``). Reads the values: skipped on CUDA and under ``torch.compile``."""
    if mask.device.type == "cuda" or torch.compiler.is_compiling():
        return
    m = mask.bool()
    t = m.shape[1]
    cols = torch.arange(t, device=m.device)
    start = run_start(m)
    end = start + m.sum(1) if not left_only else torch.full_like(start, t)
    want = (cols[None] >= start[:, None]) & (cols[None] < end[:, None])
    if not torch.equal(m, want):
        bad = int((m != want).any(1).nonzero()[0])
        kind = "left padding (zeros, then ones)" if left_only else "one run of ones per row (left / right padding)"
        raise ValueError(f"DASGForCausalLM: {what} must be {kind}; row {bad} is {m[bad].int().tolist()}. "
                         "Packed sequences (several documents in one row) are not supported by this model")


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row ``b`` of ``x [B, T, ...]`` rolled left by ``shift[b]``: ``out[b, j] = x[b, (j + shift[b]) % T]``."""
    t = x.shape[1]
    idx = (torch.arange(t, device=x.device)[None] + shift[:, None]) % max(t, 1)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)
