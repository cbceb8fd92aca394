"""``python -m benchmarks.compile_report``: the command of :mod:`benchmarks.offline.compile_report` (see there)."""
import sys

from benchmarks.offline import rerun_without_interpreter

if __name__ == "__main__":
    rerun_without_interpreter("benchmarks.compile_report")  # before anything imports dasg_kernels
    from benchmarks.offline.compile_report import main

    sys.exit(main())
