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


# --------------------------------------------------------------------------- multi-process tests


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (gloo's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(entry, world: int, args: tuple, *, timeout: float = 300.0) -> None:
    """Run ``entry(rank, *args)`` in ``world`` processes and wait at most ``timeout`` seconds.

    Forked where possible (children skip re-importing torch: seconds each on 2 cores), not
    after CUDA was initialised here. A rank's exception fails the test with its traceback; a
    hang (e.g. ranks issuing collectives in different orders) fails it after ``timeout``
    instead of blocking the whole suite.
    """
    import time

    import torch.multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized() else "spawn"
    ctx = mp.start_processes(entry, args=args, nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            alive = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
            pytest.fail(f"{world} ranks did not finish in {timeout:.0f} s (still running: ranks {alive}); "
                        f"a collective that not every rank reaches hangs")
