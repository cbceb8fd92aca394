"""What the kernels compile to on Hopper, without a GPU, and the experiments built on it.

- ``offline_compile.py``        the engine: records the launches of the public ops, compiles
                                them for sm_90a with Triton's own ptxas / cuobjdump, and reads
                                the SASS (loops, instruction mix, what runs while a wgmma is in flight)
- ``compile_report.py``         ``python -m benchmarks.compile_report``: the calibrated speed
                                model and the report (``results/compile-sm90a.{json,md}``)
- ``calibrate.py``              ``python -m benchmarks.calibrate``: fits the model's constants on
                                peer kernels with published H100 figures (``results/calibration.*``)
- ``fwd_overlap_experiment.py`` the attention kernels' configs against the model's bounds
                                (``results/fwd-overlap.md``)
- ``tma_experiment.py``         TMA descriptor loads against pointer loads (``results/tma-experiment.md``)

These tools compile the real ``@triton.jit`` functions, so they never run under Triton's
interpreter: :func:`rerun_without_interpreter` re-executes a command without it.
"""
from __future__ import annotations

import os
import sys

#: benchmarks/results, where the reports are written and the calibration is read
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
#: the repository root
ROOT = os.path.dirname(os.path.dirname(RESULTS))


def rerun_without_interpreter(module: str) -> None:
    """Re-execute ``python -m <module> <argv>`` with ``TRITON_INTERPRET=0`` when the
    interpreter is on (it replaces every ``@triton.jit`` function); returns otherwise.
    Call it before anything imports ``dasg_kernels``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        env = dict(os.environ, TRITON_INTERPRET="0")
        os.execvpe(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
