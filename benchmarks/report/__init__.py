"""Results JSON -> Markdown tables, PASS/MISS target lines and PNG plots; README snippet.

::

    python -m benchmarks.report benchmarks/results/<file>.json   # regenerate its .md and .png
    python -m benchmarks.report --latest                          # write benchmarks/results/LATEST.md
    python -m benchmarks.report --latest --readme README.md       # also replace the block between
                                                                  # <!-- BENCHMARKS:START/END --> in README.md

``--latest`` picks the newest *committed* (``git ls-files``) GPU results file, so the
README never shows numbers that are not in the repository; with none it writes a note
saying that no GPU run has been committed yet.

Speed-ups are ``baseline ms / our ms`` for the same case and mode (> 1: ours is faster).
They are shown only for GPU runs of the real kernels: on the CPU (interpreter) or with
the torch stand-in they would be meaningless, and a family whose kernel failed a
correctness check shows none at all.

Modules: :mod:`~benchmarks.report.targets` (the targets as data and their verdicts),
:mod:`~benchmarks.report.tables` (the Markdown page), :mod:`~benchmarks.report.plots` (one
function per figure), :mod:`~benchmarks.report.readme` (the README block),
:mod:`~benchmarks.report.index` (record lookups and number formatting).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from benchmarks.report.index import RESULTS_DIR, VARLEN_METHODS, Index
from benchmarks.report.plots import NO_DATA_CPU, make_plots, mark_empty_panel
from benchmarks.report.readme import (README_END, README_START, committed_results, latest_snippet, pick_latest,
                                      write_latest)
from benchmarks.report.tables import markdown
from benchmarks.report.targets import TARGETS, Target, evaluate_targets, target_lines

__all__ = ["Index", "NO_DATA_CPU", "README_END", "README_START", "RESULTS_DIR", "TARGETS", "Target", "VARLEN_METHODS",
           "committed_results", "evaluate_targets", "latest_snippet", "main", "make_plots", "mark_empty_panel",
           "markdown", "pick_latest", "target_lines", "write_latest", "write_report"]


def write_report(results: dict[str, Any], out_dir: str, stem: str, *, plots: bool = True) -> list[str]:
    """Write ``<stem>.md`` (and ``<stem>-*.png``) next to the JSON; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    pngs = make_plots(results, out_dir, stem) if plots else []
    md = os.path.join(out_dir, stem + ".md")
    with open(md, "w") as f:
        f.write(markdown(results, pngs))
    return [md, *pngs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", help="a results JSON to render (its .md and .png are rewritten)")
    p.add_argument("--latest", action="store_true", help="write LATEST.md from the newest committed GPU run")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--out", default=None, help="where --latest writes (default <results-dir>/LATEST.md)")
    p.add_argument("--readme", default=None, help="also replace the BENCHMARKS block of this README")
    p.add_argument("--include-uncommitted", action="store_true", help="--latest also considers untracked files")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if not args.results and not args.latest:
        p.error("give a results JSON or --latest")
    if args.results:
        with open(args.results) as f:
            res = json.load(f)
        res["targets"] = evaluate_targets(res)
        d, stem = os.path.dirname(os.path.abspath(args.results)), os.path.splitext(os.path.basename(args.results))[0]
        for path in write_report(res, d, stem, plots=not args.no_plots):
            print(f"wrote {path}")
        print("\n".join(target_lines(res)))
    if args.latest:
        for path in write_latest(args.results_dir, args.out, args.readme, args.include_uncommitted):
            print(f"wrote {path}")
    return 0
