"""Triton helpers shared by the attention kernels: tile loads, visibility, loop bounds.

Conventions (FLA style): ``b_`` block values, ``p_`` pointers, ``o_`` offsets, ``m_`` masks.
Positions: query row ``r`` is at position ``i = Q_OFFSET + r``; local key ``j`` is at
position ``j``; summary key ``g`` stands for group ``[g*G, (g+1)*G)``.

The launchers pass *effective* window bounds: an unbounded side (``-1``) becomes
``T_K`` and any bound larger than ``T_K`` is clipped to it, so every kernel works
with ``0 <= left, right <= T_K`` and plain integer arithmetic (no ``-1`` special
case, no int32 overflow). With ``left = T_K`` the "before" summary count
``max(i - left, 0) // G`` is 0 for every query, and with ``right = T_K`` the first
"after" summary ``(i + right) // G + 1`` is ``>= ceil(T_K / G)``, so unbounded sides
also switch the summaries off exactly as :func:`reference.summary_mask` does.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # Python floats for the launchers ...
LN2 = 0.6931471805599453
K_LOG2E = tl.constexpr(LOG2E)  # ... and constexpr globals for the kernels
K_LN2 = tl.constexpr(LN2)

#: Tests set this to fill every buffer the launchers allocate with NaN, so an output
#: element that a kernel forgets to write fails the comparison (FLA's conftest habit).
POISON_ALLOCATIONS = False


def new_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for every buffer a launcher hands to a kernel (NaN-filled when poisoned)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_ALLOCATIONS:
        t.fill_(float("nan"))
    return t


class Varlen(NamedTuple):
    """A packed (varlen) batch in flash-attn's layout: rows ``[cu_q[b], cu_q[b+1])`` of
    ``q [total_q, H, D]`` are sequence ``b`` (keys: ``cu_k``); int32 ``cu_*`` of length
    ``B + 1`` on the device, and the caller's bounds ``max_q >= max(len_q)``,
    ``max_k >= max(len_k)`` (they size the grid and the summary buffers: no host read)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    @property
    def batch(self) -> int:
        return self.cu_q.shape[0] - 1


def batched_view(x: torch.Tensor, varlen: Varlen | None) -> torch.Tensor:
    """``x [total, H, D]`` of a varlen batch as ``[B, total, H, D]`` with batch stride 0
    (the kernels add each sequence's start row themselves); dense tensors unchanged."""
    if varlen is None:
        return x
    return x.unsqueeze(0).expand(varlen.batch, *x.shape)


#: CUDA limit on grid axes 1 and 2 (axis 0 allows 2**31 - 1): the launchers put the
#: ``batch * heads`` programs there.
MAX_GRID_YZ = 65535


def block_d(d: int) -> int:
    """``BLOCK_D`` of a head dim: the next power of two, at least 16 (``tl.dot``'s smallest K)."""
    return max(16, triton.next_power_of_2(d))


def no_specialize(names: str) -> list[str]:
    """``do_not_specialize`` list of a kernel from its space-separated int argument names.

    Triton compiles a separate kernel for each combination of "== 1" / "divisible by 16"
    / other of every int argument. For sequence lengths, window bounds, group sizes and
    head counts that only multiplies compilations (each distinct (T, window, G) of a test
    sweep would compile anew, 2-10 s per kernel on sm_90) for no gain: none of them sets
    the alignment of a tile load. Nor do the strides of ``lse [B, H, T]`` and ``delta``
    (``T`` and ``H*T``: 1, divisible by 16 or neither, depending on ``T``); they only
    address vectors of ``BLOCK_M`` floats. The q/k/v/o strides stay specialized (``D`` and
    multiples: divisibility by 16 gives vectorized tile loads).
    ``tests/test_attention.py`` checks that the names are arguments.
    """
    return names.split()


#: Rows of the largest tile any config loads. The in-tile offsets
#: ``o_t * stride_t + o_d`` are int32 (see :func:`_load_tile`), so a row stride must keep
#: ``MAX_TILE_ROWS * stride_t`` below 2**31.
MAX_TILE_ROWS = 256
MAX_ROW_STRIDE = (2**31 - 1) // MAX_TILE_ROWS - 256


def row_stride_ok(t: torch.Tensor) -> bool:
    """Whether the tile offsets of ``t [B, T, H, D]`` fit in int32 (stride of T, in elements)."""
    return t.shape[1] <= 1 or t.stride(1) <= MAX_ROW_STRIDE


def check_row_stride(op: str, **tensors: torch.Tensor) -> None:
    """Raise a ``ValueError`` for a sequence stride the int32 tile offsets cannot address."""
    for name, t in tensors.items():
        if not row_stride_ok(t):
            raise ValueError(f"{op}: {name}.stride(1) = {t.stride(1)} elements between positions exceeds the "
                             f"kernels' limit {MAX_ROW_STRIDE}; call {name}.contiguous() first")


def check_grid(op: str, n_programs: int, what: str) -> None:
    """Raise a ``ValueError`` (instead of a CUDA launch error) past the grid-axis limit."""
    if n_programs > MAX_GRID_YZ:
        raise ValueError(f"{op}: {what} = {n_programs} exceeds the CUDA grid limit {MAX_GRID_YZ} "
                         f"of the kernels' second grid axis; split the batch")


def _scratch_allocator_var():
    """Triton's context variable holding the allocator of kernels' global scratch memory
    (``triton.set_allocator`` sets it), or ``None`` where this Triton has none."""
    try:
        from triton.runtime import _allocation
    except ImportError:
        return None
    var = getattr(_allocation, "_allocator", None)
    return var if all(hasattr(var, a) for a in ("get", "set", "reset")) else None


def tma_loads_ok(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may load the ``[B, T, H, D]`` tiles of ``tensors`` through TMA
    descriptors built on the device. Needs 2-byte elements (fp32 inputs keep exact FMA dots
    and pointer loads), a 16-byte aligned start, strides that are 16-byte multiples (every
    program moves the base by whole rows and heads), a positive row stride and a unit last
    stride, and on CUDA a GPU with TMA (compute capability 9+) and a Triton whose launches
    can be given the descriptors' scratch memory (:func:`tma_scratch`). CPU tensors (the
    interpreter) and ``meta`` tensors (offline compiles) take the TMA path."""
    for t in tensors:
        size = t.element_size()
        # the descriptor is [rows, D] with the row stride t.stride(1) (0 for an expanded
        # tensor: pointer loads); batch and head strides only move its start
        if size != 2 or t.dim() != 4 or t.stride(-1) != 1 or t.stride(1) <= 0 or t.data_ptr() % 16:
            return False
        if any(st * size % 16 for st in t.stride()[:-1]):
            return False
    dev = tensors[0].device
    if dev.type == "cuda":
        return torch.cuda.get_device_capability(dev)[0] >= 9 and _scratch_allocator_var() is not None
    return True


@contextlib.contextmanager
def tma_scratch(device: torch.device, enabled: bool = True):
    """Launches inside get an allocator for the global scratch memory that device-side TMA
    descriptors need (128 bytes per descriptor and program), unless the caller installed
    one with ``triton.set_allocator``; the caller's setting is restored afterwards."""
    var = _scratch_allocator_var()
    if not enabled or device.type != "cuda" or var is None or type(var.get()).__name__ != "NullAllocator":
        yield
        return

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    token = var.set(alloc)
    try:
        yield
    finally:
        var.reset(token)


def on_device_of_first_arg(fn):
    """Run a launcher with the CUDA device of its first (tensor) argument current.

    Triton launches on the *current* device, so a tensor on ``cuda:1`` while ``cuda:0``
    is current would be read by a kernel on the wrong device (FLA's ``input_guard``).
    """

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        ctx = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
        with ctx:
            return fn(x, *args, **kwargs)

    return wrapper


@triton.jit
def _load_tile(base, start, o_t, o_2d, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load rows ``start + o_t`` (a contiguous tile); rows ``>= n_rows`` (when ``CHECK_ROWS``)
    and columns ``>= HEAD_DIM`` read 0. Only the scalar ``start * stride_t`` is int64 (long
    sequences cannot overflow), and the int32 tile offsets (in range: the launchers
    reject row strides above ``MAX_ROW_STRIDE``, :func:`check_row_stride`)
    ``o_2d = o_t[:, None] * stride_t + o_d[None, :]`` are computed once by the kernel and
    shared by all its loops (one loop-invariant tensor instead of one per inlined loop:
    measured with cuobjdump on sm_90, this is what keeps register spills down)."""
    p = base + tl.cast(start, tl.int64) * stride_t + o_2d
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(p, mask=((start + o_t) < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(p, mask=((start + o_t) < n_rows)[:, None] & (o_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(p)
        else:
            x = tl.load(p, mask=(o_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _block_and_head(VARLEN: tl.constexpr):
    """``(block, batch * head, number of blocks)`` of this program. Dense launches put the
    blocks on grid axis 0 and ``batch * heads`` on axis 1 (at most 65535); varlen launches
    swap them, since a packed batch may hold many (mostly empty) sequences: e.g. ``B*T + 1``
    bounds sized for the worst case under ``torch.compile``."""
    if VARLEN:
        return tl.program_id(1), tl.program_id(0), tl.num_programs(1)
    else:
        return tl.program_id(0), tl.program_id(1), tl.num_programs(0)


def block_grid(n_blocks: int, n_bh: int, varlen: object, *rest: int) -> tuple[int, ...]:
    """The launch grid of :func:`_block_and_head` (``varlen``: any non-``None`` swaps the axes)."""
    return ((n_bh, n_blocks) if varlen is not None else (n_blocks, n_bh)) + rest


@triton.jit
def _seq_bounds(CU, i_b, n_rows, max_len):
    """``(start, length)`` of sequence ``i_b`` of a varlen batch (``CU``: int32 ``cu_seqlens``),
    clamped so that whatever ``CU`` holds (it is not checked under ``torch.compile`` or with
    ``validate=False``) the rows ``[start, start + length)`` lie in ``[0, n_rows)`` (the packed
    length) and ``0 <= length <= max_len`` (the ``max_seqlen`` that sized the grid and the
    summary buffers). ``start`` is int64 (it multiplies row strides), ``length`` int32."""
    start = tl.minimum(tl.maximum(tl.load(CU + i_b), 0), n_rows)
    end = tl.minimum(tl.maximum(tl.load(CU + i_b + 1), start), n_rows)
    return start.to(tl.int64), tl.minimum(end - start, max_len).to(tl.int32)


@triton.jit
def _store_tile(base, x, start, o_t, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a tile of rows ``start + o_t`` (cast to the buffer's dtype), masked."""
    p = base + tl.cast(start, tl.int64) * stride_t + (o_t[:, None] * stride_t + o_d[None, :])
    m = ((start + o_t) < n_rows)[:, None]
    if BLOCK_D != HEAD_DIM:
        m = m & (o_d < HEAD_DIM)[None, :]
    tl.store(p, x.to(base.dtype.element_ty), mask=m)


@triton.jit
def _local_visible(i, j, left, right, n_keys):
    """Query position ``i`` sees local key ``j`` (broadcasting)."""
    return (j >= i - left) & (j <= i + right) & (j < n_keys)


@triton.jit
def _local_window(i, left, right, n_keys, m_valid):
    """``(lo, width)`` of query positions ``i``: ``i`` sees local key ``j`` iff
    ``0 <= j - lo <= width`` (one unsigned compare per score, :func:`_in_window`), the same
    relation as :func:`_local_visible`. Rows that see no key, or where the mask ``m_valid``
    (like ``i``) is false, get ``lo = -1, width = 0``, which no ``j >= 0`` matches."""
    lo = i - left
    width = tl.minimum(i + right, n_keys - 1) - lo
    m_none = (width < 0) | (m_valid == 0)
    return tl.where(m_none, -1, lo), tl.where(m_none, 0, width).to(tl.uint32)


@triton.jit
def _in_window(j, lo, width):
    """Key ``j`` lies in the window ``(lo, width)`` of :func:`_local_window` (broadcasting)."""
    return (j - lo).to(tl.uint32) <= width


@triton.jit
def _summary_visible(i, g, left, right, G, NG, SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr):
    """Query position ``i`` sees the summary of group ``g`` (broadcasting).

    Before the window: ``(g+1)*G - 1 < i - left``  <=>  ``g < (i - left) // G`` (for ``i >= left``).
    After the window (non-causal only): ``g*G > i + right``  <=>  ``g >= (i + right) // G + 1``.
    """
    if SUM_BEFORE:
        vis = g < tl.maximum(i - left, 0) // G
        if SUM_AFTER:
            vis = vis | (g >= (i + right) // G + 1)
    else:
        vis = g >= (i + right) // G + 1
    return vis & (g < NG)


@triton.jit
def _visible(i, j, left, right, G, n_keys, IS_SUMMARY: tl.constexpr, SUM_BEFORE: tl.constexpr,
             SUM_AFTER: tl.constexpr):
    """Query position ``i`` sees key ``j``: a local key, or the summary of group ``j``
    when ``IS_SUMMARY`` (broadcasting)."""
    if IS_SUMMARY:
        vis = _summary_visible(i, j, left, right, G, n_keys, SUM_BEFORE, SUM_AFTER)
    else:
        vis = _local_visible(i, j, left, right, n_keys)
    return vis


@triton.jit
def _kv_tile(p, desc, start, o_t, o_2d, stride_t, o_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             TMA: tl.constexpr):
    """Rows ``start + o_t`` of a tile the main loops stream (keys, values; queries and dO in
    dk/dv), rows ``>= n_rows`` reading 0: a TMA load through the descriptor ``desc`` (whose
    shape bounds the rows, see :func:`tma_loads_ok`), or a masked load of ``p``."""
    if TMA:
        x = desc.load([start, 0])
    else:
        x = _load_tile(p, start, o_t, o_2d, stride_t, o_d, n_rows, HEAD_DIM, BLOCK_D, True)
    return x


@triton.jit
def _local_key_range(first, last, left, right, n_keys, BLOCK_N: tl.constexpr):
    """Key tiles for the query positions ``[first, last]``.

    Returns ``lo <= full_lo <= full_hi <= hi``: tiles in ``[lo, full_lo)`` and
    ``[full_hi, hi)`` need the mask, tiles in ``[full_lo, full_hi)`` are visible to
    every query of the block (and in bounds), so they are processed without a mask.
    Tiles outside ``[lo, hi)`` are never loaded.
    """
    lo = tl.maximum(first - left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(last + right + 1, n_keys)
    full_lo = (tl.maximum(last - left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(first + right + 1, n_keys) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _summary_key_range(first, last, left, right, G, NG, BLOCK_N: tl.constexpr,
                       SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr):
    """Summary tiles for the query positions ``[first, last]``.

    Returns ``(full, b_hi, a_lo)``: ``[0, full)`` is visible to every query (no mask),
    ``[full, b_hi)`` holds the rest of the "before" summaries (masked), and
    ``[a_lo, NG)`` the "after" summaries (masked; starts past the last "before" tile
    so no tile is visited twice).
    """
    if SUM_BEFORE:
        b_hi = tl.maximum(last - left, 0) // G
        full = tl.maximum(first - left, 0) // G // BLOCK_N * BLOCK_N
        b_end = (b_hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    else:
        b_hi = 0
        full = 0
        b_end = 0
    if SUM_AFTER:
        a_lo = tl.maximum(((first + right) // G + 1) // BLOCK_N * BLOCK_N, b_end)
    else:
        a_lo = NG
    return full, b_hi, a_lo


@triton.jit
def _local_query_range(first_n, last_n, left, right, n_q, BLOCK_M: tl.constexpr):
    """Query tiles that see some key of ``[first_n, last_n]`` (the dk/dv loop).

    Query ``i`` sees key ``j`` when ``j - right <= i <= j + left``: the same relation as in
    :func:`_local_key_range` with ``left`` and ``right`` swapped, so it is that function.
    """
    return _local_key_range(first_n, last_n, right, left, n_q, BLOCK_M)


@triton.jit
def _summary_query_range(g_first, g_last, left, right, G, n_q, BLOCK_M: tl.constexpr,
                         SUM_BEFORE: tl.constexpr, SUM_AFTER: tl.constexpr):
    """Query tiles that see some summary of ``[g_first, g_last]`` (the summary dk/dv loop).

    Query ``i`` sees group ``g`` after its window when ``i < g*G - right`` and before it
    when ``i >= (g+1)*G + left``. Returns ``(a_hi, b_lo, b_full, b_tail)``: masked
    ``[0, a_hi)`` ("after" queries), masked ``[b_lo, b_full)``, unmasked
    ``[b_full, b_tail)`` (these queries see the whole block), masked ``[b_tail, n_q)``.
    """
    if SUM_AFTER:
        a_hi = tl.minimum(tl.maximum(g_last * G - right, 0), n_q)
    else:
        a_hi = g_first * 0
    if SUM_BEFORE:
        b_lo = tl.maximum(((g_first + 1) * G + left) // BLOCK_M * BLOCK_M,
                          (a_hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
        b_full = ((g_last + 1) * G + left + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        b_full = tl.minimum(tl.maximum(b_full, b_lo), n_q)
        b_tail = tl.maximum(n_q // BLOCK_M * BLOCK_M, b_full)
    else:
        b_lo = n_q
        b_full = n_q
        b_tail = n_q
    return a_hi, b_lo, b_full, b_tail
