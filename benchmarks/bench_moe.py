"""Routed-experts benchmark: ``dasg_kernels.expert_ffn`` / ``route`` against PyTorch.

Methods (all compute ``y = sum_slots weight * down(silu(gate(x)) * up(x))`` for the same
routing, in bf16 on CUDA):

================  ===========================================================================
``ours``          ``dasg_kernels.expert_ffn`` (grouped Triton GEMMs, gather-on-load, fused SwiGLU)
``loop``          transformers' eager experts: one ``F.linear`` pair per expert hit
``grouped_mm``    transformers' ``grouped_mm`` experts: sort by expert, gather, two
                  ``torch._grouped_mm`` (``F.grouped_mm`` where it exists), un-permute, sum
``dense_gemm``    the ceiling: a dense SwiGLU (two cuBLAS GEMMs) over as many rows as there are
                  routed (token, expert) pairs, i.e. the same FLOPs with no routing
================  ===========================================================================

Shapes: Mixtral-like (D=4096, F=14336, E=8, k=2), fine-grained DeepSeek-like
(D=2048, F=1408, E=64, k=6), and top-p routing on the fine-grained shape (top_p=0.7,
k_max=4), at N in {1, 16, 512, 4096, 16384}. Modes ``fwd`` and ``fwd+bwd`` (grads of x,
both weight banks and the routing weights). TFLOP/s count the routed FLOPs really done
(``6*D*F`` per used pair forward, 3x that forward+backward).

Also measured: the device's copy bandwidth and, for N <= 16, the decode bound (bytes of the
active experts' weights / bandwidth); and at the largest N the routing (+ dispatch) time
against the whole layer forward.

Run alone: ``python -m benchmarks.bench_moe [--quick]``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import Context, compare, moe_flops

FAMILY = "moe"
METHODS = ("ours", "loop", "grouped_mm", "dense_gemm")
MODES = ("fwd", "fwd+bwd")
GPU_N = (1, 16, 512, 4096, 16384)


@dataclass(frozen=True)
class MoECase:
    shape: str
    n: int
    d: int
    f: int
    e: int
    k_max: int
    top_p: float = 1.0
    logit_scale: float = 1.0
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        return common.case_id(shape=self.shape, N=self.n)

    def params(self) -> dict[str, Any]:
        return {"shape": self.shape, "N": self.n, "D": self.d, "F": self.f, "E": self.e, "k_max": self.k_max,
                "top_p": self.top_p, "dtype": str(self.dtype).replace("torch.", "")}


SHAPES_GPU = {
    "mixtral": dict(d=4096, f=14336, e=8, k_max=2),
    "deepseek": dict(d=2048, f=1408, e=64, k_max=6),
    "deepseek-top-p": dict(d=2048, f=1408, e=64, k_max=4, top_p=0.7, logit_scale=4.0),
}
SHAPES_CPU = {
    "mixtral": dict(d=32, f=64, e=4, k_max=2),
    "deepseek": dict(d=32, f=32, e=8, k_max=3),
    "deepseek-top-p": dict(d=32, f=32, e=8, k_max=4, top_p=0.7, logit_scale=4.0),
}


def cases(quick: bool, device: torch.device) -> list[MoECase]:
    if device.type == "cuda":
        ns = GPU_N if not quick else (16, 4096)
        return [MoECase(s, n, **kw) for s, kw in SHAPES_GPU.items() for n in ns]
    ns = (1, 8) if not quick else (8,)
    shapes = SHAPES_CPU if not quick else {k: SHAPES_CPU[k] for k in ("mixtral", "deepseek-top-p")}
    return [MoECase(s, n, dtype=torch.float32, **kw) for s, kw in shapes.items() for n in ns]


def priority(c: MoECase) -> tuple:
    return (0 if c.n >= 4096 or c.n <= 16 else 1, c.shape, c.n)


# ----------------------------------------------------------------------------- baselines


def experts_loop(x, gate_up_proj, down_proj, top_k_index, top_k_weights):
    """transformers' eager experts (``integrations/moe.py``), ``-1`` slots skipped."""
    e = gate_up_proj.shape[0]
    final = torch.zeros_like(x)
    idx = torch.where(top_k_index < 0, e, top_k_index).long()
    with torch.no_grad():
        expert_mask = F.one_hot(idx, num_classes=e + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = int(expert_idx[0])
        if expert_idx == e:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        gate, up = F.linear(x[token_idx], gate_up_proj[expert_idx]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down_proj[expert_idx])
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(a.to(b.dtype), b, offs=offs)
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(a.to(b.dtype), b, offs=offs)
    raise NotImplementedError("this torch has neither F.grouped_mm nor torch._grouped_mm")


def grouped_mm_available(device: torch.device) -> tuple[bool, str]:
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False, "this torch has neither F.grouped_mm nor torch._grouped_mm"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return False, "grouped_mm needs SM80+"
    return True, ""


def experts_grouped_mm(x, gate_up_proj, down_proj, top_k_index, top_k_weights, has_unused: bool | None = None):
    """transformers' ``grouped_mm_experts_forward``; ``-1`` slots become sentinels sorted
    to the tail and dropped by the offsets (transformers' expert-parallel sentinel path).
    ``has_unused`` (whether any slot is ``-1``) is passed in so that the timed call does
    not read it back from the device."""
    e = gate_up_proj.shape[0]
    n, k = top_k_index.shape
    d = x.shape[-1]
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1).long()
    has_sentinel = bool((top_k_index < 0).any()) if has_unused is None else has_unused
    if has_sentinel:
        expert_ids = torch.where(expert_ids < 0, e, expert_ids)
    expert_ids_g, perm = torch.sort(expert_ids)
    xs = x[perm // k]
    sw = sample_weights[perm]
    histc_input = expert_ids_g.float() if x.device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=e, min=0, max=e - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    sentinel = (expert_ids_g >= e).unsqueeze(-1) if has_sentinel else None
    if sentinel is not None:
        xs = xs.masked_fill(sentinel, 0.0)
    h = _grouped_mm(xs, gate_up_proj.transpose(-2, -1), offsets)
    if sentinel is not None:
        h = h.masked_fill(sentinel, 0.0)
    gate, up = h.chunk(2, dim=-1)
    h = F.silu(gate) * up
    out = _grouped_mm(h, down_proj.transpose(-2, -1), offsets)
    if sentinel is not None:
        out = out.masked_fill(sentinel, 0.0)
    out = out * sw.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0), device=x.device)
    return out[inv].view(n, k, d).sum(dim=1).to(x.dtype)


# ----------------------------------------------------------------------------- setup


def kernel_available(device: torch.device) -> tuple[bool, str]:
    import dasg_kernels as dk

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(4, 16, device=device, dtype=dt)
    w1 = torch.randn(2, 32, 16, device=device, dtype=dt)
    w2 = torch.randn(2, 16, 16, device=device, dtype=dt)
    ids = torch.tensor([[0, 1]] * 4, device=device, dtype=torch.int32)
    w = torch.full((4, 2), 0.5, device=device)
    return _op_available(lambda: dk.expert_ffn(x, w1, w2, (ids, w), backend="triton"))


def _op_available(fn: Callable[[], Any]) -> tuple[bool, str]:
    try:
        fn()
    except NotImplementedError as exc:
        return False, f"not built yet ({exc})"
    except ValueError as exc:
        if "cannot run" in str(exc):
            return False, str(exc)
    except Exception:
        pass
    return True, ""


class Inputs:
    def __init__(self, c: MoECase, device, seed: int = 0):
        from dasg_kernels.reference import route_ref

        gen = torch.Generator(device=device).manual_seed(seed + 1000 * list(SHAPES_GPU).index(c.shape))
        rnd = lambda *s, scale=1.0: (torch.randn(*s, device=device, generator=gen) * scale)  # noqa: E731
        self.x = rnd(c.n, c.d).to(c.dtype).requires_grad_()
        self.w1 = (rnd(c.e, 2 * c.f, c.d, scale=c.d ** -0.5)).to(c.dtype).requires_grad_()
        self.w2 = (rnd(c.e, c.d, c.f, scale=c.f ** -0.5)).to(c.dtype).requires_grad_()
        self.router = (rnd(c.e, c.d, scale=c.logit_scale * c.d ** -0.5)).to(c.dtype)
        self.logits = (self.x.detach().float() @ self.router.float().t())
        r = route_ref(self.logits, top_p=c.top_p, k_max=c.k_max)
        self.ids = r.expert_ids
        self.weights = r.weights.detach().clone().requires_grad_()
        self.num_selected = r.num_selected
        self.tokens_per_expert = r.tokens_per_expert
        self.used_pairs = int(r.num_selected.sum())
        self.active_experts = int((r.tokens_per_expert > 0).sum())
        self.has_unused = bool((self.ids < 0).any())
        self.dy = rnd(c.n, c.d).to(c.dtype)

    @property
    def leaves(self):
        return [self.x, self.w1, self.w2, self.weights]

    def routing(self):
        from dasg_kernels.moe.types import Routing

        return Routing(self.ids, self.weights, self.num_selected, self.tokens_per_expert)


def build_method(name: str, c: MoECase, inp: Inputs, device, backend: str, gmm_ok: tuple[bool, str]):
    import dasg_kernels as dk

    if name == "ours":
        routing = inp.routing()
        fn = lambda: dk.expert_ffn(inp.x, inp.w1, inp.w2, routing, backend=backend)  # noqa: E731
        return fn, inp.leaves, ("" if backend == "triton" else "kernel not available: torch reference stand-in")
    if name == "loop":
        return (lambda: experts_loop(inp.x, inp.w1, inp.w2, inp.ids, inp.weights)), inp.leaves, \
            "transformers eager experts"
    if name == "grouped_mm":
        if not gmm_ok[0]:
            return gmm_ok[1]
        return (lambda: experts_grouped_mm(inp.x, inp.w1, inp.w2, inp.ids, inp.weights, inp.has_unused)), inp.leaves, \
            "transformers grouped_mm experts"
    if name == "dense_gemm":
        m = max(1, inp.used_pairs)
        gen = torch.Generator(device=device).manual_seed(7)
        xd = torch.randn(m, c.d, device=device, generator=gen).to(c.dtype).requires_grad_()
        w1 = (torch.randn(2 * c.f, c.d, device=device, generator=gen) * c.d ** -0.5).to(c.dtype).requires_grad_()
        w2 = (torch.randn(c.d, c.f, device=device, generator=gen) * c.f ** -0.5).to(c.dtype).requires_grad_()

        def dense():
            gate, up = F.linear(xd, w1).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, w2)
        return dense, [xd, w1, w2], f"dense SwiGLU over M={m} rows (same FLOPs, no routing)"
    raise ValueError(name)


# ----------------------------------------------------------------------------- checks


def _sample_tokens(n: int) -> int:
    return min(n, 256)


def check_forward(ctx: Context, c: MoECase, inp: Inputs, name: str, fn: Callable, *, factor: float,
                  baseline: bool) -> bool:
    from dasg_kernels.reference import expert_ffn_ref

    s = _sample_tokens(c.n)
    with torch.no_grad():
        y = fn()
        ref = expert_ffn_ref(inp.x[:s], inp.w1, inp.w2, inp.ids[:s], inp.weights[:s])
        low = expert_ffn_ref(inp.x[:s], inp.w1, inp.w2, inp.ids[:s], inp.weights[:s], upcast=False)
    res = compare(f"{name} y (first {s} tokens)", y[:s], ref, low, dtype=c.dtype, factor=factor)
    if baseline:
        res["baseline"] = True
        ctx.checks.append({"family": FAMILY, "case_id": c.id, "op": name, **res})
        return res["passed"]
    return ctx.add_check(c.id, "expert_ffn", res, kernel=name)["passed"]


def check_grads(ctx: Context, c: MoECase, device, backend: str) -> bool:
    """dx, d gate_up, d down, d weights on a reduced N of the same shape (fp32 reference)."""
    import dasg_kernels as dk
    from dasg_kernels.moe.types import Routing
    from dasg_kernels.reference import expert_ffn_ref

    n = min(c.n if device.type != "cuda" else 256, 256)
    small = MoECase(c.shape, n, c.d, c.f, c.e, c.k_max, c.top_p, c.logit_scale, c.dtype)
    inp = Inputs(small, device, seed=1)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (inp.x, inp.w1, inp.w2)]
        w = inp.weights.detach().clone().requires_grad_()
        fn(*leaves, w).backward(inp.dy.to(dtype))
        return [t.grad for t in leaves] + [w.grad]

    ok = True
    try:
        ours = grads(lambda x, a, b, w: dk.expert_ffn(x, a, b, Routing(inp.ids, w, inp.num_selected,
                                                                         inp.tokens_per_expert), backend=backend),
                     c.dtype)
        ref = grads(lambda x, a, b, w: expert_ffn_ref(x, a, b, inp.ids, w), torch.float32)
        low = grads(lambda x, a, b, w: expert_ffn_ref(x, a, b, inp.ids, w, upcast=False), c.dtype)
        gid = small.id
        for name, a, r, lo in zip(("dx", "d gate_up_proj", "d down_proj", "d weights"), ours, ref, low):
            ok &= ctx.add_check(gid, "expert_ffn", compare(name, a, r, lo, dtype=c.dtype, factor=3.0),
                                kernel=backend)["passed"]
    except Exception as exc:
        if common.is_oom(exc):
            ctx.log(f"moe grad check {c.id}: out of memory in the reference, check skipped")
        else:
            ctx.add_check(small.id, "expert_ffn", {"check": "grads run", "passed": False, "max_err": None,
                                                   "tol": None, "note": f"raised {type(exc).__name__}: {exc}"[:300]},
                          kernel=backend)
            ok = False
    common.cleanup(device)
    return ok


def check_route(ctx: Context, c: MoECase, inp: Inputs, backend: str) -> bool:
    """Ids, counts and weights against ``route_ref`` on the same fp32 logits. A token whose
    choice sits on a rounding-level tie (two near-equal probabilities, or a cumulative mass
    at ``top_p``) may legitimately differ, so up to 0.1% of the tokens may choose otherwise;
    the weights are compared on the tokens that agree."""
    import dasg_kernels as dk
    from dasg_kernels.reference import route_ref

    r = dk.route(inp.logits, top_p=c.top_p, k_max=c.k_max, backend=backend)
    ref = route_ref(inp.logits, top_p=c.top_p, k_max=c.k_max)
    same = (r.expert_ids.to(torch.int32) == ref.expert_ids).all(-1)
    differ = int((~same).sum())
    allowed = int(0.001 * c.n)
    res = compare("route weights (agreeing tokens)", r.weights[same], ref.weights[same], None, dtype=torch.float32)
    counts_ok = differ > 0 or bool(torch.equal(r.tokens_per_expert.to(torch.int32), ref.tokens_per_expert))
    res["passed"] = res["passed"] and differ <= allowed and counts_ok
    res["note"] = (f"{differ} of {c.n} tokens chose other experts (allowed {allowed})"
                   + ("" if counts_ok else "; tokens_per_expert differ"))
    return ctx.add_check(c.id, "route", res, kernel=backend)["passed"]


# ----------------------------------------------------------------------------- run


def copy_bandwidth(ctx: Context) -> float | None:
    """Device copy bandwidth in bytes/s (read + write), measured once."""
    dev = ctx.device
    nbytes = (1 << 30) if dev.type == "cuda" else (64 << 20)
    try:
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).fill_(1.0)
        dst = torch.empty_like(src)
        m = common.measure(lambda: dst.copy_(src), ctx.settings)
        bw = 2 * nbytes / (m["ms"] * 1e-3)
        ctx.add_record(case_id="copy", case={"bytes": nbytes}, method="copy_bandwidth", mode="copy",
                       note="dst.copy_(src); bandwidth counts read + write", bandwidth_gbs=bw / 1e9, **m)
        del src, dst
        common.cleanup(dev)
        return bw
    except Exception as exc:
        ctx.add_record(case_id="copy", case={}, method="copy_bandwidth", mode="copy", status="error",
                       reason=str(exc)[:200])
        return None


def run(ctx: Context) -> None:
    dev = ctx.device
    all_cases = sorted(cases(ctx.settings.quick, dev), key=priority)
    available, why = kernel_available(dev)
    backend = "triton" if available else ("torch" if dev.type == "cpu" else None)
    if not available:
        ctx.log(f"moe: {why}; " + ("timing the torch reference as a stand-in (no speed-ups reported)"
                                   if backend else "our kernel is not timed on this device"))
    ctx.families[FAMILY].update(kernel_available=available, kernel_backend=backend, kernel_reason=why)
    gmm_ok = grouped_mm_available(dev)
    bw = copy_bandwidth(ctx)
    max_n = max(c.n for c in all_cases)
    checked: set = set()
    for c in all_cases:
        if ctx.out_of_time():
            for name in METHODS:
                ctx.step(f"{c.id} {name}")
                ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*", status="skipped",
                               reason=ctx.budget_reason())
            continue
        try:
            inp = Inputs(c, dev)
        except Exception as exc:
            for name in METHODS:
                ctx.step(f"{c.id} {name}")
                ctx.add_record(case_id=c.id, case=c.params(), method=name, mode="*",
                               status="skipped" if common.is_oom(exc) else "error", reason=str(exc)[:200])
            common.cleanup(dev)
            continue
        params = {**c.params(), "used_pairs": inp.used_pairs, "mean_k": inp.used_pairs / c.n,
                  "active_experts": inp.active_experts}
        for name in METHODS:
            ctx.step(f"{c.id} {name}")
            base = {"case_id": c.id, "case": params, "method": name, "pairs": inp.used_pairs}
            if name == "ours" and backend is None:
                ctx.add_record(**base, mode="*", status="unavailable", reason=why)
                continue
            try:
                built = build_method(name, c, inp, dev, backend or "torch", gmm_ok)
            except Exception as exc:
                built = f"could not be set up: {type(exc).__name__}: {str(exc)[:200]}"
            if isinstance(built, str):
                ctx.add_record(**base, mode="*", status="skipped", reason=built)
                continue
            fn, leaves, note = built
            base.update(note=note, stand_in=(name == "ours" and backend != "triton"))
            try:
                if name == "ours":
                    good = check_forward(ctx, c, inp, name, fn, factor=2.0, baseline=False)
                    if c.shape not in checked:
                        checked.add(c.shape)
                        good &= check_grads(ctx, c, dev, backend)
                elif name == "dense_gemm":
                    good = True  # computes something else by design (the FLOP ceiling)
                else:
                    good = check_forward(ctx, c, inp, name, fn, factor=3.0, baseline=True)
            except Exception as exc:
                if name == "ours":
                    ctx.add_check(c.id, "expert_ffn", {"check": "runs", "passed": False, "max_err": None,
                                                       "tol": None, "note": f"{type(exc).__name__}: {exc}"[:300]})
                good = False
                common.cleanup(dev)
            if not good:
                ctx.add_record(**base, mode="*", status="error",
                               reason="wrong output (see the correctness table): not timed")
                continue
            dy = inp.dy if name != "dense_gemm" else torch.randn_like(leaves[0].detach())
            ctx.timed({**base, "mode": "fwd"}, fn, flops=moe_flops(inp.used_pairs, c.d, c.f, "fwd"), memory=True)
            ctx.timed({**base, "mode": "fwd+bwd"}, lambda: fn().backward(dy),
                      flops=moe_flops(inp.used_pairs, c.d, c.f, "fwd+bwd"), grad_to_none=leaves, memory=True)
            for t in leaves:
                t.grad = None
            common.cleanup(dev)
        if c.n <= 16 and bw:
            nbytes = inp.active_experts * 3 * c.d * c.f * torch.finfo(c.dtype).bits // 8
            ctx.add_record(case_id=c.id, case=params, method="decode_bound", mode="fwd", ms=nbytes / bw * 1e3,
                           timing="derived: active expert bytes / copy bandwidth", weight_bytes=nbytes,
                           meaningful=ctx.settings.on_cuda)
        if c.n == max_n:
            try:
                _routing_share(ctx, c, inp, params, backend)
            except Exception as exc:
                ctx.add_record(case_id=c.id, case=params, method="route", mode="fwd", status="error",
                               reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                common.cleanup(dev)
        ctx.log(_line(ctx, c))
        del inp
        common.cleanup(dev)


def _routing_share(ctx: Context, c: MoECase, inp: Inputs, params: dict, backend: str | None) -> None:
    """Time route (+ dispatch) and the whole layer forward at the largest N."""
    import dasg_kernels as dk

    base = {"case_id": c.id, "case": params}
    be = backend or "torch"
    route_ok, why = _op_available(lambda: dk.route(inp.logits[:4], top_p=c.top_p, k_max=c.k_max, backend="triton"))
    rbe = "triton" if route_ok else ("torch" if ctx.device.type == "cpu" else None)
    if rbe is None:
        ctx.add_record(**base, method="route", mode="fwd", status="unavailable", reason=why)
        return
    try:
        good = check_route(ctx, c, inp, rbe)
    except Exception as exc:
        ctx.add_check(c.id, "route", {"check": "runs", "passed": False, "max_err": None, "tol": None,
                                      "note": f"{type(exc).__name__}: {exc}"[:300]})
        good = False
    if not good:
        ctx.add_record(**base, method="route", mode="fwd", status="error", reason="wrong routing: not timed")
        return
    stand_in = rbe != "triton" or be != "triton"
    x = inp.x.detach()
    logits_fn = lambda: x @ inp.router.t()  # noqa: E731
    ctx.timed({**base, "method": "route", "mode": "fwd", "stand_in": rbe != "triton",
               "note": "router logits GEMM + route"},
              lambda: dk.route(logits_fn(), top_p=c.top_p, k_max=c.k_max, backend=rbe))
    has_dispatch = hasattr(dk, "dispatch")
    if has_dispatch:
        ids = inp.ids
        ctx.timed({**base, "method": "dispatch", "mode": "fwd", "stand_in": stand_in},
                  lambda: dk.dispatch(ids, c.e, block_m=64, tokens_per_expert=inp.tokens_per_expert))
    if hasattr(dk, "moe_ffn"):
        def layer():
            return dk.moe_ffn(x, inp.router, inp.w1.detach(), inp.w2.detach(), top_p=c.top_p, k_max=c.k_max,
                              backend=be)
        note = "dasg_kernels.moe_ffn"
    else:
        def layer():
            r = dk.route(logits_fn(), top_p=c.top_p, k_max=c.k_max, backend=rbe)
            return dk.expert_ffn(x, inp.w1.detach(), inp.w2.detach(), r, backend=be)
        note = "route + expert_ffn (moe_ffn not available)"
    with torch.no_grad():
        ctx.timed({**base, "method": "layer", "mode": "fwd", "stand_in": stand_in,
                   "note": note + ("" if has_dispatch else "; dispatch is inside expert_ffn")}, layer)


def _line(ctx: Context, c: MoECase) -> str:
    parts = []
    for r in ctx.records:
        if r.get("case_id") == c.id and r.get("family") == FAMILY and r.get("mode") in MODES:
            if r["status"] == "ok":
                parts.append(f"{r['method']}:{r['mode']}={r['ms']:.3f}ms")
            else:
                parts.append(f"{r['method']}:{r['status']}")
    return f"  moe {c.id:<28} " + " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.runner import main as runner_main

    return runner_main(["--only", FAMILY, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
