"""The ``torch`` attention backend on the CPU: time and peak memory against SDPA.

    python -m benchmarks.bench_torch_backend [--threads 2] [--ts 2048 8192] [--reps 3]

The issue-11 case: ``q [1, T, 8, 64]``, 2 kv heads, fp32, ``window=(255, 0)``, ``G=64``
with summaries. Three implementations:

- ``blockwise``: ``dasg_kernels.attention.blockwise`` (what ``backend="torch"`` runs);
- ``sdpa-causal``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True,
  enable_gqa=True)``, full causal attention (more work than the windowed op: the bar);
- ``reference``: ``dasg_kernels.reference.swa_attention_ref`` (the readable oracle,
  ``[B, Hq, T, T + T/G]`` fp32 scores).

Each (implementation, T, mode) runs in its own subprocess, so its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own: reported whole and above
the process's RSS just before the first call (imports and inputs). Time: the best of
``--reps`` calls after one warm-up (the reference at the largest T: one call, no
warm-up). Modes: ``fwd`` (under ``no_grad``) and ``fwd+bwd``. Writes
``benchmarks/results/torch-backend-cpu.md``. A script, not a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "torch-backend-cpu.md")
IMPLS = ("blockwise", "sdpa-causal", "reference")
CASE = dict(b=1, hq=8, hkv=2, d=64, window=(255, 0), group_size=64)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _case(impl: str, t: int, mode: str, reps: int, threads: int) -> dict:
    """Runs in the subprocess: one implementation, one T, one mode."""
    import torch
    import torch.nn.functional as F

    from dasg_kernels import reference
    from dasg_kernels.attention.blockwise import swa_attention_blockwise

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = CASE
    q = torch.randn(c["b"], t, c["hq"], c["d"], requires_grad=mode != "fwd")
    k = torch.randn(c["b"], t, c["hkv"], c["d"], requires_grad=mode != "fwd")
    v = torch.randn(c["b"], t, c["hkv"], c["d"], requires_grad=mode != "fwd")
    kw = dict(window=c["window"], causal=True, group_size=c["group_size"], summaries=True)

    def call():
        if impl == "blockwise":
            return swa_attention_blockwise(q, k, v, **kw)[0]
        if impl == "reference":
            return reference.swa_attention_ref(q, k, v, **kw)[0]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                call()
        else:
            out = call()
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    base = _rss_mb()
    warm = not (impl == "reference" and t > 2048)
    if warm:
        step()
    times = []
    for _ in range(reps if warm else 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(impl=impl, t=t, mode=mode, time_s=min(times), peak_rss_mb=peak, base_rss_mb=base,
                peak_above_base_mb=peak - base, threads=threads)


def _run_case(impl, t, mode, reps, threads) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.bench_torch_backend", "--case", impl, str(t), mode,
           "--reps", str(reps), "--threads", str(threads)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return dict(impl=impl, t=t, mode=mode, error=res.stderr.strip().splitlines()[-1:] or ["failed"])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _markdown(rows, args) -> str:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    import torch

    lines = [
        "# torch attention backend on the CPU",
        "",
        f"`python -m benchmarks.bench_torch_backend --threads {args.threads} --reps {args.reps}` "
        f"({time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} threads; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}: the machine was shared, so times are noisy).",
        "",
        f"Case: q [1, T, 8, 64] fp32, 2 kv heads, window (255, 0), G=64, summaries on. `blockwise` is "
        f"what `backend=\"torch\"` runs; `sdpa-causal` is SDPA's full causal attention (the bar); "
        f"`reference` is `reference.swa_attention_ref` (dense fp32 scores). Peak RSS per case in its own "
        f"process; 'above base' subtracts the RSS after imports and inputs. Time: best of {args.reps} after "
        f"a warm-up (reference at T > 2048: one call).",
        "",
        "| T | mode | impl | time (s) | peak RSS (MB) | above base (MB) | vs sdpa-causal time | vs sdpa-causal above-base mem |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["impl"], r["t"], r["mode"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['t']} | {r['mode']} | {r['impl']} | error: {' '.join(r['error'])[:80]} | | | | |")
            continue
        s = by.get(("sdpa-causal", r["t"], r["mode"]))
        rt = f"{r['time_s'] / s['time_s']:.2f}x" if s and "error" not in s else ""
        rm = f"{r['peak_above_base_mb'] / max(s['peak_above_base_mb'], 1e-9):.2f}x" if s and "error" not in s else ""
        lines.append(f"| {r['t']} | {r['mode']} | {r['impl']} | {r['time_s']:.3f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_above_base_mb']:.0f} | {rt} | {rm} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs=3, metavar=("IMPL", "T", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    if args.case:
        impl, t, mode = args.case
        print(json.dumps(_case(impl, int(t), mode, args.reps, args.threads)))
        return
    rows = []
    for mode in args.modes:
        for t in args.ts:
            for impl in IMPLS:
                if impl == "reference" and mode != "fwd" and t > 2048:
                    continue  # its backward at 8192 keeps several [8, T, T + T/G] fp32 tensors
                r = _run_case(impl, t, mode, args.reps, args.threads)
                print(r, flush=True)
                rows.append(r)
    md = _markdown(rows, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
