"""Compile Triton kernels for a GPU this machine does not have, and read the machine code.

The launchers of :mod:`dasg_kernels` run unchanged on ``meta`` tensors (shapes and
strides without storage) inside :func:`capture_launches`, which records every kernel
launch instead of running it: the kernel, its arguments, and, for an autotuned kernel,
the configs its pruner keeps. :func:`compile_launch` then specialises the arguments
exactly as ``JITFunction.run`` does (divisibility-by-16 of ints and pointers, ``== 1``
ints as constants, ``do_not_specialize`` honoured) and compiles for a chosen target with
``triton.compile``; nothing here needs a GPU or a driver. The Triton wheel's
``cuobjdump`` disassembles the cubin, and :func:`analyse` reads from the SASS and the
TTGIR what a profiler would show: registers, spills, shared memory, wgmma (``HGMMA``)
vs ``mma.sync`` (``HMMA``), TMA / cp.async / plain global loads, the instructions and
``MUFU`` of the main loop (the whole body, and the path that skips the code a conditional
forward branch in it jumps over: the masking code only boundary tiles run,
:func:`skipped_regions`), and whether some warps compute the same tile as others.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces every ``@triton.jit``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


@dataclass
class Launch:
    """One recorded kernel launch: ``fn[grid](*args, **kwargs)`` and the configs to try."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    configs: list = field(default_factory=list)  # triton.Config kept by the pruner; [] = kwargs hold them

    @property
    def name(self) -> str:
        return self.fn.fn.__name__


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Record launches instead of running them (the launcher code runs as usual).

    An autotuned kernel is recorded once with every config its ``early_config_prune``
    keeps (the report compiles each); a plain kernel with the launch's own options.
    """
    launches: list[Launch] = []
    jit_run, tune_run = JITFunction.run, Autotuner.run

    def fake_jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))

    def fake_tune_run(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.nargs = dict(zip(self.arg_names, args))
        configs = list(self.prune_configs(kwargs))
        self.nargs = None
        fn = self.fn
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        launches.append(Launch(fn, args, dict(kwargs), configs))

    JITFunction.run, Autotuner.run = fake_jit_run, fake_tune_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run


def meta(shape, dtype=torch.bfloat16, stride=None) -> torch.Tensor:
    """A tensor with a shape and strides but no storage (what the launchers are given)."""
    if stride is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _stand_in(a: Any) -> Any:
    # Pointers specialise on their dtype and 16-byte alignment only: a 16-element CPU
    # tensor (64-byte aligned) stands in for every (meta) tensor, also the base of a host
    # tensor descriptor (whose shape, strides and block shape are kept).
    if isinstance(a, torch.Tensor):
        return torch.empty(16, dtype=a.dtype)
    if type(a).__name__ == "TensorDescriptor" and hasattr(a, "base"):
        return dataclasses.replace(a, base=torch.empty(16, dtype=a.base.dtype))
    return a


def targets() -> dict[str, Any]:
    """The offline targets this Triton can compile for (sm_90a always; sm_80, sm_100 if present)."""
    from triton.backends.compiler import GPUTarget

    out = {"sm_90a": GPUTarget("cuda", 90, 64)}
    out["sm_80"] = GPUTarget("cuda", 80, 32)
    if shutil.which("ptxas-blackwell", path=_bin_dir()) or triton.__version__ >= "3.3":
        out["sm_100"] = GPUTarget("cuda", 100, 64)
    return out


def _bin_dir() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def tools_available() -> bool:
    """Whether the installed Triton ships the NVIDIA tools an offline compile needs."""
    return all(os.path.exists(os.path.join(_bin_dir(), t)) for t in ("ptxas", "cuobjdump"))


@dataclass
class Compiled:
    name: str
    target: str
    num_warps: int
    num_stages: int
    shared: int
    sass: str
    ttgir: str
    ptxas_log: str
    res_usage: str


def compile_launch(launch: Launch, config=None, target: str = "sm_90a") -> Compiled:
    """Compile ``launch`` (with ``config``, a ``triton.Config``) for ``target`` offline."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    tgt = targets()[target]
    backend = make_backend(tgt)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
        if getattr(config, "pre_hook", None) is not None:  # e.g. sets descriptor block shapes per config
            config.pre_hook(dict(zip(fn.arg_names, launch.args), **kwargs))
    kwargs["debug"] = False
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    args = tuple(_stand_in(a) for a in launch.args)
    kwargs = {k: _stand_in(v) for k, v in kwargs.items()}
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    log = io.StringIO()
    # ptxas must run (a cached kernel has no ptxas log, and its spill figure would come from
    # cuobjdump's STACK, which also counts other local memory): compile past Triton's cache
    old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=tgt, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        cuobjdump = os.path.join(_bin_dir(), "cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return Compiled(launch.name, target, options.num_warps, options.num_stages, k.metadata.shared, sass,
                    k.asm["ttgir"], log.getvalue(), res)


# --------------------------------------------------------------------------- reading SASS

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRA_TARGET = re.compile(r"0x([0-9a-f]+)")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of every instruction (NOPs dropped). A branch's
    operands start with its guard predicate when it has one (``@!P6 BRA P5, 0x36f0`` ->
    ``"@!P6 P5, 0x36f0"``), so that :func:`conditional_branch` can tell it from a jump."""
    out = []
    for m in _INSTR.finditer(sass):
        op = m.group(3)
        if op == "NOP":
            continue
        rest = m.group(4)
        if op.startswith("BRA") and m.group(2):
            rest = m.group(2).strip() + rest
        out.append((int(m.group(1), 16), op, rest))
    return out


_BRA_PRED = re.compile(r"(?:^|[\s,])!?U?P[0-6]\b")


def conditional_branch(op: str, rest: str) -> bool:
    """Whether an instruction (of :func:`parse_sass`) is a branch taken on a predicate: a
    guard (``@P5 BRA``) or a predicate operand (``BRA P5, ...``, ``BRA.U !UP0, ...``)."""
    return op.startswith("BRA") and (rest.lstrip().startswith("@") or bool(_BRA_PRED.search(rest)))


#: opcodes a masking region may not hold: tensor-core work, memory traffic (constant-bank
#: ``LDC`` aside), barriers; code a compiler guards for its own reasons (a pipeline's
#: prefetch of the next stage, a rescale skipped when the row max holds) has them or lacks -inf
_NOT_MASKING = ("HGMMA", "QGMMA", "HMMA", "LDG", "LDS", "LDL", "LD.", "STG", "STS", "STL", "ST.", "UTMA", "UBLKCP",
                "SYNCS", "BAR", "ATOM", "RED", "LDSM", "STSM")


def skipped_regions(body: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """Index ranges ``[first, last]`` of ``body`` (one loop body) holding masking code that a
    conditional forward branch inside it jumps over: the branch's target lies in the body,
    after it, and the code in between (outermost regions only) writes ``-inf`` (a score
    masked out) and holds no tensor-core, memory or barrier instruction (:data:`_NOT_MASKING`).
    That is the masking a loop runs on its boundary tiles alone: interior tiles take the branch."""
    if not body:
        return []
    index = {a: i for i, (a, _, _) in enumerate(body)}
    out: list[tuple[int, int]] = []
    for i, (addr, op, rest) in enumerate(body):
        if not conditional_branch(op, rest) or (out and i <= out[-1][1]):
            continue
        m = _BRA_TARGET.search(rest)
        j = index.get(int(m.group(1), 16)) if m else None
        if j is None or j <= i + 1:
            continue
        region = body[i + 1:j]
        if any(o.startswith(_NOT_MASKING) for _, o, _ in region) or not any("-INF" in r for _, _, r in region):
            continue
        out.append((i + 1, j - 1))
    return out


def loops(instrs: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """Index ranges ``[first, last]`` of the loops (a backward branch closes each)."""
    index = {a: i for i, (a, _, _) in enumerate(instrs)}
    out = []
    for i, (addr, op, rest) in enumerate(instrs):
        if op.startswith("BRA"):
            m = _BRA_TARGET.search(rest)
            if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
                out.append((index[int(m.group(1), 16)], i))
    return out


_MMA_SHAPE = re.compile(r"[HQ]GMMA\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"HMMA\.(16)(8)(\d+)")
_DEPBAR = re.compile(r"gsb0\s*,\s*0x([0-9a-f]+)")


def mma_fma(op: str) -> tuple[int, str]:
    """Multiply-adds of one tensor-core instruction and its kind (per warpgroup for
    ``HGMMA`` (16-bit) and ``QGMMA`` (fp8) wgmma, per warp for ``HMMA``)."""
    m = _MMA_SHAPE.match(op)
    if m:
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)), ("wgmma_fp8" if op[0] == "Q" else "wgmma")
    m = _HMMA_SHAPE.match(op)
    if m:
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)), "mma_sync"
    return 0, ""


#: H100 SXM: dense bf16/fp16 tensor peak per SM and clock (989 TFLOP/s = 132 SMs x 1.83 GHz
#: x 2048 multiply-adds); fp8 wgmma (QGMMA) at twice that, mma.sync at half of it.
FMA_PER_CLK_WGMMA = 2048
FMA_PER_CLK_QGMMA = 4096
FMA_PER_CLK_MMA_SYNC = 1024
ISSUE_PER_CLK = 4  # one warp instruction per scheduler (4 per SM) per clock
MUFU_PER_CLK = 16  # MUFU results (ex2, rcp, ...) per clock per SM: a warp's MUFU takes 2 SM clocks
_WGMMA_OPS = ("HGMMA", "QGMMA")


def _count(instrs, pred) -> int:
    return sum(1 for _, op, rest in instrs if pred(op, rest))


def in_flight(body: list[tuple[int, str, str]]) -> tuple[int, int]:
    """(instructions, MUFU) of a loop body issued while a wgmma group of the same warpgroup
    is still in flight, in the steady state (the body is scanned twice, so a group
    committed at the end of an iteration and waited for in the next counts).

    A group is the run of ``HGMMA``/``QGMMA`` up to the one carrying ``gsb0`` (its commit);
    ``WARPGROUP.DEPBAR.LE gsb0, N`` waits until at most ``N`` groups are pending. Every
    other instruction counts as in flight while a group is pending or being formed;
    the ones after a full wait (``N = 0``) up to the next wgmma are *exposed*: the
    warpgroup runs them with its tensor work finished (serialised with it).
    """
    pending, forming, n, mufu = 0, False, 0, 0
    for copy in (0, 1):
        for _, op, rest in body:
            if op.startswith(_WGMMA_OPS):
                forming = "gsb0" not in rest
                if not forming:
                    pending += 1
                continue
            if op.startswith("WARPGROUP.DEPBAR"):
                m = _DEPBAR.search(rest)
                pending = min(pending, int(m.group(1), 16) if m else 0)
                continue
            if copy == 1 and (pending or forming):
                n += 1
                mufu += op.startswith("MUFU")
    return n, mufu


def loop_stats(body: list[tuple[int, str, str]], num_warps: int) -> dict:
    """Per iteration of a loop body: instructions, MUFU, tensor and issue cycles per CTA,
    and the instructions / MUFU issued while a wgmma is in flight (:func:`in_flight`); the
    same counts (``unmasked_*``) on the path of an iteration that takes the branches of
    :func:`skipped_regions` (the body without the masking code it jumps over)."""
    fma_wg = sum(mma_fma(op)[0] for _, op, _ in body if op.startswith("HGMMA"))
    fma_q = sum(mma_fma(op)[0] for _, op, _ in body if op.startswith("QGMMA"))
    fma_w = sum(mma_fma(op)[0] for _, op, _ in body if op.startswith("HMMA"))
    tensor = ((num_warps / 4) * (fma_wg / FMA_PER_CLK_WGMMA + fma_q / FMA_PER_CLK_QGMMA)
              + num_warps * fma_w / FMA_PER_CLK_MMA_SYNC)
    fl_instrs, fl_mufu = in_flight(body)
    regions = skipped_regions(body)
    skipped = {i for a, b in regions for i in range(a, b + 1)}
    path = [x for i, x in enumerate(body) if i not in skipped]  # an interior tile's path
    un_instrs, un_mufu = in_flight(path)
    return {
        "instrs": len(body),
        "mufu": _count(body, lambda op, _: op.startswith("MUFU")),
        "mma": _count(body, lambda op, _: op.startswith(("HGMMA", "QGMMA", "HMMA"))),
        "qgmma": _count(body, lambda op, _: op.startswith("QGMMA")),
        "spill_ops": _count(body, lambda op, _: op.startswith(("STL", "LDL"))),
        "bar_syncs": _count(body, lambda op, _: op.startswith("BAR.SYNC")),
        "inflight_instrs": fl_instrs,
        "inflight_mufu": fl_mufu,
        "tensor_cycles": tensor,
        "issue_cycles": len(body) * num_warps / ISSUE_PER_CLK,
        # the path that skips the regions of skipped_regions (an iteration that needs no mask)
        "unmasked_instrs": len(path),
        "unmasked_mufu": _count(path, lambda op, _: op.startswith("MUFU")),
        "unmasked_inflight_instrs": un_instrs,
        "unmasked_inflight_mufu": un_mufu,
        "skipped_regions": [[body[a][0], body[b][0]] for a, b in regions],  # addresses, first and last
    }


_MMA_LAYOUT = re.compile(r"#(mma\d*)\s*=\s*#ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[(\d+), (\d+)\]"
                         r".*?instrShape = \[(\d+), (\d+)")
_DOT_RESULT = re.compile(r"(?:warp_group_dot|tt\.dot)\b.*->\s*tensor<(\d+)x(\d+)x\w+, #(mma\d*)>")


def duplication(ttgir: str) -> int:
    """The largest factor by which warps of a CTA recompute the same dot tile.

    A dot of an ``M x N`` tile in an MMA layout with ``warpsPerCTA = [wm, wn]`` covers
    ``16*wm`` rows (each warp 16; a wgmma warpgroup 64) and ``wn * instrN`` columns;
    when that is more than the tile, the extra warps hold copies (what Triton does with
    a 64-row tile on 8 warps laid out [8, 1]: both warpgroups compute the same tile).
    """
    layouts = {m.group(1): (int(m.group(3)), int(m.group(4)), int(m.group(6)))
               for m in _MMA_LAYOUT.finditer(ttgir)}
    worst = 1
    for m in _DOT_RESULT.finditer(ttgir):
        rows, cols, name = int(m.group(1)), int(m.group(2)), m.group(3)
        if name not in layouts:
            continue
        wm, wn, inst_n = layouts[name]
        dup = max(1, 16 * wm // rows) * max(1, wn * inst_n // cols)
        worst = max(worst, dup)
    return worst


_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"REG:(\d+)")
_STACK = re.compile(r"STACK:(\d+)")


def analyse(c: Compiled) -> dict:
    """Everything the report prints about one compiled kernel (see the module docstring).

    The *main loop* is the innermost loop with the most tensor-core instructions (ties:
    the shortest, i.e. the unmasked steady-state loop of a kernel that splits masked and
    unmasked tiles); ``instrs_per_iter`` etc. are per iteration of it, per thread (the
    whole body). A loop that masks only its boundary tiles branches around the masking code
    (:func:`skipped_regions`): ``unmasked_*_per_iter`` count the path of the other tiles,
    ``masking_*_per_iter`` the code they skip.
    """
    instrs = parse_sass(c.sass)
    lps = loops(instrs)
    inner = [(a, b) for a, b in lps if not any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2 in lps)]
    stats = [(loop_stats(instrs[a:b + 1], c.num_warps), (a, b)) for a, b in inner]
    with_mma = [s for s in stats if s[0]["mma"] > 0]
    if with_mma:
        best = max(s[0]["mma"] for s in with_mma)
        main, main_range = min((s for s in with_mma if s[0]["mma"] == best), key=lambda s: s[0]["instrs"])
    elif stats:
        main, main_range = max(stats, key=lambda s: s[0]["instrs"])
    else:
        main, main_range = loop_stats([], c.num_warps), (0, -1)
    # the epilogue: everything after the last loop with tensor-core work (loops in it once)
    mma_ends = [b for a, b in lps if any(op.startswith(("HGMMA", "QGMMA", "HMMA")) for _, op, _ in instrs[a:b + 1])]
    tail_from = max(mma_ends, default=-1) + 1
    spill = _SPILL.search(c.ptxas_log)
    regs = _REGS.search(c.res_usage)
    stack = _STACK.search(c.res_usage)
    dup = duplication(c.ttgir)
    return {
        "target": c.target,
        "num_warps": c.num_warps,
        "num_stages": c.num_stages,
        "regs": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spill.group(1)) if spill else (int(stack.group(1)) if stack else 0),
        "stack_bytes": int(stack.group(1)) if stack else 0,
        "smem_bytes": c.shared,
        "wgmma": _count(instrs, lambda op, _: op.startswith(("HGMMA", "QGMMA"))),
        "qgmma": _count(instrs, lambda op, _: op.startswith("QGMMA")),
        "mma_sync": _count(instrs, lambda op, _: op.startswith("HMMA")),
        "tma_loads": _count(instrs, lambda op, _: op.startswith("UTMALDG")),
        "cp_async_loads": _count(instrs, lambda op, _: op.startswith("LDGSTS")),
        "global_loads": _count(instrs, lambda op, _: op.startswith("LDG")),
        "total_instrs": len(instrs),
        "loops": len(lps),
        "instrs_per_iter": main["instrs"],
        "mufu_per_iter": main["mufu"],
        "mma_per_iter": main["mma"],
        "spill_ops_in_main_loop": main["spill_ops"],
        "inflight_instrs_per_iter": main["inflight_instrs"],
        "inflight_mufu_per_iter": main["inflight_mufu"],
        "bar_syncs_per_iter": main["bar_syncs"],
        # the main loop's path that skips the code a conditional forward branch jumps over
        # (an unmasked tile's), and the skipped region(s): run by the masked tiles only
        "unmasked_instrs_per_iter": main["unmasked_instrs"],
        "unmasked_mufu_per_iter": main["unmasked_mufu"],
        "unmasked_inflight_instrs_per_iter": main["unmasked_inflight_instrs"],
        "unmasked_inflight_mufu_per_iter": main["unmasked_inflight_mufu"],
        "masking_instrs_per_iter": main["instrs"] - main["unmasked_instrs"],
        "masking_mufu_per_iter": main["mufu"] - main["unmasked_mufu"],
        "masking_inflight_instrs_per_iter": main["inflight_instrs"] - main["unmasked_inflight_instrs"],
        "masking_inflight_mufu_per_iter": main["inflight_mufu"] - main["unmasked_inflight_mufu"],
        "masking_regions": [f"{a:#x}-{b:#x}" for a, b in main["skipped_regions"]],
        "outside_main_loop_instrs": len(instrs) - main["instrs"],
        "tensor_cycles_per_iter": main["tensor_cycles"],
        "issue_cycles_per_iter": main["issue_cycles"],
        "duplicated": dup > 1,
        "duplication": dup,
        "tail_instrs": len(instrs) - tail_from,
        "other_loops": [dict(s, first=a, last=b, in_tail=a >= tail_from) for s, (a, b) in stats
                        if (a, b) != main_range],
    }
