"""The one place that decides how an op runs.

Three ways to run every public op:

=========  ==========================================  =========================================
backend    runs on                                     what runs
=========  ==========================================  =========================================
triton     CUDA tensors                                the compiled Triton kernels
triton     CPU tensors with ``TRITON_INTERPRET=1``     the same kernels, interpreted
torch      anything                                    PyTorch (blockwise attention, references)
=========  ==========================================  =========================================

``backend="auto"`` picks ``triton`` where it can run and ``torch`` otherwise.
Asking for ``triton`` on a CPU tensor without the interpreter is a ``ValueError``
raised here, never a crash inside Triton.

``TRITON_INTERPRET=1`` is read by Triton when a kernel is decorated, so it must be
set before ``dasg_kernels`` is imported (``tests/conftest.py`` and ``.ci/run`` do).
Its value at import is kept (:data:`INTERPRET_AT_IMPORT`); if it changes later,
``triton`` is a ``ValueError`` saying so and ``auto`` runs ``torch``.

The ``torch`` backend of attention is :mod:`dasg_kernels.attention.blockwise`
(``O(T * (W + T/G))`` time and memory), that of the routed experts
:mod:`dasg_kernels.moe.experts_torch` (static shapes: compiles without a graph
break); ``dasg_kernels.reference`` is the readable oracle of the tests, imported by
no package module.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


#: ``TRITON_INTERPRET`` when this package was imported: Triton decides at decoration
#: whether a kernel is compiled or interpreted, so this is what the kernels were (or,
#: for the modules imported lazily, will be) built for.
INTERPRET_AT_IMPORT: bool = _interpret_env()


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET=1`` was
    set when ``dasg_kernels`` was imported and still is. Setting it later does not turn
    the interpreter on (the kernels are already decorated); see :func:`interpreter_mismatch`."""
    return INTERPRET_AT_IMPORT and _interpret_env()


def interpreter_mismatch() -> str | None:
    """Why the Triton kernels cannot run at all in this process, or ``None``:
    ``TRITON_INTERPRET`` changed since ``dasg_kernels`` was imported (some kernels would
    be compiled and others interpreted, which crashes inside Triton)."""
    now = _interpret_env()
    if now == INTERPRET_AT_IMPORT:
        return None
    if now:
        return ("TRITON_INTERPRET=1 was set after dasg_kernels was imported; Triton reads it when a kernel "
                "is decorated, so set TRITON_INTERPRET=1 before importing dasg_kernels, or use backend='torch'")
    return ("TRITON_INTERPRET was unset after dasg_kernels was imported with TRITON_INTERPRET=1; "
            "set it before importing dasg_kernels and leave it, or use backend='torch'")


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def interpreted_bf16(t: torch.Tensor) -> bool:
    """A bf16 tensor under Triton's CPU interpreter, whose bf16 ``tl.dot`` multiplies bit
    patterns (triton-lang/triton#11584): the launchers run the fp32 kernels and round."""
    return t.dtype == torch.bfloat16 and interpreter_enabled()


def bf16_via_fp32(fn: Callable[..., Any], *tensors: torch.Tensor | None) -> Any:
    """The interpreter's bf16 workaround in one place: call ``fn`` on the fp32 copies of
    ``tensors`` (``None`` passes through) and round its output to bf16; when ``fn``
    returns a tuple only the first element (the attention output) is rounded, the rest
    (e.g. the fp32 ``lse``) is returned as is. Autograd follows the casts, so gradients
    come back in bf16. Use it where :func:`interpreted_bf16` is true."""
    res = fn(*(None if t is None else t.float() for t in tensors))
    if isinstance(res, tuple):
        return (res[0].to(torch.bfloat16), *res[1:])
    return res.to(torch.bfloat16)


def triton_can_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if not triton_available() or interpreter_mismatch() is not None:
        return False
    if device.type == "cuda":
        return not interpreter_enabled()
    if device.type == "cpu":
        return interpreter_enabled()
    return False


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str = "op") -> str:
    """Return ``"triton"`` or ``"torch"`` for a call of ``op`` on ``tensors``.

    Raises ``ValueError`` for an unknown backend name, for tensors on different
    devices, and for ``backend="triton"`` where Triton cannot run (a CPU tensor
    without ``TRITON_INTERPRET=1``, a CUDA tensor while the interpreter is on, or any
    tensor once ``TRITON_INTERPRET`` changed since import); ``auto`` runs ``torch`` there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices)) if devices else torch.device("cpu")
    if backend == "torch":
        return "torch"
    if triton_can_run_on(device):
        return "triton"
    if backend == "auto":
        return "torch"
    mismatch = interpreter_mismatch()
    if mismatch is not None:
        reason = mismatch
    elif device.type == "cpu":
        reason = "tensors are on the CPU; set TRITON_INTERPRET=1 before importing dasg_kernels to run the kernels in Triton's interpreter, or use backend='torch'"
    elif device.type == "cuda":
        reason = "TRITON_INTERPRET=1 is set, so Triton only runs CPU tensors in this process"
    else:
        reason = f"device type {device.type!r} is not supported by the Triton kernels"
    raise ValueError(f"{op}: backend='triton' cannot run here: {reason}")


def autotune_enabled() -> bool:
    """Whether the CUDA kernels autotune (``DASG_AUTOTUNE=0`` pins one config per kernel:
    no benchmarking on a new shape, for tests, quick runs and cross-process reproducibility).
    Read at each launch; the interpreter never autotunes."""
    return os.environ.get("DASG_AUTOTUNE", "1") != "0"
