"""The compile report's speed model: SM cycles of a compiled kernel's loops at a workload.

A PREDICTION from the SASS (:func:`benchmarks.offline.offline_compile.analyse` records),
calibrated against published H100 measurements of peer Triton kernels compiled by the same
tool (``python -m benchmarks.calibrate``; ``benchmarks/results/calibration.md`` holds the
points and the error band).

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
* an unmasked iteration (``Work.iters_full``) runs the main loop's body without the code a
  conditional forward branch in it skips (a loop that masks only its boundary tiles:
  :func:`offline_compile.skipped_regions`); a masked one (``Work.iters_masked``, the
  boundary tiles counted with the kernels' loop bounds) runs the whole body, or the
  slowest other loop with as many tensor-core instructions (a loop over another source of
  tiles, e.g. summaries), whole;
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
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.offline.offline_compile import ISSUE_PER_CLK, MUFU_PER_CLK

if TYPE_CHECKING:
    from benchmarks.offline.work_model import Work

#: H100 SXM: SMs, SM clock, HBM bytes per second
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


def occupancy(rec: dict) -> int:
    """CTAs of ``rec`` (an :func:`analyse` record) resident per SM: registers, shared memory, threads."""
    threads = 32 * rec["num_warps"]
    by_regs = REGS_PER_SM // max(1, (rec["regs"] or 255) * threads)
    by_smem = SMEM_PER_SM // max(1, rec["smem_bytes"] + 1024)
    return max(1, min(by_regs, by_smem, 2048 // threads))


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


def main_stats(rec: dict, unmasked: bool = False) -> dict:
    """The main loop's per-iteration fields of ``rec`` as :func:`iteration_cycles` reads them:
    the whole body, or with ``unmasked`` the path of a tile that needs no mask (the body
    without the code a conditional forward branch skips; the whole body when the record
    has no such split)."""
    pre = "unmasked_" if unmasked and "unmasked_instrs_per_iter" in rec else ""
    return {"tensor_cycles": rec["tensor_cycles_per_iter"], "instrs": rec[pre + "instrs_per_iter"],
            "mufu": rec[pre + "mufu_per_iter"], "inflight_instrs": rec[pre + "inflight_instrs_per_iter"],
            "inflight_mufu": rec[pre + "inflight_mufu_per_iter"]}


def predict(rec: dict, work: Work, model: dict | None = None) -> dict:
    """The calibrated prediction of ``rec`` (an :func:`analyse` record) at ``work``, with
    its serialised and overlapped bounds and the HBM floor (module docstring)."""
    m = dict(MODEL, **(model or {}))
    occ = occupancy(rec)
    warps = rec["num_warps"]
    full = iteration_cycles(main_stats(rec, unmasked=True), warps, occ, m)
    masked_loops = [lp for lp in rec.get("other_loops", []) if lp["mma"] == rec["mma_per_iter"] and lp["mma"] > 0]
    masked = max((iteration_cycles(lp, warps, occ, m) for lp in masked_loops),
                 key=lambda c: c["calibrated"], default=iteration_cycles(main_stats(rec), warps, occ, m))
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

