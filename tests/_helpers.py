"""Helpers shared by the test modules (imported as ``_helpers``: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import pytest
import torch

from dasg_kernels.backend import triton_can_run_on


def require_triton(device: torch.device, *ops: str) -> None:
    """Skip unless the Triton kernels can run on ``device`` (CUDA, or the CPU interpreter).

    Only the environment decides: a kernel that raises is a failure, never a skip.
    ``ops`` names the ops a test needs, for the skip message.
    """
    if not triton_can_run_on(device):
        what = ", ".join(ops) or "the kernels"
        pytest.skip(f"{what}: backend='triton' cannot run on {device} here (no CUDA, TRITON_INTERPRET unset)")
