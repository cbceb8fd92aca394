"""The host loop bounds (``dasg_kernels.attention.loop_bounds``, used by the offline compile
report) equal the kernels' ``@triton.jit`` ones (``dasg_kernels.attention.common``).

A small kernel calls the four jit functions on vectors of arguments (random ints around the
tile and group sizes, plus edge rows: empty windows, a single query, negative shifted bounds
as context parallelism passes them, bounds past the sequence) and stores every result; the
host functions must give the same ints for every row, block size and summary-flag pair.
Runs in Triton's interpreter on a CPU (TRITON_INTERPRET=1, set by conftest) and compiled on
a GPU.
"""
from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl

from dasg_kernels.attention import common
from dasg_kernels.attention import loop_bounds as lb


def _jit(name: str):
    """The kernels' jit function ``name`` of ``attention/common.py`` (public, or underscored)."""
    fn = getattr(common, name, None) or getattr(common, "_" + name)
    assert type(fn).__name__ in ("JITFunction", "InterpretedFunction"), f"{name} is not a @triton.jit function"
    return fn


_local_key_range = _jit("local_key_range")
_summary_key_range = _jit("summary_key_range")
_local_query_range = _jit("local_query_range")
_summary_query_range = _jit("summary_query_range")

N_ARGS, N_OUT = 8, 15


@triton.jit
def _bounds_kernel(args, out, N, BLOCK: tl.constexpr, ROWS: tl.constexpr, SUM_BEFORE: tl.constexpr,
                   SUM_AFTER: tl.constexpr):
    r = tl.arange(0, ROWS)
    m = r < N
    first = tl.load(args + r * 8 + 0, mask=m, other=0)
    last = tl.load(args + r * 8 + 1, mask=m, other=0)
    left = tl.load(args + r * 8 + 2, mask=m, other=0)
    right = tl.load(args + r * 8 + 3, mask=m, other=0)
    n = tl.load(args + r * 8 + 4, mask=m, other=1)
    G = tl.load(args + r * 8 + 5, mask=m, other=1)
    NG = tl.load(args + r * 8 + 6, mask=m, other=1)
    g_last = tl.load(args + r * 8 + 7, mask=m, other=0)
    lo, full_lo, full_hi, hi = _local_key_range(first, last, left, right, n, BLOCK)
    s_full, s_bhi, s_alo = _summary_key_range(first, last, left, right, G, NG, BLOCK, SUM_BEFORE, SUM_AFTER)
    q_lo, q_flo, q_fhi, q_hi = _local_query_range(first, last, left, right, n, BLOCK)
    a_hi, b_lo, b_full, b_tail = _summary_query_range(first, g_last, left, right, G, n, BLOCK, SUM_BEFORE, SUM_AFTER)
    o = out + r * 15
    tl.store(o + 0, lo, mask=m)
    tl.store(o + 1, full_lo, mask=m)
    tl.store(o + 2, full_hi, mask=m)
    tl.store(o + 3, hi, mask=m)
    tl.store(o + 4, s_full, mask=m)
    tl.store(o + 5, s_bhi, mask=m)
    tl.store(o + 6, s_alo, mask=m)
    tl.store(o + 7, q_lo, mask=m)
    tl.store(o + 8, q_flo, mask=m)
    tl.store(o + 9, q_fhi, mask=m)
    tl.store(o + 10, q_hi, mask=m)
    tl.store(o + 11, a_hi, mask=m)
    tl.store(o + 12, b_lo, mask=m)
    tl.store(o + 13, b_full, mask=m)
    tl.store(o + 14, b_tail, mask=m)


def _host(row: list[int], block: int, before: bool, after: bool) -> tuple[int, ...]:
    first, last, left, right, n, g, ng, g_last = row
    return (*lb.local_key_range(first, last, left, right, n, block),
            *lb.summary_key_range(first, last, left, right, g, ng, block, before, after),
            *lb.local_query_range(first, last, left, right, n, block),
            *lb.summary_query_range(first, g_last, left, right, g, n, block, before, after))


def _rows(seed: int, n_random: int) -> list[list[int]]:
    """``[first, last, left, right, n, G, NG, g_last]`` rows: edge cases, then random ones.
    For the summary query range ``first`` doubles as the first group and ``g_last`` is the last."""
    rng = random.Random(seed)
    rows = [
        [0, 0, 0, 0, 1, 1, 1, 0],            # one query, one key, a zero window
        [0, 63, 2047, 0, 64, 16, 4, 3],      # the first block of a causal window
        [4096, 4159, 2047, 0, 32768, 256, 128, 127],
        [100, 100, 5, 7, 101, 3, 34, 33],    # a single query at the end of the keys
        [0, 127, 4096, 4096, 128, 64, 2, 1],  # windows past the sequence (after effective_window)
        [50, 90, -40, 3, 120, 8, 15, 14],     # negative shifted bounds (context parallelism)
        [50, 90, 3, -40, 120, 8, 15, 14],
        [10, 20, -30, -30, 25, 4, 7, 6],      # a window that sees nothing
        [1000, 1100, 0, 0, 999, 7, 143, 150],  # queries past the keys
    ]
    for _ in range(n_random):
        n = rng.choice([1, 2, 17, 64, 100, 257, 1000, 4096])
        first = rng.randrange(0, n + 40)
        last = first + rng.choice([0, 1, rng.randrange(0, 160)])
        left = rng.choice([0, 1, rng.randrange(-64, 300), n, n + 5])
        right = rng.choice([0, 0, 1, rng.randrange(-64, 300), n])
        g = rng.choice([1, 2, 3, 4, 16, 64, rng.randrange(1, 100)])
        ng = -(-n // g)
        g_last = first + rng.randrange(0, 40)
        rows.append([first, last, left, right, n, g, ng, g_last])
    return rows


@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("before,after", [(True, False), (False, True), (True, True), (False, False)])
def test_host_loop_bounds_equal_the_jit_ones(block, before, after, device):
    rows = _rows(seed=block * 4 + 2 * before + after, n_random=500)
    args = torch.tensor(rows, dtype=torch.int32, device=device)
    out = torch.full((len(rows), N_OUT), -7, dtype=torch.int32, device=device)
    _bounds_kernel[(1,)](args, out, len(rows), BLOCK=block, ROWS=triton.next_power_of_2(len(rows)),
                         SUM_BEFORE=before, SUM_AFTER=after)
    got = out.cpu().tolist()
    for row, jit in zip(rows, got):
        assert tuple(jit) == _host(row, block, before, after), f"row {row}, block {block}, flags {before, after}"


def test_trunc_div_truncates_toward_zero():
    assert [lb.trunc_div(a, 4) for a in (-9, -8, -1, 0, 1, 7, 8)] == [-2, -2, 0, 0, 0, 1, 2]
    assert lb.trunc_div(9, -4) == -2 and lb.trunc_div(-9, -4) == 2
