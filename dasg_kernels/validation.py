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
