"""Test setup: run Triton kernels in the interpreter on CPU-only machines.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before
any test module imports ``dasg_kernels``.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (TRITON_INTERPRET off)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device the kernels are tested on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
