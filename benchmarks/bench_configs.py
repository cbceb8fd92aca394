"""``python -m benchmarks.bench_configs``: the attention kernels' first configs and the
forward's two schedules measured on a GPU, beside the offline prediction of each.

At the compile report's main attention shape (bf16, D=128, B=1 T=32k Hq=32 Hkv=8
left=2047 causal, G=256 summaries) it times, with ``triton.testing.do_bench`` and one
config pinned at a time (``DASG_AUTOTUNE=0`` runs the first entry of a space):

* the forward with its software-pipelined loop (the space's first config): the softmax of
  a tile runs while the tensor cores compute the next tile's scores, an overlap no
  calibration point of the offline model covers (it gives only bounds), and
* the forward without it (the best unpipelined config of the space): a schedule the
  calibration covers;
* the whole backward (dq, dk/dv, the summaries' dk/dv and the preprocess; first configs);
* the MoE expert FFN forward and forward + backward at the Mixtral-like shape.

Beside each measurement it sets the compile report's prediction for the same kernel and
config (``results/compile-sm90a.json``: calibrated, serialised and overlapped TFLOP/s)
and the ratio; for the forward also where the pipelined schedule lands between its
bounds and the share of the model's overlap headroom it realised
(:func:`overlap_reading`). That reading is the calibration point for a pipelined softmax
the model lacks: the first GPU run supplies it. CUDA only; writes
``<out>/bench-configs.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from benchmarks.offline.work_model import ATTN_MAIN

#: the forward's two schedules at D=128 (BM, BN, warps, stages, PIPELINE): the first config
#: of the space and the best unpipelined one (dasg_kernels/attention/configs.py)
FWD_SCHEDULES = (("pipelined", (64, 64, 4, 2, True)), ("unpipelined", (64, 64, 4, 2, False)))
#: the head dim of the compile report's main attention shape (``ATTN_MAIN``, bf16)
HEAD_DIM = 128


def config_text(cfg: tuple[int, int, int, int, bool]) -> str:
    """The compile report's label of a forward config (``compile_report.config_text``)."""
    bm, bn, w, s, pipeline = cfg
    return f"{bm}x{bn} w{w} s{s}" + ("" if pipeline else " unpipelined")


def _pin_fwd(cfg: tuple[int, int, int, int, bool], head_dim: int = HEAD_DIM) -> None:
    """Make ``cfg`` the first config of the forward's space for ``head_dim``'s class (what
    ``DASG_AUTOTUNE=0`` runs) and forget every tuned choice."""
    import triton

    from dasg_kernels.attention import configs, fwd

    bm, bn, w, s, pipeline = cfg
    space = configs.SPACES["fwd"]
    cls = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)

    def match(c: triton.Config, dclass: int) -> bool:
        return dclass == cls and (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.num_warps, c.num_stages,
                                  c.kwargs.get("PIPELINE", True)) == (bm, bn, w, s, pipeline)

    hit = [e for e in space if match(*e)]
    if not hit:
        raise ValueError(f"bench_configs: {config_text(cfg)} is not in the forward's config space")
    space[:] = hit[:1] + [e for e in space if e is not hit[0]]
    if isinstance(fwd._swa_fwd_kernel, triton.runtime.Autotuner):
        fwd._swa_fwd_kernel.cache.clear()


def time_attention(partial=None) -> list[dict]:
    """Measured ms of the forward's two schedules and of the whole backward (CUDA), through
    the public op (so the forward includes pooling the summaries: a few % at this shape).
    ``partial(rows)`` is called with the forward rows before the backward runs."""
    import triton

    import dasg_kernels as dk

    s, d, dev, dt = ATTN_MAIN, HEAD_DIM, "cuda", torch.bfloat16
    q = torch.randn(s.b, s.t, s.hq, d, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(s.b, s.t, s.hkv, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    kw = dict(window=(s.left, 0), causal=True, group_size=s.g, summaries=s.summaries)
    out = []
    for which, cfg in FWD_SCHEDULES:
        _pin_fwd(cfg)
        ms = triton.testing.do_bench(lambda: dk.swa_attention(q, k, v, **kw))
        out.append({"kernel": "attn_fwd", "which": which, "config": config_text(cfg), "ms": ms})
        print(out[-1], flush=True)
    if partial is not None:
        partial(out)
    _pin_fwd(FWD_SCHEDULES[0][1])
    o = dk.swa_attention(q, k, v, **kw)
    do = torch.randn_like(o)
    ms = triton.testing.do_bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    out.append({"kernel": "attn_bwd", "which": "first configs", "config": "", "ms": ms})
    print(out[-1], flush=True)
    return out


def time_moe(n: int = 16384, d: int = 4096, f: int = 14336, e: int = 8, k: int = 2) -> list[dict]:
    """Measured ms and TFLOP/s of the MoE expert FFN forward and forward + backward (CUDA)."""
    import triton

    import dasg_kernels as dk

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
    w1 = (torch.randn(e, 2 * f, d, device=dev, dtype=dt) * d ** -0.5).requires_grad_()
    w2 = (torch.randn(e, d, f, device=dev, dtype=dt) * f ** -0.5).requires_grad_()
    routing = dk.route(torch.randn(n, e, device=dev), top_p=1.0, k_max=k)
    flops = 2 * n * k * d * 3 * f
    fwd = triton.testing.do_bench(lambda: dk.expert_ffn(x, w1, w2, routing))
    y = dk.expert_ffn(x, w1, w2, routing)
    dy = torch.randn_like(y)
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(y, (x, w1, w2), dy, retain_graph=True))
    out = [{"kernel": "moe_expert_ffn", "which": "fwd", "ms": fwd, "tflops": flops / fwd / 1e9},
           {"kernel": "moe_expert_ffn", "which": "fwd+bwd", "ms": fwd + bwd, "tflops": 3 * flops / (fwd + bwd) / 1e9}]
    for r in out:
        print(r, flush=True)
    return out


def default_report(version: str | None = None) -> str:
    """The compile report compiled by this Triton: ``compile-sm90a-triton3.6-quick.json`` under
    Triton 3.6 (the GPU machines'), else ``compile-sm90a.json`` (Triton 3.9)."""
    import triton

    results = os.path.join(os.path.dirname(__file__), "results")
    v36 = os.path.join(results, "compile-sm90a-triton3.6-quick.json")
    if (version or triton.__version__).startswith("3.6") and os.path.exists(v36):
        return v36
    return os.path.join(results, "compile-sm90a.json")


def predictions(report: dict) -> dict:
    """The compile report's figures for what :func:`time_attention` measures: per forward
    config label its record's useful TFLOP and TFLOP/s (calibrated / serialised /
    overlapped, and whether its overlap is uncalibrated); the backward's target figure."""
    out: dict = {"report_commit": report.get("meta", {}).get("commit"),
                 "report_triton": report.get("meta", {}).get("triton"), "fwd": {}}
    for r in report.get("records", []):
        if (r.get("kernel") == "attn_fwd" and r.get("target") == "sm_90a" and r.get("dtype") == "bfloat16"
                and r.get("head_dim") == HEAD_DIM and r.get("shape") == ATTN_MAIN.label and r.get("predicted_tflops")):
            out["fwd"][r["config"]] = {k: r[k] for k in ("useful_tflop", "predicted_tflops", "serialised_tflops",
                                                        "overlapped_tflops", "uncalibrated_overlap")}
    for t in report.get("meta", {}).get("targets", []):
        if t.get("id") == "attn_bwd":
            out["bwd"] = {k: t.get(k) for k in ("calibrated_tflops", "serialised_tflops", "overlapped_tflops")}
    return out


def overlap_reading(t_pipe: float, t_base: float, pipe: dict, base: dict) -> dict:
    """Where the measured pipelined forward lands (times in any one unit, figures in TFLOP/s
    of the same work): ``position`` between its serialised (0) and overlapped (1) bounds,
    and ``realised_share``: the share of the time the model's ideal overlap would save over
    the unpipelined schedule's calibrated prediction that the measured pipelined schedule
    did save over the measured unpipelined one (``calibrate.overlap_check`` reads the one
    published compiler-pipelined schedule the same way)."""
    inv = {k: 1.0 / pipe[k] for k in ("serialised_tflops", "overlapped_tflops")}
    scale = t_pipe * pipe["measured_tflops"]  # time x TFLOP/s of the same work
    t_ser, t_ovl = scale * inv["serialised_tflops"], scale * inv["overlapped_tflops"]
    t_base_pred = scale / base["predicted_tflops"]
    return {"position": (t_ser - t_pipe) / (t_ser - t_ovl) if t_ser > t_ovl else None,
            "realised_share": (t_base - t_pipe) / (t_base_pred - t_ovl) if t_base_pred > t_ovl else None}


def compare(measured: list[dict], pred: dict) -> list[dict]:
    """Rows of measured beside predicted TFLOP/s (the attention rows of ``measured`` from
    :func:`time_attention`, ``pred`` from :func:`predictions`)."""
    rows = []
    fwd_flops = None
    for m in measured:
        p = pred["fwd"].get(m["config"]) if m["kernel"] == "attn_fwd" else None
        if p is not None:
            fwd_flops = p["useful_tflop"] * 1e12
        row = dict(m)
        if p is not None:
            row.update(measured_tflops=p["useful_tflop"] * 1e12 / (m["ms"] * 1e-3) / 1e12, **p)
        rows.append(row)
    for row in rows:
        if row["kernel"] == "attn_bwd" and fwd_flops and pred.get("bwd"):
            row.update(measured_tflops=2.5 * fwd_flops / (row["ms"] * 1e-3) / 1e12,
                       predicted_tflops=pred["bwd"]["calibrated_tflops"],
                       serialised_tflops=pred["bwd"]["serialised_tflops"],
                       overlapped_tflops=pred["bwd"]["overlapped_tflops"])
        if row.get("measured_tflops") and row.get("predicted_tflops"):
            row["measured_over_predicted"] = row["measured_tflops"] / row["predicted_tflops"]
    fwd = {r["which"]: r for r in rows if r["kernel"] == "attn_fwd" and r.get("measured_tflops")}
    if "pipelined" in fwd and "unpipelined" in fwd:
        fwd["pipelined"]["overlap"] = overlap_reading(fwd["pipelined"]["ms"], fwd["unpipelined"]["ms"],
                                                      fwd["pipelined"], fwd["unpipelined"])
    return rows


def markdown(device: str, rows: list[dict], moe: list[dict], pred: dict) -> str:
    """The page ``bench-configs.md``: MEASURED beside PREDICTED."""
    lines = [f"# Attention first configs and the forward's two schedules, MEASURED on {device}", "",
             f"Predictions: compile report of commit {pred.get('report_commit')} (Triton "
             f"{pred.get('report_triton')}); shape bf16 D=128 B=1 T=32k Hq=32 Hkv=8 left=2047 causal G=256 "
             "summaries. Backward TFLOP/s count 2.5x the forward's useful FLOPs. Timed through the public op: "
             "the forward includes pooling the group means (a few % of its time), which the prediction leaves "
             "out.", "",
             "| kernel | schedule / config | ms | measured TFLOP/s | predicted calibrated (serialised / overlapped) "
             "| measured / predicted |", "|---|---|---|---|---|---|"]

    def num(x, fmt="{:.0f}"):
        return fmt.format(x) if x is not None else "-"

    for r in rows:
        unc = " U" if r.get("uncalibrated_overlap") else ""
        lines.append(f"| {r['kernel']} | {r['which']} {r['config']} | {r['ms']:.3f} | {num(r.get('measured_tflops'))} "
                     f"| {num(r.get('predicted_tflops'))} ({num(r.get('serialised_tflops'))} / "
                     f"{num(r.get('overlapped_tflops'))}){unc} | {num(r.get('measured_over_predicted'), '{:.2f}')} |")
    ov = next((r["overlap"] for r in rows if r.get("overlap")), None)
    if ov:
        lines += ["", f"Pipelined forward between its bounds: position {num(ov['position'], '{:.2f}')} "
                  "(0 = serialised, 1 = overlapped); share of the model's ideal overlap realised over the "
                  f"unpipelined schedule: {num(ov['realised_share'], '{:.2f}')} (the compiler-pipelined "
                  "Triton tutorial of triton-lang/triton PR #5185: 0.27, calibration-triton3.6.md)."]
    lines += ["", "| MoE expert FFN | ms | measured TFLOP/s |", "|---|---|---|"]
    lines += [f"| {m['which']} | {m['ms']:.3f} | {m['tflops']:.0f} |" for m in moe]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--report", default=None, help="compile report JSON (default: default_report())")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_configs: needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ["DASG_AUTOTUNE"] = "0"  # one config per kernel: the pinned one (read at each launch)
    a.report = a.report or default_report()
    with open(a.report) as f:
        pred = predictions(json.load(f))
    device = torch.cuda.get_device_name()
    os.makedirs(a.out, exist_ok=True)

    def write(rows: list[dict], moe: list[dict]) -> None:
        with open(os.path.join(a.out, "bench-configs.json"), "w") as f:
            json.dump({"device": device, "attention": rows, "moe": moe, "predictions": pred}, f, indent=1)
        with open(os.path.join(a.out, "bench-configs.md"), "w") as f:
            f.write(markdown(device, rows, moe, pred))

    # written as soon as measured: a time limit that stops a later step keeps what came before
    rows = compare(time_attention(lambda fwd_rows: write(compare(fwd_rows, pred), [])), pred)
    write(rows, [])
    write(rows, time_moe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
