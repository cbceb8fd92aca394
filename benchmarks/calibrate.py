"""``python -m benchmarks.calibrate``: the command of :mod:`benchmarks.offline.calibrate` (see there)."""
import sys

from benchmarks.offline import rerun_without_interpreter

if __name__ == "__main__":
    rerun_without_interpreter("benchmarks.calibrate")  # before anything imports dasg_kernels
    from benchmarks.offline.calibrate import main

    sys.exit(main())
