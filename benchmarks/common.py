"""Shared machinery of the benchmark families: timing, FLOPs, checks, environment, progress.

Timing
------
On CUDA every figure is a set of CUDA-event timings after warm-up with the L2 cache
flushed before each repeat: :func:`triton.testing.do_bench` (``return_mode="all"``, so
the JSON keeps every raw figure) for calls up to ``Settings.slow_call_ms``, and for
slower calls (dense ``T^2`` baselines, whole-model steps) the same loop with fewer
repeats so that one measurement stays within ``Settings.max_measure_s``. The median is
reported. On the CPU the timings are wall-clock and flagged ``meaningful: false``:
Triton's interpreter is orders of magnitude slower than a GPU and says nothing about speed.

Correctness
-----------
:func:`compare` follows flash-attn's tests: the kernel's error against the fp32
reference must be at most ``factor`` times the error of the same reference computed in
the kernel's dtype, plus a small dtype-dependent floor relative to the output scale.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

SCHEMA = "dasg-bench/1"
MODES_ATTN = ("fwd", "bwd", "fwd+bwd")

# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """How hard to measure. ``quick`` and the device pick the case matrices."""

    device: torch.device
    quick: bool = False
    warmup_ms: float = 10.0
    rep_ms: float = 40.0
    slow_call_ms: float = 25.0     # above this, time with a short CUDA-event loop, not do_bench
    max_measure_s: float = 1.5     # time spent on the repeats of one slow measurement
    max_repeats_slow: int = 8
    cpu_repeats: int = 2
    # seconds per family; None = unlimited. Unused time carries over to the next family.
    budget_s: dict[str, float | None] = field(default_factory=dict)
    progress: bool = True

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


# ----------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    except Exception:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def device_slug(device: torch.device) -> str:
    """``nvidia-h100-80gb-hbm3`` / ``cpu``: the device part of a results file name."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device, *, quick: bool, argv: list[str] | None = None) -> dict[str, Any]:
    """The header of every results file: device, versions, date, git commit."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_kind": device.type,
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "timings_meaningful": device.type == "cuda",
        "quick": quick,
        "argv": list(argv or []),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def is_target_device(env: dict[str, Any]) -> bool:
    """The issues' speed targets are stated for H100 / H200."""
    name = str(env.get("device", "")).upper()
    return env.get("device_kind") == "cuda" and ("H100" in name or "H200" in name)


# ----------------------------------------------------------------------------- progress


class Progress:
    """A progress bar on stderr: tqdm when installed and stderr is a terminal, plain lines otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.n, self.enabled = total, desc, 0, enabled
        self._bar = None
        self._t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True,
                                 dynamic_ncols=True, mininterval=0.5)
            except Exception:
                self._bar = None

    def step(self, label: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label[:60], refresh=False)
            self._bar.update(1)
        else:
            el = time.perf_counter() - self._t0
            print(f"[{self.desc} {self.n}/{self.total} {el:6.1f}s] {label}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(grad_to_none: Iterable[torch.Tensor] | None) -> None:
    for t in grad_to_none or ():
        t.grad = None


_L2_FLUSH: dict[str, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _L2_FLUSH:  # 256 MiB, as triton.testing does: larger than any L2
        _L2_FLUSH[key] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return _L2_FLUSH[key]


def _event_loop(fn: Callable[[], Any], n: int, device: torch.device, grad_to_none) -> list[float]:
    cache = _l2_flush_buffer(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        _clear_grads(grad_to_none)
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _do_bench(fn, warmup: float, rep: float, grad_to_none) -> list[float]:
    import triton.testing

    try:
        out = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="all")
    except (AssertionError, TypeError):  # an older Triton without return_mode="all"
        out = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                      quantiles=[0.2, 0.5, 0.8])
    return [float(x) for x in (out if isinstance(out, (list, tuple)) else [out])]


def measure(fn: Callable[[], Any], settings: Settings, *, grad_to_none=None) -> dict[str, Any]:
    """Time ``fn``; returns ``ms`` (median), ``ms_all`` (every raw figure), ``timing``, ...

    The first call (compilation, autotuning) is timed separately as ``first_call_s``
    and never enters the figures.
    """
    dev = settings.device
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    first = time.perf_counter() - t0
    if not settings.on_cuda:
        times = []
        for _ in range(max(1, settings.cpu_repeats)):
            _clear_grads(grad_to_none)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        timing = "wall-clock (CPU; not meaningful)"
    else:
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        est_ms = (time.perf_counter() - t0) * 1e3
        if est_ms <= settings.slow_call_ms:
            times = _do_bench(fn, settings.warmup_ms, settings.rep_ms, grad_to_none)
            timing = "triton.testing.do_bench"
        else:
            n = int(settings.max_measure_s * 1e3 / max(est_ms, 1e-3))
            n = max(2, min(settings.max_repeats_slow, n))
            times = _event_loop(fn, n, dev, grad_to_none)
            timing = f"cuda-events x{n} (slow call, L2 flushed)"
    _clear_grads(grad_to_none)
    return {
        "ms": statistics.median(times),
        "ms_all": [round(t, 6) for t in times],
        "timing": timing,
        "first_call_s": round(first, 4),
        "meaningful": settings.on_cuda,
    }


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak extra device memory of one call of ``fn`` (MiB), beyond what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return round(peak / 2**20, 2)


def free_memory_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def cleanup(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- FLOPs


def attention_pairs(
    t: int, left: int, *, causal: bool = True, group_size: int | None = None, summaries: bool = False
) -> int:
    """Visible (query, key) pairs of one head: the useful work of causal sliding-window
    attention with ``window=(left, 0)`` (``left=-1``: full causal), plus the summary keys.

    Query ``i`` sees ``min(i, left) + 1`` local keys and, with summaries of group size
    ``G``, the ``floor((i - left) / G)`` groups lying wholly before its window.
    """
    if not causal:
        raise ValueError("attention_pairs: only causal windows are benchmarked")
    i = torch.arange(t, dtype=torch.int64)
    local = i + 1 if left < 0 else torch.clamp(i, max=left) + 1
    total = int(local.sum())
    if summaries and left >= 0 and group_size:
        ng = -(-t // group_size)
        total += int(torch.clamp(torch.div(i - left, group_size, rounding_mode="floor"), 0, ng).sum())
    return total


def attention_flops(pairs: int, batch: int, heads: int, head_dim: int, mode: str) -> float:
    """Useful attention FLOPs: 2 matmuls of 2 FLOPs per visible pair and dim (fwd);
    the backward does 2.5x the forward's (5 matmuls instead of 2), as flash-attn counts."""
    fwd = 4.0 * pairs * head_dim * batch * heads
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def moe_flops(pairs: int, d: int, f: int, mode: str) -> float:
    """Routed SwiGLU FLOPs for ``pairs`` (token, expert) pairs: ``x W_gu^T`` (2*D*2F) and
    ``a W_d^T`` (2*F*D) = 6*D*F per pair; the backward (dx and dW) doubles it."""
    fwd = 6.0 * pairs * d * f
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


def tflops(flops: float | None, ms: float | None) -> float | None:
    if not flops or not ms:
        return None
    return flops / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- correctness

# Floor of the tolerance, relative to max(1, max|ref|): the rounding of the output dtype.
ATOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def compare(
    name: str,
    ours: torch.Tensor,
    ref: torch.Tensor,
    ref_lowp: torch.Tensor | None,
    *,
    dtype: torch.dtype,
    factor: float = 2.0,
) -> dict[str, Any]:
    """Check ``ours`` against the fp32 ``ref``: ``err <= factor * err(ref_lowp) + floor``."""
    ours_f, ref_f = ours.detach().float(), ref.detach().float()
    if ours_f.shape != ref_f.shape:
        return {"check": name, "passed": False, "max_err": None, "tol": None,
                "note": f"shape {tuple(ours_f.shape)} != reference {tuple(ref_f.shape)}"}
    finite_ref = torch.isfinite(ref_f)
    bad_nan = bool((~torch.isfinite(ours_f) & finite_ref).any())
    same_inf = bool(torch.equal(ours_f[~finite_ref], ref_f[~finite_ref])) if (~finite_ref).any() else True
    diff = (ours_f - ref_f)[finite_ref].abs()
    err = float(diff.max()) if diff.numel() else 0.0
    base = 0.0
    if ref_lowp is not None:
        d2 = (ref_lowp.detach().float() - ref_f)[finite_ref].abs()
        base = float(d2.max()) if d2.numel() else 0.0
    scale = max(1.0, float(ref_f[finite_ref].abs().max()) if finite_ref.any() else 1.0)
    tol = factor * base + ATOL.get(dtype, 1e-4) * scale
    passed = (not bad_nan) and same_inf and err <= tol and math.isfinite(err)
    note = ""
    if bad_nan:
        note = "non-finite values where the reference is finite"
    elif not same_inf:
        note = "infinite entries (empty rows) differ from the reference"
    return {"check": name, "passed": passed, "max_err": err, "tol": tol, "ref_lowp_err": base, "note": note}


# ----------------------------------------------------------------------------- run context


class Context:
    """What a family's ``run`` gets: settings, the result lists, progress, the deadline."""

    def __init__(self, settings: Settings, env: dict[str, Any]):
        self.settings = settings
        self.env = env
        self.device = settings.device
        self.records: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.families: dict[str, dict[str, Any]] = {}
        self.family: str | None = None
        self._deadline: float | None = None
        self._carry = 0.0
        self._t_family = 0.0
        self.progress: Progress | None = None

    @classmethod
    def standalone(cls, family: str, device: torch.device, **settings_kw: Any) -> "Context":
        """A context outside the runner (pytest-benchmark, tests): no budget, no progress bar."""
        ctx = cls(Settings(device=device, progress=False, **settings_kw), environment(device, quick=True))
        ctx.family = family
        ctx.families[family] = {"status": "running", "budget_s": None}
        return ctx

    # -- families and budget
    def begin_family(self, name: str, total_steps: int) -> None:
        self.family = name
        budget = self.settings.budget_s.get(name)
        self._t_family = time.perf_counter()
        self._deadline = None if budget is None else self._t_family + budget + self._carry
        self.families[name] = {"status": "running", "budget_s": None if budget is None else round(budget + self._carry, 1)}
        self.progress = Progress(total_steps, name, self.settings.progress)

    def end_family(self, status: str = "ok", reason: str = "") -> None:
        el = time.perf_counter() - self._t_family
        info = self.families[self.family]
        info.update(status=status, elapsed_s=round(el, 2))
        if reason:
            info["reason"] = reason
        if self._deadline is not None:
            self._carry = max(0.0, self._deadline - time.perf_counter())
        if self.progress:
            self.progress.close()
        self.progress = None

    def time_left(self) -> float:
        return math.inf if self._deadline is None else self._deadline - time.perf_counter()

    def out_of_time(self) -> bool:
        return self.time_left() <= 0

    def budget_reason(self) -> str:
        return f"time budget of the {self.family} family ({self.families[self.family]['budget_s']} s) exhausted"

    # -- output
    def log(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def step(self, label: str) -> None:
        if self.progress is not None:
            self.progress.step(label)

    def add_check(self, case_id: str, op: str, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
        row = {"family": self.family, "case_id": case_id, "op": op, **result, **extra}
        self.checks.append(row)
        if not result.get("passed", False):
            self.log(f"!! CORRECTNESS FAILURE {self.family} {case_id} {op} {result.get('check')}: "
                     f"max_err={result.get('max_err')} tol={result.get('tol')} {result.get('note', '')}")
        return row

    def add_record(self, **rec: Any) -> dict[str, Any]:
        rec.setdefault("family", self.family)
        rec.setdefault("status", "ok")
        self.records.append(rec)
        return rec

    def timed(
        self,
        base: dict[str, Any],
        fn: Callable[[], Any],
        *,
        flops: float | None = None,
        grad_to_none=None,
        memory: bool = False,
    ) -> dict[str, Any]:
        """Measure ``fn`` and append a record built on ``base``; failures become records too."""
        rec = dict(base)
        if self.out_of_time():
            return self.add_record(**rec, status="skipped", reason=self.budget_reason())
        try:
            m = measure(fn, self.settings, grad_to_none=grad_to_none)
            rec.update(m)
            if flops:
                rec["flops"] = flops
                rec["tflops"] = tflops(flops, m["ms"])
            if memory:
                _clear_grads(grad_to_none)
                rec["peak_mib"] = peak_memory_mib(fn, self.device)
                _clear_grads(grad_to_none)
            rec["status"] = "ok"
        except NotImplementedError as exc:
            rec.update(status="unavailable", reason=f"not implemented: {exc}")
        except Exception as exc:  # one failing case records the error and the run goes on
            if is_oom(exc):
                rec.update(status="skipped", reason="out of memory")
            else:
                rec.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            cleanup(self.device)
        return self.add_record(**rec)


def case_id(**params: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
