"""Host-side helpers of the attention launchers: buffer allocation, launch checks, grids,
window bounds and flags, TMA eligibility. No ``@triton.jit`` code here (the kernels' jit
helpers are in :mod:`dasg_kernels.attention.common`)."""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton

#: log2(e) and ln(2): the launchers fold ``LOG2E`` into the softmax scale (the kernels work in
#: the log2 domain; their constexpr copies are ``common.K_LOG2E``, ``common.K_LN2``).
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

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
    ``tests/kernels/attention/test_attention.py`` checks that the names are arguments.
    """
    return names.split()


#: Rows of the largest tile any config loads. The in-tile offsets
#: ``o_t * stride_t + o_d`` are int32 (see :func:`load_tile`), so a row stride must keep
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


def block_grid(n_blocks: int, n_bh: int, varlen: object, *rest: int) -> tuple[int, ...]:
    """The launch grid of :func:`block_and_head` (``varlen``: any non-``None`` swaps the axes)."""
    return ((n_bh, n_blocks) if varlen is not None else (n_blocks, n_bh)) + rest


def effective_window(left: int, right: int, t_k: int, last_pos: int | None = None) -> tuple[int, int]:
    """Map ``-1`` (unbounded) and bounds beyond the sequence to a finite bound: the kernels
    work with ``0 <= left, right <= T_K`` (see :mod:`.common`).

    ``last_pos`` is the position of the last query (default ``t_k - 1``). A left bound of
    ``max(t_k, last_pos + 1)`` already reaches key 0 from every query, and a right bound of
    ``t_k`` reaches the last key from every query at a position ``>= 0``."""
    span = t_k if last_pos is None else max(t_k, last_pos + 1)
    left = span if left < 0 else min(left, span)
    right = t_k if right < 0 else min(right, t_k)
    return left, right


def summary_flags(left: int, right: int, causal: bool, summaries: bool) -> tuple[bool, bool]:
    """(SUM_BEFORE, SUM_AFTER) from the *user* window (``-1`` = unbounded, causal applied)."""
    return summaries and left >= 0, summaries and not causal and right >= 0


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact ``"ieee"`` for fp32 inputs (the tests hold fp32 to
    ~1e-4, TF32 would not pass), Triton's default for fp16/bf16 (where it does not apply)."""
    return "ieee" if dtype == torch.float32 else "tf32"
