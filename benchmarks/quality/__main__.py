"""``python -m benchmarks.quality``: see :mod:`benchmarks.quality`."""
import sys

from benchmarks.quality.cli import main

sys.exit(main())
