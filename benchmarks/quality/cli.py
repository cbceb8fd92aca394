"""The command line of the quality benchmark (``python -m benchmarks.quality``).

::

    python -m benchmarks.quality                 # the default CPU grid (resumable)
    python -m benchmarks.quality --quick         # MQAR + passkey, three attention variants, one seed
    python -m benchmarks.quality --gpu           # 4k-16k tokens on a GPU (the Triton kernels)
    python -m benchmarks.quality --task mqar --attention dasg --experts adr --seq-len 512 \\
        --window 32 --group-size 16 --num-pairs 8 --steps 400 --seed 0 --json   # one run

A grid appends one JSON line per finished run to ``<out>/<stem>.jsonl`` and skips the runs
already there, so an interrupted grid resumes where it stopped (``--fresh`` starts over);
at the end (and with ``--report-only``) it writes ``<stem>.json``, ``<stem>.md`` and the
plots. ``<stem>`` is ``quality-<device>`` (``quality-cpu``, ``quality-nvidia-h100-80gb-hbm3``),
``-quick`` added for ``--quick``.

On the CPU every run of a grid trains in its own forked process (so its peak memory is its
own), ``--jobs`` of them at a time with ``--threads`` torch threads each.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import replace
from typing import Any

import torch

from benchmarks.quality import grids
from benchmarks.quality.report import SCHEMA, write_report
from benchmarks.quality.tasks import TASKS
from benchmarks.quality.train import RESULT_KEYS, RunSpec, run, stderr_log
from benchmarks.quality.variants import ATTENTIONS, EXPERTS

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    one = p.add_argument_group("one run (given --task)")
    one.add_argument("--task", choices=sorted(TASKS), help="run one training run of this task")
    one.add_argument("--attention", choices=ATTENTIONS, default="dasg")
    one.add_argument("--experts", choices=EXPERTS, default="dense")
    for flag, help_ in (("--seq-len", "sequence length"), ("--window", "attention window W"),
                        ("--group-size", "summary group size G"), ("--steps", "optimizer steps"),
                        ("--batch-size", "sequences per step"), ("--hidden-size", "model width"),
                        ("--layers", "decoder blocks"), ("--heads", "attention heads"),
                        ("--ffn-size", "dense FFN hidden size (the matched active expert size)"),
                        ("--eval-size", "held-out sequences")):
        one.add_argument(flag, type=int, default=None, help=f"{help_} (default: the task's)")
    one.add_argument("--num-pairs", type=int, default=None, help="MQAR key-value pairs (default: the task's)")
    one.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="another task option (e.g. max_depth=3 for listops, num_tokens=8 for copy); repeatable")
    one.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the task's)")
    one.add_argument("--rope-theta", type=float, default=None, help="RoPE base (default: the task's)")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    grid = p.add_argument_group("grids (without --task)")
    size = grid.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick grid (under 10 minutes on 2 CPU cores)")
    size.add_argument("--gpu", action="store_true", help="the GPU grid (4k-16k tokens)")
    grid.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: benchmarks/results)")
    grid.add_argument("--name", default=None, help="file stem (default: quality-<device>[-quick])")
    grid.add_argument("--jobs", type=int, default=None,
                      help="runs at a time, each in a forked process (default: 2 on the CPU, 1 on a GPU); "
                           "0 runs in this process")
    grid.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the grid's)")
    grid.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                      help="start no run after this many seconds (the rest stays for a later resume)")
    grid.add_argument("--fresh", action="store_true", help="discard the runs of an earlier, interrupted grid")
    grid.add_argument("--report-only", action="store_true", help="rewrite the report from the JSONL, train nothing")
    grid.add_argument("--list", action="store_true", help="print the grid's runs and exit")
    grid.add_argument("--no-plots", action="store_true")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda for --gpu, else cpu)")
    p.add_argument("--backend", default=None, choices=("auto", "triton", "torch"),
                   help="kernel backend (default: torch on the CPU, auto on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 2 / jobs on the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.task is None:
        single = [f for f in ("num_pairs", "seq_len", "window", "group_size", "steps", "json") if
                  getattr(args, f) not in (None, False)]
        if single:
            p.error(f"--{single[0].replace('_', '-')} applies to a single run: give --task too")
    elif args.num_pairs is not None and args.task != "mqar":
        p.error("--num-pairs applies to --task mqar only")
    return args


def _option_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def single_spec(args: argparse.Namespace) -> RunSpec:
    """The :class:`RunSpec` of a single-run command line (the task's defaults filled in)."""
    base = grids.task_defaults(args.task)
    opts = dict(base.task_options)
    if args.num_pairs is not None:
        opts["num_pairs"] = args.num_pairs
    for item in args.option:
        if "=" not in item:
            raise SystemExit(f"--option must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        opts[k.strip().replace("-", "_")] = _option_value(v.strip())
    device = args.device or "cpu"
    changes = {"attention": args.attention, "experts": args.experts, "seed": args.seed, "task_options": opts,
               "device": device, "backend": args.backend or ("torch" if device == "cpu" else "auto")}
    for field, arg in (("seq_len", "seq_len"), ("window", "window"), ("group_size", "group_size"),
                       ("steps", "steps"), ("batch_size", "batch_size"), ("hidden_size", "hidden_size"),
                       ("num_layers", "layers"), ("num_heads", "heads"), ("ffn_size", "ffn_size"),
                       ("eval_size", "eval_size"), ("lr", "lr"), ("rope_theta", "rope_theta")):
        if getattr(args, arg) is not None:
            changes[field] = getattr(args, arg)
    return replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.task is not None:
        return _single(args)
    return _grid(args)


def _single(args: argparse.Namespace) -> int:
    spec = single_spec(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec.make_task()
        spec.model_spec(1).validate()
    except ValueError as exc:
        print(f"python -m benchmarks.quality: {exc}", file=sys.stderr)
        return 2
    log = None if args.no_progress else stderr_log
    if log:
        log(f"quality run {spec.key()} on {spec.device}, {torch.get_num_threads()} thread(s)")
    result = run(spec, log=log)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for k in RESULT_KEYS:
            print(f"{k}: {result[k]}")
        for b in result["by_distance"]:
            print(f"  distance {b['lo']}-{b['hi']}: accuracy {b['accuracy']:.3f} (n={b['n']})")
    return 0


# ----------------------------------------------------------------------------- grids


def _device_slug(device: torch.device) -> str:
    from benchmarks.common import device_slug

    return device_slug(device)


def _read_jsonl(path: str) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a kill: that run reruns
                        pass
    return out


def _append_jsonl(path: str, result: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(result, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _worker(spec: RunSpec, threads: int) -> dict:
    """Run one grid run (in a forked child); an exception becomes an ``error`` entry."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        result = run(spec)
    except Exception as exc:  # a run that fails does not take the grid with it
        return {"key": spec.key(), "task": spec.task, "attention": spec.attention, "experts": spec.experts,
                "seed": spec.seed, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def _environment(device: torch.device, args: argparse.Namespace, jobs: int, threads: int) -> dict:
    from benchmarks import common

    env = common.environment(device, quick=args.quick, argv=args.argv)
    env["threads"], env["jobs"] = threads, jobs
    return env


def _grid(args: argparse.Namespace) -> int:
    kind = "quick" if args.quick else "gpu" if args.gpu else "cpu"
    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    backend = args.backend or ("torch" if device.type == "cpu" else "auto")
    specs = grids.grid(kind, device=str(device), backend=backend, seeds=args.seeds)
    if args.list:
        for s in specs:
            print(s.key())
        print(f"{len(specs)} runs", file=sys.stderr)
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks.quality: --gpu / --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    stem = args.name or f"quality-{_device_slug(device)}" + ("-quick" if args.quick else "")
    jobs = args.jobs if args.jobs is not None else (2 if device.type == "cpu" else 1)
    if device.type == "cuda":
        jobs = 0  # one process: CUDA does not survive a fork
    threads = args.threads or (max(1, 2 // max(jobs, 1)) if device.type == "cpu" else torch.get_num_threads())
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, stem + ".jsonl")
    if args.fresh and os.path.exists(jsonl):
        os.remove(jsonl)
    done = {r["key"]: r for r in _read_jsonl(jsonl) if "error" not in r}
    todo = [s for s in specs if s.key() not in done]
    progress = not args.no_progress
    t0 = time.perf_counter()
    env = _environment(device, args, jobs, threads)
    if progress:
        stderr_log(f"quality grid '{kind}' on {env['device']}: {len(specs)} runs, {len(done)} already in {jsonl}, "
                   f"{len(todo)} to train ({jobs or 1} at a time, {threads} thread(s) each)")
    errors: list[dict] = []
    stopped = False
    if not args.report_only and todo:
        stopped, errors = _train_all(todo, jsonl, jobs, threads, args.time_budget, progress, t0)
    runs_by_key = {r["key"]: r for r in _read_jsonl(jsonl) if "error" not in r}
    runs = [runs_by_key[s.key()] for s in specs if s.key() in runs_by_key]
    complete = len(runs) == len(specs)
    results = {"schema": SCHEMA, "grid": kind, "complete": complete, "planned": len(specs), "env": env,
               "command": "python -m benchmarks.quality " + " ".join(a for a in args.argv if a != "--report-only"),
               "elapsed_s": sum(r.get("wall_s", r.get("train_s", 0)) for r in runs) / max(jobs, 1),
               "runs": runs + errors}
    paths = write_report(results, args.out, stem, with_plots=not args.no_plots)
    for p in paths:
        print(f"wrote {p}")
    if errors:
        print(f"{len(errors)} run(s) failed: " + "; ".join(f"{e['key']}: {e['error']}" for e in errors))
        return 1
    if not complete:
        print(f"grid incomplete ({len(runs)}/{len(specs)} runs{'; stopped by --time-budget' if stopped else ''}): "
              f"run the same command again to resume")
        return 3 if not stopped else 0
    return 0


def _train_all(todo: list[RunSpec], jsonl: str, jobs: int, threads: int, budget: float | None, progress: bool,
               t0: float) -> tuple[bool, list[dict]]:
    total_cost = sum(s.cost() for s in todo)
    done_cost = 0.0
    errors: list[dict] = []
    n = len(todo)

    def report(i: int, spec: RunSpec, r: dict) -> None:
        nonlocal done_cost
        done_cost += spec.cost()
        if "error" in r:
            errors.append(r)
            if progress:
                stderr_log(f"[quality {i}/{n}] FAILED {spec.key()}: {r['error']}")
            return
        _append_jsonl(jsonl, r)
        if progress:
            el = time.perf_counter() - t0
            eta = el / done_cost * (total_cost - done_cost)
            beyond = r.get("accuracy_beyond_window")
            extra = f"bpb {r['bits_per_byte']:.3f}" if "bits_per_byte" in r else (
                f"acc {r['accuracy']:.3f} (in {r['accuracy_in_window'] or 0:.3f} / beyond "
                f"{'-' if beyond is None else f'{beyond:.3f}'})")
            stderr_log(f"[quality {i}/{n} {el / 60:5.1f} min, ETA {eta / 60:5.1f} min] {spec.task} "
                       f"T={spec.seq_len} {r['attention']}/{r['experts']} G={spec.group_size} seed {spec.seed}: "
                       f"{extra}, {r['step_ms']:.0f} ms/step, {r.get('wall_s', 0):.0f}s")

    def over_budget() -> bool:
        return budget is not None and time.perf_counter() - t0 > budget

    if jobs == 0:
        for i, spec in enumerate(todo, 1):
            if over_budget():
                return True, errors
            report(i, spec, _worker(spec, threads))
        return False, errors
    ctx = mp.get_context("fork")
    stopped = False
    with ctx.Pool(processes=jobs, maxtasksperchild=1) as pool:
        pending: list[tuple[RunSpec, Any]] = []
        queue = list(todo)
        i = 0
        while queue or pending:
            while queue and len(pending) < jobs and not stopped:
                if over_budget():
                    stopped = True
                    break
                spec = queue.pop(0)
                pending.append((spec, pool.apply_async(_worker, (spec, threads))))
            if stopped and not pending:
                break
            time.sleep(0.2)
            for item in list(pending):
                spec, res = item
                if res.ready():
                    pending.remove(item)
                    i += 1
                    report(i, spec, res.get())
            if stopped:
                queue.clear()
    return stopped, errors
