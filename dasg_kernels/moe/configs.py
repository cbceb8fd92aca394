"""Tile sizes of the MoE grouped GEMMs: one pinned config under the interpreter, a pruned
autotune space on CUDA (host code: no Triton kernel here; the launchers of
:mod:`dasg_kernels.moe.grouped_gemm` read it at each launch).

* Under the interpreter every kernel runs :data:`INTERPRET_CONFIG` (``@triton.autotune``
  with several configs needs a driver there).
* On CUDA each kernel is offered the :data:`GPU_CONFIGS` its operand tiles fit in shared
  memory and its accumulators fit in registers (:func:`fits`, per kernel kind);
  :func:`autotuned` wraps a kernel in ``triton.autotune`` keyed on ``(D, F, BLOCK_M)``
  plus the tensor dtypes, built lazily at its first launch so nothing touches the driver at
  import. ``DASG_AUTOTUNE=0`` (:func:`dasg_kernels.backend.autotune_enabled`) runs the
  first config that fits instead (:func:`fixed_gpu_config`).
* Rows per tile (:func:`choose_block_m`) and the grouped program order
  (:func:`group_m_for`) are chosen per launch from the sizes.
"""
from __future__ import annotations

import functools

import torch
import triton

from dasg_kernels.backend import interpreter_enabled

# Under the interpreter: one fixed config, no autotuning (it needs a driver).
INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 32}
#: ``(BLOCK_N, BLOCK_K, num_warps, num_stages)``, best guess first (their speed is
#: unmeasured: no GPU run). The last one fits any case (fp32,
#: BLOCK_M = 256) and is the fallback. Each kernel is offered the ones its own operand tiles
#: and accumulators fit (:func:`fits`): 256 x 64 (a 128 x 256 output tile at BLOCK_M = 128)
#: fits only down fwd and gate/up bwd dx.
GPU_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 4), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
               (256, 64, 8, 3), (32, 32, 4, 2)]
#: shared memory the pipelined operand tiles may take (bytes)
SMEM_LIMIT = 200 * 1024
#: row tiles per group of the grouped program order (``grouped_gemm._swizzle``) when the A
#: panel size is unknown (the weight gradients); read at each launch
GROUP_M = 8
#: L2 bytes the A row panels of one group may take (H100: 50 MB of L2), and the range of
#: GROUP_M (:func:`group_m_for`)
L2_A_BUDGET = 16 * 1024 * 1024
GROUP_M_RANGE = (4, 16)

# The main-loop shape of each kernel kind: "row" = a [BM, BK] A tile and one [BK, BN] B tile
# per step (down fwd, gate/up bwd dx), "swiglu_bwd" = the same main loop with the SwiGLU
# backward epilogue (down bwd), "dual" = two B tiles sharing the A tile (gate/up fwd),
# "dw" = [BN, BM] x [BM, BK] (the weight gradients, output [BN, BK]).
ROW, SWIGLU_BWD, DUAL, DW = "row", "swiglu_bwd", "dual", "dw"
# fp32 accumulator registers per thread a kind may use (255 registers in all). Offline on
# sm_90a (python -m benchmarks.compile_report, bf16, BLOCK_M=128): gate/up's two 128 x 128
# accumulators on 4 warps (256 each) spilled ~1.1 KB inside the main loop; down bwd, whose
# epilogue keeps about eight fp32 tiles of the accumulator's shape live (gate, up, sigmoid,
# silu, the two gradients, w * h, the weight-gradient product), spilled ~7 KB a thread
# around it with 128 accumulators (128x64 on 4 warps, 256x64 on 8) and ~1.5 KB with 32-64.
ACC_REG_LIMIT = {ROW: 128, SWIGLU_BWD: 64, DUAL: 128, DW: 128}


def smem_estimate(kind: str, block_m: int, bn: int, bk: int, stages: int, elsize: int) -> int:
    """Bytes of the pipelined operand tiles of a ``kind`` kernel: ``stages`` x (``[BM, BK] + [BK, BN]``,
    with two B tiles for ``dual``; ``[BN, BM] + [BM, BK]`` for ``dw``)."""
    if kind == DW:
        per_stage = bn * block_m + block_m * bk
    else:
        per_stage = block_m * bk + (2 if kind == DUAL else 1) * bk * bn
    return elsize * per_stage * stages


def acc_regs(kind: str, block_m: int, bn: int, bk: int, num_warps: int) -> int:
    """fp32 accumulator registers per thread of a ``kind`` kernel."""
    if kind == DW:
        elems = bn * bk
    else:
        elems = (2 if kind == DUAL else 1) * block_m * bn
    return elems // (32 * num_warps)


def fits(kind: str, block_m: int, bn: int, bk: int, num_warps: int, stages: int, elsize: int) -> bool:
    """Whether a config's operand tiles fit :data:`SMEM_LIMIT` and its accumulators
    :data:`ACC_REG_LIMIT` for a ``kind`` kernel with ``elsize``-byte operands."""
    return (smem_estimate(kind, block_m, bn, bk, stages, elsize) <= SMEM_LIMIT
            and acc_regs(kind, block_m, bn, bk, num_warps) <= ACC_REG_LIMIT[kind])


def operand_elsize(args) -> int:
    """Bytes per element of the GEMM operands. Every kernel here takes its A operand (``x``,
    ``h``, ``dy`` or ``dgu``, in the weights' dtype) first; the fp32 routing weights and
    partial sums it also takes are never staged in shared memory, so they do not count."""
    first = next(iter(args), None)
    return first.element_size() if isinstance(first, torch.Tensor) else 2


def prune(configs, named_args, kind=DUAL, **kwargs):
    """Drop the configs a ``kind`` kernel's operand tiles would overflow the shared memory
    with, or its accumulators the registers (``kind`` defaults to the most demanding
    row-tile kernel)."""
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 64))
    el = operand_elsize(named_args.values())
    keep = [c for c in configs
            if fits(kind, bm, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages, el)]
    return keep or configs[-1:]


def fixed_gpu_config(kind: str, block_m: int, elsize: int) -> dict:
    """The first config that fits a ``kind`` kernel (used with DASG_AUTOTUNE=0)."""
    for bn, bk, w, st in GPU_CONFIGS:
        if fits(kind, block_m, bn, bk, w, st, elsize):
            break
    return {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}


_TUNED: dict = {}


def autotuned(kernel, kind: str):
    """``kernel`` wrapped in ``triton.autotune`` over :data:`GPU_CONFIGS`, pruned for ``kind``
    and keyed on ``(D, F, BLOCK_M)`` (Triton adds the tensor dtypes); built at the first
    call for a kernel and kept."""
    tuned = _TUNED.get(kernel)
    if tuned is None:
        configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                   for bn, bk, w, st in GPU_CONFIGS]
        tuned = triton.autotune(configs=configs, key=["D", "F", "BLOCK_M"],
                                prune_configs_by={"early_config_prune": functools.partial(prune, kind=kind)})(kernel)
        _TUNED[kernel] = tuned
    return tuned


def group_m_for(block_m: int, a_cols: int | None, elsize: int) -> int:
    """Row tiles per group of the program order: as many ``[block_m, a_cols]`` A panels as
    fit :data:`L2_A_BUDGET` (a power of two in :data:`GROUP_M_RANGE`), so a group's A panels
    stay in L2 while it sweeps the output columns and each B panel is re-read only
    ``tiles per expert / GROUP_M`` times. Offline model (``benchmarks.compile_report``,
    Mixtral N=16k, 128x128 tiles): gate/up fwd (K=4096, 1 MB panels) reads A 4.3x at
    GROUP_M=8 and 1.0x at 16; down fwd and dx (K=14336 / 28672) 2.9x at 8 and 1.9x at 4.
    ``a_cols=None`` (the weight gradients) keeps :data:`GROUP_M`."""
    if a_cols is None:
        return GROUP_M
    lo, hi = GROUP_M_RANGE
    fit = L2_A_BUDGET // max(1, block_m * a_cols * elsize)
    g = lo
    while g * 2 <= min(fit, hi):
        g *= 2
    return g


def min_block_n() -> int:
    """The smallest BLOCK_N a launch may use (bounds the F-block count of the down backward)."""
    if interpreter_enabled():
        return INTERPRET_CONFIG["BLOCK_N"]
    return min(c[0] for c in GPU_CONFIGS)


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: small when experts get few rows (decode), 128 when they get many."""
    if interpreter_enabled():
        return 16
    avg = num_pairs / max(num_experts, 1)
    for bm in (16, 32, 64):
        if avg <= bm:
            return bm
    return 128


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: IEEE for fp32 (no TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"
