"""Attention benchmark: ``dasg_kernels.swa_attention`` against the PyTorch ways to do it.

Methods (all compute causal sliding-window attention with ``window=(W-1, 0)``, i.e.
``W`` keys per query including itself, plus one summary key per group of ``G = W``
tokens lying wholly before the window when ``summaries`` is on):

==================  =========================================================================
``ours``            ``dasg_kernels.swa_attention`` (the Triton kernels)
``sdpa_dense_mask`` ``F.scaled_dot_product_attention`` with a dense boolean ``[T, T(+S)]``
                    mask (memory-efficient backend; summary keys pooled with torch ops and
                    concatenated). Skipped, with the reason, where one call would take too
                    long or the mask would not fit.
``flex``            ``torch.nn.attention.flex_attention`` (compiled) with a block mask built
                    from the window (same concatenated summary keys). CUDA only.
``fla``             flash-linear-attention's ``parallel_attn`` (package ``fla-core``, pure
                    Triton; ``window_size=W`` is our ``window=(W-1, 0)``, checked by
                    ``tests/benchmarks/test_fla_peer.py``): the cases without summaries (fla has none).
                    CUDA only; skipped with the reason when fla is not importable.
``sdpa_flash``      SDPA's flash backend on *full* causal attention (``window=(-1,-1)``):
                    measured on the full-causal cases; the windowed cases are compared with
                    it as "what full attention costs at this T".
==================  =========================================================================

Modes: ``fwd`` (inputs require grad, as in training), ``bwd`` (backward of a retained
graph), ``fwd+bwd``. Useful TFLOP/s count only the visible (query, key) pairs
(:func:`benchmarks.common.attention_pairs`). Every method is checked against
``dasg_kernels.reference.swa_attention_ref`` before it is timed: the forward on rows
sampled from the benchmark shape (first, middle and last query tiles), and for our
kernel also lse and dq/dk/dv on a reduced shape of the same configuration.

Run alone: ``python -m benchmarks.bench_attention [--quick]`` (same as
``python -m benchmarks --only attention``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import Context, attention_flops, attention_pairs, compare

FAMILY = "attention"
METHODS = ("ours", "flex", "fla", "sdpa_dense_mask", "sdpa_flash")
GPU_T = (4096, 16384, 65536)
GPU_W = (256, 1024, 4096)
GPU_D = (64, 128)
HIDDEN = 2048          # heads = HIDDEN // D, so both head dims do the same FLOPs per pair
FLEX_BLOCK = 128
DENSE_ASSUMED_TFLOPS = 150.0   # to predict how long one dense-mask SDPA call takes
FLEX_CUDA_ONLY = ("FlexAttention is benchmarked compiled (torch.compile) on CUDA only; on the CPU it "
                  "would need a C++ toolchain and its compile time would dominate")
FLA_CUDA_ONLY = ("flash-linear-attention's parallel_attn is timed on CUDA only (on the CPU its Triton kernel runs "
                 "in the interpreter; tests/benchmarks/test_fla_peer.py checks its semantics there)")
FLA_NO_SUMMARIES = "flash-linear-attention's parallel_attn has no summary keys (timed on the cases without them)"


@dataclass(frozen=True)
class AttnCase:
    t: int
    w: int                 # keys per query incl. itself; -1 = full causal
    d: int
    summaries: bool
    heads: int
    batch: int = 1
    dtype: torch.dtype = torch.bfloat16

    @property
    def left(self) -> int:
        return self.w - 1 if self.w > 0 else -1

    @property
    def group_size(self) -> int | None:
        return self.w if self.summaries else None

    @property
    def id(self) -> str:
        return common.case_id(T=self.t, W=self.w, D=self.d, summaries=int(self.summaries))

    def params(self) -> dict[str, Any]:
        return {"T": self.t, "W": self.w, "D": self.d, "summaries": self.summaries, "G": self.group_size,
                "B": self.batch, "Hq": self.heads, "Hkv": self.heads, "dtype": str(self.dtype).replace("torch.", ""),
                "window": [self.left, 0]}

    def pairs(self) -> int:
        return attention_pairs(self.t, self.left, group_size=self.group_size, summaries=self.summaries)


def cases(quick: bool, device: torch.device) -> list[AttnCase]:
    """The case matrix: the full matrix on CUDA; tiny shapes on the CPU."""
    out: list[AttnCase] = []
    if device.type == "cuda":
        ts, ws, ds = (GPU_T, GPU_W, GPU_D) if not quick else ((4096, 16384), (1024,), (128,))
        for d in ds:
            for t in ts:
                out.append(AttnCase(t, -1, d, False, HIDDEN // d))
                for w in ws:
                    for s in (False, True):
                        out.append(AttnCase(t, w, d, s, HIDDEN // d))
    else:  # Triton's interpreter: tiny shapes, fp32 (bf16 is wrong in the interpreter)
        ts = (64,) if quick else (64, 128)
        for t in ts:
            out.append(AttnCase(t, -1, 32, False, 2, dtype=torch.float32))
            out.append(AttnCase(t, 16, 32, True, 2, dtype=torch.float32))
            if not quick:
                out.append(AttnCase(t, 16, 32, False, 2, dtype=torch.float32))
    return out


def priority(c: AttnCase) -> tuple:
    """Run what the issue's targets need first (D=128, T >= 16k, full causal), so that a
    run cut short by its time budget still decides the targets."""
    first = c.d == 128 and (c.t >= 16384 or c.w == -1)
    return (0 if first else 1, -c.d, c.t, c.summaries, c.w)


# ----------------------------------------------------------------------------- methods


def probe_kernel(call: Callable[[], Any]) -> tuple[bool, str]:
    """Whether ``call`` (one tiny ``backend="triton"`` call) runs here, and why not."""
    try:
        call()
    except NotImplementedError as exc:
        return False, f"the Triton attention kernel is not built yet ({exc})"
    except ValueError as exc:
        if "cannot run" in str(exc):
            return False, str(exc)
    except Exception:
        pass  # a kernel that crashes is "available" and fails its correctness check loudly
    return True, ""


def kernel_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``swa_attention(..., backend="triton")`` runs here (probe on a tiny input)."""
    import dasg_kernels as dk

    on_cuda = device.type == "cuda"
    dt = torch.bfloat16 if on_cuda else torch.float32
    q = torch.randn(1, 16, 1, 128 if on_cuda else 32, device=device, dtype=dt)  # D=128: a kernel the run needs
    return probe_kernel(lambda: dk.swa_attention(q, q, q, window=(255 if on_cuda else 3, 0), backend="triton"))


def choose_backend(ctx: Context, family: str, available: bool, why: str) -> str | None:
    """``"triton"`` where the kernel runs; on the CPU the torch reference stands in; elsewhere
    ``None`` (ours is not timed). Logged and recorded in the family's entry."""
    if available:
        backend = "triton"
    elif ctx.device.type == "cpu":
        backend = "torch"
        ctx.log(f"{family}: {why}; timing the torch reference as a stand-in (no speed-ups reported)")
    else:
        backend = None
        ctx.log(f"{family}: {why}; our kernel is not timed on this device")
    ctx.families[family].update(kernel_available=available, kernel_backend=backend, kernel_reason=why)
    return backend


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    return x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)


def summary_slots(t: int, g: int) -> int:
    """Summary keys appended for the baselines: ``ceil(T/G)`` padded to a multiple of the
    flex block, and the same for every ``G >= 256`` of one ``T`` (one compiled flex kernel)."""
    ng = -(-t // g)
    return -(-max(ng, -(-t // 256)) // FLEX_BLOCK) * FLEX_BLOCK


def append_slots(k: torch.Tensor, v: torch.Tensor, pool: Callable, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B,H,T,D]`` keys/values followed by ``pool(x) [B,H,S,D]``, zero-padded to ``slots`` keys."""
    def one(x):
        s = pool(x)
        return torch.cat([x, F.pad(s, (0, 0, 0, slots - s.shape[2]))], dim=2)

    return one(k), one(v)


def _with_summaries(k: torch.Tensor, v: torch.Tensor, g: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B,H,T,D]`` keys/values followed by their group means, zero-padded to ``slots``."""
    from dasg_kernels.reference import group_means_ref

    def pool(x):
        t = x.shape[2]
        if t % g == 0:  # the benchmark shapes: a mean in the input dtype, no fp32 copy of x
            return x.unflatten(2, (t // g, g)).mean(3)
        return group_means_ref(x.transpose(1, 2), g).transpose(1, 2)

    return append_slots(k, v, pool, slots)


def dense_mask(c: AttnCase, tk: int, device) -> torch.Tensor:
    """Bool ``[T, Tk]``: local window keys, then the (padded) summary slots."""
    from dasg_kernels.reference import local_mask, summary_mask

    m = local_mask(c.t, c.t, (c.left, 0), True, 0, device)
    if tk > c.t:
        s = summary_mask(c.t, c.t, (c.left, 0), True, c.group_size, 0, device)
        m = torch.cat([m, s, torch.zeros(c.t, tk - c.t - s.shape[1], dtype=torch.bool, device=device)], dim=1)
    return m


def flex_mask_mod(t: int, left: int, g: int, ng: int, device):
    """The mask of :func:`dense_mask` as a flex ``mask_mod``. The sizes are captured as
    tensors, not ints, so one compiled kernel serves every window of a sequence length."""
    t_ = torch.tensor(t, device=device)
    l_ = torch.tensor(left if left >= 0 else t, device=device)
    g_ = torch.tensor(max(g, 1), device=device)
    n_ = torch.tensor(ng, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        local = (kv_idx < t_) & (kv_idx <= q_idx) & (kv_idx >= q_idx - l_)
        s = kv_idx - t_
        summ = (kv_idx >= t_) & (s < n_) & ((s + 1) * g_ - 1 < q_idx - l_)
        return local | summ

    return mask_mod


def key_intervals(lengths, left: int, group_size: int | None, n_slots: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of sequences packed one after another (each its own causal window
    ``(left, 0)``), followed by ``n_slots`` summary keys, as one query interval per key:
    key ``k`` is seen by exactly the queries ``[a[k], b[k])``. Slot ``i`` holds the ``i``-th
    whole group of the sequences in order (a partial group is seen by no query, so it gets
    no slot); the slots past them are padding, seen by none."""
    lens = torch.tensor(list(lengths), dtype=torch.int64, device=device)
    ends = torch.cumsum(lens, 0)
    starts = ends - lens
    total = int(lens.sum())
    seq = torch.arange(lens.numel(), device=device)
    kv = torch.arange(total, device=device)
    lft = left if left >= 0 else total
    a, b = [kv], [torch.minimum(kv + lft + 1, ends[torch.repeat_interleave(seq, lens)])]
    n_real = 0
    if group_size and left >= 0:
        ng = lens // group_size
        sseq = torch.repeat_interleave(seq, ng)
        j = torch.arange(sseq.numel(), device=device) - (torch.cumsum(ng, 0) - ng)[sseq]
        a.append(starts[sseq] + (j + 1) * group_size + left)  # (j+1)*G - 1 < pos - left
        b.append(ends[sseq])
        n_real = sseq.numel()
    if n_slots < n_real:
        raise ValueError(f"key_intervals: {n_real} whole groups need {n_real} slots, got {n_slots}")
    a.append(torch.full((n_slots - n_real,), total, dtype=torch.int64, device=device))
    b.append(torch.zeros(n_slots - n_real, dtype=torch.int64, device=device))
    return torch.cat(a), torch.cat(b)


def block_mask_from_intervals(a: torch.Tensor, b: torch.Tensor, tq: int, mask_mod: Callable,
                              block: int = FLEX_BLOCK):
    """A flex ``BlockMask`` for a mask in which key ``k`` is seen by the queries ``[a[k], b[k])``
    (:func:`key_intervals`), in closed form (``create_block_mask`` would evaluate ``mask_mod``
    on all ``Tq * Tk`` pairs: gigabytes at 64k). Blocks are full (no mask_mod needed) or
    partial, as FlexAttention wants; a block reaching past ``Tq`` or ``Tk`` is never full
    (as in ``create_block_mask``)."""
    from torch.nn.attention.flex_attention import BlockMask

    tk = a.shape[0]
    nq, nk = -(-tq // block), -(-tk // block)
    q0 = torch.arange(nq, device=a.device)[:, None] * block
    q1 = q0 + block - 1
    pad = nk * block - tk
    a_, b_ = F.pad(a, (0, pad), value=tq)[None], F.pad(b, (0, pad), value=0)[None]
    seen = (a_ <= q1) & (b_ > q0) & (a_ < b_)   # by some query of the block
    whole = (a_ <= q0) & (b_ > q1)              # by every query of the block
    any_ = seen.view(nq, nk, block).any(-1)
    full = whole.view(nq, nk, block).all(-1) & any_
    partial = any_ & ~full

    def pack(m):
        num = m.sum(-1).to(torch.int32)[None, None]
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
        return num, idx

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(tq, tk))


def sliding_block_mask(t: int, tk: int, left: int, g: int, ng: int, device, block: int = FLEX_BLOCK):
    """A flex ``BlockMask`` for :func:`flex_mask_mod` (one sequence of ``t`` tokens and
    ``tk - t`` summary slots), from :func:`key_intervals`."""
    a, b = key_intervals([t], left, g if ng else None, tk - t, device)
    return block_mask_from_intervals(a, b, t, flex_mask_mod(t, left, g, ng, device), block)


_FLEX_COMPILED = None


def compiled_flex():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(64, getattr(cfg, name)))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


class Method:
    """One way to compute the case: ``fn(*inputs) -> out`` in the layout of ``inputs``
    (``[B, T, H, D]`` when ``bthd``, else ``[B, H, T, D]``)."""

    def __init__(self, name: str, fn: Callable, inputs: list[torch.Tensor], to_bthd: Callable, note: str = "",
                 same_semantics: bool = True, stand_in: bool = False, bthd: bool = False):
        self.name, self.fn, self.inputs, self.to_bthd, self.note = name, fn, inputs, to_bthd, note
        self.same_semantics, self.stand_in, self.bthd = same_semantics, stand_in, bthd


def fla_parallel_attn() -> tuple[Callable | None, str]:
    """flash-linear-attention's ``parallel_attn`` and its version, or None and why not."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            from fla.ops.attn.parallel import parallel_attn
        from importlib.metadata import version

        return parallel_attn, f"fla-core {version('fla-core')}"
    except Exception as exc:
        return None, (f"flash-linear-attention is not importable ({type(exc).__name__}: {str(exc)[:120]}); "
                      "pip install -e '.[bench]'")


def build_method(name: str, c: AttnCase, q, k, v, device, backend: str) -> Method | str:
    """The method ``name`` for case ``c``, or the reason it does not run here."""
    import dasg_kernels as dk

    on_cuda = device.type == "cuda"
    if name == "ours":
        def ours(q, k, v):
            return dk.swa_attention(q, k, v, window=(c.left, 0), causal=True, group_size=c.group_size,
                                    summaries=c.summaries, backend=backend)
        note = "" if backend == "triton" else "kernel not available: torch reference stand-in, no speed-up"
        return Method("ours", ours, [q, k, v], lambda o: o, note, stand_in=backend != "triton", bthd=True)

    if name == "fla":
        if not on_cuda:
            return FLA_CUDA_ONLY
        if c.summaries:
            return FLA_NO_SUMMARIES
        fla, why = fla_parallel_attn()
        if fla is None:
            return why

        def run_fla(q, k, v):
            return fla(q, k, v, scale=c.d ** -0.5, window_size=c.w if c.w > 0 else None)
        return Method(name, run_fla, [q, k, v], lambda o: o,
                      f"{why} parallel_attn, window_size={c.w if c.w > 0 else None}", bthd=True)

    qh, kh, vh = _bhtd(q), _bhtd(k), _bhtd(v)
    to_bthd = lambda o: o.transpose(1, 2)  # noqa: E731
    slots = summary_slots(c.t, c.group_size) if c.summaries else 0
    tk = c.t + slots

    if name == "sdpa_flash":
        if c.w != -1:
            return "measured on the full-causal case of this T and D"
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION] if on_cuda else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]

        def flash(q, k, v):
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return Method(name, flash, [qh, kh, vh], to_bthd, "" if on_cuda else "CPU: SDPA's default backend")

    if name == "sdpa_dense_mask":
        flops = 3.5 * 4.0 * c.t * tk * c.d * c.heads * c.batch
        pred_s = flops / (DENSE_ASSUMED_TFLOPS * 1e12)
        if on_cuda and pred_s > _settings_dense_max_s:
            return (f"dense-mask SDPA does the full T x {tk} work whatever the window: one fwd+bwd call "
                    f"would take ~{pred_s:.2f} s at {DENSE_ASSUMED_TFLOPS:.0f} TFLOP/s (limit {_settings_dense_max_s} s); "
                    "skipped to fit the time budget (measured at the smaller T)")
        need = c.t * tk * 3 + 6 * c.batch * c.heads * tk * c.d * 2
        free = common.free_memory_bytes(device)
        if free is not None and need > 0.7 * free:
            return f"dense mask and its bias need ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        mask = dense_mask(c, tk, device)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.EFFICIENT_ATTENTION] if on_cuda else [SDPBackend.MATH]

        def dense(q, k, v):
            if c.summaries:
                k, v = _with_summaries(k, v, c.group_size, slots)
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        note = (f"{'memory-efficient backend' if on_cuda else 'CPU: math backend'}; peak memory excludes the "
                f"{c.t * tk / 2**20:.0f} MiB bool mask, built once")
        return Method(name, dense, [qh, kh, vh], to_bthd, note)

    if name == "flex":
        if not on_cuda:
            return FLEX_CUDA_ONLY
        ng = -(-c.t // c.group_size) if c.summaries else 0
        bm = sliding_block_mask(c.t, tk, c.left, c.group_size or 1, ng, device)
        flex = compiled_flex()

        def run_flex(q, k, v):
            if c.summaries:
                k, v = _with_summaries(k, v, c.group_size, slots)
            return flex(q, k, v, block_mask=bm)
        return Method(name, run_flex, [qh, kh, vh], to_bthd, "torch.compile(flex_attention), block mask")
    raise ValueError(name)


_settings_dense_max_s = 0.25


# ----------------------------------------------------------------------------- checks


def sample_rows(t: int, tile: int = 128) -> list[tuple[int, int]]:
    """Query row ranges checked at the benchmark shape: first, middle and last tile."""
    if t <= 3 * tile:
        return [(0, t)]
    mid = (t // 2) // tile * tile
    return [(0, tile), (mid, mid + tile), (t - tile, t)]


def reference_rows(q, k, v, c: AttnCase, rows, upcast=True):
    """The reference on query rows ``rows`` of ``q [B,T,H,D]`` (exact: rows are independent)."""
    from dasg_kernels.reference import swa_attention_ref

    outs, lses = [], []
    for a, b in rows:
        o, lse = swa_attention_ref(q[:, a:b], k, v, window=(c.left, 0), causal=True, group_size=c.group_size,
                                   summaries=c.summaries, q_offset=a, upcast=upcast)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def take_rows(x: torch.Tensor, rows, dim: int) -> torch.Tensor:
    return torch.cat([x.narrow(dim, a, b - a) for a, b in rows], dim)


def grad_check_shape(c: AttnCase, device) -> AttnCase:
    """A smaller shape of the same configuration for the gradient check (the fp32
    reference materialises ``T x T`` scores): 2 heads and ``T <= 12288``."""
    if device.type != "cuda":
        return c
    w = c.w if c.w > 0 else 256
    t = min(c.t, max(1024, 4 * w), 12288)
    return AttnCase(t, c.w, c.d, c.summaries, 2, 1, c.dtype)


def check_ours(ctx: Context, c: AttnCase, q, k, v, backend: str, checked: set) -> bool:
    """Forward (out, lse) on sampled rows of the benchmark shape; dq/dk/dv on a reduced
    shape, once per configuration. Returns whether every check passed."""
    import dasg_kernels as dk
    from dasg_kernels.reference import swa_attention_ref

    kw = dict(window=(c.left, 0), causal=True, group_size=c.group_size, summaries=c.summaries)
    ok = True
    extra = {"kernel": backend}
    try:
        with torch.no_grad():
            out, lse = dk.swa_attention_with_lse(q, k, v, backend=backend, **kw)
            rows = sample_rows(c.t)
            ref, ref_lse = reference_rows(q, k, v, c, rows)
            low, _ = reference_rows(q, k, v, c, rows, upcast=False)
        ok &= ctx.add_check(c.id, "swa_attention", compare("out (sampled rows)", take_rows(out, rows, 1), ref, low,
                                                          dtype=c.dtype), **extra)["passed"]
        ok &= ctx.add_check(c.id, "swa_attention", compare("lse (sampled rows)", take_rows(lse, rows, 2), ref_lse,
                                                          None, dtype=torch.float32), **extra)["passed"]
        del out, lse, ref, ref_lse, low
        key = (c.w, c.d, c.summaries, c.dtype)
        if key not in checked:
            checked.add(key)
            g = grad_check_shape(c, q.device)
            gen = torch.Generator(device=q.device).manual_seed(1)
            shape = (g.batch, g.t, g.heads, g.d)
            qs, ks, vs = (torch.randn(shape, device=q.device, dtype=c.dtype, generator=gen) for _ in range(3))
            do = torch.randn(shape, device=q.device, dtype=c.dtype, generator=gen)

            def grads(fn):
                leaves = [x.detach().clone().requires_grad_() for x in (qs, ks, vs)]
                fn(*leaves).backward(do)
                return [x.grad for x in leaves]

            ours = grads(lambda a, b, cc: dk.swa_attention(a, b, cc, backend=backend, **kw))
            ref = grads(lambda a, b, cc: swa_attention_ref(a, b, cc, **kw)[0])
            low = grads(lambda a, b, cc: swa_attention_ref(a, b, cc, upcast=False, **kw)[0])
            gid = common.case_id(T=g.t, W=g.w, D=g.d, summaries=int(g.summaries), H=g.heads)
            for name, a, r, lo in zip(("dq", "dk", "dv"), ours, ref, low):
                ok &= ctx.add_check(gid, "swa_attention", compare(name, a, r, lo, dtype=c.dtype, factor=3.0),
                                    **extra)["passed"]
            del ours, ref, low
    except Exception as exc:
        if common.is_oom(exc):
            ctx.log(f"attention check {c.id}: out of memory in the reference, check skipped")
            common.cleanup(q.device)
            return ok
        ctx.add_check(c.id, "swa_attention", {"check": "runs", "passed": False, "max_err": None, "tol": None,
                                              "note": f"raised {type(exc).__name__}: {str(exc)[:200]}"}, **extra)
        ok = False
    common.cleanup(q.device)
    return ok


def check_baseline(ctx: Context, c: AttnCase, m: Method) -> bool:
    """A baseline must compute the same thing, or the comparison means nothing."""
    q = m.inputs[0]
    # with grad enabled, as when timed: a compiled baseline (flex) would recompile for no_grad
    out = m.to_bthd(m.fn(*m.inputs)).detach()
    with torch.no_grad():
        rows = sample_rows(c.t)
        qb, kb, vb = m.inputs if m.bthd else (x.transpose(1, 2) for x in m.inputs)
        ref, _ = reference_rows(qb, kb, vb, c, rows)
        low, _ = reference_rows(qb, kb, vb, c, rows, upcast=False)
    res = compare(f"{m.name} out (sampled rows)", take_rows(out, rows, 1), ref, low, dtype=c.dtype, factor=3.0)
    del out, q
    res["baseline"] = True
    ctx.checks.append({"family": FAMILY, "case_id": c.id, "op": m.name, **res})
    return res["passed"]


# ----------------------------------------------------------------------------- run


def _inputs(c: AttnCase, device):
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (c.batch, c.t, c.heads, c.d)
    q, k, v = (torch.randn(shape, device=device, dtype=c.dtype, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(shape, device=device, dtype=c.dtype, generator=gen)
    return q, k, v, do


def time_modes(ctx: Context, base: dict[str, Any], m: Method, d_o: torch.Tensor, flops: dict[str, float]) -> None:
    """Time ``m`` in the modes fwd, bwd (of a retained graph) and fwd+bwd; ``d_o`` is the
    output gradient in ``m``'s layout."""
    inputs = m.inputs
    fwd = lambda: m.fn(*inputs)  # noqa: E731

    def fwd_bwd():
        m.fn(*inputs).backward(d_o)

    ctx.timed({**base, "mode": "fwd"}, fwd, flops=flops["fwd"], memory=True)
    if ctx.out_of_time():
        ctx.timed({**base, "mode": "bwd"}, fwd)
    else:
        try:
            out = m.fn(*inputs)
            ctx.timed({**base, "mode": "bwd"}, lambda: out.backward(d_o, retain_graph=True), flops=flops["bwd"],
                      grad_to_none=inputs)
            del out
        except Exception as exc:
            ctx.add_record(**base, mode="bwd", status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    ctx.timed({**base, "mode": "fwd+bwd"}, fwd_bwd, flops=flops["fwd+bwd"], grad_to_none=inputs, memory=True)
    for x in inputs:
        x.grad = None


def _attention_kernels() -> tuple:
    from dasg_kernels.attention import bwd, fwd

    return (("fwd", fwd._swa_fwd_kernel), ("dq", bwd._swa_bwd_dq_kernel), ("dkdv", bwd._swa_bwd_dkdv_kernel))


def forget_tuned_configs() -> None:
    """Clear what :func:`tuned_configs` reports (before a case's timings)."""
    for _, kernel in _attention_kernels():
        if getattr(kernel, "best_config", None) is not None:
            kernel.best_config = None


def tuned_configs() -> dict[str, str]:
    """The launch config the autotuner ran last for each attention kernel since
    :func:`forget_tuned_configs` (CUDA; empty under the interpreter): tile, warps, stages
    and, for the forward, whether it kept its software-pipelined loop (``PIPELINE``).
    dk/dv: its last launch (the summaries' when they are on)."""
    out = {}
    for name, kernel in _attention_kernels():
        cfg = getattr(kernel, "best_config", None)
        if cfg is not None:
            kw = dict(cfg.kwargs)
            if name == "fwd":
                kw.setdefault("PIPELINE", True)
            out[name] = ", ".join(f"{k}={v}" for k, v in kw.items()) + f", w{cfg.num_warps} s{cfg.num_stages}"
    return out


def time_method(ctx: Context, c: AttnCase, m: Method, do: torch.Tensor, pairs: int) -> None:
    base = {"case_id": c.id, "case": c.params(), "method": m.name, "note": m.note, "stand_in": m.stand_in,
            "pairs": pairs}
    d_o = do if m.bthd else do.transpose(1, 2).contiguous()
    flops = {mode: attention_flops(pairs, c.batch, c.heads, c.d, mode) for mode in common.MODES_ATTN}
    n = len(ctx.records)
    if m.name == "ours":
        forget_tuned_configs()
    time_modes(ctx, base, m, d_o, flops)
    if m.name == "ours" and not m.stand_in:
        tuned = tuned_configs()  # what the autotuner chose for this case (the fwd+bwd timing ran last)
        for r in ctx.records[n:]:
            r["tuned_configs"] = tuned
        if tuned:
            ctx.log(f"  {FAMILY} {c.id}: autotuned " + "; ".join(f"{k}: {v}" for k, v in tuned.items()))
    else:
        peer_ratios(ctx, FAMILY, c.id, m.name)
    ctx.log(progress_line(ctx, FAMILY, c.id, m.name))


def peer_ratios(ctx: Context, family: str, case_id: str, method: str, ours: str = "ours") -> None:
    """On every timed record of ``method`` for ``case_id``: ``ours_speedup`` = its ms / the ms
    of ``ours`` in the same mode (> 1: ours faster), when ours was timed (not a stand-in);
    logged for the fla peer."""
    mine = {r["mode"]: r for r in ctx.records if r.get("family") == family and r.get("case_id") == case_id
            and r.get("method") == ours and r.get("status") == "ok" and not r.get("stand_in")}
    for r in ctx.records:
        if (r.get("family") == family and r.get("case_id") == case_id and r.get("method") == method
                and r.get("status") == "ok" and r.get("mode") in mine and mine[r["mode"]].get("ms")):
            r["ours_speedup"] = r["ms"] / mine[r["mode"]]["ms"]
            if method.startswith("fla"):
                ctx.log(f"  {family} {case_id} {r['mode']}: {method} {r['ms']:.3f} ms, {ours} "
                        f"{mine[r['mode']]['ms']:.3f} ms: ours {r['ours_speedup']:.2f}x fla")


def progress_line(ctx: Context, family: str, case_id: str, method: str) -> str:
    parts = []
    for r in ctx.records:
        if r.get("case_id") == case_id and r.get("method") == method and r.get("family") == family:
            parts.append(f"{r['mode']}={r['ms']:.3f}ms" if r["status"] == "ok" else f"{r['mode']}:{r['status']}")
    return f"  {family} {case_id:<40} {method:<16} " + " ".join(parts)


def run(ctx: Context) -> None:
    """Run the attention family into ``ctx`` (records + correctness checks)."""
    global _settings_dense_max_s
    dev = ctx.device
    _settings_dense_max_s = getattr(ctx.settings, "dense_max_call_s", 0.25)
    all_cases = sorted(cases(ctx.settings.quick, dev), key=priority)
    available, why = kernel_available(dev)
    backend = choose_backend(ctx, FAMILY, available, why)

    # pass 1: ours, flex, flash; pass 2: the dense-mask baseline (slowest, least informative)
    passes = [("ours", "flex", "fla", "sdpa_flash"), ("sdpa_dense_mask",)]
    checked: set = set()
    for methods in passes:
        for c in all_cases:
            if ctx.out_of_time():
                for name in methods:
                    ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*", status="skipped",
                                   reason=ctx.budget_reason())
                    ctx.step(f"{c.id} {name}")
                continue
            try:
                q, k, v, do = _inputs(c, dev)
            except Exception as exc:
                for name in methods:
                    ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*",
                                   status="skipped" if common.is_oom(exc) else "error", reason=str(exc)[:200])
                    ctx.step(f"{c.id} {name}")
                common.cleanup(dev)
                continue
            pairs = c.pairs()
            for name in methods:
                ctx.step(f"{c.id} {name}")
                if name == "ours" and backend is None:
                    ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*", status="unavailable",
                                   reason=why)
                    continue
                try:
                    m = build_method(name, c, q, k, v, dev, backend or "torch")
                except Exception as exc:
                    m = f"could not be set up: {type(exc).__name__}: {str(exc)[:200]}"
                    common.cleanup(dev)
                if isinstance(m, str):
                    if not ((name == "sdpa_flash" and c.w != -1) or m == FLA_NO_SUMMARIES):
                        ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*", status="skipped",
                                       reason=m)
                    continue
                if name == "ours":
                    good = check_ours(ctx, c, q, k, v, backend, checked)
                    if not good:
                        ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*", status="error",
                                       reason="wrong output (see the correctness table): not timed")
                        continue
                else:
                    try:
                        good = check_baseline(ctx, c, m)
                    except Exception as exc:
                        st = "skipped" if common.is_oom(exc) else "error"
                        ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*", status=st,
                                       reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                        common.cleanup(dev)
                        continue
                    if not good:
                        ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*", status="error",
                                       reason="baseline disagrees with the reference: not timed")
                        continue
                time_method(ctx, c, m, do, pairs)
                del m
                common.cleanup(dev)
            del q, k, v, do
            common.cleanup(dev)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.runner import main as runner_main

    return runner_main(["--only", FAMILY, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
