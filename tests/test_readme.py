"""Every ```python block of README.md runs as written.

The blocks run in README order in one child process (``TRITON_INTERPRET=1``, so the Triton
kernels run in the interpreter on the CPU), each in a fresh namespace, so each block must be
complete on its own: what a reader copies is what runs. A block whose first line is
``# needs a CUDA GPU`` or ``# needs several processes ...`` is skipped, and the skip reason
names it. The whole run takes well under a minute on a CPU.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
#: First-line comments that mark a block this test cannot run on a CPU in one process.
SKIP_MARKERS = ("# needs a CUDA GPU", "# needs several processes")
TIMEOUT_S = 300


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the opening fence, source)`` of every ```python block of ``text``."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if re.fullmatch(r"\s*```python\s*", lines[i]):
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not re.fullmatch(r"\s*```\s*", lines[i]):
                body.append(lines[i])
                i += 1
            blocks.append((start, textwrap.dedent("\n".join(body)) + "\n"))
        i += 1
    return blocks


def skip_marker(src: str) -> str | None:
    """The block's skip marker (its first line), or ``None`` when it runs on a CPU."""
    first = src.lstrip("\n").splitlines()[0].strip() if src.strip() else ""
    return first if first.startswith(SKIP_MARKERS) else None


with open(README) as _f:
    BLOCKS = python_blocks(_f.read())
SKIPPED = [(line, skip_marker(src)) for line, src in BLOCKS if skip_marker(src)]
RUNNABLE = [(line, src) for line, src in BLOCKS if not skip_marker(src)]

# Runs each block in its own namespace; one JSON line per block: its line, ok, the error.
_DRIVER = r'''
import json, sys, time, traceback
blocks = json.load(sys.stdin)
for line, src in blocks:
    t0 = time.perf_counter()
    try:
        # padded so that tracebacks give README.md's own line numbers
        exec(compile("\n" * line + src, "README.md", "exec"), {"__name__": "__main__"})
        err = None
    except BaseException:
        err = traceback.format_exc()
    print("@@BLOCK " + json.dumps({"line": line, "error": err, "s": round(time.perf_counter() - t0, 2)}), flush=True)
'''


@pytest.fixture(scope="module")
def block_results(tmp_path_factory) -> dict[int, dict]:
    """Run every CPU block once, in order, in a child process; results by opening line."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(RUNNABLE), capture_output=True,
                          text=True, cwd=tmp_path_factory.mktemp("readme"), env=env, timeout=TIMEOUT_S)
    results = {}
    for out_line in proc.stdout.splitlines():
        if out_line.startswith("@@BLOCK "):
            r = json.loads(out_line[len("@@BLOCK "):])
            results[r["line"]] = r
    if len(results) < len(RUNNABLE):  # the child died: every block after the last report fails with its output
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
        for line, _ in RUNNABLE:
            results.setdefault(line, {"line": line, "error": f"child process exited {proc.returncode}:\n{tail}"})
    return results


def test_readme_has_python_blocks():
    assert len(RUNNABLE) >= 5, [line for line, _ in BLOCKS]


@pytest.mark.parametrize("line", [line for line, _ in RUNNABLE] + [
    pytest.param(line, marks=pytest.mark.skip(reason=f"README.md:{line} starts with '{marker}'"))
    for line, marker in SKIPPED], ids=lambda n: f"README.md:{n}")
def test_readme_block_runs(block_results, line):
    r = block_results[line]
    if r["error"] is not None:
        pytest.fail(f"the README.md block at line {line} failed:\n{r['error']}", pytrace=False)


def test_python_blocks_parser():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n  ```python\n  # needs a CUDA GPU\n  b = 2\n  ```\n"
    blocks = python_blocks(text)
    assert blocks == [(2, "a = 1\n"), (8, "# needs a CUDA GPU\nb = 2\n")]
    assert skip_marker("# needs several processes (torchrun)\nimport os\n") == "# needs several processes (torchrun)"
    assert skip_marker(blocks[0][1]) is None and skip_marker(blocks[1][1]) == "# needs a CUDA GPU"
