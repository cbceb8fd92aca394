"""``python -m benchmarks.compile_report``: what the kernels compile to on Hopper, without a GPU.

Every hot kernel (attention forward, dq, dk/dv with and without summaries and GQA,
pooling, the backward preprocess, decode; MoE route, dispatch, the grouped SwiGLU GEMMs
forward and backward, combine) is launched by its real launcher on ``meta`` tensors of
the benchmark shapes, recorded (:mod:`benchmarks.offline.offline_compile`), and compiled offline
for sm_90a (and sm_80 / sm_100 without ``--quick``) for **every config its pruner keeps**,
fp16 and bf16. For each kernel x config it records registers, spills, shared memory,
wgmma (``HGMMA``, fp8 ``QGMMA``) vs mma.sync, TMA / cp.async / plain loads, the SASS
instructions and ``MUFU`` of the main loop (how many of them run while a wgmma is in
flight, and how many are masking code that only boundary tiles run), and whether some
warps duplicate others' tiles. Every speed figure is a
PREDICTION of one model, calibrated against published H100 measurements of
peer Triton kernels compiled by the same tool (``python -m benchmarks.calibrate``;
``benchmarks/results/calibration.md`` holds the points and the error band).

The model is :mod:`benchmarks.offline.speed_model` (:func:`~.speed_model.predict`), the
workloads it is applied to :mod:`benchmarks.offline.work_model` (loop iterations from the
kernels' own loop bounds, FLOPs, HBM bytes), the launches :mod:`benchmarks.offline.cases`,
the targets :mod:`benchmarks.offline.speed_targets`, the files :mod:`benchmarks.offline.writing`;
this module runs the compiles (in parallel with ``--workers``) and is the command.

The speed targets are data (:data:`~.speed_targets.TARGETS`), judged by :func:`judge` on the best
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
import json
import os
import sys
import time

from benchmarks.offline import RESULTS, rerun_without_interpreter

# The kernels must be real @triton.jit functions, not the interpreter's: rerun without it.
if __name__ == "__main__":
    rerun_without_interpreter("benchmarks.offline.compile_report")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["DASG_AUTOTUNE"] = "1"  # record every config the pruners keep

import triton  # noqa: E402

from benchmarks.offline.offline_compile import Launch, analyse, compile_launch, targets  # noqa: E402
# The pieces of the report; the names other tools and the tests use are re-exported here.
from benchmarks.offline.cases import Case, attn_kind, attn_label, attn_record, build_cases, moe_block_m  # noqa: E402
from benchmarks.offline.speed_model import (CLOCK_HZ, HBM_BYTES_S, MODEL, SMS, iteration_cycles, main_stats,  # noqa: E402
                                           occupancy, predict)
from benchmarks.offline.speed_targets import TARGETS, calibration, judge, targets_check  # noqa: E402
from benchmarks.offline.work_model import (ATTN_MAIN, AttnShape, MoEShape, Work, attn_work, fla_fwd_work,  # noqa: E402
                                          hbm_reads, launch_order, moe_work, rowtile_hbm, tiles)
from benchmarks.offline.writing import git_commit, write  # noqa: E402

__all__ = ["ATTN_MAIN", "CLOCK_HZ", "HBM_BYTES_S", "MODEL", "SMS", "SMOKE_KERNELS", "TARGETS", "AttnShape", "Work",
           "attn_kind", "attn_label", "attn_record", "attn_work", "calibration", "config_text", "fla_fwd_work",
           "git_commit", "hbm_reads", "iteration_cycles", "judge", "launch_order", "main", "main_stats", "occupancy",
           "predict", "rowtile_hbm", "run", "run_job", "targets_check", "tiles", "write"]

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


def config_text(launch: Launch, cfg) -> str:
    kw = cfg.all_kwargs() if cfg is not None else launch.kwargs
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "BLOCK_T", "BLOCK_D", "BLOCK_G", "CHUNK", "BT", "BS")
    parts = [f"{kw[k]}" for k in keys if k in kw]
    text = "x".join(parts) + f" w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"
    return text + (" unpipelined" if kw.get("PIPELINE") is False else "")


def run_job(job: tuple) -> dict:
    ci, li, k, target, label = job
    case = _CASES[ci]
    launch = case.record()[li]
    cfg = (launch.configs or [None])[k]
    t0 = time.time()
    try:
        rec = analyse(compile_launch(launch, cfg, target))
    except Exception as e:  # a config that does not compile is reported, not fatal
        return {"kernel": label, "family": case.family, "target": target, "config": config_text(launch, cfg),
                "error": repr(e)[:300], "dtype": case.dtype}
    rec.update(kernel=label, family=case.family, dtype=case.dtype, config=config_text(launch, cfg),
               config_rank=k, compile_s=round(time.time() - t0, 1))
    if case.head_dim is not None:
        rec["head_dim"] = case.head_dim
    rec["shape"] = case.shape.label
    kw = dict(launch.kwargs, **(cfg.all_kwargs() if cfg is not None else {}))
    el = 2
    work = None
    if target == "sm_90a":
        base, _, passno = label.replace("_nosum", "").replace("_varlen", "").partition("_pass")
        kind = attn_kind(base)
        if label == "fla_parallel_attn_fwd":
            work = fla_fwd_work(case.shape, case.head_dim, el, kw["BT"], kw["BS"])
        elif kind is not None:
            work = attn_work(kind, case.shape, case.head_dim, el, kw["BLOCK_M"], kw["BLOCK_N"], int(passno or 0))
        elif isinstance(case.shape, MoEShape):
            work = moe_work(launch, cfg, rec, case.shape, el, kw.get("BLOCK_M", moe_block_m(case.shape)))
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
