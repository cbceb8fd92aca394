"""pytest setup for ``pytest benchmarks/ --benchmark-only`` (pytest-benchmark).

Importing :mod:`benchmarks` sets ``TRITON_INTERPRET=1`` on machines without a GPU before
anything imports ``dasg_kernels``; ``DASG_BENCH_QUICK=1`` selects the ``--quick`` matrices
on a GPU (the CPU always runs the tiny ones).
"""
import benchmarks  # noqa: F401  (must come first: TRITON_INTERPRET)
import torch

if not torch.cuda.is_available():
    # tiny shapes: OpenMP threads only spin against each other on a small shared machine
    torch.set_num_threads(1)
