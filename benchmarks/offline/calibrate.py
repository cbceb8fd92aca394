"""``python -m benchmarks.calibrate [--out DIR]``: calibrate the compile report's speed model.

Peer Triton kernels whose H100 speed has been published are compiled with the same offline
tool and Triton as the report (:mod:`benchmarks.offline.offline_compile`, sm_90a, no GPU), read by
the same analysis (:func:`offline_compile.analyse`) and predicted by the same model
(:func:`compile_report.predict`). The constants of :data:`compile_report.MODEL` are fitted
on the points marked ``fit``; the others are held out. Writes
``benchmarks/results/calibration.json`` and ``.md``: per point the kernel and where its
exact source came from, shape, dtype, config, the published TFLOP/s and its citation, the
predicted TFLOP/s and their ratio.

Sources are the measured kernels, never rewrites: an installed package pinned in the
``bench`` extra (Liger-Kernel), or a file of a public repository at a fixed commit, read
with ``git show COMMIT:PATH`` from a local clone and cached under ``.peers/`` (ignored by
git; nothing of another project is committed). ``--git-dir owner/name=PATH`` (or the
``DASG_PEER_GIT`` variable, ``;``-separated) names the clones; without one, a missing file
is reported with the command that fetches it and its point is skipped (the stored JSON
keeps the last full run).

Each autotuned peer is predicted at its best kept config (what its autotuner picks when
the model ranks configs right); configs that cannot launch on an H100 (over 227 KB of
shared memory) are dropped. All figures are PREDICTIONS; the published ones are H100
measurements by others, cited per point.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Callable
from unittest import mock

from benchmarks.offline import RESULTS, ROOT, rerun_without_interpreter

# The kernels must be real @triton.jit functions, not the interpreter's: rerun without it.
if __name__ == "__main__":
    rerun_without_interpreter("benchmarks.offline.calibrate")

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.offline import compile_report as cr  # noqa: E402
from benchmarks.offline.offline_compile import analyse, capture_launches, compile_launch, meta, tools_available  # noqa: E402

PEERS = os.path.join(ROOT, ".peers")
SMEM_LIMIT = 227 * 1024  # an H100 CTA's shared memory
REPORT_TRITON = "3.9"  # the Triton of benchmarks/results/compile-sm90a.md and calibration.md


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class GitSource:
    """One file of a public repository at a fixed commit."""

    repo: str
    commit: str
    path: str
    cut_at: str | None = None  # keep the module only up to this line (tutorials run tests at import)

    @property
    def cached(self) -> str:
        return os.path.join(PEERS, f"{self.repo.replace('/', '+')}@{self.commit[:12]}", os.path.basename(self.path))

    @property
    def command(self) -> str:
        return (f"git clone https://github.com/{self.repo} peer && mkdir -p {os.path.dirname(self.cached)} && "
                f"git -C peer show {self.commit}:{self.path} > {self.cached}")

    @property
    def where(self) -> str:
        return f"{self.repo} {self.path} @ {self.commit}"


def _git_dirs() -> dict[str, str]:
    out = {}
    for item in filter(None, os.environ.get("DASG_PEER_GIT", "").split(";")):
        name, _, path = item.partition("=")
        out[name] = path
    return out


def obtain(src: GitSource, git_dirs: dict[str, str]) -> str | None:
    """The cached path of ``src`` (read from a local clone when not cached yet), or None."""
    if os.path.exists(src.cached):
        return src.cached
    gd = git_dirs.get(src.repo)
    if gd is None:
        guess = os.path.join("/work/.mirror", src.repo.replace("/", "+"), "repo")
        gd = guess if os.path.isdir(guess) else None
    if gd is None:
        return None
    proc = subprocess.run(["git", f"--git-dir={gd}", "show", f"{src.commit}:{src.path}"], capture_output=True)
    if proc.returncode != 0:
        return None
    os.makedirs(os.path.dirname(src.cached), exist_ok=True)
    with open(src.cached, "wb") as f:
        f.write(proc.stdout)
    return src.cached


@contextlib.contextmanager
def fake_hopper():
    """What a tutorial asks of the driver at import and launch, answered as an H100 would
    (the kernels still only compile; nothing runs)."""
    from triton.backends.compiler import GPUTarget

    class _Driver:
        def get_active_torch_device(self):
            return torch.device("meta")

        def get_current_target(self):
            return GPUTarget("cuda", 90, 64)

        def get_current_device(self):
            return 0

    props = types.SimpleNamespace(multi_processor_count=cr.SMS)
    with mock.patch.object(triton.runtime.driver, "_active", _Driver(), create=True), \
            mock.patch("torch.cuda.get_device_capability", lambda *a, **k: (9, 0)), \
            mock.patch("torch.cuda.get_device_properties", lambda *a, **k: props), \
            mock.patch("torch.cuda.is_available", lambda: False):
        yield


def load_module(src: GitSource, path: str, name: str) -> types.ModuleType:
    with open(path) as f:
        text = f.read()
    if src.cut_at and src.cut_at in text:
        text = text[:text.index(src.cut_at)]
    mod = types.ModuleType(name)
    mod.__file__ = path
    with fake_hopper():
        exec(compile(text, path, "exec"), mod.__dict__)
    sys.modules[name] = mod  # @triton.jit looks its globals up through the module
    return mod


# --------------------------------------------------------------------------- points

FA = GitSource("facebookexperimental/triton", "75d27b0b425329bad8c13b9cd47177d93590ec31",
               "python/tutorials/06-fused-attention.py")
#: the 2024 tutorial as tritonbench's ancestor ran it (block pointers: Triton <= 3.8 only)
FA_PB = GitSource("pytorch/benchmark", "ff65cb675209d2308f7d27c6920af8a32de9aa90",
                  "torchbenchmark/util/kernels/triton_fused_attention.py")
#: tritonbench's copy with the TMA / computation-pipelining variants (triton-lang/triton PR #5185)
FA_TB = GitSource("meta-pytorch/tritonbench", "c0a84799656cda3b6acbcc5605c8986679ea53c5",
                  "tritonbench/kernels/triton_fused_attention.py")
MM = GitSource("facebookexperimental/triton", "3091fa7f7818bba3e5d05cb22d24ef44da90192e",
               "python/tutorials/03-matrix-multiplication.py", cut_at="# Unit Test")


@dataclass
class Point:
    """One published H100 measurement of a peer kernel and how to reproduce its launch."""

    id: str
    kernel: str
    source: str  # where the exact source came from
    shape: str
    dtype: str
    published: float
    citation: str
    fit: bool
    capture: Callable[[], list[tuple]]  # -> [(launch, work)] of the measured call, offline
    note: str = ""
    needs: GitSource | None = None
    records: list = field(default_factory=list)
    #: why this Triton cannot compile the point (None: it can); such points are listed, not predicted
    unavailable: Callable[[], str | None] = lambda: None
    skipped: str = ""  # the reason it was not compiled in this run


def fa_work(b: int, h: int, n: int, d: int, bm: int, bn: int) -> cr.Work:
    """The tutorial's forward, non-causal: every program streams all N keys of its head."""
    programs = -(-n // bm) * b * h
    iters = programs * -(-n // bn)
    nbytes = 4.0 * b * h * n * d * 2  # q, k, v read once (a head's k/v stays in L2), o written
    return cr.Work(f"B={b} H={h} N={n} D={d}", iters, 0, 4.0 * b * h * n * n * d, nbytes, programs=programs,
                   uniform=True)


def gemm_work(m: int, n: int, k: int, bm: int, bn: int, bk: int, gm: int | None, el: float, wave: int) -> cr.Work:
    n_m, n_n = -(-m // bm), -(-n // bn)
    progs = ([("a", i, bm * k * el), ("b", j, bn * k * el)] for i, j in cr.launch_order(n_m, n_n, gm))
    read, _ = cr.hbm_reads(progs, wave)
    return cr.Work(f"M={m} N={n} K={k}", n_m * n_n * -(-k // bk), 0, 2.0 * m * n * k, read + m * n * el,
                   programs=n_m * n_n, uniform=True)


def _capture_fa(b: int, h: int, n: int, d: int, dt: torch.dtype):
    def capture():
        mod = load_module(FA, FA.cached, "peer_fused_attention")
        q = meta((b, h, n, d), dt)
        with fake_hopper(), capture_launches() as launches:
            mod.attention(q, q, q, False, d ** -0.5, False)
        (launch,) = [lc for lc in launches if lc.name == "_attn_fwd"]
        return [(launch, lambda cfg, rec=None: fa_work(b, h, n, d, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]))]

    return capture


def _block_pointers() -> str | None:
    """Why this Triton cannot compile a block-pointer kernel (``tl.make_block_ptr`` +
    ``tl.advance``), or None. Triton 3.9 removed block pointers in favour of tensor
    descriptors (``NotImplementedError`` at compile time)."""
    import triton.language as tl

    if hasattr(tl, "advance"):
        return None
    return (f"Triton {triton.__version__} removed block pointers (tl.advance / tl.make_block_ptr), which this "
            "kernel uses: compiled by the Triton 3.6 calibration only (calibration-triton3.6.md)")


def _capture_fa_2024(src: GitSource, b: int, h: int, n: int, d: int, dt: torch.dtype, variant: str | None = None):
    """The 2024 tutorial forward (``_attn_fwd``, block pointers, non-causal) as pytorch/benchmark
    (``attention(q, k, v, causal, sm_scale)``) or tritonbench (``_attention_opt``, ``variant``)
    launch it. tritonbench's TMA-descriptor helper needs a driver: its descriptors are unused
    by the non-TMA variants, so a meta tensor stands in for each."""
    def capture():
        mod = load_module(src, src.cached, "peer_fused_attention_" + src.repo.split("/")[0])
        q = meta((b, h, n, d), dt)
        patches = []
        if variant is not None:
            helper = mod.TmaAutoTuneHelper
            patches = [mock.patch.object(helper, "__init__", lambda self: None),
                       mock.patch.object(helper, "init_tma_descriptor", lambda self, name: None),
                       mock.patch.object(helper, "get_tma_descriptor_kernel_param",
                                         lambda self, name: meta((128,), torch.int8))]
        with contextlib.ExitStack() as stack:
            for ptch in patches:
                stack.enter_context(ptch)
            stack.enter_context(fake_hopper())
            launches = stack.enter_context(capture_launches())
            if variant is None:
                mod.attention(q, q, q, False, d ** -0.5)
            else:
                mod._attention_opt.forward(_Ctx(), q, q, q, False, d ** -0.5, variant)
        (launch,) = [lc for lc in launches if lc.name.startswith("_attn_fwd")]
        return [(launch, lambda cfg, rec=None: fa_work(b, h, n, d, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]))]

    return capture


def _capture_mm(size: int, dt: torch.dtype):
    def capture():
        mod = load_module(MM, MM.cached, "peer_matmul")
        a = meta((size, size), dt)
        # the tutorial's fp8 benchmark multiplies by a pre-transposed b (b = b.T)
        b = meta((size, size), dt).T if dt != torch.float16 else meta((size, size), dt)
        with fake_hopper(), capture_launches() as launches:
            mod.matmul(a, b)
        (launch,) = launches
        el = a.element_size()

        def work(cfg, rec=None):
            kw = cfg.kwargs
            return gemm_work(size, size, size, kw["BLOCK_SIZE_M"], kw["BLOCK_SIZE_N"], kw["BLOCK_SIZE_K"],
                             kw.get("GROUP_SIZE_M"), el, cr.SMS)
        return [(launch, work)]

    return capture


def _capture_liger(t: int, e: int, hdim: int, idim: int, topk: int):
    """Liger-Kernel's fused MoE forward: the up-projection + SwiGLU and the down-projection
    grouped GEMMs, on a uniform routing (``t*topk/e`` rows per expert)."""
    def capture():
        from liger_kernel.ops import fused_moe as lfm

        bm = lfm.BLOCK_M_TOKEN
        per = t * topk // e
        n_tiles = e * -(-per // bm)
        tk = t * topk
        i32 = torch.int32
        routing = (meta((e,), i32), meta((e + 1,), i32), meta((tk,), i32), meta((tk,), i32), meta((tk,), i32),
                   meta((n_tiles,), i32), meta((n_tiles,), i32))
        x = meta((t, hdim), torch.bfloat16)
        w1, w2 = meta((e, 2 * idim, hdim), torch.bfloat16), meta((e, hdim, idim), torch.bfloat16)
        with mock.patch.object(lfm, "compute_routing_metadata", lambda *a, **k: routing), \
                mock.patch.object(lfm, "_token_aggregation", lambda Y, *a: meta((t, hdim), torch.bfloat16)), \
                capture_launches() as launches:
            lfm.LigerFusedMoEFunction.forward(_Ctx(), x, w1, w2, meta((t, topk), i32), meta((t, topk), torch.bfloat16))
        tiles = [ex for ex in range(e) for _ in range(-(-per // bm))]
        out = []
        for launch in launches:
            dual = launch.name == "_fused_up_proj_swiglu_kernel"
            n_out, kdim = (idim, hdim) if dual else (hdim, idim)

            def work(cfg, rec=None, n_out=n_out, kdim=kdim, dual=dual):
                bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
                wave = cr.SMS * (cr.occupancy(rec) if rec else 1)
                read, _, _ = cr.rowtile_hbm(tiles, -(-n_out // bn), bm, bn, kdim, 2, wave, None, dual)
                written = tk * n_out * 2 * (2 if dual else 1)
                flops = 2.0 * tk * kdim * n_out * (2 if dual else 1)
                return cr.Work(f"T={t} E={e} H={hdim} I={idim} K={topk}", len(tiles) * -(-n_out // bn) * -(-kdim // bk),
                               0, flops, read + written, programs=len(tiles) * -(-n_out // bn), uniform=True)
            out.append((launch, work))
        return out

    return capture


class _Ctx:
    """An autograd ctx that accepts whatever the forward stores or marks."""

    needs_input_grad = (False,) * 8

    def __getattr__(self, name):
        return lambda *a, **k: None


def _liger_version() -> str:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return "not installed"


POINTS = [
    Point("fa-fwd-d128", "Triton fused-attention tutorial forward (_attn_fwd), non-causal, warp_specialize=False",
          FA.where, "B=4 H=32 N=16384 D=128", "float16", 486.99,
          "https://github.com/facebookexperimental/triton/pull/205 (fused-attention-batch4-head32-d128-fwd-"
          "causal=False-warp_specialize=False, N_CTX=16384; the tutorial of the fork on 2025-07-07)",
          True, _capture_fa(4, 32, 16384, 128, torch.float16), needs=FA,
          note="pytorch/benchmark PR #2391 measured the 2024 version of the same tutorial at 476.8 "
               "(bf16, B=1 H=16 N=16384): within 2%. That version uses block pointers, which Triton 3.9 removed."),
    Point("fa-fwd-d64", "Triton fused-attention tutorial forward (_attn_fwd), non-causal",
          FA.where, "B=1 H=32 N=16384 D=64", "float16", 403.0,
          "FlashAttention-3 paper (arXiv:2407.08608), Figure 5 'Attention forward speed (FP16/BF16) on H100', "
          "panel head dim 64 without causal mask, bar 'Triton' at sequence length 16k (hidden 2048: 32 heads)",
          True, _capture_fa(1, 32, 16384, 64, torch.float16), needs=FA,
          note="The paper measured the mid-2024 tutorial with the Triton of that time (its D=128 bar reads 395, "
               "vs 477-487 for the tutorial elsewhere); compiled here: the 2025 tutorial of the D=128 point. "
               "Caveat: the same-era kernel at the paper's D=128 shape measured 476.8 in pytorch/benchmark PR "
               "#2391 (held-out point pb-fa-fwd-d128), 1.21x the paper's bar, so this figure may understate "
               "the kernel; the leave-one-out check below shows what the fit would predict without it."),
    # held out: the D=128 fit point's kernel, commit and table at the shorter sequences (fewer
    # key tiles per program: the per-tile term and the waves weigh more; TILE_LATENCY is not fitted)
    *[Point(f"fa-fwd-d128-n{n}", "Triton fused-attention tutorial forward (_attn_fwd), non-causal, "
            "warp_specialize=False", FA.where, f"B=4 H=32 N={n} D=128", "float16", pub,
            "https://github.com/facebookexperimental/triton/pull/205 (the table of the D=128 fit point, "
            f"row N_CTX={n})", False, _capture_fa(4, 32, n, 128, torch.float16), needs=FA)
      for n, pub in ((1024, 406.80), (2048, 427.77), (4096, 459.61), (8192, 464.42))],
    # held out, Triton 3.6 only: the 2024 tutorial (block pointers), two independent measurements
    Point("pb-fa-fwd-d128", "Triton fused-attention tutorial forward of mid-2024 (_attn_fwd, block pointers, "
          "autotuned 64/128 x 64/128, s3/4/7, w4/8), non-causal", FA_PB.where, "B=1 H=16 N=16384 D=128",
          "bfloat16", 476.75,
          "https://github.com/pytorch/benchmark/pull/2391 (test plan: triton_tutorial_flash_v2-tflops at "
          "(1, 16, 16384, 128); FA3 at the same shape 620.7)",
          False, _capture_fa_2024(FA_PB, 1, 16, 16384, 128, torch.bfloat16), needs=FA_PB,
          unavailable=_block_pointers),
    Point("pb-fa-fwd-d128-n1024", "as pb-fa-fwd-d128", FA_PB.where, "B=16 H=16 N=1024 D=128", "bfloat16", 389.72,
          "https://github.com/pytorch/benchmark/pull/2391 (same table, row (16, 16, 1024, 128))",
          False, _capture_fa_2024(FA_PB, 16, 16, 1024, 128, torch.bfloat16), needs=FA_PB,
          unavailable=_block_pointers),
    Point("tb-fa-fwd-d128", "tritonbench triton_tutorial_flash_v2 forward ('base' variant of _attention_opt: "
          "_attn_fwd, block pointers, 128x128 w8 s3), non-causal", FA_TB.where, "B=8 H=16 N=8192 D=128",
          "bfloat16", 481.40,
          "https://github.com/triton-lang/triton/pull/5185 (table: triton_tutorial_flash_v2-tflops at "
          "(8, 16, 8192, 128); the PR's compiler, tritonbench of the same day)",
          False, _capture_fa_2024(FA_TB, 8, 16, 8192, 128, torch.bfloat16, "base"), needs=FA_TB,
          unavailable=_block_pointers,
          note="The same table measures the compiler-pipelined schedule (triton_tutorial_flash_v2_opt, the QK^T "
               "of tile j+1 issued before the softmax of tile j) at 517.5 = 1.075x this kernel; that schedule "
               "comes from the PR's own compiler pass (open, never merged; the kernel's loop_schedule argument "
               "is commented out and no released Triton reproduces it), so it cannot be compiled here: see "
               "'Overlapped schedule' below."),
    Point("gemm-fp16-3072", "Triton matmul tutorial (matmul_kernel, autotuned), fp16",
          MM.where, "M=N=K=3072", "float16", 524.7,
          "https://github.com/triton-lang/triton/issues/3672 (03-matrix-multiplication on H100, fp16, "
          "M=N=K=3072: Triton 524.7, cuBLAS 584.7)",
          True, _capture_mm(3072, torch.float16), needs=MM),
    Point("gemm-fp8-3584", "Triton matmul tutorial (matmul_kernel, autotuned), fp8 e5m2 with pre-transposed b",
          MM.where, "M=N=K=3584", "float8_e5m2", 1279.9,
          "https://github.com/triton-lang/triton/pull/3546 (results on H100, matmul-performance-fp8, "
          "M=N=K=3584; the PR is this commit)",
          False, _capture_mm(3584, torch.float8_e5m2), needs=MM),
    Point("liger-moe-fwd", "Liger-Kernel fused MoE forward (_fused_up_proj_swiglu_kernel + _fused_down_proj_kernel)",
          f"liger-kernel {_liger_version()} (PyPI; its Triton forward kernels equal main of 2026-07-08)",
          "T=32768 E=128 H=2048 I=768 K=8 (Qwen3-30B-A3B experts)", "bfloat16", 257.0,
          "https://github.com/linkedin/Liger-Kernel/pull/1294: the PR's forward reaches 501 TFLOP/s at T=32768 "
          "and is 1.95x main there (same environment, Triton 3.7.1): main = 501 / 1.95 = 257 (derived)",
          False, _capture_liger(32768, 128, 2048, 768, 8),
          note="Derived figure; the PR's independent re-run (Triton 3.6) gives 1.25-1.33x, i.e. main up to ~400 "
               "if the PR's 501 held there: the published band is 257-400. Cause of the miss: the kernels gather "
               "their A rows with plain per-row loads (no TMA, 64-row tiles of one warpgroup), whose latency the "
               "model does not charge (its main loop shows the wgmma in flight across them); no fit point "
               "gathers rows. Read the model as optimistic by up to this ratio for gathered grouped GEMMs."),
]


# --------------------------------------------------------------------------- compiling and fitting


_JOBS: list[tuple] = []


def _compile_job(i: int) -> dict:
    li, launch, work, cfg = _JOBS[i]
    cfg_obj = cfg if cfg is not None else types.SimpleNamespace(kwargs=launch.kwargs)
    t0 = time.time()
    try:
        rec = analyse(compile_launch(launch, cfg))
    except Exception as e:  # a config that does not compile is reported, not fatal
        return {"launch": li, "kernel": launch.name, "config": _config_text(launch, cfg), "error": repr(e)[:200]}
    w = work(cfg_obj, rec)
    return {"launch": li, "kernel": launch.name, "config": _config_text(launch, cfg), "record": rec,
            "work": {"shape": w.shape, "iters_full": w.iters_full, "iters_masked": w.iters_masked,
                     "flops": w.flops, "hbm_bytes": w.hbm_bytes, "programs": w.programs, "uniform": w.uniform},
            "compile_s": round(time.time() - t0, 1)}


def compile_point(p: Point, workers: int = 1) -> list[dict]:
    """Every kept config of every launch of ``p``: its analysis record and work."""
    global _JOBS
    _JOBS = [(li, launch, work, cfg) for li, (launch, work) in enumerate(p.capture())
             for cfg in (launch.configs or [None])]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            out = list(pool.imap(_compile_job, range(len(_JOBS))))
    else:
        out = [_compile_job(i) for i in range(len(_JOBS))]
    for r in out:
        rec = r.get("record")
        print(f"  {p.id} {r['kernel']} {r['config']}: " + (r.get("error") or
              f"regs {rec['regs']} smem {rec['smem_bytes']} instr/it {rec['instrs_per_iter']} in flight "
              f"{rec['inflight_instrs_per_iter']} mufu {rec['mufu_per_iter']}"), flush=True)
    return out


def _config_text(launch, cfg) -> str:
    kw = cfg.all_kwargs() if cfg is not None else launch.kwargs
    blocks = "x".join(str(v) for k, v in kw.items() if k.startswith(("BLOCK", "GROUP")))
    return f"{blocks} w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"


def work_of(d: dict) -> cr.Work:
    return cr.Work(d["shape"], d["iters_full"], d["iters_masked"], d["flops"], d["hbm_bytes"],
                   programs=d["programs"], uniform=d["uniform"])


def predict_point(records: list[dict], model: dict | None = None) -> dict:
    """The point's prediction: per launch its best feasible config; launches add up in time."""
    best: dict[int, tuple] = {}
    for r in records:
        if "record" not in r or r["record"]["smem_bytes"] > SMEM_LIMIT:
            continue
        p = cr.predict(r["record"], work_of(r["work"]), model)
        if r["launch"] not in best or p["predicted_tflops"] > best[r["launch"]][0]["predicted_tflops"]:
            best[r["launch"]] = (p, r)
    if not best:
        return {}
    flops = sum(r["work"]["flops"] for _, r in best.values())
    out = {}
    for key in ("predicted_tflops", "serialised_tflops", "overlapped_tflops"):
        seconds = sum(r["work"]["flops"] / (p[key] * 1e12) for p, r in best.values())
        out[key] = flops / seconds / 1e12
    out["configs"] = [f"{r['kernel']} {r['config']}" for _, r in best.values()]
    out["occupancy"] = [p["occupancy"] for p, _ in best.values()]
    out["bound"] = [p["bound"] for p, _ in best.values()]
    return out


#: the values the fit searches (MODEL keys); TILE_LATENCY stays at its default
FIT_GRID = {
    "TENSOR_EFF": [round(0.60 + 0.01 * i, 2) for i in range(41)],
    "MUFU_WEIGHT": [round(0.05 * i, 2) for i in range(41)],
    "CTA_OVERLAP": [round(0.05 * i, 2) for i in range(21)],
}


def fit(points: list[Point], exclude: tuple[str, ...] = ()) -> dict:
    """The MODEL minimising the squared log-ratios of the fit points (held-out points and the
    ids in ``exclude`` unused), by coordinate descent over :data:`FIT_GRID`. ``CTA_OVERLAP``
    keeps its default unless a fit point runs more than one CTA per SM (nothing else can
    tell it apart)."""
    fit_pts = [p for p in points if p.fit and p.records and p.id not in exclude]
    multi = any(max(predict_point(p.records).get("occupancy", [1])) > 1 for p in fit_pts)
    grid = {k: v for k, v in FIT_GRID.items() if multi or k != "CTA_OVERLAP"}

    def err(m: dict) -> float:
        return sum(math.log(predict_point(p.records, m)["predicted_tflops"] / p.published) ** 2 for p in fit_pts)

    best = dict(cr.MODEL)
    best_err = err(best)
    for _ in range(6):
        improved = False
        for key, values in grid.items():
            for v in values:
                m = dict(best, **{key: v})
                e = err(m)
                if e < best_err - 1e-12:
                    best, best_err, improved = m, e, True
        if not improved:
            break
    return best


def leave_one_out(points: list[Point]) -> dict[str, dict]:
    """Per fit point: the model fitted without it and its ratio to its published figure
    under that model (how far the fit would be off had this point been held out)."""
    out = {}
    for p in points:
        if not (p.fit and p.records):
            continue
        m = fit(points, exclude=(p.id,))
        pred = predict_point(p.records, m)["predicted_tflops"]
        out[p.id] = {"model": m, "predicted_tflops": pred, "ratio": pred / p.published}
    return out


def overlap_check(points: list[Point], model: dict) -> dict | None:
    """The one published compiler-pipelined attention schedule (triton-lang/triton PR #5185:
    517.5 TFLOP/s vs 481.4 for the same kernel's default schedule) against the model's
    bounds for the default schedule's SASS: the share of the cycles the model's overlapped
    bound would save that the measured schedule did save (in time, not TFLOP/s)."""
    base = next((p for p in points if p.id == "tb-fa-fwd-d128" and p.records), None)
    if base is None:
        return None
    pr = predict_point(base.records, model)
    rec = next(r["record"] for r in base.records if f"{r['kernel']} {r['config']}" == pr["configs"][0])
    # the ideal overlap of one iteration: tensor, issue and MUFU cycles all hidden under the
    # longest of them (what a perfect softmax/wgmma pipeline would reach); per-tile terms unchanged
    cyc = cr.iteration_cycles(cr.main_stats(rec), rec["num_warps"], cr.occupancy(rec), model)
    ideal_cyc = cr.iteration_cycles(cr.main_stats(rec), rec["num_warps"], 10 ** 6, model)["overlapped"]
    ideal = pr["predicted_tflops"] * cyc["calibrated"] / ideal_cyc
    pipelined = 517.528
    t_pub, t_pipe = 1 / base.published, 1 / pipelined
    t_cal, t_ideal = 1 / pr["predicted_tflops"], 1 / ideal
    return {"base_published": base.published, "pipelined_published": pipelined, "config": pr["configs"][0],
            "base_predicted": pr["predicted_tflops"], "base_serialised": pr["serialised_tflops"],
            "base_overlapped": pr["overlapped_tflops"], "base_ideal": ideal,
            "realised_share": (t_pub - t_pipe) / (t_cal - t_ideal) if t_cal > t_ideal else None,
            "citation": "https://github.com/triton-lang/triton/pull/5185"}


# --------------------------------------------------------------------------- writing


def row(p: Point, model: dict) -> dict:
    pr = predict_point(p.records, model)
    ratio = pr["predicted_tflops"] / p.published if pr else None
    return {"id": p.id, "kernel": p.kernel, "source": p.source, "shape": p.shape, "dtype": p.dtype,
            "configs": pr.get("configs"), "occupancy": pr.get("occupancy"), "bound": pr.get("bound"),
            "published_tflops": p.published, "citation": p.citation, "used_for_fit": p.fit,
            "predicted_tflops": pr.get("predicted_tflops"), "serialised_tflops": pr.get("serialised_tflops"),
            "overlapped_tflops": pr.get("overlapped_tflops"), "ratio": ratio,
            "within_20pct": ratio is not None and abs(ratio - 1) <= 0.20, "note": p.note,
            "source_command": p.needs.command if p.needs else "pip install -e '.[bench]' (pins liger-kernel)"}


def error_bands(rows: list[dict]) -> dict:
    """The calibration's error band (largest ``|ratio - 1|`` over the points within +-20%,
    fit and held out) and the same over the held-out attention points alone, each with the
    range of ratios it covers."""
    def band(sel):
        ratios = [r["ratio"] for r in sel if r["ratio"] is not None]
        if not ratios:
            return None
        return {"band": round(max(abs(x - 1) for x in ratios), 3), "low": round(min(ratios), 3),
                "high": round(max(ratios), 3), "points": [r["id"] for r in sel]}

    within = [r for r in rows if r["within_20pct"]]
    attn_held = [r for r in rows if not r["used_for_fit"] and "fa-fwd" in r["id"]]
    return {"all_within_20pct": band(within), "held_out_attention": band(attn_held)}


def write(points: list[Point], model: dict, out_dir: str, seconds: float, name: str = "calibration",
          loo: dict | None = None) -> tuple[str, str]:
    rows = [row(p, model) for p in points if p.records]
    meta_ = {"triton": triton.__version__, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
             "commit": cr.git_commit(), "model": model, "seconds": round(seconds)}
    bands = error_bands(rows)
    meta_["error_band"] = bands["all_within_20pct"]["band"] if bands["all_within_20pct"] else 0.0
    meta_["error_bands"] = bands
    meta_["leave_one_out"] = loo or {}
    meta_["skipped"] = {p.id: p.skipped for p in points if p.skipped}
    ovl = overlap_check(points, model)
    meta_["overlap_check"] = ovl
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, f"{name}.json")
    with open(jpath, "w") as f:
        json.dump({"meta": meta_, "points": rows,
                   "records": {p.id: p.records for p in points if p.records}}, f, indent=1)
    band, held = bands["all_within_20pct"], bands["held_out_attention"]
    lines = [
        "# Calibration of the offline speed model against published H100 measurements", "",
        f"Triton {meta_['triton']}, torch {meta_['torch']}, {meta_['date']}, commit {meta_['commit']}; "
        f"`python -m benchmarks.calibrate` ({meta_['seconds']} s). Peer kernels compiled offline for sm_90a with "
        "the compile report's tool and read by its analysis; predictions by `compile_report.predict` (its module "
        "docstring states the model). Published figures are H100 measurements by others (cited); predicted ones "
        "are PREDICTIONS.", "",
        "Fitted constants: " + ", ".join(f"`{k}` = {v}" for k, v in model.items()) + ".", "",
        f"**Error band** (largest |ratio - 1| over the points within +-20%, fit and held out): "
        f"+-{100 * meta_['error_band']:.0f}% (ratios {band['low']:.2f}-{band['high']:.2f})"
        + (f"; over the held-out attention points alone: +-{100 * held['band']:.0f}% (ratios "
           f"{held['low']:.2f}-{held['high']:.2f}, {len(held['points'])} points)" if held else
           "; no held-out attention point compiled with this Triton") + ". Misses are listed below.", "",
        "| point | kernel | shape, dtype | config (best kept) | published TFLOP/s | predicted | ratio | serialised / "
        "overlapped | fit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['id']} | {r['kernel']} | {r['shape']}, {r['dtype']} | {'; '.join(r['configs'] or [])} "
                     f"(k={r['occupancy']}, {', '.join(r['bound'] or [])}) | {r['published_tflops']:.0f} | "
                     f"{r['predicted_tflops']:.0f} | {r['ratio']:.2f}{'' if r['within_20pct'] else ' MISS'} | "
                     f"{r['serialised_tflops']:.0f} / {r['overlapped_tflops']:.0f} | "
                     f"{'fit' if r['used_for_fit'] else 'held out'} |")
    skipped = [p for p in points if p.skipped]
    if skipped:
        lines += ["", "Not compiled in this run (listed so that no point disappears silently):", ""]
        lines += [f"- {p.id} ({p.shape}, published {p.published:.0f}): {p.skipped}." for p in skipped]
    if loo:
        lines += ["", "## Leave-one-out", "",
                  "Each fit point predicted by the model fitted on the other fit points (how far off it would be "
                  "had it been held out). The refits start from the fitted constants and two points leave three "
                  "constants under-determined, so the constants barely move: this shows that the fit points agree "
                  "with one another, not that each constant is pinned down; the held-out points above are the test.",
                  "",
                  "| point | constants fitted without it | predicted | published | ratio |", "|---|---|---|---|---|"]
        by_id = {p.id: p for p in points}
        for pid, v in loo.items():
            consts = ", ".join(f"{k} {val}" for k, val in v["model"].items() if k != "TILE_LATENCY")
            lines.append(f"| {pid} | {consts} | {v['predicted_tflops']:.0f} | {by_id[pid].published:.0f} | "
                         f"{v['ratio']:.2f} |")
    lines += ["", "## Overlapped schedule", ""]
    if ovl:
        share = ovl["realised_share"]
        lines += [f"The only published H100 figure of a Triton attention forward whose softmax overlaps its own "
                  f"wgmma (compiler pipelining, {ovl['citation']}): {ovl['pipelined_published']:.1f} TFLOP/s vs "
                  f"{ovl['base_published']:.1f} for the same kernel's default schedule (point tb-fa-fwd-d128). "
                  f"For the default schedule's SASS ({ovl['config']}) the model gives calibrated "
                  f"{ovl['base_predicted']:.0f}, serialised {ovl['base_serialised']:.0f}, overlapped "
                  f"{ovl['base_overlapped']:.0f} (one CTA per SM: no co-resident CTA to overlap with), and "
                  f"{ovl['base_ideal']:.0f} with every iteration's issue and MUFU cycles hidden under its tensor "
                  "cycles (the ideal pipeline). The measured pipelined schedule saved "
                  + (f"{100 * share:.0f}% of the time that ideal would save" if share is not None
                     else "time the model does not account for")
                  + ". Its SASS cannot be compiled (the schedule is a pass of the PR's own compiler, never merged), "
                  "so it calibrates no constant: a compiler-pipelined softmax realised about that share of the "
                  "ideal overlap, the one published data point on the overlapped bound of a kernel whose softmax "
                  "is in flight."]
    else:
        lines += ["The only published H100 figure of a Triton attention forward whose softmax overlaps its own "
                  "wgmma (triton-lang/triton PR #5185: 517.5 TFLOP/s with compiler pipelining vs 481.4 for the "
                  "default schedule) comes from a compiler pass that was never merged, so its SASS cannot be "
                  "compiled; its default-schedule kernel (tb-fa-fwd-d128) uses block pointers and is compiled by "
                  "the Triton 3.6 calibration (calibration-triton3.6.md), which states the share of the model's "
                  "overlap headroom the pipelined schedule realised. No calibration point covers an overlapped "
                  "softmax: the compile report gives both bounds for such kernels."]
    lines += ["", "## Sources and citations", ""]
    for r in rows:
        lines += [f"- **{r['id']}**: source {r['source']}; obtained with `{r['source_command']}`.",
                  f"  Published: {r['citation']}."]
        if r["note"]:
            lines.append(f"  Note: {r['note']}")
    lines += ["", "## Misses and their causes", ""]
    misses = [r for r in rows if not r["within_20pct"]]
    lines += [f"- {r['id']}: ratio {r['ratio']:.2f}. {r['note']}" for r in misses] or ["- none: every point within +-20%."]
    mpath = os.path.join(out_dir, f"{name}.md")
    with open(mpath, "w") as f:
        f.write("\n".join(lines) + "\n")
    return jpath, mpath


# --------------------------------------------------------------------------- measuring (GPU)

#: how each point's measured call runs on a GPU: (point id) -> callable(mod_or_none) -> (fn, flops)
def _measure_calls() -> dict:
    def fa(b, h, n, d):
        def make():
            mod = load_module_gpu(FA, "peer_fused_attention")
            q, k, v = (torch.randn((b, h, n, d), device="cuda", dtype=torch.float16) for _ in range(3))
            return (lambda: mod.attention(q, k, v, False, d ** -0.5, False)), 4.0 * b * h * n * n * d
        return make

    def mm(size, dt):
        def make():
            mod = load_module_gpu(MM, "peer_matmul")
            a = torch.randn((size, size), device="cuda", dtype=torch.float16).to(dt)
            b = torch.randn((size, size), device="cuda", dtype=torch.float16).to(dt)
            b = b.T if dt != torch.float16 else b
            return (lambda: mod.matmul(a, b)), 2.0 * size ** 3
        return make

    def liger(t, e, hdim, idim, topk):
        def make():
            from liger_kernel.ops import LigerFusedMoEFunction

            x = torch.randn((t, hdim), device="cuda", dtype=torch.bfloat16)
            w1 = torch.randn((e, 2 * idim, hdim), device="cuda", dtype=torch.bfloat16) * 0.02
            w2 = torch.randn((e, hdim, idim), device="cuda", dtype=torch.bfloat16) * 0.02
            logits = torch.randn((t, e), device="cuda")
            idx = torch.topk(logits, topk, dim=-1).indices.to(torch.int32)
            wts = torch.softmax(torch.gather(logits, 1, idx.long()), -1).to(torch.bfloat16)
            return (lambda: LigerFusedMoEFunction.apply(x, w1, w2, idx, wts)), 6.0 * t * topk * hdim * idim
        return make

    def fa_2024(src, name, b, h, n, d, variant=None):
        def make():
            mod = load_module_gpu(src, name)
            q, k, v = (torch.randn((b, h, n, d), device="cuda", dtype=torch.bfloat16) for _ in range(3))
            if variant is None:
                return (lambda: mod.attention(q, k, v, False, d ** -0.5)), 4.0 * b * h * n * n * d
            return (lambda: mod._attention_opt.apply(q, k, v, False, d ** -0.5, variant)), 4.0 * b * h * n * n * d
        return make

    calls = {f"fa-fwd-d128-n{n}": fa(4, 32, n, 128) for n in (1024, 2048, 4096, 8192)}
    calls.update({"pb-fa-fwd-d128": fa_2024(FA_PB, "peer_fa_pb", 1, 16, 16384, 128),
                  "pb-fa-fwd-d128-n1024": fa_2024(FA_PB, "peer_fa_pb", 16, 16, 1024, 128),
                  "tb-fa-fwd-d128": fa_2024(FA_TB, "peer_fa_tb", 8, 16, 8192, 128, "base")})
    return {**calls, "fa-fwd-d128": fa(4, 32, 16384, 128), "fa-fwd-d64": fa(1, 32, 16384, 64),
            "gemm-fp16-3072": mm(3072, torch.float16), "gemm-fp8-3584": mm(3584, torch.float8_e5m2),
            "liger-moe-fwd": liger(32768, 128, 2048, 768, 8)}


def load_module_gpu(src: GitSource, name: str) -> types.ModuleType:
    with open(src.cached) as f:
        text = f.read()
    if src.cut_at and src.cut_at in text:
        text = text[:text.index(src.cut_at)]
    mod = types.ModuleType(name)
    exec(compile(text, src.cached, "exec"), mod.__dict__)
    sys.modules[name] = mod
    return mod


def _write_measured(rows: list[dict], stored: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "calibration-measured.json")
    with open(path, "w") as f:
        json.dump({"meta": {"triton": triton.__version__, "torch": torch.__version__, "model": stored["meta"]["model"]},
                   "points": rows}, f, indent=1)
    lines = ["# Calibration peers measured on a GPU (published vs predicted vs MEASURED)", "",
             "| point | published | predicted | measured | predicted / measured |", "|---|---|---|---|---|"]
    for r in rows:
        m = r.get("measured_tflops")
        meas = "" if m is None else f"{m:.0f}"
        ratio = "" if not m else f"{r['predicted_tflops'] / m:.2f}"
        lines.append(f"| {r['id']} | {r['published_tflops']:.0f} | {r['predicted_tflops']:.0f} | {meas} | {ratio} |")
    with open(os.path.join(out_dir, "calibration-measured.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def measure(out_dir: str, budget_s: float) -> str:
    """Time every point's measured call on this GPU (do_bench, autotuning first) and write
    ``calibration-measured.json``/``.md``: published, predicted and measured side by side."""
    from triton.testing import do_bench

    results = RESULTS
    own = os.path.join(results, "calibration-triton" + ".".join(triton.__version__.split(".")[:2]) + ".json")
    # the calibration compiled by this Triton when there is one (it has the points only it compiles)
    stored = json.load(open(own if os.path.exists(own) else os.path.join(results, "calibration.json")))
    t0, rows, path = time.time(), [], ""
    for r in stored["points"]:
        if time.time() - t0 > budget_s:
            rows.append(dict(r, measured_tflops=None, error="time budget spent"))
            continue
        try:
            fn, flops = _measure_calls()[r["id"]]()
            fn()  # autotune / compile
            ms = do_bench(fn, warmup=50, rep=200)
            rows.append(dict(r, measured_tflops=flops / ms / 1e9, device=torch.cuda.get_device_name()))
        except Exception as e:  # one failing peer does not stop the others
            rows.append(dict(r, measured_tflops=None, error=repr(e)[:300]))
        print(f"{r['id']:16s} published {r['published_tflops']:7.1f} predicted {r['predicted_tflops']:7.1f} "
              f"measured {rows[-1].get('measured_tflops') or float('nan'):7.1f}", flush=True)
        path = _write_measured(rows, stored, out_dir)  # after every point: a timeout keeps what was measured
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--only", default=None, help="comma-separated point ids")
    ap.add_argument("--git-dir", action="append", default=[], help="owner/name=PATH of a local clone (repeatable)")
    ap.add_argument("--no-fit", action="store_true", help="keep compile_report.MODEL; only check the points")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--measure", action="store_true",
                    help="on a GPU: time the points' kernels and write calibration-measured.{json,md}")
    ap.add_argument("--budget-s", type=float, default=120.0, help="--measure: stop starting points after this")
    ap.add_argument("--from-json", default=None,
                    help="rewrite the tables from the records of an earlier run's JSON (no compiling)")
    ap.add_argument("--name", default=None,
                    help="output file stem (default: calibration, or calibration-tritonX.Y under another Triton "
                         "than the report's " + REPORT_TRITON + ")")
    a = ap.parse_args(argv)
    if a.measure:
        git_dirs = dict(_git_dirs(), **dict(x.split("=", 1) for x in a.git_dir))
        for p in POINTS:
            if p.needs is not None:
                obtain(p.needs, git_dirs)
        print(f"wrote {measure(a.out, a.budget_s)}")
        return 0
    if not tools_available() and not a.from_json:
        print("calibrate: this Triton has no NVIDIA ptxas/cuobjdump; nothing to compile", file=sys.stderr)
        return 2
    git_dirs = dict(_git_dirs(), **dict(x.split("=", 1) for x in a.git_dir))
    t0 = time.time()
    points = [p for p in POINTS if not a.only or p.id in a.only.split(",")]
    stored = None
    if a.from_json:
        with open(a.from_json) as f:
            stored = json.load(f)
        t0 -= stored["meta"].get("seconds", 0)
    for p in points:
        if stored is not None:
            p.records = stored["records"].get(p.id, [])
            p.skipped = stored["meta"].get("skipped", {}).get(p.id, "" if p.records else "not in " + a.from_json)
            continue
        why = p.unavailable()
        if why:
            p.skipped = why
            print(f"calibrate: {p.id} skipped: {why}", file=sys.stderr)
            continue
        if p.needs is not None and obtain(p.needs, git_dirs) is None:
            p.skipped = f"source not found; fetch it with: {p.needs.command}"
            print(f"calibrate: {p.id} skipped, {p.skipped}", file=sys.stderr)
            continue
        print(f"calibrate: {p.id}", flush=True)
        try:
            p.records = compile_point(p, a.workers)
        except ImportError as e:
            p.skipped = f"{e}; pip install -e '.[bench]'"
            print(f"calibrate: {p.id} skipped ({p.skipped})", file=sys.stderr)
    model = dict(cr.MODEL) if a.no_fit else fit(points)
    if model != cr.MODEL:
        print(f"calibrate: fitted {model} differs from compile_report.MODEL {cr.MODEL}: update it", flush=True)
    loo = leave_one_out(points)
    name = a.name or ("calibration" if triton.__version__.startswith(REPORT_TRITON)
                      else "calibration-triton" + ".".join(triton.__version__.split(".")[:2]))
    jpath, mpath = write(points, model, a.out, time.time() - t0, name, loo)
    for r in json.load(open(jpath))["points"]:
        print(f"{r['id']:20s} published {r['published_tflops']:7.1f} predicted {r['predicted_tflops']:7.1f} "
              f"ratio {r['ratio']:.2f} {'fit' if r['used_for_fit'] else 'held out'}")
    for pid, v in loo.items():
        print(f"{pid:20s} leave-one-out ratio {v['ratio']:.2f}")
    print(f"wrote {jpath} and {mpath} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
