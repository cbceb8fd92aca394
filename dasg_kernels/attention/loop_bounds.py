"""Host (plain Python) copies of the attention kernels' loop bounds.

Each function here computes, on Python ints, what the ``@triton.jit`` function of the same
name in :mod:`dasg_kernels.attention.common` computes in a kernel:
which key (or query) tiles a program visits, and which of them need the mask. The offline
compile report counts a kernel's loop iterations with them, so its work model follows the
kernels; ``tests/kernels/attention/test_loop_bounds.py`` runs the jit functions on a grid of
arguments and checks that both agree.

Arguments are positions and lengths as the kernels receive them (window bounds after
:func:`dasg_kernels.attention.host.effective_window`); block sizes are the kernels'
``BLOCK_M`` / ``BLOCK_N``. Integer division is Triton's on signed ints: it truncates toward
zero (:func:`trunc_div`), which differs from Python's ``//`` for negative operands.
"""
from __future__ import annotations


def trunc_div(a: int, b: int) -> int:
    """``a // b`` as a kernel computes it on signed ints: the quotient truncated toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _round_down(x: int, block: int) -> int:
    return trunc_div(x, block) * block


def local_key_range(first: int, last: int, left: int, right: int, n_keys: int,
                    block_n: int) -> tuple[int, int, int, int]:
    """Key tiles for the query positions ``[first, last]``: ``(lo, full_lo, full_hi, hi)``
    with ``lo <= full_lo <= full_hi <= hi``; ``[lo, full_lo)`` and ``[full_hi, hi)`` need the
    mask, ``[full_lo, full_hi)`` is visible to every query of the block."""
    lo = _round_down(max(first - left, 0), block_n)
    hi = min(last + right + 1, n_keys)
    full_lo = _round_down(max(last - left, 0) + block_n - 1, block_n)
    full_lo = min(max(full_lo, lo), hi)
    full_hi = _round_down(min(first + right + 1, n_keys), block_n)
    full_hi = max(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


def summary_key_range(first: int, last: int, left: int, right: int, g: int, ng: int, block_n: int,
                      sum_before: bool, sum_after: bool) -> tuple[int, int, int]:
    """Summary tiles for the query positions ``[first, last]``: ``(full, b_hi, a_lo)``;
    ``[0, full)`` is visible to every query, ``[full, b_hi)`` holds the rest of the "before"
    summaries (masked), ``[a_lo, ng)`` the "after" ones (masked). ``g``: the group size."""
    if sum_before:
        b_hi = trunc_div(max(last - left, 0), g)
        full = _round_down(trunc_div(max(first - left, 0), g), block_n)
        b_end = _round_down(b_hi + block_n - 1, block_n)
    else:
        b_hi = full = b_end = 0
    if sum_after:
        a_lo = max(_round_down(trunc_div(first + right, g) + 1, block_n), b_end)
    else:
        a_lo = ng
    return full, b_hi, a_lo


def local_query_range(first_n: int, last_n: int, left: int, right: int, n_q: int,
                      block_m: int) -> tuple[int, int, int, int]:
    """Query tiles that see some key of ``[first_n, last_n]`` (the dk/dv loop):
    :func:`local_key_range` with ``left`` and ``right`` swapped."""
    return local_key_range(first_n, last_n, right, left, n_q, block_m)


def summary_query_range(g_first: int, g_last: int, left: int, right: int, g: int, n_q: int, block_m: int,
                        sum_before: bool, sum_after: bool) -> tuple[int, int, int, int]:
    """Query tiles that see some summary of the groups ``[g_first, g_last]`` (the summary
    dk/dv loop): ``(a_hi, b_lo, b_full, b_tail)``; masked ``[0, a_hi)`` ("after" queries),
    masked ``[b_lo, b_full)``, unmasked ``[b_full, b_tail)``, masked ``[b_tail, n_q)``."""
    a_hi = min(max(g_last * g - right, 0), n_q) if sum_after else 0
    if sum_before:
        b_lo = max(_round_down((g_first + 1) * g + left, block_m), _round_down(a_hi + block_m - 1, block_m))
        b_full = _round_down((g_last + 1) * g + left + block_m - 1, block_m)
        b_full = min(max(b_full, b_lo), n_q)
        b_tail = max(_round_down(n_q, block_m), b_full)
    else:
        b_lo = b_full = b_tail = n_q
    return a_hi, b_lo, b_full, b_tail
