"""``python -m benchmarks.report``: see :mod:`benchmarks.report`."""
import sys

from benchmarks.report import main

sys.exit(main())
