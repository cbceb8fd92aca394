"""dasg-kernels: Triton kernels for long-sequence Mixture-of-Experts transformers.

Public ops (each takes ``backend="auto" | "triton" | "torch"``; see
:mod:`dasg_kernels.backend`):

- attention (:mod:`dasg_kernels.attention`): :func:`swa_attention` and friends,
  grouped sliding-window attention with optional group summaries (GMHA).
- routed experts (:mod:`dasg_kernels.moe`): :func:`route`, :func:`expert_ffn`
  and friends (ADR + grouped SwiGLU experts).

Every name in ``attention.__all__`` and ``moe.__all__`` is re-exported here.
:mod:`dasg_kernels.reference` (the readable PyTorch oracle of the tests) is loaded on
first use of ``dasg_kernels.reference``: no module of the package imports it.
"""
import importlib
from typing import Any

from dasg_kernels import attention, moe
from dasg_kernels._version import __version__  # noqa: F401
from dasg_kernels.attention import *  # noqa: F401,F403
from dasg_kernels.backend import interpreter_enabled, resolve_backend
from dasg_kernels.moe import *  # noqa: F401,F403

__all__ = [
    "attention",
    "interpreter_enabled",
    "moe",
    "reference",
    "resolve_backend",
    *attention.__all__,
    *moe.__all__,
]


def __getattr__(name: str) -> Any:
    if name == "reference":
        return importlib.import_module("dasg_kernels.reference")
    raise AttributeError(f"module 'dasg_kernels' has no attribute {name!r}")
