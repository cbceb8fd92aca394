"""The compile report's files: ``<name>.json`` (header, judged targets, every record) and
``<name>.md`` (targets, the calibrated figure per kernel, the fla peer, every kernel x config)."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections import OrderedDict

import torch
import triton

from benchmarks.offline.cases import fla_available
from benchmarks.offline.speed_model import CLOCK_HZ, HBM_BYTES_S, MODEL, SMS
from benchmarks.offline.speed_targets import TARGETS, best, calibration, judge, targets_check, with_band
from benchmarks.offline.work_model import ATTN_LONG, ATTN_MAIN, ATTN_PEER, MOE_SHAPES


COLUMNS = ("family", "kernel", "dtype", "head_dim", "config", "target", "regs", "spill_bytes", "smem_bytes", "wgmma",
           "mma_sync", "tma_loads", "cp_async_loads", "global_loads", "instrs_per_iter", "unmasked_instrs_per_iter",
           "masking_instrs_per_iter", "inflight_instrs_per_iter",
           "mufu_per_iter", "inflight_mufu_per_iter", "tensor_cycles_per_iter", "issue_cycles_per_iter", "duplicated",
           "bound", "predicted_tflops", "serialised_tflops", "overlapped_tflops")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


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
        b = best(rs)
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
    ours = best([r for r in rs if r["kernel"] == "attn_fwd"])
    fla = best([r for r in rs if r["kernel"] == "fla_parallel_attn_fwd"])
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


def git_commit() -> str:
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
                             "date": datetime.date.today().isoformat(), "commit": git_commit(), "quick": quick})
    header["model"] = {"sms": SMS, "clock_hz": CLOCK_HZ, "hbm_bytes_s": HBM_BYTES_S, "fma_per_clk_wgmma": 2048,
                       "fma_per_clk_mma_sync": 1024, "calibrated": MODEL}
    header["calibration"] = cal
    header["targets"] = [judge(t, records, cal) for t in TARGETS]
    jpath = os.path.join(out_dir, f"{name}.json")
    with open(jpath, "w") as f:
        json.dump({"meta": header, "records": records}, f, indent=1)
    band = (f"the calibration's ratios (predicted / published H100 figure) run {cal['low']:.2f}-{cal['high']:.2f} "
            f"over its points within +-20% ({cal['path']}), so a prediction X stands for X/{cal['high']:.2f} to "
            f"X/{cal['low']:.2f}" + ("; stated misses: " + ", ".join(f"{k} {v:.2f}x" for k, v in cal["misses"].items())
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
        "`unmasked_instrs_per_iter`: the same body without the code a conditional forward branch in it skips",
        "(`masking_instrs_per_iter`: the masking code, run by boundary tiles only); the model charges unmasked",
        "iterations the first, masked ones the whole body.",
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
