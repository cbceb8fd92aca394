"""``python -m benchmarks``: run every benchmark family, check, time, and report.

::

    python -m benchmarks                    # everything (GPU: the full matrices, ~8 min on an H100)
    python -m benchmarks --quick            # a small subset
    python -m benchmarks --only attention   # one family (attention | varlen | moe | model | generate); repeatable
    python -m benchmarks --only quality     # the training benchmark (benchmarks.quality), only when named
    python -m benchmarks --out DIR          # where the JSON / Markdown / PNG go (default benchmarks/results)

Each kernel's output is checked against ``dasg_kernels.reference`` before it is timed;
a wrong kernel is not timed, the run prints a loud FAILED line and exits with status 1
(after writing the files, whose correctness table shows what failed). One case that
errors (or runs out of memory) is recorded and the run goes on. Exit status: 0 all good,
1 correctness failure, 3 a family could not run.

On a machine without a GPU the families run tiny shapes under Triton's interpreter; the
timings are wall-clock and not meaningful (the report says so) but the correctness table
is real.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback

import torch

import benchmarks  # noqa: F401  (sets TRITON_INTERPRET on CPU-only machines first)
from benchmarks import common

FAMILIES = ("attention", "varlen", "moe", "model", "generate")
# trains models for up to an hour: runs only when named (--only quality), see benchmarks.quality
QUALITY = "quality"
# share of the time budget per family on a full GPU run (normalised over the families run);
# unused time carries over
BUDGET_SHARE = {"attention": 0.5, "varlen": 0.12, "moe": 0.2, "model": 0.18, "generate": 0.12}
DEFAULT_BUDGET_S = {"full": 450.0, "quick": 240.0}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class FamilyUnavailable(Exception):
    """A family cannot run at all here (e.g. the model API is missing)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small subset of every matrix")
    p.add_argument("--only", action="append", default=None, metavar="FAMILY",
                   help="attention | varlen | moe | model | generate (repeatable or comma-separated; default: all "
                        "of these) | quality (the training benchmark, only when named)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: benchmarks/results)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget of the whole run; cases past it are recorded as skipped "
                        "(default on CUDA: 450 full, 240 quick; unlimited on the CPU)")
    p.add_argument("--dense-max-call-s", type=float, default=0.25,
                   help="skip dense-mask SDPA where one fwd+bwd call is predicted to take longer")
    p.add_argument("--cpu-repeats", type=int, default=2, help="timed repeats per figure on the CPU")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads for a CPU run (0: leave as is)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--name", default=None, help="file stem (default: <device>-<date>)")
    args = p.parse_args(argv)
    fams: list[str] = []
    for item in args.only or []:
        for f in item.split(","):
            f = f.strip()
            if f not in FAMILIES + (QUALITY,):
                p.error(f"--only: unknown family {f!r}; choose from {', '.join(FAMILIES + (QUALITY,))}")
            if f not in fams:
                fams.append(f)
    args.families = fams or list(FAMILIES)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _budgets(args, device: torch.device) -> dict[str, float | None]:
    total = args.time_budget
    if total is None and device.type == "cuda":
        total = DEFAULT_BUDGET_S["quick" if args.quick else "full"]
    if total is None:
        return {f: None for f in FAMILIES}
    share = {f: BUDGET_SHARE[f] for f in args.families}
    s = sum(share.values())
    return {f: total * share[f] / s for f in args.families}


def _steps(name: str, mod, settings: common.Settings) -> int:
    try:
        return len(mod.cases(settings.quick, settings.device)) * len(getattr(mod, "METHODS", (1,)))
    except Exception:
        return 0


def header_lines(env: dict) -> list[str]:
    lines = [
        f"dasg-kernels benchmarks on {env['device']}",
        f"  torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | python {env['python']} | "
        f"{env['date']} | commit {str(env['git_commit'])[:10]}{' (dirty)' if env['git_dirty'] else ''}",
    ]
    if not env["timings_meaningful"]:
        lines.append("  CPU run: Triton's interpreter, wall-clock timings -- NOT MEANINGFUL as speed; "
                     "only the correctness results count.")
    return lines


def _quality_argv(args: argparse.Namespace) -> list[str]:
    """The ``python -m benchmarks.quality`` options matching this command line."""
    out = ["--out", args.out] + (["--name", args.name] if args.name else [])
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    out += ["--quick"] if args.quick else (["--gpu"] if cuda else [])
    out += ["--device", "cuda" if cuda else "cpu"]
    out += ["--time-budget", str(args.time_budget)] if args.time_budget is not None else []
    return out + ["--no-plots"] * args.no_plots + ["--no-progress"] * args.no_progress


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if QUALITY in args.families:
        from benchmarks.quality.cli import main as quality_main

        args.families.remove(QUALITY)
        rc = quality_main(_quality_argv(args))
        if rc or not args.families:
            return rc
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in
                              ("", "0") else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.cpu_threads:
        # tiny shapes gain nothing from threads, and on a busy 2-core machine OpenMP's spinning
        # threads make every small op 100x slower
        torch.set_num_threads(args.cpu_threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


class HardTimeLimit(BaseException):
    """Raised by SIGALRM when the run overshoots its budget by ``HARD_GRACE_S`` (a compile or
    a measurement that will not end): the remaining work is skipped and the files are written."""


HARD_GRACE_S = 90.0


def _on_alarm(signum, frame):  # pragma: no cover - only on a run that overshoots
    raise HardTimeLimit(f"hard time limit: the budget plus {HARD_GRACE_S:.0f} s is spent")


def _run(args: argparse.Namespace, device: torch.device) -> int:
    settings = common.Settings(device=device, quick=args.quick, cpu_repeats=args.cpu_repeats,
                               budget_s=_budgets(args, device), progress=not args.no_progress)
    settings.dense_max_call_s = args.dense_max_call_s  # type: ignore[attr-defined]
    env = common.environment(device, quick=args.quick, argv=args.argv)
    for line in header_lines(env):
        print(line, file=sys.stderr, flush=True)
    torch.manual_seed(0)
    ctx = common.Context(settings, env)
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or f"{env['device_slug']}-{env['date'][:10]}" + ("-quick" if args.quick else "")
    json_path = os.path.join(args.out, stem + ".json")
    t0 = time.perf_counter()
    budget = [b for b in settings.budget_s.values() if b is not None]
    alarm = None
    if budget and hasattr(signal, "SIGALRM"):
        try:
            alarm = signal.signal(signal.SIGALRM, _on_alarm)
            signal.alarm(int(sum(budget) + HARD_GRACE_S))
        except ValueError:  # not the main thread: no hard limit
            alarm = None
    stopped = None
    try:
        for fam in args.families:
            mod = importlib.import_module(f"benchmarks.bench_{fam}")
            if stopped is not None:
                ctx.begin_family(fam, 0)
                ctx.end_family("skipped", stopped)
                continue
            ctx.begin_family(fam, _steps(fam, mod, settings))
            try:
                mod.run(ctx)
                ctx.end_family("ok")
            except FamilyUnavailable as exc:
                ctx.log(f"{fam}: UNAVAILABLE: {exc}")
                ctx.end_family("unavailable", str(exc))
            except HardTimeLimit as exc:
                stopped = str(exc)
                ctx.log(f"{fam}: STOPPED: {exc}")
                ctx.end_family("stopped", stopped)
            except Exception as exc:  # a family that crashes does not take the others with it
                ctx.log(f"{fam}: ERROR: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                ctx.end_family("error", f"{type(exc).__name__}: {str(exc)[:500]}")
            common.cleanup(device)
            # partial results survive a run that is killed later
            _dump(_results(args, settings, env, ctx, t0, complete=False), json_path)
    finally:
        if alarm is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, alarm)
    results = _results(args, settings, env, ctx, t0, complete=True)
    from benchmarks import report

    results["targets"] = report.evaluate_targets(results)
    _dump(results, json_path)
    paths = report.write_report(results, args.out, stem, plots=not args.no_plots)
    return summarize(results, [json_path, *paths])


def _results(args, settings, env, ctx, t0, *, complete: bool) -> dict:
    return {
        "schema": common.SCHEMA,
        "complete": complete,
        "env": env,
        "settings": {"quick": args.quick, "families": args.families, "time_budget_s": settings.budget_s,
                     "warmup_ms": settings.warmup_ms, "rep_ms": settings.rep_ms,
                     "slow_call_ms": settings.slow_call_ms, "max_measure_s": settings.max_measure_s,
                     "dense_max_call_s": args.dense_max_call_s},
        "families": ctx.families,
        "correctness": ctx.checks,
        "records": ctx.records,
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }


def _dump(results: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, path)


def summarize(results: dict, paths: list[str]) -> int:
    """Print the verdict to stdout and return the exit status."""
    from benchmarks import report

    failed = [c for c in results["correctness"] if not c.get("passed")]
    kernel_failed = [c for c in failed if not c.get("baseline")]
    fams = results["families"]
    broken = {f: i for f, i in fams.items() if i.get("status") in ("error", "stopped", "skipped")}
    unavailable = {f: i for f, i in fams.items() if i.get("status") == "unavailable"}
    out = sys.stdout
    for line in header_lines(results["env"]):
        print(line, file=out)
    n_ok = sum(1 for c in results["correctness"] if c.get("passed"))
    print(f"correctness: {n_ok} checks passed, {len(failed)} failed", file=out)
    for c in failed:
        print(f"  FAILED {c['family']} {c['case_id']} {c['op']} {c['check']}: max_err={c.get('max_err')} "
              f"tol={c.get('tol')} {c.get('note') or ''}", file=out)
    for f, i in fams.items():
        extra = f" ({i['reason']})" if i.get("reason") else ""
        if i.get("kernel_available") is False:
            extra += f" [kernel not available: {i.get('kernel_reason')}]"
        print(f"family {f}: {i.get('status')} in {i.get('elapsed_s')} s{extra}", file=out)
    if kernel_failed:
        print("\n" + "!" * 78 + f"\nFAILED: {len(kernel_failed)} correctness check(s) of our kernels failed. "
              "A wrong kernel is not timed and no speed-up is reported for it.\n" + "!" * 78, file=out)
    else:
        for line in report.target_lines(results):
            print(line, file=out)
    for p in paths:
        print(f"wrote {p}", file=out)
    if kernel_failed:
        return 1
    requested = set(results["settings"]["families"]) != set(FAMILIES)
    if broken or (unavailable and requested):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
