"""Input checks shared by every public op, raised in Python before any launch.

Every message names the argument and the expected value, so a user can fix the
call without reading the kernel.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    op: str = "op",
) -> torch.Tensor:
    """Check that ``t`` is a tensor of rank ``ndim`` and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same(op: str, what: str, **tensors: torch.Tensor) -> None:
    """Check that all ``tensors`` agree on ``what`` (``"dtype"`` or ``"device"``)."""
    values = {name: getattr(t, what) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        desc = ", ".join(f"{n}={str(v).replace('torch.', '')}" for n, v in values.items())
        raise (TypeError if what == "dtype" else ValueError)(f"{op}: {', '.join(values)} must share one {what}, got {desc}")


def check_last_dim_contiguous(op: str, **tensors: torch.Tensor) -> None:
    """The kernels accept any strides except along the last (feature) dimension."""
    for name, t in tensors.items():
        if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{op}: {name} must have stride 1 in its last dimension (got strides {tuple(t.stride())}); "
                f"call {name}.contiguous() first"
            )


def check_int(op: str, name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """Check an integer argument lies in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{op}: {name} must be in [{lo}, {hi}], got {value}")
    return value


def check_cu_seqlens(
    op: str,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    total_q: int,
    total_k: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[list[int], list[int]]:
    """Check the values of a packed batch's sequence bounds (flash-attn's varlen layout).

    ``cu_seqlens_q, cu_seqlens_k``: int32 ``[B + 1]`` on one device (their metadata is
    checked by the op). Reads both on the host in one transfer (a sync on CUDA: eager
    only) and raises a ``ValueError`` naming the argument unless each starts at 0, never
    decreases and ends at its packed length (``total_q = q.shape[0]``, ``total_k =
    k.shape[0]``), every sequence has ``len_q <= len_k``, and ``max_seqlen_q`` /
    ``max_seqlen_k`` are at least the longest ``len_q`` / ``len_k``.

    Returns the bounds as Python lists (the ``torch`` backend loops over them).
    """
    if cu_seqlens_q is cu_seqlens_k:
        bq = bk = cu_seqlens_q.tolist()
    else:
        both = torch.cat([cu_seqlens_q, cu_seqlens_k]).tolist()
        bq, bk = both[: cu_seqlens_q.shape[0]], both[cu_seqlens_q.shape[0]:]
    for name, b, total, length, mx_name, mx in (
        ("cu_seqlens_q", bq, total_q, "q.shape[0]", "max_seqlen_q", max_seqlen_q),
        ("cu_seqlens_k", bk, total_k, "k.shape[0]", "max_seqlen_k", max_seqlen_k),
    ):
        if b[0] != 0:
            raise ValueError(f"{op}: {name} must start at 0, got {name}[0] = {b[0]}")
        lens = [e - s for s, e in zip(b[:-1], b[1:])]
        bad = next((i for i, n in enumerate(lens) if n < 0), None)
        if bad is not None:
            raise ValueError(f"{op}: {name} must be non-decreasing, got {name}[{bad}] = {b[bad]} > "
                             f"{name}[{bad + 1}] = {b[bad + 1]}")
        if b[-1] != total:
            raise ValueError(f"{op}: {name} must end at the packed length {length} = {total}, "
                             f"got {name}[-1] = {b[-1]}")
        longest = max(lens, default=0)
        if longest > mx:
            raise ValueError(f"{op}: {mx_name} ({mx}) must be >= the longest sequence of {name} "
                             f"({longest}, sequence {lens.index(longest)})")
    for i in range(len(bq) - 1):
        nq, nk = bq[i + 1] - bq[i], bk[i + 1] - bk[i]
        if nq > nk:
            raise ValueError(f"{op}: sequence {i} has {nq} queries (cu_seqlens_q) and {nk} keys (cu_seqlens_k); "
                             f"needs len_q <= len_k (a sequence's queries are its last positions)")
    return bq, bk
