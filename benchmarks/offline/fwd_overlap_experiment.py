"""Softmax / tensor-core overlap of the attention kernels, read from offline sm_90a SASS.

``python -m benchmarks.offline.fwd_overlap_experiment [--kernels attn_fwd,attn_dq,attn_dkdv,attn_dkdv_summary]
[--head-dim 128] [--first]`` (no GPU; runs without ``TRITON_INTERPRET``). Compiles the
kernels' real launches at the compile report's main attention shape
(:data:`benchmarks.offline.compile_report.ATTN_MAIN`, bf16) for every config their pruner keeps
and prints, per config, three predictions (TFLOP/s of useful work, none measured):

* a loops-only model (forward and dq): **serialised** ``tensor + issue +
  MUFU`` cycles per iteration (``MUFU = MUFU instructions x warps x 32 / 16``) and
  **overlapped**: that less the work issued after an ``HGMMA`` and before the
  ``WARPGROUP.DEPBAR`` that waits for its group, up to the tensor cycles of the groups in
  flight (:func:`overlap_stats`; the body is scanned twice, so a group committed at the end
  of an iteration and waited for in the next one counts);
* the calibrated model of :func:`benchmarks.offline.compile_report.predict` with its serialised and
  overlapped bounds (:func:`calibrated`), "U" where the softmax's MUFU run while a wgmma is
  in flight (an overlap no calibration point covers: only the bounds hold). The kernels
  here use one loop per key (or query) source that branches around its mask for the tiles
  every row sees; :func:`offline_compile.analyse` counts those tiles on the path that skips
  the mask block (:func:`offline_compile.skipped_regions`, :func:`fast_path` here).

It also reports ptxas's C7515 ("wgmma serialized": every ``HGMMA`` then waits for the one
before; separate masked and unmasked loops over the same tiles trigger it) and the spills,
registers, shared memory and resident CTAs. Results: benchmarks/results/fwd-overlap.md.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from benchmarks.offline import rerun_without_interpreter

# The kernels must be real @triton.jit functions, not the interpreter's: rerun without it.
if __name__ == "__main__":
    rerun_without_interpreter("benchmarks.offline.fwd_overlap_experiment")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["DASG_AUTOTUNE"] = "1"  # record every config the pruners keep

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.offline import compile_report as cr  # noqa: E402
from benchmarks.offline import offline_compile as oc  # noqa: E402
from dasg_kernels.attention.loop_bounds import local_key_range, summary_key_range  # noqa: E402

MUFU_PER_CLK = 16  # ex2 results per clock per SM (FA3 paper: 3.9 TFLOP/s of special functions)
_DEPBAR = re.compile(r"gsb0,\s*0x([0-9a-f]+)")


def _costs(op: str, num_warps: int) -> float:
    """Issue + MUFU cycles per CTA of one instruction executed by every warp."""
    c = num_warps / oc.ISSUE_PER_CLK
    if op.startswith("MUFU"):
        c += num_warps * 32 / MUFU_PER_CLK
    return c


def overlap_stats(body: list[tuple[int, str, str]], num_warps: int) -> dict:
    """Serialised and overlapped cycles per CTA of one iteration of a loop ``body``.

    wgmma groups: consecutive ``HGMMA``s up to one carrying ``gsb0`` (the commit);
    ``WARPGROUP.DEPBAR.LE gsb0, N`` retires the oldest groups until ``N`` are pending.
    """
    tensor = sum(oc.mma_fma(op)[0] for _, op, _ in body if op.startswith("HGMMA")) * (num_warps / 4) \
        / oc.FMA_PER_CLK_WGMMA
    issue = len(body) * num_warps / oc.ISSUE_PER_CLK
    n_mufu = sum(op.startswith("MUFU") for _, op, _ in body)
    mufu = n_mufu * num_warps * 32 / MUFU_PER_CLK
    # scan two copies; credit the windows of the groups that start in the first copy
    pending: list[dict] = []  # groups issued, not yet retired: {tensor, work, n, first}
    forming: dict | None = None
    credit = 0.0
    in_flight_instrs = 0
    hg = [0, 0]
    for copy in (0, 1):
        for _, op, rest in body:
            if op.startswith("HGMMA"):
                t = oc.mma_fma(op)[0] * (num_warps / 4) / oc.FMA_PER_CLK_WGMMA
                if forming is None:
                    forming = {"tensor": 0.0, "work": 0.0, "n": 0, "first": copy == 0}
                forming["tensor"] += t
                hg[copy] += 1
                if "gsb0" in rest:
                    pending.append(forming)
                    forming = None
                continue
            if op.startswith("WARPGROUP.DEPBAR"):
                m = _DEPBAR.search(rest)
                keep = int(m.group(1), 16) if m else 0
                while len(pending) > keep:
                    g = pending.pop(0)
                    if g["first"]:
                        credit += min(g["work"], g["tensor"])
                        in_flight_instrs += g["n"]
                continue
            live = pending + ([forming] if forming is not None else [])
            if live:
                # the work hides behind the oldest group still in flight
                live[0]["work"] += _costs(op, num_warps)
                live[0]["n"] += 1
    for g in pending + ([forming] if forming is not None else []):
        if g["first"]:
            credit += min(g["work"], g["tensor"])
            in_flight_instrs += g["n"]
    serial = tensor + issue + mufu
    return {
        "instrs": len(body), "mufu": n_mufu, "hgmma": hg[0],
        "tensor": tensor, "issue": issue, "mufu_cycles": mufu,
        "in_flight_instrs": in_flight_instrs, "credit": credit,
        "serialised": serial, "overlapped": serial - credit,
        "wgmma_groups": sum(op.startswith("HGMMA") and "gsb0" in rest for _, op, rest in body),
    }


def fast_path(body: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """``body`` without the blocks a conditional forward branch inside it jumps over
    (:func:`offline_compile.skipped_regions`: the masking code of a loop that masks only
    some of its tiles; the unmasked tiles take the jumps)."""
    skipped = {i for a, b in oc.skipped_regions(body) for i in range(a, b + 1)}
    return [x for i, x in enumerate(body) if i not in skipped]


def real_loops(instrs: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """:func:`offline_compile.loops` without the jumps back from the mbarrier-wait stubs
    ptxas puts after the last ``EXIT`` (``@!P BRA self; BRA back``: not loops)."""
    return [(a, b) for a, b in oc.loops(instrs) if not (b > 0 and instrs[b - 1][1].startswith("BRA"))]


def mma_loops(sass: str) -> list[list[tuple[int, str, str]]]:
    """Bodies of the innermost loops with tensor-core work, in program order."""
    instrs = oc.parse_sass(sass)
    lps = real_loops(instrs)
    inner = [(a, b) for a, b in lps if not any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2 in lps)]
    bodies = [instrs[a:b + 1] for a, b in sorted(inner)]
    return [b for b in bodies if any(op.startswith("HGMMA") for _, op, _ in b)]


def ptxas_diagnostics(ptx: str) -> list[str]:
    """ptxas's performance notes for ``ptx`` (e.g. C7515: wgmma serialised), for sm_90a."""
    bindir = oc._bin_dir()
    exe = os.path.join(bindir, "ptxas")
    m = re.search(r"^\.version (\d+)\.(\d+)", ptx, re.M)
    if m and (int(m.group(1)), int(m.group(2))) > (8, 8) and os.path.exists(os.path.join(bindir, "ptxas-blackwell")):
        exe = os.path.join(bindir, "ptxas-blackwell")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    return [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if "Performance" in ln or "spill" in ln]


def compile_with_ptx(launch: oc.Launch, config=None) -> tuple[oc.Compiled, str]:
    """:func:`offline_compile.compile_launch`, also returning the PTX."""
    got = {}
    orig = triton.compile

    def keep(*a, **k):
        got["k"] = orig(*a, **k)
        return got["k"]

    triton.compile = keep
    try:
        c = oc.compile_launch(launch, config)
    finally:
        triton.compile = orig
    return c, got["k"].asm["ptx"]


def attn_launches(d: int = 128, dtype=torch.bfloat16, shape: cr.AttnShape = cr.ATTN_MAIN) -> dict[str, oc.Launch]:
    """The recorded forward / backward launches at ``shape`` by report label."""
    out = {}
    for launch in cr.attn_record(shape, d, dtype)():
        label = cr.attn_label(launch)
        if label and label not in out:
            out[label] = launch
    return out


def q_block_iters(shape: cr.AttnShape, bm: int, bn: int) -> dict[str, int]:
    """Key-tile iterations of the query-block programs (forward, dq) by kind, all heads:
    local unmasked / masked, summary unmasked / masked (the kernels' own loop bounds)."""
    ng = -(-shape.t // shape.g)
    out = dict(local_full=0, local_masked=0, sum_full=0, sum_masked=0)
    for start in range(0, shape.t, bm):
        first, last = start, min(start + bm, shape.t) - 1
        lo, flo, fhi, hi = local_key_range(first, last, shape.left, 0, shape.t, bn)
        out["local_full"] += cr.tiles(flo, fhi, bn)
        out["local_masked"] += cr.tiles(lo, flo, bn) + cr.tiles(fhi, hi, bn)
        if shape.summaries:
            s_full, b_hi, _ = summary_key_range(first, last, shape.left, 0, shape.g, ng, bn, True, False)
            out["sum_full"] += cr.tiles(0, s_full, bn)
            out["sum_masked"] += cr.tiles(s_full, b_hi, bn)
    heads = shape.b * shape.hq
    return {k: v * heads for k, v in out.items()}


def _outside(sass: str, num_warps: int) -> dict:
    """Issue and tensor cycles per CTA of everything outside the loops with tensor-core work
    (prologue, the pipelined loops' first ``Q K^T``, epilogue), run once per program."""
    instrs = oc.parse_sass(sass)
    inside = set()
    for a, b in real_loops(instrs):
        if any(op.startswith("HGMMA") for _, op, _ in instrs[a:b + 1]):
            inside.update(range(a, b + 1))
    rest = [x for i, x in enumerate(instrs) if i not in inside]
    tensor = sum(oc.mma_fma(op)[0] for _, op, _ in rest if op.startswith("HGMMA")) * (num_warps / 4) \
        / oc.FMA_PER_CLK_WGMMA
    return {"instrs": len(rest), "issue": len(rest) * num_warps / oc.ISSUE_PER_CLK, "tensor": tensor}


def predict(label: str, launch: oc.Launch, cfg, c: oc.Compiled, shape: cr.AttnShape = cr.ATTN_MAIN,
            d: int = 128) -> dict:
    """Both bounds (TFLOP/s of useful work) of one compiled forward or dq kernel at ``shape``.

    The loops with tensor-core work are, in program order, either one per key source
    (local, summary: masked tiles take the whole body, unmasked ones skip the blocks a
    forward branch jumps over) or the split layout (masked, unmasked, masked local loops,
    then unmasked and masked summary loops). Per program, the instructions and wgmma
    outside those loops are added once (serialised: issue + tensor; overlapped: the larger)."""
    kw = dict(launch.kwargs, **(cfg.all_kwargs() if cfg is not None else {}))
    warps = c.num_warps
    bodies = mma_loops(c.sass)
    fast = [overlap_stats(fast_path(b), warps) for b in bodies]
    slow = [overlap_stats(b, warps) for b in bodies]
    if len(bodies) >= 5:  # split: [local masked, local full, local masked, summary full, summary masked, ...]
        roles = {"local_full": [fast[1]], "local_masked": [slow[0], slow[2]], "sum_full": [fast[3]],
                 "sum_masked": [slow[4]]}
    else:  # one loop per key source
        roles = {"local_full": [fast[0]], "local_masked": [slow[0]], "sum_full": [fast[-1]],
                 "sum_masked": [slow[-1]]}
    iters = q_block_iters(shape, kw["BLOCK_M"], kw["BLOCK_N"])
    base, _, passno = label.partition("_pass")
    work = cr.attn_work(cr.attn_kind(base), shape, d, 2, kw["BLOCK_M"], kw["BLOCK_N"], int(passno or 0))
    programs = -(-shape.t // kw["BLOCK_M"]) * shape.b * shape.hq
    out_ = _outside(c.sass, warps)
    hbm_s = work.hbm_bytes / cr.HBM_BYTES_S
    out = {"main": roles["local_full"][0], "masked_worst": max(roles["local_masked"], key=lambda s: s["instrs"]),
           "iters": iters, "outside": out_}
    for key in ("serialised", "overlapped"):
        cyc = sum(n * max(s[key] for s in roles[k]) for k, n in iters.items())
        out[key + "_tflops"] = work.flops / max(cyc / (cr.SMS * cr.CLOCK_HZ), hbm_s) / 1e12
        per_prog = out_["issue"] + out_["tensor"] if key == "serialised" else max(out_["issue"], out_["tensor"])
        cyc += programs * per_prog
        out[key + "_pp_tflops"] = work.flops / max(cyc / (cr.SMS * cr.CLOCK_HZ), hbm_s) / 1e12
    return out


def calibrated(label: str, launch: oc.Launch, cfg, c: oc.Compiled, shape: cr.AttnShape = cr.ATTN_MAIN,
               d: int = 128) -> dict:
    """:func:`benchmarks.offline.compile_report.predict` (the calibrated model) of one compiled
    attention kernel: :func:`offline_compile.analyse` takes the unmasked iterations of a loop
    that branches around its mask on the path that skips it, the masked ones on the whole body."""
    kw = dict(launch.kwargs, **(cfg.all_kwargs() if cfg is not None else {}))
    base, _, passno = label.partition("_pass")
    work = cr.attn_work(cr.attn_kind(base), shape, d, 2, kw["BLOCK_M"], kw["BLOCK_N"], int(passno or 0))
    return cr.predict(oc.analyse(c), work)


def report(label: str, launch: oc.Launch, cfg, c: oc.Compiled, ptx: str | None = None,
           shape: cr.AttnShape = cr.ATTN_MAIN, d: int = 128) -> str:
    """One line: resources, the unmasked iteration's counts, both models' figures."""
    rec = oc.analyse(c)
    bodies = mma_loops(c.sass)
    main = overlap_stats(fast_path(bodies[0]), c.num_warps) if bodies else None
    spills = [sum(op.startswith(("STL", "LDL")) for _, op, _ in b) for b in bodies]
    cal = calibrated(label, launch, cfg, c, shape, d)
    line = (f"{label} D={d} {cr.config_text(launch, cfg)}: regs {rec['regs']}, spill {rec['spill_bytes']} B "
            f"(main-loop spill instructions {spills}), smem {rec['smem_bytes']}, {cal['occupancy']} CTA/SM")
    if main:
        line += (f" | unmasked iteration: {main['instrs']} instrs, {main['mufu']} MUFU, {main['hgmma']} HGMMA in "
                 f"{main['wgmma_groups']} groups, {main['in_flight_instrs']} in flight")
    if label in ("attn_fwd", "attn_dq"):
        p = predict(label, launch, cfg, c, shape, d)
        line += f" | interim: serialised {p['serialised_tflops']:.0f}, overlapped {p['overlapped_tflops']:.0f}"
    line += (f" | calibrated {cal['predicted_tflops']:.0f} (serialised {cal['serialised_tflops']:.0f}, "
             f"overlapped {cal['overlapped_tflops']:.0f}){' U' if cal['uncalibrated_overlap'] else ''}")
    if ptx and any("C7515" in x for x in ptxas_diagnostics(ptx)):
        line += " | C7515: wgmma serialized"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="attn_fwd,attn_dq,attn_dkdv,attn_dkdv_summary")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--first", action="store_true", help="first config only")
    a = ap.parse_args(argv)
    print(f"Triton {triton.__version__}, sm_90a, {cr.ATTN_MAIN.label}, bf16 D={a.head_dim}", flush=True)
    launches = attn_launches(a.head_dim)
    for label in a.kernels.split(","):
        launch = launches[label]
        for cfg in (launch.configs[:1] if a.first else launch.configs):
            c, ptx = compile_with_ptx(launch, cfg)
            print(report(label, launch, cfg, c, ptx, d=a.head_dim), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
