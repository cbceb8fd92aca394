"""The compile report's speed targets (data) and their verdicts on compiled records:
the calibrated figure of the best kept config per kernel, its calibration band, the
serialised and overlapped bounds, and the report's structural checks."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import triton

from benchmarks.offline import RESULTS
from benchmarks.offline.speed_model import HBM_BYTES_S
from benchmarks.offline.work_model import ATTN_MAIN



@dataclass(frozen=True)
class Target:
    """One speed target of the Hopper kernels, judged on the calibrated predictions.

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


#: the speed targets (``benchmarks/results/compile-sm90a.md`` judges them)
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


def best(records: list[dict]) -> dict | None:
    return max(records, key=lambda r: r.get("predicted_tflops") or 0, default=None)


def preprocess_seconds(r: dict) -> float:
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
    parts = []
    for k in target.kernels:
        rs = [r for r in ok if r["kernel"] == k]
        if not rs:
            continue
        parts.append(best(rs) if k != "attn_bwd_preprocess" else rs[0])
    if not any(r.get("predicted_tflops") for r in parts):
        return {"id": target.id, "text": target.text, "status": "NO DATA", "detail": "no compiled record"}
    seconds = {"calibrated": 0.0, "serialised": 0.0, "overlapped": 0.0}
    flops = 0.0
    for r in parts:
        if r["kernel"] == "attn_bwd_preprocess":
            for key in seconds:
                seconds[key] += preprocess_seconds(r)
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
    if uncal and len(target.kernels) == 1:
        # the best kept config whose overlap the calibration covers (e.g. the unpipelined forward)
        covered = best([r for r in ok if r["kernel"] == target.kernels[0] and not r.get("uncalibrated_overlap")])
        if covered is not None and covered.get("predicted_tflops"):
            out["covered_tflops"] = covered["predicted_tflops"]
            out["covered_config"] = covered["config"]
            out["covered_band"] = (covered["predicted_tflops"] / cal["high"], covered["predicted_tflops"] / cal["low"])
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
    if "covered_tflops" in j:
        txt += (f". Best config the calibration covers (no softmax in flight): {j['covered_config']}, calibrated "
                f"{j['covered_tflops']:.0f} (band {j['covered_band'][0]:.0f}-{j['covered_band'][1]:.0f}); "
                "the autotuner measures both on a GPU")
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
