"""``python -m benchmarks.compile_report``: what the kernels compile to on Hopper, without a GPU.

Every hot kernel (attention forward, dq, dk/dv with and without summaries and GQA,
pooling, the backward preprocess, decode; MoE route, dispatch, the grouped SwiGLU GEMMs
forward and backward, combine) is launched by its real launcher on ``meta`` tensors of
the benchmark shapes, recorded (:mod:`benchmarks.offline.offline_compile`), and compiled offline
for sm_90a (and sm_80 / sm_100 without ``--quick``) for **every config its pruner keeps**,
fp16 and bf16. For each kernel x config it records registers, spills, shared memory,
wgmma (``HGMMA``, fp8 ``QGMMA``) vs mma.sync, TMA / cp.async / plain loads, the SASS
instructions and ``MUFU`` of the main loop (and how many of them run while a wgmma is in
flight), and whether some warps duplicate others' tiles. Every speed figure is a
PREDICTION of the one model below, calibrated against published H100 measurements of
peer Triton kernels compiled by the same tool (``python -m benchmarks.calibrate``;
``benchmarks/results/calibration.md`` holds the points and the error band).

The model (:func:`iteration_cycles`, :func:`predict`), per CTA and main-loop iteration:

* tensor ``T``: wgmma multiply-adds / 2048 per clock per SM (fp8 ``QGMMA``: 4096), over
  ``TENSOR_EFF`` (the fraction of the 989 TFLOP/s spec a Triton wgmma loop sustains);
* issue: SASS instructions x warps / 4 schedulers, split by :func:`offline_compile.in_flight`
  into the instructions issued while a wgmma group of the same warpgroup is in flight
  (``I_o``) and the exposed rest (``I_x``, e.g. a softmax after a ``WARPGROUP.DEPBAR ...
  0x0``);
* MUFU: MUFU instructions x warps x 32 / 16 (16 ex2 per clock per SM), split the same
  way (``M_o``, ``M_x``) and weighted by ``MUFU_WEIGHT``;
* a warpgroup is serialised with its own wgmma except for the in-flight window, and the
  warpgroups of a CTA run in lockstep (the loop's ``BAR.SYNC``): ``c1 = max(T, I_o +
  w*M_o) + I_x + w*M_x``;
* ``k`` CTAs resident per SM (registers, shared memory) can overlap one another's phases:
  overlapped ``c_k = max(T, I_o + I_x, M_o + M_x, c1 / k)``; the calibrated figure uses
  ``c1 + CTA_OVERLAP * (c_k - c1)``;
* per program (tile): the instructions outside the main loop x warps / 4 plus
  ``TILE_LATENCY`` cycles (pipeline fill and the epilogue's stores), shared by the
  ``k`` co-resident CTAs; programs run in waves of ``132 x k``;
* HBM: bytes (the re-reads the grid order causes, an LRU model of 40 MB of L2) at
  3.35 TB/s; the kernel takes the larger of the compute and HBM times.

Two bounds come with every figure: **serialised** (no overlap at all: ``T + I + w*M`` per
iteration, CTAs one after another) and **overlapped** (``c_k``). Where the SASS shows
an overlap that no calibration point covers (MUFU issued while a wgmma is in flight,
i.e. a softmax pipelined against the tensor cores), the calibrated figure is not
defined by the fit: the report gives both bounds and marks the kernel uncalibrated.

The targets of issue 20 are data (:data:`TARGETS`), judged by :func:`judge` on the best
kept config of each kernel (what the autotuner runs): the calibrated figure with the
calibration's error band (its predicted / published ratios, read from
``results/calibration.json``, or ``calibration-tritonX.Y.json`` for another Triton), both
bounds, and for a kernel whose softmax runs while its wgmma is in flight the bounds
instead of the calibrated figure. Kernels that run one after another (the backward, the
expert block) add up in time. flash-linear-attention's ``parallel_attn`` forward (fla-core)
is recorded by its own launcher beside ours at the forward target's shape without summaries
(family ``attention-peer``).

Writes ``benchmarks/results/compile-sm90a.json`` and ``.md`` (``--out DIR`` elsewhere,
``--name`` another stem); ``--from-json REPORT.json`` re-judges an earlier report's records
without compiling.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from benchmarks.offline import RESULTS, rerun_without_interpreter

# The kernels must be real @triton.jit functions, not the interpreter's: rerun without it.
if __name__ == "__main__":
    rerun_without_interpreter("benchmarks.offline.compile_report")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["DASG_AUTOTUNE"] = "1"  # record every config the pruners keep

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.offline.offline_compile import (ISSUE_PER_CLK, MUFU_PER_CLK, Launch, analyse, capture_launches,  # noqa: E402
                                        compile_launch, meta, targets)

SMS, CLOCK_HZ, HBM_BYTES_S = 132, 1.83e9, 3.35e12

#: The calibrated constants of the model (module docstring); ``python -m benchmarks.calibrate``
#: fits them on its fit points and checks the held-out ones (benchmarks/results/calibration.md).
MODEL = {
    "TENSOR_EFF": 0.67,     # sustained fraction of the wgmma peak in a Triton main loop
    "MUFU_WEIGHT": 0.25,    # MUFU cycles added to the exposed issue cycles (1: fully serialised)
    "CTA_OVERLAP": 0.2,     # 0: co-resident CTAs do not overlap; 1: perfectly
    "TILE_LATENCY": 1500,   # cycles per program beyond its instructions (pipeline fill, epilogue)
}
SMEM_PER_SM, REGS_PER_SM = 228 * 1024, 65536
#: L2 an LRU panel model may count on (H100: 50 MB in two partitions; lines a far
#: partition holds are not free, so less than all of it)
L2_BYTES = 40e6

# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class AttnShape:
    b: int = 1
    t: int = 32768
    hq: int = 32
    hkv: int = 8
    left: int = 2047
    g: int = 256
    summaries: bool = True

    @property
    def label(self) -> str:
        return (f"B={self.b} T={self.t} Hq={self.hq} Hkv={self.hkv} left={self.left} causal "
                + (f"G={self.g} summaries" if self.summaries else "no summaries"))


@dataclass(frozen=True)
class MoEShape:
    name: str
    n: int
    d: int
    f: int
    e: int
    k: int

    @property
    def label(self) -> str:
        return f"{self.name} N={self.n} D={self.d} F={self.f} E={self.e} k={self.k}"


ATTN_MAIN = AttnShape()
ATTN_LONG = AttnShape(t=65536, g=256)  # the summary-epilogue target
ATTN_NOSUM = AttnShape(hkv=32, summaries=False)
ATTN_VARLEN = AttnShape(b=4, t=8192)  # 4 packed sequences of 8k (swa_attention_varlen)
#: the forward target's shape without summaries (GQA 32/8): ours beside flash-linear-attention's
#: parallel_attn (window_size = left + 1 keys, no summary keys)
ATTN_PEER = AttnShape(summaries=False)
MOE_SHAPES = (MoEShape("mixtral", 16384, 4096, 14336, 8, 2), MoEShape("deepseek", 16384, 2048, 1408, 64, 6))


# --------------------------------------------------------------------------- the work model
# Iteration counts port the kernels' own loop bounds (dasg_kernels/attention/common.py).


def _local_key_range(first, last, left, right, n_keys, bn):
    lo = max(first - left, 0) // bn * bn
    hi = min(last + right + 1, n_keys)
    full_lo = (max(last - left, 0) + bn - 1) // bn * bn
    full_lo = min(max(full_lo, lo), hi)
    full_hi = max(min(first + right + 1, n_keys) // bn * bn, full_lo)
    return lo, full_lo, full_hi, hi


def _tiles(a, b, step):
    return max(0, -(-(b - a) // step))


def _summary_tiles(first, last, left, g, ng, bn):
    b_hi = max(last - left, 0) // g
    full = max(first - left, 0) // g // bn * bn
    return _tiles(0, full, bn), _tiles(full, b_hi, bn)


def attn_pairs(s: AttnShape) -> tuple[float, float]:
    """(local, summary) visible query-key pairs per head (causal, window ``left``)."""
    t, left = s.t, s.left
    local = sum(min(i, left) + 1 for i in range(t))
    summ = sum(max(i - left, 0) // s.g for i in range(t)) if s.summaries else 0
    return float(local), float(summ)


def attn_q_iters(s: AttnShape, bm: int, bn: int) -> tuple[int, int]:
    """(unmasked, masked) key-tile iterations of every query-block program (fwd and dq)."""
    ng = -(-s.t // s.g)
    full = masked = 0
    for start in range(0, s.t, bm):
        first, last = start, min(start + bm, s.t) - 1
        lo, flo, fhi, hi = _local_key_range(first, last, s.left, 0, s.t, bn)
        full += _tiles(flo, fhi, bn)
        masked += _tiles(lo, flo, bn) + _tiles(fhi, hi, bn)
        if s.summaries:
            f, m = _summary_tiles(first, last, s.left, s.g, ng, bn)
            full, masked = full + f, masked + m
    heads = s.b * s.hq
    return full * heads, masked * heads


def attn_kv_iters(s: AttnShape, bm: int, bn: int) -> tuple[int, int]:
    """(unmasked, masked) query-tile iterations of the local dk/dv programs (all GQA heads)."""
    full = masked = 0
    for start in range(0, s.t, bn):
        first, last = start, min(start + bn, s.t) - 1
        lo, flo, fhi, hi = _local_key_range(first, last, 0, s.left, s.t, bm)  # left/right swapped
        full += _tiles(flo, fhi, bm)
        masked += _tiles(lo, flo, bm) + _tiles(fhi, hi, bm)
    heads = s.b * s.hq
    return full * heads, masked * heads


def attn_summary_kv_iters(s: AttnShape, bm: int, bn: int) -> tuple[int, int]:
    """(unmasked, masked) query-tile iterations of the summary dk/dv programs."""
    ng = -(-s.t // s.g)
    full = masked = 0
    for g0 in range(0, ng, bn):
        g1 = min(g0 + bn, ng) - 1
        b_lo = ((g0 + 1) * s.g + s.left) // bm * bm
        b_full = min(max(((g1 + 1) * s.g + s.left + bm - 1) // bm * bm, b_lo), s.t)
        b_tail = max(s.t // bm * bm, b_full)
        masked += _tiles(b_lo, b_full, bm) + _tiles(b_tail, s.t, bm)
        full += _tiles(b_full, b_tail, bm)
    heads = s.b * s.hq
    return full * heads, masked * heads


@dataclass
class Work:
    """What one launch does at a benchmark shape: loop iterations, useful FLOPs, HBM bytes."""

    shape: str
    iters_full: float
    iters_masked: float
    flops: float
    hbm_bytes: float
    notes: dict = field(default_factory=dict)
    programs: int = 0  # programs (tiles) of the launch; 0: unknown (no per-tile term)
    uniform: bool = False  # every program runs the same iterations (then: waves of SMS x k)


def _attn_bytes(s: AttnShape, d: int, el: int, n_q_tensors: int, n_kv_tensors: int) -> float:
    ng = -(-s.t // s.g) if s.summaries else 0
    q_side = s.b * s.t * s.hq * d * el * n_q_tensors
    kv_side = s.b * s.hq * (s.t + ng) * d * el * n_kv_tensors  # each q head reads its kv head's window
    return float(q_side + kv_side + s.b * s.hq * s.t * 4 * 2)


#: matmuls per tile of the dk/dv kernel: fused (0), the dv pass (1: Q K^T, P^T dO), the dk
#: pass (2: Q K^T, dO V^T, dS^T Q)
DKDV_PASS_MATMULS = {0: 4, 1: 2, 2: 3}


def attn_work(kind: str, s: AttnShape, d: int, el: int, bm: int, bn: int, dkdv_pass: int = 0) -> Work:
    local, summ = attn_pairs(s)
    heads = s.b * s.hq
    if kind in ("fwd", "dq"):
        full, masked = attn_q_iters(s, bm, bn)
        mm = 2 if kind == "fwd" else 3
        flops = 2.0 * mm * d * (local + summ) * heads
        nbytes = _attn_bytes(s, d, el, 2 if kind == "fwd" else 3, 2)
    elif kind == "dkdv":
        full, masked = attn_kv_iters(s, bm, bn)
        flops = DKDV_PASS_MATMULS[dkdv_pass] * 2.0 * d * local * heads
        nbytes = _attn_bytes(s, d, el, 2, 4)
    else:  # dkdv_summary
        full, masked = attn_summary_kv_iters(s, bm, bn)
        flops = DKDV_PASS_MATMULS[dkdv_pass] * 2.0 * d * summ * heads
        nbytes = _attn_bytes(s, d, el, 2, 0)
    progs = -(-s.t // (bm if kind in ("fwd", "dq") else bn)) * s.b * (s.hq if kind in ("fwd", "dq") else s.hkv)
    return Work(s.label, full, masked, flops, nbytes, programs=progs)


def fla_fwd_work(s: AttnShape, d: int, el: int, bt: int, bs: int) -> Work:
    """flash-linear-attention ``parallel_attn_fwd_kernel`` (fla-core 0.6.0) at ``s``: per
    ``bt``-row query block, its first loop streams the ``bs``-key tiles from
    ``max((start - W + 1) // bs * bs, 0)`` up to the block's first row (window-masked by a
    ``tl.where`` on every tile), its second loop the block's own diagonal tiles (causal mask)."""
    if s.summaries:
        raise ValueError("fla_fwd_work: parallel_attn has no summary keys")
    w = s.left + 1
    full = diag = 0
    for i_t in range(-(-s.t // bt)):
        start = i_t * bt
        first = max((start - w + 1) // bs * bs, 0)
        full += _tiles(first, start, bs)
        diag += _tiles(start, min(start + bt, s.t), bs)
    heads = s.b * s.hq
    local, _ = attn_pairs(s)
    return Work(s.label, full * heads, diag * heads, 4.0 * d * local * heads, _attn_bytes(s, d, el, 2, 2),
                programs=-(-s.t // bt) * heads)


def _order(n_m: int, n_n: int, group_m: int | None):
    """(m, n) of every program in launch order: M fastest (a 2-D grid with the M tile on
    axis 0), or grouped by ``group_m`` M tiles (the matmul tutorial's swizzle)."""
    if not group_m:
        for n in range(n_n):
            for m in range(n_m):
                yield m, n
        return
    for base in range(0, n_m, group_m):
        size = min(group_m, n_m - base)
        for n in range(n_n):
            for m in range(base, base + size):
                yield m, n


def _occupancy(rec: dict) -> int:
    threads = 32 * rec["num_warps"]
    by_regs = REGS_PER_SM // max(1, (rec["regs"] or 255) * threads)
    by_smem = SMEM_PER_SM // max(1, rec["smem_bytes"] + 1024)
    return max(1, min(by_regs, by_smem, 2048 // threads))


class L2:
    """L2 at operand-panel granularity. Programs resident at once (a wave) stream their
    K loops side by side, so a panel two of them read comes from HBM once; across waves
    a panel survives in an LRU of ``L2_BYTES`` (an approximation: no set conflicts, no
    partition split)."""

    def __init__(self, capacity: float = L2_BYTES):
        self.capacity, self.used = capacity, 0.0
        self.lru: OrderedDict = OrderedDict()

    def wave(self, panels: dict) -> float:
        """Read one wave's distinct panels (key -> bytes); returns the bytes from HBM."""
        missed = sum(nbytes for key, nbytes in panels.items() if key not in self.lru)
        for key, nbytes in panels.items():
            if key in self.lru:
                self.lru.move_to_end(key)
            else:
                self.lru[key] = nbytes
                self.used += nbytes
        while self.used > self.capacity and self.lru:
            _, old = self.lru.popitem(last=False)
            self.used -= old
        return missed


def hbm_reads(programs, wave: int) -> tuple[float, dict]:
    """HBM bytes of ``programs`` (each a list of ``(operand, key, bytes)`` panels, in
    launch order) ``wave`` at a time, and the bytes read per operand."""
    l2, total, by_op = L2(), 0.0, {}
    programs = list(programs)
    for w0 in range(0, len(programs), wave):
        panels: dict = {}
        for prog in programs[w0:w0 + wave]:
            for op, key, nbytes in prog:
                panels[(op, key)] = nbytes
        for op in {op for op, _ in panels}:
            got = l2.wave({k: v for k, v in panels.items() if k[0] == op})
            by_op[op] = by_op.get(op, 0.0) + got
            total += got
    return total, by_op


def rowtile_hbm(tile_expert: list[int], n_cols: int, bm: int, bn: int, k: int, el: int, wave: int,
                group_m: int | None, dual: bool) -> tuple[float, float, float]:
    """Bytes the grouped row-tile GEMMs read from HBM (launch order, :class:`L2`), and how
    many times over the A and B operands are read (1 = once)."""
    a_tile, b_tile = bm * k * el, bn * k * el * (2 if dual else 1)
    progs = ([("a", m, a_tile), ("b", (tile_expert[m], n), b_tile)]
             for m, n in _order(len(tile_expert), n_cols, group_m))
    total, by_op = hbm_reads(progs, wave)
    b_once = len(set(tile_expert)) * n_cols * b_tile
    return total, by_op["a"] / (len(tile_expert) * a_tile), by_op["b"] / b_once


def moe_rows(s: MoEShape, bm: int) -> list[int]:
    """``tile_expert`` of a uniform routing (``N*k/E`` rows per expert, padded to ``bm``)."""
    per = s.n * s.k // s.e
    tiles = []
    for e in range(s.e):
        tiles += [e] * -(-per // bm)
    return tiles


#: kernel -> (output columns, K of the GEMM, dual B operand) for a shape (D, F)
_ROWTILE = {
    "_gate_up_fwd_kernel": (lambda d, f: (f, d, True)),
    "_down_fwd_kernel": (lambda d, f: (d, f, False)),
    "_down_bwd_kernel": (lambda d, f: (f, d, False)),
    "_gate_up_bwd_dx_kernel": (lambda d, f: (d, 2 * f, False)),
}
_DW = {"_dw_down_kernel": (lambda d, f: (d, f)), "_dw_gate_up_kernel": (lambda d, f: (2 * f, d))}


def _group_m(launch: Launch, config) -> int | None:
    kw = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    for name in ("GROUP_M", "GROUP_SIZE_M"):
        if name in kw:
            return int(kw[name])
    return None


def moe_work(launch: Launch, config, rec: dict, s: MoEShape, el: int, bm: int) -> Work | None:
    name = launch.name
    kw = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    bn, bk = kw.get("BLOCK_N"), kw.get("BLOCK_K")
    if bn is None or bk is None:
        return None
    rows = s.n * s.k
    wave = SMS * _occupancy(rec)
    gm = _group_m(launch, config)
    if name in _ROWTILE:
        n_out, k, dual = _ROWTILE[name](s.d, s.f)
        tiles = moe_rows(s, bm)
        n_cols = -(-n_out // bn)
        iters = len(tiles) * n_cols * -(-k // bk)
        flops = 2.0 * rows * k * n_out * (2 if dual else 1)
        read, a_reads, b_reads = rowtile_hbm(tiles, n_cols, bm, bn, k, el, wave, gm, dual)
        written = rows * n_out * el * (2 if dual else 1)
        return Work(s.label, iters, 0, flops, read + written,
                    {"a_reads": round(a_reads, 2), "b_reads": round(b_reads, 2), "grid_group_m": gm},
                    programs=len(tiles) * n_cols, uniform=True)
    if name in _DW:
        n_out, k_out = _DW[name](s.d, s.f)
        per = s.n * s.k // s.e
        n_tiles = -(-n_out // bn) * -(-k_out // bk)
        iters = n_tiles * s.e * -(-per // bm)
        flops = 2.0 * rows * n_out * k_out
        # each program streams its expert's rows of both operands for its (n, k) block
        progs = ([("a", (e, m), per * bn * el), ("b", (e, n), per * bk * el)]
                 for e in range(s.e) for m, n in _order(-(-n_out // bn), -(-k_out // bk), gm))
        read, _ = hbm_reads(progs, wave)
        a_reads = read / max(1.0, rows * (n_out + k_out) * el)
        return Work(s.label, iters, 0, flops, read + s.e * n_out * k_out * el,
                    {"operand_reads": round(a_reads, 2), "grid_group_m": gm}, programs=n_tiles, uniform=True)
    return None


def iteration_cycles(st: dict, num_warps: int, occupancy: int, model: dict | None = None) -> dict:
    """SM cycles per CTA-iteration of one loop (``st``: :func:`offline_compile.loop_stats`
    fields, or a record's ``*_per_iter`` ones): calibrated, serialised and overlapped."""
    m = dict(MODEL, **(model or {}))
    w = m["MUFU_WEIGHT"]
    t = st["tensor_cycles"] / m["TENSOR_EFF"]
    i_o = st["inflight_instrs"] * num_warps / ISSUE_PER_CLK
    i_x = (st["instrs"] - st["inflight_instrs"]) * num_warps / ISSUE_PER_CLK
    m_o = st["inflight_mufu"] * num_warps * 32 / MUFU_PER_CLK
    m_x = (st["mufu"] - st["inflight_mufu"]) * num_warps * 32 / MUFU_PER_CLK
    c1 = max(t, i_o + w * m_o) + i_x + w * m_x
    floor = max(t, i_o + i_x, m_o + m_x)
    ck = max(floor, c1 / max(1, occupancy))
    return {"calibrated": c1 + m["CTA_OVERLAP"] * (ck - c1), "serialised": t + i_o + i_x + w * (m_o + m_x),
            "overlapped": ck, "tensor": t, "softmax_in_flight": st["inflight_mufu"] > 0}


def _main_stats(rec: dict) -> dict:
    return {"tensor_cycles": rec["tensor_cycles_per_iter"], "instrs": rec["instrs_per_iter"],
            "mufu": rec["mufu_per_iter"], "inflight_instrs": rec["inflight_instrs_per_iter"],
            "inflight_mufu": rec["inflight_mufu_per_iter"]}


def predict(rec: dict, work: Work, model: dict | None = None) -> dict:
    """The calibrated prediction of ``rec`` (an :func:`analyse` record) at ``work``, with
    its serialised and overlapped bounds and the HBM floor (module docstring)."""
    m = dict(MODEL, **(model or {}))
    occ = _occupancy(rec)
    warps = rec["num_warps"]
    full = iteration_cycles(_main_stats(rec), warps, occ, m)
    masked_loops = [lp for lp in rec.get("other_loops", []) if lp["mma"] == rec["mma_per_iter"] and lp["mma"] > 0]
    masked = max((iteration_cycles(lp, warps, occ, m) for lp in masked_loops),
                 key=lambda c: c["calibrated"], default=full)
    per_prog = rec.get("outside_main_loop_instrs", 0) * warps / ISSUE_PER_CLK + m["TILE_LATENCY"]
    out = {}
    for key in ("calibrated", "serialised", "overlapped"):
        k = 1 if key == "serialised" else occ
        share = 1.0 if key == "serialised" else (1.0 / occ if key == "overlapped" else
                                                  1.0 - m["CTA_OVERLAP"] * (1 - 1.0 / occ))
        loop = work.iters_full * full[key] + work.iters_masked * masked[key]
        prologue = work.programs * per_prog * share
        cycles = (loop + prologue) / SMS
        if work.uniform and work.programs:
            waves = -(-work.programs // (SMS * k))
            cycles = max(cycles, waves * k * (loop + prologue) / work.programs)
        out[key] = cycles / CLOCK_HZ
    hbm_s = work.hbm_bytes / HBM_BYTES_S
    res = {"shape": work.shape, "useful_tflop": work.flops / 1e12, "occupancy": occ,
           "compute_ms": out["calibrated"] * 1e3, "hbm_bound_ms": hbm_s * 1e3,
           "softmax_in_flight": full["softmax_in_flight"]}
    t_cal = max(out["calibrated"], hbm_s, 1e-12)
    res["bound"] = "hbm" if hbm_s >= out["calibrated"] else (
        "tensor" if full["calibrated"] <= 1.01 * full["tensor"] else "issue+mufu")
    res["predicted_tflops"] = work.flops / t_cal / 1e12
    res["serialised_tflops"] = work.flops / max(out["serialised"], hbm_s, 1e-12) / 1e12
    res["overlapped_tflops"] = work.flops / max(out["overlapped"], hbm_s, 1e-12) / 1e12
    # an overlap no calibration point covers: the calibrated figure is only a bracket
    res["uncalibrated_overlap"] = bool(full["softmax_in_flight"])
    res.update(work.notes)
    return res


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """Launches recorded from one launcher call, with their labels and work models."""

    family: str
    label: Callable[[Launch], str | None]
    record: Callable[[], list[Launch]]
    dtype: str
    head_dim: int | None = None
    shape: object = None
    work: Callable | None = None


def _attn_label(launch: Launch) -> str | None:
    kw = launch.kwargs
    if launch.name == "_swa_fwd_kernel":
        return "attn_decode" if kw.get("PACK_GQA") else "attn_fwd"
    if launch.name == "_swa_bwd_dq_kernel":
        return "attn_dq"
    if launch.name == "_swa_bwd_dkdv_kernel":  # D > 128: two passes (dv, then dk), labelled apart
        p = kw.get("DKDV_PASS", 0)
        return ("attn_dkdv_summary" if kw.get("IS_SUMMARY") else "attn_dkdv") + (f"_pass{p}" if p else "")
    return {"_group_mean_kernel": "attn_pool", "_bwd_preprocess_kernel": "attn_bwd_preprocess",
            "_ring_fwd_kernel": "attn_ring_decode"}.get(launch.name)


def _attn_record(s: AttnShape, d: int, dt: torch.dtype, decode: bool = False,
                 varlen: bool = False) -> Callable[[], list[Launch]]:
    def record():
        from dasg_kernels.attention.bwd import swa_bwd
        from dasg_kernels.attention.common import Varlen
        from dasg_kernels.attention.decode import swa_decode_fwd
        from dasg_kernels.attention.fwd import swa_fwd
        from dasg_kernels.attention.ring import ring_attention_fwd

        q, k, v = meta((s.b, s.t, s.hq, d), dt), meta((s.b, s.t, s.hkv, d), dt), meta((s.b, s.t, s.hkv, d), dt)
        kw = dict(left=s.left, right=0, causal=True, group_size=s.g if s.summaries else None,
                  summaries=s.summaries, scale=d ** -0.5)
        if varlen:  # the same tokens packed: B sequences of T in flash-attn's [total, H, D] layout
            q, k, v = (x.reshape(s.b * s.t, *x.shape[2:]) for x in (q, k, v))
            cu = meta((s.b + 1,), torch.int32)
            kw["varlen"] = Varlen(cu, cu, s.t, s.t)
        with capture_launches() as launches:
            if decode:
                swa_decode_fwd(meta((s.b, 1, s.hq, d), dt), k, v, **kw)
                # the bounded cache of generation: a ring of left + 1 slots and the group means
                ring = meta((s.b, s.left + 1, s.hkv, d), dt)
                means = meta((s.b, s.t // s.g + 1, s.hkv, d), dt) if s.summaries else None
                ring_attention_fwd(meta((s.b, 1, s.hq, d), dt), ring, ring, None if means is None else (means, means),
                                   meta((s.b,), torch.int32), seq_offset=0, left=s.left, group_size=s.g,
                                   scale=d ** -0.5)
            else:
                out, lse, ks, vs = swa_fwd(q, k, v, **kw)
                swa_bwd(out, q, k, v, out, lse, ks, vs, **kw)
        return launches

    return record


def _long_label(launch: Launch) -> str | None:
    """The local dk/dv launches only (the summary-gradient epilogue target)."""
    label = _attn_label(launch) or ""
    return label if label.startswith("attn_dkdv") and "summary" not in label else None


def _nosum_label(launch: Launch) -> str | None:
    label = _attn_label(launch) or ""
    if label == "attn_fwd" or label.startswith("attn_dkdv"):
        return label.replace("attn_fwd", "attn_fwd_nosum").replace("attn_dkdv", "attn_dkdv_nosum")
    return None


def _varlen_label(launch: Launch) -> str | None:
    label = _attn_label(launch)
    return f"{label}_varlen" if label in ("attn_fwd", "attn_dq", "attn_dkdv", "attn_pool") else None


def _attn_kind(label: str) -> str | None:
    return {"attn_fwd": "fwd", "attn_dq": "dq", "attn_dkdv": "dkdv", "attn_dkdv_summary": "dkdv_summary"}.get(label)


_MOE_LABELS = {
    "_route_kernel": "moe_route", "_gate_up_fwd_kernel": "moe_gate_up_fwd", "_down_fwd_kernel": "moe_down_fwd",
    "_down_bwd_kernel": "moe_down_bwd", "_gate_up_bwd_dx_kernel": "moe_dx", "_dw_down_kernel": "moe_dw_down",
    "_dw_gate_up_kernel": "moe_dw_gate_up", "_combine_kernel": "moe_combine",
}


def _moe_label(launch: Launch) -> str | None:
    if launch.name.startswith("_plan_"):
        return "moe_dispatch" + launch.name[len("_plan"):-len("_kernel")]
    return _MOE_LABELS.get(launch.name)


def _moe_block_m(s: MoEShape) -> int:
    from dasg_kernels.moe import grouped_gemm as gg

    return gg.choose_block_m(s.n * s.k, s.e)


def _moe_record(s: MoEShape, dt: torch.dtype) -> Callable[[], list[Launch]]:
    def record():
        import importlib

        # (dasg_kernels.moe exports a function named dispatch: import the modules by path)
        dispatch, ops, routing = (importlib.import_module(f"dasg_kernels.moe.{m}") for m in ("dispatch", "ops", "routing"))

        bm = _moe_block_m(s)
        x = meta((s.n, s.d), dt)
        w1, w2 = meta((s.e, 2 * s.f, s.d), dt), meta((s.e, s.d, s.f), dt)
        weights = meta((s.n, s.k), torch.float32)
        with capture_launches() as launches:
            routing.route_select_triton(meta((s.n, s.e), torch.float32), top_p=1.0, k_max=s.k, k_cap=s.k,
                                        min_k=1, n_group=1, topk_group=1)
            ids = meta((s.n, s.k), torch.int32)
            plan = dispatch.build_plan_triton(ids, s.e, bm)
            pl = (plan.row_pair, plan.pair_row, plan.expert_offsets, plan.tile_expert)
            _, gu = ops.moe_expert_ffn_fwd._init_fn(x, w1, w2, weights, *pl, bm, True)
            ops.moe_expert_ffn_bwd._init_fn(x, x, w1, w2, weights, gu, *pl, bm, True, True, True, True)
        return launches

    return record


def _fla_record(s: AttnShape, d: int, dt: torch.dtype) -> Callable[[], list[Launch]]:
    """flash-linear-attention's forward launcher (``parallel_attn_fwd``, fla-core 0.6.0) on
    meta tensors, as on an H100 (its Hopper branch: ``check_shared_mem('hopper')`` true)."""
    def record():
        from unittest import mock

        from fla.ops.attn import parallel as fla_parallel

        q, k, v = meta((s.b, s.t, s.hq, d), dt), meta((s.b, s.t, s.hkv, d), dt), meta((s.b, s.t, s.hkv, d), dt)
        with mock.patch.object(fla_parallel, "check_shared_mem", lambda arch="none", idx=0: arch == "hopper"), \
                capture_launches() as launches:
            fla_parallel.parallel_attn_fwd(q, k, v, None, None, d ** -0.5, window_size=s.left + 1)
        return launches

    return record


def _peer_label(launch: Launch) -> str | None:
    if launch.name == "parallel_attn_fwd_kernel":
        return "fla_parallel_attn_fwd"
    return "attn_fwd" if _attn_label(launch) == "attn_fwd" else None


def fla_available() -> str | None:
    """Why flash-linear-attention's parallel_attn cannot be recorded here, or None."""
    import warnings

    try:
        with warnings.catch_warnings():  # fla warns that it found no GPU: the kernels only compile here
            warnings.simplefilter("ignore", UserWarning)
            from fla.ops.attn import parallel  # noqa: F401
    except Exception as e:  # not installed, or an import error of its own
        return f"fla-core not importable ({type(e).__name__}: {str(e)[:120]}); pip install -e '.[bench]'"
    return None


def build_cases(quick: bool) -> list[Case]:
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    dims = [128] if quick else [64, 128, 256]
    cases = []
    for dt in dtypes:
        dn = str(dt).replace("torch.", "")
        for d in dims:
            cases.append(Case("attention", _attn_label, _attn_record(ATTN_MAIN, d, dt), dn, d, ATTN_MAIN))
            cases.append(Case("attention-long", _long_label, _attn_record(ATTN_LONG, d, dt), dn, d, ATTN_LONG))
            if not quick or d == 128:
                cases.append(Case("attention-nosum", _nosum_label, _attn_record(ATTN_NOSUM, d, dt), dn, d, ATTN_NOSUM))
                cases.append(Case("decode", _attn_label, _attn_record(ATTN_MAIN, d, dt, decode=True), dn, d, ATTN_MAIN))
                cases.append(Case("attention-varlen", _varlen_label, _attn_record(ATTN_VARLEN, d, dt, varlen=True),
                                  dn, d, ATTN_VARLEN))
        for s in (MOE_SHAPES[:1] if quick else MOE_SHAPES):
            cases.append(Case("moe", _moe_label, _moe_record(s, dt), dn, None, s))
    if fla_available() is None:  # the peer at the forward target's shape (bf16, D=128) only
        ours, fla = _attn_record(ATTN_PEER, 128, torch.bfloat16), _fla_record(ATTN_PEER, 128, torch.bfloat16)
        cases.append(Case("attention-peer", _peer_label, lambda: ours() + fla(), "bfloat16", 128, ATTN_PEER))
    return cases


# --------------------------------------------------------------------------- running


#: what ``--smoke`` compiles (the CI test): the first config of the hottest kernels
SMOKE_KERNELS = ("attn_fwd", "attn_dq", "attn_dkdv", "moe_gate_up_fwd", "moe_down_fwd")


def _jobs(cases: list[Case], quick: bool, only: str | None, smoke: bool = False) -> list[tuple]:
    jobs = []
    if smoke:
        cases_ok = {"attention", "moe"}
        for ci, case in enumerate(cases):
            if case.family not in cases_ok:
                continue
            for li, launch in enumerate(case.record()):
                label = case.label(launch)
                if label in SMOKE_KERNELS and not any(j[4] == label for j in jobs):
                    jobs.append((ci, li, 0, "sm_90a", label))
        return jobs
    tnames = ["sm_90a"] if quick else list(targets())
    for ci, case in enumerate(cases):
        if only and not case.family.startswith(only):
            continue
        seen = set()
        for li, launch in enumerate(case.record()):
            label = case.label(launch)
            if label is None or label in seen:
                continue
            seen.add(label)
            configs = launch.configs or [None]
            for target in tnames:
                if target != "sm_90a" and label not in ("attn_fwd", "attn_dkdv", "attn_dq", "moe_gate_up_fwd",
                                                         "moe_down_fwd"):
                    continue  # other targets: the hottest kernels, first config only
                for k, cfg in enumerate(configs if target == "sm_90a" else configs[:1]):
                    jobs.append((ci, li, k, target, label))
    return jobs


_CASES: list[Case] = []


def _config_text(launch: Launch, cfg) -> str:
    kw = cfg.all_kwargs() if cfg is not None else launch.kwargs
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "BLOCK_T", "BLOCK_D", "BLOCK_G", "CHUNK", "BT", "BS")
    parts = [f"{kw[k]}" for k in keys if k in kw]
    return "x".join(parts) + f" w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"


def run_job(job: tuple) -> dict:
    ci, li, k, target, label = job
    case = _CASES[ci]
    launch = case.record()[li]
    cfg = (launch.configs or [None])[k]
    t0 = time.time()
    try:
        rec = analyse(compile_launch(launch, cfg, target))
    except Exception as e:  # a config that does not compile is reported, not fatal
        return {"kernel": label, "family": case.family, "target": target, "config": _config_text(launch, cfg),
                "error": repr(e)[:300], "dtype": case.dtype}
    rec.update(kernel=label, family=case.family, dtype=case.dtype, config=_config_text(launch, cfg),
               config_rank=k, compile_s=round(time.time() - t0, 1))
    if case.head_dim is not None:
        rec["head_dim"] = case.head_dim
    rec["shape"] = case.shape.label
    kw = dict(launch.kwargs, **(cfg.all_kwargs() if cfg is not None else {}))
    el = 2
    work = None
    if target == "sm_90a":
        base, _, passno = label.replace("_nosum", "").replace("_varlen", "").partition("_pass")
        kind = _attn_kind(base)
        if label == "fla_parallel_attn_fwd":
            work = fla_fwd_work(case.shape, case.head_dim, el, kw["BT"], kw["BS"])
        elif kind is not None:
            work = attn_work(kind, case.shape, case.head_dim, el, kw["BLOCK_M"], kw["BLOCK_N"], int(passno or 0))
        elif isinstance(case.shape, MoEShape):
            work = moe_work(launch, cfg, rec, case.shape, el, kw.get("BLOCK_M", _moe_block_m(case.shape)))
    if work is not None:
        rec.update(predict(rec, work))
        if label == "attn_dkdv":
            rec.update(_epilogue(rec, launch, work, case))
    else:
        rec["predicted_tflops"] = None
    rec.pop("other_loops")
    return rec


def _epilogue(rec: dict, launch: Launch, work: Work, case: Case) -> dict:
    """Instructions of the dk/dv epilogue (its loops without tensor-core work, times their
    trip count ``N_SPLITS``) against those of the main loop, per program."""
    names = launch.fn.arg_names
    args = dict(zip(names, launch.args))
    splits = int(args.get("N_SPLITS", 1) or 1)  # partial sums each program reads (1: reduced before)
    epi_loops = [lp for lp in rec["other_loops"] if lp["mma"] == 0 and lp["in_tail"]]
    epi = rec["tail_instrs"] + sum(lp["instrs"] for lp in epi_loops) * (splits - 1)
    kw = dict(launch.kwargs, **(launch.configs[rec["config_rank"]].all_kwargs() if launch.configs else {}))
    programs = -(-case.shape.t // kw["BLOCK_N"]) * case.shape.b * case.shape.hkv
    iters = (work.iters_full + work.iters_masked) / programs
    main = rec["instrs_per_iter"] * iters
    d = case.head_dim
    # bytes each program loads: the main loop's q and dO tiles (+ lse, delta) per iteration;
    # the epilogue's fp32 summary-gradient rows (dk and dv) per split
    main_bytes = iters * kw["BLOCK_M"] * (2 * d * 2 + 8)
    epi_bytes = splits * kw["BLOCK_N"] * d * 4 * 2
    share = max(epi / max(main, 1), epi_bytes / max(main_bytes, 1))
    return {"epilogue_instrs": epi, "epilogue_splits": splits, "main_loop_instrs_per_program": round(main),
            "epilogue_load_bytes": epi_bytes, "main_loop_load_bytes": round(main_bytes),
            "epilogue_share": round(share, 4)}


def run(quick: bool, only: str | None, workers: int, smoke: bool = False) -> list[dict]:
    global _CASES
    _CASES = build_cases(quick or smoke)
    jobs = _jobs(_CASES, quick, only, smoke)
    print(f"compile_report: {len(jobs)} compiles (Triton {triton.__version__}), {workers} workers", flush=True)
    out = []
    t0 = time.time()
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            for i, rec in enumerate(pool.imap(run_job, jobs)):
                out.append(rec)
                _progress(i, len(jobs), rec, t0)
    else:
        for i, job in enumerate(jobs):
            out.append(run_job(job))
            _progress(i, len(jobs), out[-1], t0)
    return out


def _progress(i: int, n: int, rec: dict, t0: float) -> None:
    extra = rec.get("error", "") or (f"regs {rec['regs']} spill {rec['spill_bytes']} dup {rec['duplication']} "
                                     f"instr/it {rec['instrs_per_iter']}")
    print(f"[{i + 1}/{n} {time.time() - t0:5.0f}s] {rec['kernel']} {rec['dtype']} {rec.get('head_dim', '')} "
          f"{rec['config']} {rec['target']}: {extra}", flush=True)


# --------------------------------------------------------------------------- writing

COLUMNS = ("family", "kernel", "dtype", "head_dim", "config", "target", "regs", "spill_bytes", "smem_bytes", "wgmma",
           "mma_sync", "tma_loads", "cp_async_loads", "global_loads", "instrs_per_iter", "inflight_instrs_per_iter",
           "mufu_per_iter", "inflight_mufu_per_iter", "tensor_cycles_per_iter", "issue_cycles_per_iter", "duplicated",
           "bound", "predicted_tflops", "serialised_tflops", "overlapped_tflops")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One speed target of issue 20, judged on the calibrated predictions.

    ``kernels``: the record labels whose best kept configs run one after another (their
    times add up); ``flops``: how the useful work is counted (``"sum"``: the kernels' own
    useful FLOPs; ``"attn_bwd"``: 2.5x the forward's, flash-attn's convention, so that a
    recomputed ``Q K^T`` is not counted twice). Where the gain rests on an overlap no
    calibration point covers (MUFU issued while a wgmma is in flight), the target is judged
    on the two bounds instead: serialised >= ``min_serialised`` and overlapped >=
    ``min_overlapped`` (when those are given)."""

    id: str
    text: str
    family: str
    kernels: tuple[str, ...]
    min_tflops: float
    dtype: str = "bfloat16"
    head_dim: int | None = 128
    shape: str | None = None  # MoE shape name
    flops: str = "sum"
    min_serialised: float | None = None
    min_overlapped: float | None = None
    #: a calibration point whose stated miss applies to these kernels (its ratio is shown)
    miss_point: str | None = None


#: the targets of issue 20 (``benchmarks/results/compile-sm90a.md`` judges them)
TARGETS = (
    Target("attn_fwd", "attention forward bf16 D=128 T=32k W=2048 causal, summaries", "attention", ("attn_fwd",),
           500.0, min_serialised=450.0, min_overlapped=600.0),
    Target("attn_bwd", "attention backward (dq + dk/dv together) at the same shape", "attention",
           ("attn_bwd_preprocess", "attn_dq", "attn_dkdv", "attn_dkdv_pass1", "attn_dkdv_pass2", "attn_dkdv_summary",
            "attn_dkdv_summary_pass1", "attn_dkdv_summary_pass2"), 350.0, flops="attn_bwd"),
    Target("moe_gate_up_fwd", "MoE gate_up forward at the Mixtral-like shape", "moe", ("moe_gate_up_fwd",), 620.0,
           head_dim=None, shape="mixtral", miss_point="liger-moe-fwd"),
    Target("moe_block", "whole SwiGLU expert block forward + backward (Mixtral-like shape)", "moe",
           ("moe_gate_up_fwd", "moe_down_fwd", "moe_down_bwd", "moe_dx", "moe_dw_down", "moe_dw_gate_up"), 450.0,
           head_dim=None, shape="mixtral", miss_point="liger-moe-fwd"),
)

#: the report's structural checks and their limits
CHECK_LIMITS = {
    "epilogue_share": 0.10,       # dk/dv summary epilogue vs main loop (instructions and bytes), T=64k G=256
    "a_reads": 2.0,               # MoE GEMMs: times the A operand is read from HBM
    "dw_issue_over_tensor": 1.5,  # MoE weight-gradient GEMMs: issue cycles / tensor cycles per iteration
}


def calibration(version: str | None = None) -> dict:
    """The stored calibration of this Triton (``results/calibration-tritonX.Y.json`` when
    it exists, else ``results/calibration.json``): its error bands and stated misses."""
    version = version or ".".join(triton.__version__.split(".")[:2])
    results = RESULTS
    path = os.path.join(results, f"calibration-triton{version}.json")
    if not os.path.exists(path):
        path = os.path.join(results, "calibration.json")
    try:
        with open(path) as f:
            cal = json.load(f)
    except (OSError, ValueError):
        return {"path": None, "low": 1.0, "high": 1.0, "band": 0.0, "misses": {}}
    m = cal["meta"]
    band = (m.get("error_bands") or {}).get("all_within_20pct") or {}
    ratios = [p["ratio"] for p in cal["points"] if p["within_20pct"] and p["ratio"]]
    return {"path": os.path.relpath(path, os.path.dirname(results)), "triton": m.get("triton"),
            "band": band.get("band", m.get("error_band", 0.0)), "low": band.get("low", min(ratios, default=1.0)),
            "high": band.get("high", max(ratios, default=1.0)),
            "misses": {p["id"]: p["ratio"] for p in cal["points"] if not p["within_20pct"]}}


def with_band(tflops: float, cal: dict) -> str:
    """``X (Y-Z)``: the prediction and what the calibration's ratios (predicted / published,
    from ``low`` to ``high``) make of it."""
    return f"{tflops:.0f} ({tflops / cal['high']:.0f}-{tflops / cal['low']:.0f})"


def _best(records: list[dict]) -> dict | None:
    return max(records, key=lambda r: r.get("predicted_tflops") or 0, default=None)


def _preprocess_seconds(r: dict) -> float:
    """The backward preprocess (``delta = rowsum(dO * O)``) has no loop to model: its time at
    HBM speed (O and dO read in bf16, delta written in fp32)."""
    d = r.get("head_dim") or 128
    s = ATTN_MAIN
    return (2 * s.b * s.t * s.hq * d * 2 + s.b * s.t * s.hq * 4) / HBM_BYTES_S


def judge(target: Target, records: list[dict], cal: dict) -> dict:
    """The calibrated figure of ``target`` from ``records`` (best kept config per kernel),
    its band, its bounds, and whether it passes."""
    ok = [r for r in records if "error" not in r and r["target"] == "sm_90a" and r["family"] == target.family
          and r["dtype"] == target.dtype and (target.head_dim is None or r.get("head_dim") == target.head_dim)
          and (target.shape is None or str(r.get("shape", "")).startswith(target.shape))]
    parts, missing = [], []
    for k in target.kernels:
        rs = [r for r in ok if r["kernel"] == k]
        if not rs:
            continue
        parts.append(_best(rs) if k != "attn_bwd_preprocess" else rs[0])
    if not any(r.get("predicted_tflops") for r in parts):
        return {"id": target.id, "text": target.text, "status": "NO DATA", "detail": "no compiled record"}
    seconds = {"calibrated": 0.0, "serialised": 0.0, "overlapped": 0.0}
    flops = 0.0
    for r in parts:
        if r["kernel"] == "attn_bwd_preprocess":
            for key in seconds:
                seconds[key] += _preprocess_seconds(r)
            continue
        f = r["useful_tflop"] * 1e12
        flops += f
        for key, col in (("calibrated", "predicted_tflops"), ("serialised", "serialised_tflops"),
                         ("overlapped", "overlapped_tflops")):
            seconds[key] += f / (r[col] * 1e12)
    if target.flops == "attn_bwd":
        fwd = [r for r in ok if r["kernel"] == "attn_fwd"]
        if not fwd:
            return {"id": target.id, "text": target.text, "status": "NO DATA", "detail": "no forward record"}
        flops = 2.5 * fwd[0]["useful_tflop"] * 1e12
    fig = {key: flops / t / 1e12 for key, t in seconds.items()}
    uncal = any(r.get("uncalibrated_overlap") for r in parts)
    if uncal and target.min_serialised is not None:
        passed = fig["serialised"] >= target.min_serialised and fig["overlapped"] >= target.min_overlapped
        rule = (f"softmax in flight (an overlap no calibration point covers): judged on serialised >= "
                f"{target.min_serialised:.0f} and overlapped >= {target.min_overlapped:.0f}")
    else:
        passed = fig["calibrated"] >= target.min_tflops
        rule = f"calibrated >= {target.min_tflops:.0f}"
    lo, hi = fig["calibrated"] / cal["high"], fig["calibrated"] / cal["low"]
    out = {"id": target.id, "text": target.text, "status": "PASS" if passed else "FAIL", "rule": rule,
           "calibrated_tflops": fig["calibrated"], "band_low_tflops": lo, "band_high_tflops": hi,
           "serialised_tflops": fig["serialised"], "overlapped_tflops": fig["overlapped"],
           "uncalibrated_overlap": uncal, "min_tflops": target.min_tflops,
           "configs": [f"{r['kernel']} {r['config']}" for r in parts],
           "first_config_tflops": None}
    if len(target.kernels) == 1:
        first = [r for r in ok if r["kernel"] == target.kernels[0] and r.get("config_rank") == 0]
        if first and first[0].get("predicted_tflops"):
            out["first_config_tflops"] = first[0]["predicted_tflops"]
            out["first_config"] = first[0]["config"]
    if target.miss_point and target.miss_point in cal["misses"]:
        out["miss_point"] = target.miss_point
        out["miss_ratio"] = cal["misses"][target.miss_point]
        out["miss_adjusted_tflops"] = fig["calibrated"] / cal["misses"][target.miss_point]
    return out


def target_line(j: dict) -> str:
    if j["status"] == "NO DATA":
        return f"- NO DATA {j['text']}: {j['detail']}"
    txt = (f"- **{j['status']}** (predicted) {j['text']} >= {j['min_tflops']:.0f} TFLOP/s: calibrated "
           f"{j['calibrated_tflops']:.1f} (band {j['band_low_tflops']:.0f}-{j['band_high_tflops']:.0f}), "
           f"serialised {j['serialised_tflops']:.0f}, overlapped {j['overlapped_tflops']:.0f}; "
           + ("UNCALIBRATED overlap (softmax in flight); " if j["uncalibrated_overlap"] else "") + j["rule"]
           + "; " + ", ".join(j["configs"]))
    if j.get("first_config_tflops") is not None:
        txt += f" (first config {j['first_config']}: {j['first_config_tflops']:.0f})"
    if "miss_ratio" in j:
        txt += (f". Caveat: the calibration's {j['miss_point']} point (a gathered grouped GEMM) is a stated miss "
                f"at {j['miss_ratio']:.2f}x; divided by it: {j['miss_adjusted_tflops']:.0f}")
    return txt


def targets_check(records: list[dict], cal: dict | None = None) -> list[str]:
    """The issue's targets (:data:`TARGETS`) and the structural checks (:data:`CHECK_LIMITS`),
    judged on the calibrated predictions (PREDICTED, not measured)."""
    cal = cal or calibration()
    ok = [r for r in records if "error" not in r and r["target"] == "sm_90a"]
    lines = [target_line(judge(t, records, cal)) for t in TARGETS]

    def line(name: str, passed: bool, detail: str):
        lines.append(f"- {'PASS' if passed else 'FAIL'} (predicted) {name}: {detail}")

    bwd = [r for r in ok if r["kernel"].startswith(("attn_dq", "attn_dkdv")) and r["dtype"] in ("bfloat16", "float16")]
    if bwd:
        dup = sorted({f"{r['kernel']} {r['dtype']} D={r.get('head_dim')} {r['config']}" for r in bwd if r["duplicated"]})
        line("attention bwd: no duplicated work in any kept config", not dup, ", ".join(dup) or "none duplicated")
    lim = CHECK_LIMITS["epilogue_share"]
    epi = [r for r in ok if r["kernel"] == "attn_dkdv" and r["family"] == "attention-long" and r["config_rank"] == 0
           and r.get("head_dim") == 128 and r["dtype"] == "bfloat16"]
    for r in epi:
        line(f"dk/dv summary epilogue < {100 * lim:.0f}% of the main loop (instructions and bytes) at T=64k, G=256",
             r["epilogue_share"] < lim,
             f"per program {r['epilogue_instrs']} epilogue vs {r['main_loop_instrs_per_program']} main-loop "
             f"instructions, {r['epilogue_load_bytes']} vs {r['main_loop_load_bytes']} bytes loaded "
             f"({r['epilogue_splits']} splits; share {100 * r['epilogue_share']:.1f}%, the larger of the two)")
    lim = CHECK_LIMITS["a_reads"]
    gemm = [r for r in ok if "a_reads" in r and r["config_rank"] == 0]
    if gemm:
        worst = max(gemm, key=lambda r: r["a_reads"])
        line(f"MoE GEMMs: no A operand read from HBM more than {lim:g} times", worst["a_reads"] <= lim,
             f"worst {worst['kernel']} {worst['shape']}: A read {worst['a_reads']}x")
    lim = CHECK_LIMITS["dw_issue_over_tensor"]
    dw = [r for r in ok if r["kernel"] in ("moe_dw_down", "moe_dw_gate_up") and r["config_rank"] == 0]
    for r in dw:
        ratio = r["issue_cycles_per_iter"] / max(r["tensor_cycles_per_iter"], 1e-9)
        line(f"{r['kernel']} {r['dtype']} within {lim:g}x of its tensor-bound cycles ({r['shape']})", ratio <= lim,
             f"{r['issue_cycles_per_iter']:.0f} issue vs {r['tensor_cycles_per_iter']:.0f} tensor cycles per "
             f"iteration ({ratio:.2f}x)")
    spills = sorted({f"{r['kernel']} {r['dtype']} D={r.get('head_dim')} {r['config']}" for r in ok
                     if r["dtype"] in ("bfloat16", "float16") and (r["duplicated"] or r["spill_ops_in_main_loop"])})
    line("every fp16/bf16 kept config: no duplicated work, no spill in the main loop", not spills,
         ", ".join(spills) or "all clean")
    return lines


def kernel_summary(records: list[dict], cal: dict) -> list[str]:
    """Per kernel (family, dtype, head dim) on sm_90a: its best kept config's calibrated
    figure with the band, the serialised and overlapped bounds, and the first config's."""
    groups: dict = OrderedDict()
    for r in records:
        if "error" in r or r["target"] != "sm_90a" or not r.get("predicted_tflops"):
            continue
        groups.setdefault((r["family"], r["kernel"], r["dtype"], r.get("head_dim")), []).append(r)
    lines = ["| family | kernel | dtype | D | best kept config | calibrated TFLOP/s (band) | serialised | overlapped "
             "| bound | overlap | first config: calibrated |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (fam, kern, dt, d), rs in groups.items():
        b = _best(rs)
        first = next((r for r in rs if r.get("config_rank") == 0), None)
        lines.append(f"| {fam} | {kern} | {dt} | {d or ''} | {b['config']} | {with_band(b['predicted_tflops'], cal)} | "
                     f"{b['serialised_tflops']:.0f} | {b['overlapped_tflops']:.0f} | {b['bound']} | "
                     f"{'UNCALIBRATED (softmax in flight)' if b.get('uncalibrated_overlap') else 'calibrated'} | "
                     + (f"{first['config']}: {first['predicted_tflops']:.0f}" if first else "") + " |")
    return lines


def peer_summary(records: list[dict], cal: dict) -> list[str]:
    """Ours beside flash-linear-attention's parallel_attn at the forward target's shape
    without summaries (family ``attention-peer``)."""
    rs = [r for r in records if r.get("family") == "attention-peer" and "error" not in r
          and r.get("predicted_tflops")]
    ours = _best([r for r in rs if r["kernel"] == "attn_fwd"])
    fla = _best([r for r in rs if r["kernel"] == "fla_parallel_attn_fwd"])
    if ours is None or fla is None:
        return [f"Not recorded: {fla_available() or 'no compiled record'}."]
    lines = [f"Shape {ATTN_PEER.label}, bf16, D=128 (fla `window_size={ATTN_PEER.left + 1}` = our "
             f"`window=({ATTN_PEER.left}, 0)`; fla has no summary keys). fla-core's forward launcher "
             "(`parallel_attn_fwd`) recorded on meta tensors as on an H100 (its Hopper tiles: BT=128, BS=64, 8 warps). "
             "PREDICTED, calibrated as every kernel here.", "",
             "| kernel | config | regs | calibrated TFLOP/s (band) | serialised | overlapped | overlap |",
             "|---|---|---|---|---|---|---|"]
    for name, r in (("ours (swa_attention fwd)", ours), ("fla parallel_attn fwd", fla)):
        lines.append(f"| {name} | {r['config']} | {r['regs']} | {with_band(r['predicted_tflops'], cal)} | "
                     f"{r['serialised_tflops']:.0f} | {r['overlapped_tflops']:.0f} | "
                     f"{'UNCALIBRATED (softmax in flight)' if r.get('uncalibrated_overlap') else 'calibrated'} |")
    lines += ["", f"Ratio ours / fla (calibrated): {ours['predicted_tflops'] / fla['predicted_tflops']:.2f}x; "
                  f"serialised {ours['serialised_tflops'] / fla['serialised_tflops']:.2f}x."]
    return lines


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def write(records: list[dict], out_dir: str, quick: bool, name: str = "compile-sm90a",
          header: dict | None = None) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    cal = calibration(".".join(header["triton"].split(".")[:2]) if header else None)
    header = dict(header or {"triton": triton.__version__, "torch": torch.__version__,
                             "date": datetime.date.today().isoformat(), "commit": _commit(), "quick": quick})
    header["model"] = {"sms": SMS, "clock_hz": CLOCK_HZ, "hbm_bytes_s": HBM_BYTES_S, "fma_per_clk_wgmma": 2048,
                       "fma_per_clk_mma_sync": 1024, "calibrated": MODEL}
    header["calibration"] = cal
    header["targets"] = [judge(t, records, cal) for t in TARGETS]
    jpath = os.path.join(out_dir, f"{name}.json")
    with open(jpath, "w") as f:
        json.dump({"meta": header, "records": records}, f, indent=1)
    band = (f"the calibration's ratios (predicted / published H100 figure) run {cal['low']:.2f}-{cal['high']:.2f} "
            f"over its points within +-20% ({cal['path']}), so a prediction X stands for X/{cal['high']:.2f} to "
            f"X/{cal['low']:.2f}" + (f"; stated misses: " + ", ".join(f"{k} {v:.2f}x" for k, v in cal["misses"].items())
                                     if cal["misses"] else ""))
    lines = [
        "# Offline compile report (PREDICTED from compiled code, not measured)", "",
        f"Triton {header['triton']}, torch {header['torch']}, {header['date']}, commit {header['commit']}"
        f"{' (--quick)' if quick else ''}. Kernels compiled offline with `triton.compile` for sm_90a (no GPU);",
        "SASS read with the wheel's `cuobjdump`. Caps assume an H100 SXM (132 SMs, 1.83 GHz, "
        "989 bf16 TFLOP/s dense, 3.35 TB/s) and are predictions.", "",
        "Shapes: attention " + ATTN_MAIN.label + f" (dk/dv epilogue also at T={ATTN_LONG.t}); MoE "
        + "; ".join(s.label for s in MOE_SHAPES) + ".", "",
        f"Speed figures: the calibrated model (`compile_report.MODEL` = {MODEL}); {band}. Bounds: "
        "serialised (no overlap: tensor + issue + MUFU per iteration, one CTA after another) and overlapped "
        "(co-resident CTAs overlap perfectly); 'UNCALIBRATED' marks a kernel whose softmax (MUFU) is issued "
        "while its wgmma is in flight, an overlap no calibration point covers.", "",
        "## Targets (predicted)", "", *targets_check(records, cal), "",
        "## Calibrated figure per kernel (best kept config, sm_90a)", "", *kernel_summary(records, cal), "",
        "## Peer: flash-linear-attention parallel_attn at the forward target's shape (predicted)", "",
        *peer_summary(records, cal), "",
        "## Per kernel and config", "",
        "`instrs_per_iter`, `mufu_per_iter`, cycles: per thread and main-loop iteration (the innermost loop with the",
        "most tensor-core instructions; the shortest such loop when masked and unmasked copies exist).",
        "`duplicated`: some warps compute the same dot tile as others.", "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r.get('family', '')} | {r['kernel']} | {r['dtype']} | | {r['config']} | {r['target']} | "
                         "compile error: "
                         f"{r['error'][:80]} |")
            continue
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    mpath = os.path.join(out_dir, f"{name}.md")
    with open(mpath, "w") as f:
        f.write("\n".join(lines) + "\n")
    return jpath, mpath


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="bf16, D=128, one MoE shape, sm_90a only")
    p.add_argument("--only", default=None, help="family prefix: attention, decode, moe")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--smoke", action="store_true",
                   help="first config of " + ", ".join(SMOKE_KERNELS) + " (bf16, D=128): JSON only")
    p.add_argument("--name", default="compile-sm90a", help="output file stem")
    p.add_argument("--from-json", default=None,
                   help="re-judge the records of an earlier report (no compiling) and write NAME.{json,md} from them")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            old = json.load(f)
        jpath, mpath = write(old["records"], a.out, old["meta"].get("quick", False), a.name, old["meta"])
        print("\n".join(targets_check(old["records"], calibration(".".join(old["meta"]["triton"].split(".")[:2])))))
        print(f"wrote {jpath} and {mpath}")
        return 0
    from benchmarks.offline.offline_compile import tools_available

    if not tools_available():
        print("compile_report: this Triton has no NVIDIA ptxas/cuobjdump; nothing to compile", file=sys.stderr)
        return 2
    records = run(a.quick, a.only, a.workers, a.smoke)
    if a.smoke:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "compile-smoke.json"), "w") as f:
            json.dump(records, f, indent=1)
        return 1 if any("error" in r for r in records) else 0
    jpath, mpath = write(records, a.out, a.quick, a.name)
    print("\n".join(targets_check(records)))
    print(f"wrote {jpath} and {mpath}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
