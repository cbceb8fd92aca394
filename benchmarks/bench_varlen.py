"""Packed-sequence attention benchmark: ``dasg_kernels.swa_attention_varlen`` against padding
and FlexAttention with a document mask.

The workload (CUDA): sequence lengths drawn log-uniformly in ``[256, 32768]`` with a fixed
seed until 65536 tokens in all (the last one clipped), packed in flash-attn's ``cu_seqlens``
layout; ``Hq=32, Hkv=8, D=128``, bf16, causal window ``(2047, 0)`` with summaries of
``G=256``, and the same batch without summaries. Every sequence is its own problem
(positions, windows and groups restart at its first token).

===================  ======================================================================
``ours_varlen``      ``dasg_kernels.swa_attention_varlen`` on the packed batch
``ours_padded``      ``dasg_kernels.swa_attention`` on the batch padded to its longest
                     sequence (``[B, max_len, H, D]``, padded once before timing: the
                     pad/unpad copies are not timed). Its TFLOP/s count the useful pairs
                     only, so the padding shows as lost throughput; the records carry the
                     padded tokens and pairs.
``flex_document``    ``torch.nn.attention.flex_attention`` (compiled, ``enable_gqa``) on the
                     packed batch with a block mask combining the document mask, the window
                     and the summary keys: each sequence's whole-group means appended after
                     the packed keys (computed in the timed call), as
                     :mod:`benchmarks.bench_attention` does for one sequence. CUDA only.
``fla_varlen``       flash-linear-attention's ``parallel_attn`` with ``cu_seqlens`` on the
                     packed batch (``[1, total, H, D]``, ``window_size=W``); the batch
                     without summaries only (fla has none). CUDA only; skipped with the
                     reason when fla is not importable.
===================  ======================================================================

Modes ``fwd``, ``bwd``, ``fwd+bwd`` as in the attention family; useful FLOPs are the visible
(query, key) pairs of each sequence (:func:`benchmarks.common.attention_pairs` summed over
the sequences, about ``T * (W + T / 2G)`` each). Before timing, every method's output is
checked against ``dasg_kernels.reference.swa_attention_ref`` on sampled rows of every
sequence (first, middle and last tile); ``ours_varlen`` also on its lse, on every row
against the padded dense op, and on dq/dk/dv of a reduced batch (the dense op's gradients
are checked by the attention family). On the CPU: lengths log-uniform in [8, 40] up to 72
tokens (31, 27, 14: one interpreter tile each, so that the run takes seconds, not minutes)
in fp32 under Triton's interpreter, Hq=2 on Hkv=1, W=16, G=4.

Run alone: ``python -m benchmarks.bench_varlen [--quick]`` (same as
``python -m benchmarks --only varlen``).
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import common
from benchmarks.bench_attention import (FLA_CUDA_ONLY, FLA_NO_SUMMARIES, FLEX_BLOCK, FLEX_CUDA_ONLY, Method,
                                        append_slots, block_mask_from_intervals, choose_backend, compiled_flex,
                                        fla_parallel_attn, key_intervals, peer_ratios, probe_kernel, progress_line,
                                        reference_rows, sample_rows, take_rows, time_modes)
from benchmarks.common import Context, attention_flops, attention_pairs, compare

FAMILY = "varlen"
METHODS = ("ours_varlen", "ours_padded", "fla_varlen", "flex_document")
SEED = 0
GPU_LENGTHS = (256, 32768, 65536)   # log-uniform in [lo, hi] until this many tokens
GPU_GRAD_LENGTHS = (256, 4096, 12288)  # the gradient check's reduced batch (fp32 reference per sequence)
CPU_LENGTHS = (8, 40, 72)           # 3 sequences: 31, 27, 14 tokens (one interpreter block each)


def log_uniform_lengths(lo: int, hi: int, total: int, seed: int = SEED) -> tuple[int, ...]:
    """Lengths drawn log-uniformly in ``[lo, hi]`` (``random.Random(seed)``) until ``total``
    tokens; the last one is clipped to what is left."""
    rng = random.Random(seed)
    out: list[int] = []
    n = 0
    while n < total:
        length = min(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))), total - n)
        out.append(length)
        n += length
    return tuple(out)


@dataclass(frozen=True)
class VarlenCase:
    lengths: tuple[int, ...]
    w: int                 # keys per query incl. itself
    d: int
    summaries: bool
    hq: int
    hkv: int
    g: int                 # group size when summaries are on
    dtype: torch.dtype = torch.bfloat16

    @property
    def left(self) -> int:
        return self.w - 1

    @property
    def group_size(self) -> int | None:
        return self.g if self.summaries else None

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def starts(self) -> list[int]:
        out, n = [], 0
        for length in self.lengths:
            out.append(n)
            n += length
        return out

    @property
    def id(self) -> str:
        return common.case_id(B=self.batch, tokens=common.fmt_tokens(self.total), max=self.max_len, W=self.w,
                              D=self.d, summaries=int(self.summaries))

    def params(self) -> dict[str, Any]:
        return {"lengths": list(self.lengths), "B": self.batch, "tokens": self.total, "max_len": self.max_len,
                "padded_tokens": self.batch * self.max_len, "W": self.w, "D": self.d, "summaries": self.summaries,
                "G": self.group_size, "Hq": self.hq, "Hkv": self.hkv, "dtype": str(self.dtype).replace("torch.", ""),
                "window": [self.left, 0]}

    def seq_pairs(self, t: int) -> int:
        return attention_pairs(t, self.left, group_size=self.group_size, summaries=self.summaries)

    def pairs(self) -> int:
        """Useful (query, key) pairs of one head: each sequence's own."""
        return sum(self.seq_pairs(t) for t in self.lengths)

    def padded_pairs(self) -> int:
        """The pairs the padded batch computes: ``B`` sequences of ``max_len``."""
        return self.batch * self.seq_pairs(self.max_len)

    def cu_seqlens(self, device) -> torch.Tensor:
        return torch.tensor([0, *(s + t for s, t in zip(self.starts, self.lengths))], dtype=torch.int32,
                            device=device)

    def reduced(self, lengths: tuple[int, ...], hq: int, hkv: int) -> VarlenCase:
        return VarlenCase(lengths, self.w, self.d, self.summaries, hq, hkv, self.g, self.dtype)


def cases(quick: bool, device: torch.device) -> list[VarlenCase]:
    """The issue's packed batch on CUDA (with summaries first; ``--quick``: only that one);
    three tiny sequences in fp32 on the CPU (bf16 is wrong in the interpreter)."""
    if device.type == "cuda":
        lens = log_uniform_lengths(*GPU_LENGTHS)
        out = [VarlenCase(lens, 2048, 128, True, 32, 8, 256)]
        if not quick:
            out.append(VarlenCase(lens, 2048, 128, False, 32, 8, 256))
    else:
        lens = log_uniform_lengths(*CPU_LENGTHS)
        out = [VarlenCase(lens, 16, 32, True, 2, 1, 4, torch.float32)]
        if not quick:
            out.append(VarlenCase(lens, 16, 32, False, 2, 1, 4, torch.float32))
    return out


def grad_check_case(c: VarlenCase, device) -> VarlenCase:
    """The gradient check's batch: the case itself on the CPU; on CUDA sequences of at most
    4096 tokens (12288 in all) and 4 query heads on 1 kv head (the fp32 reference
    materialises each sequence's ``T x T`` scores)."""
    if device.type != "cuda":
        return c
    return c.reduced(log_uniform_lengths(*GPU_GRAD_LENGTHS), 4, 1)


def kernel_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``swa_attention_varlen(..., backend="triton")`` runs here (tiny probe)."""
    import dasg_kernels as dk

    on_cuda = device.type == "cuda"
    q = torch.randn(20, 4, 128 if on_cuda else 32, device=device, dtype=torch.bfloat16 if on_cuda else torch.float32)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    return probe_kernel(lambda: dk.swa_attention_varlen(q, q, q, cu, cu, 13, 13, window=(3, 0), backend="triton"))


# ----------------------------------------------------------------------------- layouts


def pad_index(c: VarlenCase, device) -> torch.Tensor:
    """Row of each packed token in the padded batch flattened to ``[B * max_len]``."""
    return torch.cat([torch.arange(t, device=device) + b * c.max_len for b, t in enumerate(c.lengths)])


def to_padded(x: torch.Tensor, c: VarlenCase, idx: torch.Tensor) -> torch.Tensor:
    """``[total, H, D] -> [B, max_len, H, D]``, zeros after each sequence (differentiable)."""
    out = x.new_zeros(c.batch * c.max_len, *x.shape[1:]).index_copy(0, idx, x)
    return out.unflatten(0, (c.batch, c.max_len))


def from_padded(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return y.flatten(0, 1)[idx]


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    """Packed ``[total, H, D]`` -> ``[1, H, total, D]`` leaf (flex's layout)."""
    return x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(x.requires_grad)


def summary_slots(c: VarlenCase) -> int:
    """Summary keys appended for flex: the sequences' whole groups, padded to the flex block."""
    n = sum(t // c.g for t in c.lengths) if c.summaries else 0
    return -(-n // FLEX_BLOCK) * FLEX_BLOCK


def group_index(c: VarlenCase, device) -> torch.Tensor:
    """``[n_groups, G]`` packed rows of each whole group, sequences in order (slot order)."""
    rows = [s + j * c.g for s, t in zip(c.starts, c.lengths) for j in range(t // c.g)]
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 1) + torch.arange(c.g, device=device)


def document_mask_mod(c: VarlenCase, device):
    """Flex ``mask_mod`` of the packed batch: a key of the query's document inside its window
    (the document-id idiom of FlexAttention's docs), or a summary slot of the query's
    document whose group lies wholly before its window (the slot's query interval from
    :func:`~benchmarks.bench_attention.key_intervals`)."""
    doc = torch.repeat_interleave(torch.arange(c.batch, device=device), torch.tensor(c.lengths, device=device))
    total, left = c.total, c.left
    a, b = key_intervals(c.lengths, left, c.group_size, summary_slots(c), device)
    tk = a.shape[0]

    def mask_mod(b_, h, q_idx, kv_idx):
        qd = doc[torch.clamp(q_idx, max=total - 1)]
        local = (kv_idx < total) & (doc[torch.clamp(kv_idx, max=total - 1)] == qd) & (kv_idx <= q_idx) \
            & (kv_idx >= q_idx - left)
        if tk == total:
            return local
        kc = torch.clamp(kv_idx, max=tk - 1)
        return local | ((kv_idx >= total) & (q_idx >= a[kc]) & (q_idx < b[kc]))

    return mask_mod


def document_block_mask(c: VarlenCase, device, block: int = FLEX_BLOCK):
    slots = summary_slots(c)
    a, b = key_intervals(c.lengths, c.left, c.group_size, slots, device)
    return block_mask_from_intervals(a, b, c.total, document_mask_mod(c, device), block)


def flex_document_fn(c: VarlenCase, device, compiled: bool = True):
    """``fn(q, k, v) -> out`` on ``[1, H, total, D]``: FlexAttention with the document block
    mask, the summary keys pooled from ``k, v`` in the call."""
    from torch.nn.attention.flex_attention import flex_attention

    bm = document_block_mask(c, device)
    slots = summary_slots(c)
    gidx = group_index(c, device) if slots else None
    flex = compiled_flex() if compiled else flex_attention

    def run_flex(q, k, v):
        if slots:
            k, v = append_slots(k, v, lambda x: x[:, :, gidx].mean(3), slots)
        return flex(q, k, v, block_mask=bm, enable_gqa=c.hq != c.hkv)

    return run_flex


# ----------------------------------------------------------------------------- methods


def build_method(name: str, c: VarlenCase, q, k, v, device, backend: str) -> Method | str:
    """The method ``name`` for ``c`` on packed leaves ``q, k, v``, or why it does not run here.
    ``Method.to_bthd`` maps its output to the packed ``[total, Hq, D]`` layout."""
    import dasg_kernels as dk

    kw = dict(window=(c.left, 0), causal=True, group_size=c.group_size, summaries=c.summaries, backend=backend)
    stand_in = backend != "triton"
    note = "kernel not available: torch reference stand-in, no speed-up" if stand_in else ""
    if name == "ours_varlen":
        return Method(name, packed_op(name, c, device, backend), [q, k, v], lambda o: o, note, stand_in=stand_in)
    if name == "ours_padded":
        idx = pad_index(c, device)
        leaves = [to_padded(x.detach(), c, idx).requires_grad_() for x in (q, k, v)]

        def padded(q, k, v):
            return dk.swa_attention(q, k, v, **kw)
        waste = f"B={c.batch} x {c.max_len}: {1 - c.total / (c.batch * c.max_len):.0%} of the tokens are padding, " \
                f"{c.padded_pairs() / c.pairs():.2f}x the useful pairs; padded once, pad/unpad not timed"
        return Method(name, padded, leaves, lambda o: from_padded(o, idx), "; ".join(x for x in (waste, note) if x),
                      stand_in=stand_in)
    if name == "flex_document":
        if device.type != "cuda":
            return FLEX_CUDA_ONLY
        fn = flex_document_fn(c, device)
        return Method(name, fn, [_bhtd(x) for x in (q, k, v)], lambda o: o[0].transpose(0, 1),
                      "torch.compile(flex_attention), document + window block mask"
                      + (", summary keys of whole groups" if c.summaries else ""))
    if name == "fla_varlen":
        if device.type != "cuda":
            return FLA_CUDA_ONLY
        if c.summaries:
            return FLA_NO_SUMMARIES
        fla, why = fla_parallel_attn()
        if fla is None:
            return why
        cu = c.cu_seqlens(q.device).long()

        def run_fla(q, k, v):
            return fla(q[None], k[None], v[None], scale=c.d ** -0.5, window_size=c.w, cu_seqlens=cu)[0]
        return Method(name, run_fla, [q, k, v], lambda o: o,
                      f"{why} parallel_attn(cu_seqlens), window_size={c.w} (fla prepares its chunk indices "
                      "from cu_seqlens in each call, as its users do)")
    raise ValueError(name)


def grad_out(m: Method, c: VarlenCase, do: torch.Tensor) -> torch.Tensor:
    """The packed output gradient ``do`` in ``m``'s layout."""
    if m.name == "ours_padded":
        return to_padded(do, c, pad_index(c, do.device))
    if m.name == "flex_document":
        return _bhtd(do.detach())
    return do


# ----------------------------------------------------------------------------- checks


@dataclass
class RefRows:
    rows: list[tuple[int, int]]   # packed row ranges
    out: torch.Tensor             # [n, Hq, D] fp32 reference
    lse: torch.Tensor             # [Hq, n]
    low: torch.Tensor             # the same reference in the case dtype
    padded: torch.Tensor | None = None  # ours_padded's output in packed rows, once computed


def reference_rows_packed(q, k, v, c: VarlenCase) -> RefRows:
    """The reference on sampled rows (first, middle, last tile) of every sequence."""
    rows, outs, lses, lows = [], [], [], []
    with torch.no_grad():
        for s, t in zip(c.starts, c.lengths):
            r = sample_rows(t)
            qs, ks, vs = (x[None, s:s + t] for x in (q, k, v))
            o, lse = reference_rows(qs, ks, vs, c, r)
            lo, _ = reference_rows(qs, ks, vs, c, r, upcast=False)
            rows += [(s + a, s + b) for a, b in r]
            outs.append(o[0])
            lses.append(lse[0])
            lows.append(lo[0])
    return RefRows(rows, torch.cat(outs, 0), torch.cat(lses, 1), torch.cat(lows, 0))


def reference_packed(q, k, v, c: VarlenCase, upcast: bool = True) -> torch.Tensor:
    """The reference output of every row (differentiable), each sequence on its own."""
    from dasg_kernels.reference import swa_attention_ref

    return torch.cat([swa_attention_ref(q[None, s:s + t], k[None, s:s + t], v[None, s:s + t], window=(c.left, 0),
                                        causal=True, group_size=c.group_size, summaries=c.summaries,
                                        upcast=upcast)[0][0] for s, t in zip(c.starts, c.lengths)], 0)


def check_grads(ctx: Context, c: VarlenCase, name: str, backend: str, device) -> bool:
    """dq/dk/dv of method ``name`` on the reduced batch against the per-sequence reference."""
    g = grad_check_case(c, device)
    gen = torch.Generator(device=device).manual_seed(1)
    qs = torch.randn(g.total, g.hq, g.d, device=device, dtype=g.dtype, generator=gen)
    ks, vs = (torch.randn(g.total, g.hkv, g.d, device=device, dtype=g.dtype, generator=gen) for _ in range(2))
    do = torch.randn(g.total, g.hq, g.d, device=device, dtype=g.dtype, generator=gen)

    def grads(fn):
        leaves = [x.detach().clone().requires_grad_() for x in (qs, ks, vs)]
        fn(*leaves).backward(do)
        return [x.grad for x in leaves]

    got = grads(lambda a, b, cc: packed_op(name, g, device, backend)(a, b, cc))
    ref = grads(lambda a, b, cc: reference_packed(a, b, cc, g))
    low = grads(lambda a, b, cc: reference_packed(a, b, cc, g, upcast=False))
    gid = common.case_id(B=g.batch, tokens=g.total, max=g.max_len, W=g.w, D=g.d, summaries=int(g.summaries),
                         Hq=g.hq, Hkv=g.hkv)
    ok = True
    for what, a, r, lo in zip(("dq", "dk", "dv"), got, ref, low):
        ok &= ctx.add_check(gid, _op(name), compare(what, a, r, lo, dtype=c.dtype, factor=3.0),
                            kernel=backend)["passed"]
    return ok


def packed_op(name: str, c: VarlenCase, device, backend: str, **extra):
    """Our method ``name`` as ``fn(q, k, v)`` on packed ``[total, H, D]`` tensors, output in
    packed rows (differentiable): the varlen op, or pad -> dense op -> unpad."""
    import dasg_kernels as dk

    kw = dict(window=(c.left, 0), causal=True, group_size=c.group_size, summaries=c.summaries, backend=backend)
    if name == "ours_varlen":
        cu = c.cu_seqlens(device)  # built here: no host check per timed call (flash-attn checks none either)
        return lambda q, k, v: dk.swa_attention_varlen(q, k, v, cu, cu, c.max_len, c.max_len, validate=False, **kw,
                                                       **extra)
    idx = pad_index(c, device)
    return lambda q, k, v: from_padded(dk.swa_attention(*(to_padded(x, c, idx) for x in (q, k, v)), **kw), idx)


def _op(name: str) -> str:
    return {"ours_varlen": "swa_attention_varlen", "ours_padded": "swa_attention (padded)"}.get(name, name)


def check_method(ctx: Context, c: VarlenCase, m: Method, q, k, v, ref: RefRows, backend: str,
                 checked: set) -> bool:
    """Check ``m`` before it is timed; returns whether every check passed. Ours: the forward
    on sampled rows; the varlen op also its lse, every row against the padded dense op, and
    dq/dk/dv on a reduced batch once per configuration (the dense op's gradients are the
    attention family's checks). Flex: the forward, as a baseline."""
    dev = q.device
    if not m.name.startswith("ours"):  # a baseline; with grad enabled, as when timed (compiled flex
        out = m.to_bthd(m.fn(*m.inputs)).detach()  # would recompile for no_grad)
        res = compare(f"{m.name} out (sampled rows)", take_rows(out, ref.rows, 0), ref.out, ref.low,
                      dtype=c.dtype, factor=3.0)
        ctx.checks.append({"family": FAMILY, "case_id": c.id, "op": m.name, **res, "baseline": True})
        return res["passed"]
    op, extra = _op(m.name), {"kernel": backend}
    ok = True
    try:
        with torch.no_grad():
            if ref.padded is None:  # the padded dense op: checked itself, and the varlen op against it
                ref.padded = packed_op("ours_padded", c, dev, backend)(q, k, v)
            if m.name == "ours_varlen":
                out, lse = packed_op(m.name, c, dev, backend, return_lse=True)(q, k, v)
            else:
                out, lse = ref.padded, None
            ok &= ctx.add_check(c.id, op, compare("out (sampled rows)", take_rows(out, ref.rows, 0), ref.out,
                                                  ref.low, dtype=c.dtype), **extra)["passed"]
            if lse is not None:
                ok &= ctx.add_check(c.id, op, compare("lse (sampled rows)", take_rows(lse, ref.rows, 1), ref.lse,
                                                      None, dtype=torch.float32), **extra)["passed"]
                ok &= ctx.add_check(c.id, op, compare("out == padded swa_attention (every row)", out, ref.padded,
                                                      None, dtype=c.dtype), **extra)["passed"]
            del out, lse
        key = (m.name, c.summaries)
        if m.name == "ours_varlen" and key not in checked:
            checked.add(key)
            ok &= check_grads(ctx, c, m.name, backend, dev)
    except Exception as exc:
        if common.is_oom(exc):
            ctx.log(f"varlen check {c.id} {m.name}: out of memory in the reference, check skipped")
        else:
            ctx.add_check(c.id, op, {"check": "runs", "passed": False, "max_err": None, "tol": None,
                                     "note": f"raised {type(exc).__name__}: {str(exc)[:200]}"}, **extra)
            ok = False
    common.cleanup(dev)
    return ok


# ----------------------------------------------------------------------------- run


def _inputs(c: VarlenCase, device):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(c.total, c.hq, c.d, device=device, dtype=c.dtype, generator=gen).requires_grad_()
    k, v = (torch.randn(c.total, c.hkv, c.d, device=device, dtype=c.dtype, generator=gen).requires_grad_()
            for _ in range(2))
    do = torch.randn(c.total, c.hq, c.d, device=device, dtype=c.dtype, generator=gen)
    return q, k, v, do


def time_method(ctx: Context, c: VarlenCase, m: Method, do: torch.Tensor) -> None:
    pairs = c.pairs()
    base = {"case_id": c.id, "case": c.params(), "method": m.name, "note": m.note, "stand_in": m.stand_in,
            "pairs": pairs}
    if m.name == "ours_padded":
        base.update(padded_pairs=c.padded_pairs(), padded_tokens=c.batch * c.max_len)
    flops = {mode: attention_flops(pairs, 1, c.hq, c.d, mode) for mode in common.MODES_ATTN}
    time_modes(ctx, base, m, grad_out(m, c, do), flops)
    if m.name == "fla_varlen":
        peer_ratios(ctx, FAMILY, c.id, m.name, ours="ours_varlen")
    ctx.log(progress_line(ctx, FAMILY, c.id, m.name))


def run(ctx: Context) -> None:
    """Run the varlen family into ``ctx`` (records + correctness checks)."""
    dev = ctx.device
    all_cases = sorted(cases(ctx.settings.quick, dev), key=lambda c: not c.summaries)
    available, why = kernel_available(dev)
    backend = choose_backend(ctx, FAMILY, available, why)
    # pass 1: our two ways and fla; pass 2: flex (its torch.compile is the slowest part of a fresh run)
    passes = [("ours_varlen", "ours_padded", "fla_varlen"), ("flex_document",)]
    checked: set = set()
    refs: dict[str, RefRows] = {}
    for methods in passes:
        for c in all_cases:
            skip = ("skipped", ctx.budget_reason()) if ctx.out_of_time() else None
            if skip is None:
                try:
                    q, k, v, do = _inputs(c, dev)
                    if c.id not in refs:
                        refs[c.id] = reference_rows_packed(q, k, v, c)
                except Exception as exc:
                    skip = ("skipped" if common.is_oom(exc) else "error",
                            f"inputs or reference: {type(exc).__name__}: {str(exc)[:200]}")
                    common.cleanup(dev)
            if skip is not None:
                for name in methods:
                    ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*", status=skip[0],
                                   reason=skip[1])
                    ctx.step(f"{c.id} {name}")
                continue
            for name in methods:
                ctx.step(f"{c.id} {name}")
                rec = dict(case_id=c.id, case=c.params(), method=name, mode="*")
                if name.startswith("ours") and backend is None:
                    ctx.add_record(**rec, status="unavailable", reason=why)
                    continue
                try:
                    m = build_method(name, c, q, k, v, dev, backend or "torch")
                    if isinstance(m, str):
                        if m != FLA_NO_SUMMARIES:
                            ctx.add_record(**rec, status="skipped", reason=m)
                        continue
                    good = check_method(ctx, c, m, q, k, v, refs[c.id], backend or "torch", checked)
                except Exception as exc:
                    st = "skipped" if common.is_oom(exc) else "error"
                    ctx.add_record(**rec, status=st, reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                    common.cleanup(dev)
                    continue
                if not good:
                    ctx.add_record(**rec, status="error", reason=(
                        "baseline disagrees with the reference: not timed" if name == "flex_document"
                        else "wrong output (see the correctness table): not timed"))
                    continue
                time_method(ctx, c, m, do)
                del m
                common.cleanup(dev)
            refs[c.id].padded = None  # only our two methods need it
            del q, k, v, do
            common.cleanup(dev)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.runner import main as runner_main

    return runner_main(["--only", FAMILY, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
