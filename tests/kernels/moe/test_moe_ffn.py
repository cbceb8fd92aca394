"""expert_ffn / moe_ffn (Triton grouped GEMMs) against the per-expert loop reference.

Tolerances: fp32 is compared with the fp32 reference at ``rtol=atol=1e-4`` relative
to the tensor's scale. fp16 (and bf16 on the GPU) follow flash-attn: the kernel's
error against the fp32 reference must be at most 2x (output) / 3x (gradients) the
error of the same reference computed in the low dtype (``upcast=False``, the eager
transformers path), plus 1e-4 of the tensor's scale. bf16 on the CPU runs the fp32
kernels (the interpreter's bf16 tl.dot is broken) and is held to the same bar.
"""
import pytest
import torch
import triton
import triton.language as tl

import dasg_kernels as dk
from dasg_kernels.moe import configs as cfg
from dasg_kernels.moe import grouped_gemm as gg
from dasg_kernels.moe.experts_torch import choose_method, expert_ffn_torch
from dasg_kernels.moe.grouped_gemm import _swizzle
from dasg_kernels.reference import expert_ffn_ref


@pytest.fixture(autouse=True)
def _one_config(monkeypatch):
    # On the GPU, autotuning compiles and times every config of six kernels for each new
    # (D, F, BLOCK_M, dtype): minutes per shape. Tests pin the first config that fits;
    # the tests about autotuning itself set DASG_AUTOTUNE=1. (No effect under the interpreter.)
    monkeypatch.setenv("DASG_AUTOTUNE", "0")


def _weights(e, d, f, dtype, device):
    w1 = (torch.randn(e, 2 * f, d, device=device) / d ** 0.5).to(dtype)
    w2 = (torch.randn(e, d, f, device=device) / f ** 0.5).to(dtype)
    return w1, w2


def _routing(ids, device):
    """Weights for ``ids`` (-1 = unused): positive, zero in unused slots."""
    w = torch.rand(ids.shape, device=device) + 0.1
    return torch.where(ids >= 0, w, torch.zeros_like(w))


def _run(fn, x, w1, w2, ids, wt, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, wt)]
    y = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    grads = torch.autograd.grad(y, leaves, dy)
    return [y.detach(), *grads]


def _kernel(x, w1, w2, ids, wt):
    return dk.expert_ffn(x, w1, w2, (ids, wt), backend="triton")


NAMES = ["y", "dx", "d_gate_up_proj", "d_down_proj", "d_weights"]


def _compare(x, w1, w2, ids, wt, *, dtype):
    dy = torch.randn(x.shape, device=x.device).to(dtype)
    out = _run(_kernel, x, w1, w2, ids, wt, dy)
    ref = _run(lambda *a: expert_ffn_ref(*a), x.float(), w1.float(), w2.float(), ids, wt, dy.float())
    if dtype == torch.float32:
        for name, a, b in zip(NAMES, out, ref):
            assert a.dtype == b.dtype
            scale = b.abs().max().item() + 1e-6
            err = (a - b).abs().max().item()
            assert err <= 1e-4 * scale, f"{name}: max err {err:.3g} vs scale {scale:.3g}"
    else:
        low = _run(lambda *a: expert_ffn_ref(*a, upcast=False), x, w1, w2, ids, wt, dy)
        for i, (name, a, b, c) in enumerate(zip(NAMES, out, ref, low)):
            assert a.dtype == c.dtype, name
            scale = b.abs().max().item() + 1e-6
            err = (a.float() - b).abs().max().item()
            err_pt = (c.float() - b).abs().max().item()
            factor = 2 if i == 0 else 3
            assert err <= factor * err_pt + 1e-4 * scale, f"{name}: err {err:.3g} vs torch {dtype} err {err_pt:.3g}"
    return out


def _ids_topk(n, e, k, device):
    return torch.argsort(torch.rand(n, e, device=device), dim=-1)[:, :k].int()


def _problem(n, d, f, e, k, device, dtype=torch.float32):
    """``x [n, d]``, expert weights, top-``k`` ids of ``e`` experts and routing weights."""
    x = torch.randn(n, d, device=device).to(dtype)
    w1, w2 = _weights(e, d, f, dtype, device)
    ids = _ids_topk(n, e, k, device)
    return x, w1, w2, ids, _routing(ids, device)


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,f,e,k", [(37, 32, 48, 4, 2), (1, 16, 16, 4, 2), (64, 64, 32, 8, 4), (19, 32, 16, 6, 1),
                                       (1, 16, 16, 4, 1), (23, 48, 80, 5, 3)])
def test_expert_ffn_matches_reference(device, dtype, n, d, f, e, k):
    x = torch.randn(n, d, device=device).to(dtype)
    w1, w2 = _weights(e, d, f, dtype, device)
    ids = _ids_topk(n, e, k, device)
    _compare(x, w1, w2, ids, _routing(ids, device), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_ffn_empty_experts_and_unused_slots(device, dtype):
    # experts 0, 2, 4..7 get no token; a third of the tokens use one slot of two;
    # one token uses none
    n, d, f, e = 45, 32, 32, 8
    x = torch.randn(n, d, device=device).to(dtype)
    w1, w2 = _weights(e, d, f, dtype, device)
    ids = torch.stack([torch.full((n,), 1), torch.full((n,), 3)], 1).int().to(device)
    ids[::2] = ids[::2].flip(1)
    ids[::3, 1] = -1
    ids[5] = -1
    out = _compare(x, w1, w2, ids, _routing(ids, device), dtype=dtype)
    assert torch.all(out[0][5] == 0) and torch.all(out[1][5] == 0)
    for g in (out[2], out[3]):  # weight gradients of experts without tokens are exactly zero
        assert torch.all(g[[0, 2, 4, 5, 6, 7]] == 0)
        assert torch.all(g[[1, 3]].abs().sum((1, 2)) > 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2])
def test_expert_ffn_all_tokens_one_expert(device, dtype, k):
    n, d, f, e = 50, 16, 32, 4
    x = torch.randn(n, d, device=device).to(dtype)
    w1, w2 = _weights(e, d, f, dtype, device)
    ids = torch.full((n, k), -1, dtype=torch.int32, device=device)
    ids[:, 0] = 2
    _compare(x, w1, w2, ids, _routing(ids, device), dtype=dtype)


def test_expert_ffn_bf16_on_cpu(device):
    # under the interpreter bf16 runs the fp32 kernels (tl.dot on bf16 is broken there);
    # on the GPU the bf16 kernels run: either way the result must be bf16-accurate
    n, d, f, e = 23, 32, 16, 4
    x = torch.randn(n, d, device=device).bfloat16()
    w1, w2 = _weights(e, d, f, torch.bfloat16, device)
    ids = _ids_topk(n, e, 2, device)
    _compare(x, w1, w2, ids, _routing(ids, device), dtype=torch.bfloat16)


def test_expert_ffn_never_reads_unwritten_memory(device, monkeypatch):
    # poison every new float buffer with NaN: an output row the kernels never wrote, or a
    # padding row that leaks into a result, fails the comparison
    real_empty = torch.empty

    def nan_empty(*size, **kw):
        t = real_empty(*size, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    n, d, f, e = 37, 32, 48, 8
    x = torch.randn(n, d, device=device)
    w1, w2 = _weights(e, d, f, torch.float32, device)
    for k in (1, 3):
        ids = _ids_topk(n, e, k, device)
        ids[::4, -1] = -1
        ids[1] = -1
        out = _compare(x, w1, w2, ids, _routing(ids, device), dtype=torch.float32)
        assert not any(torch.isnan(t).any() for t in out)


def test_expert_ffn_weight_grad_partials_cover_every_column(device, monkeypatch):
    # the routing-weight gradient is summed over per-F-block partials, one column per
    # block of the narrowest BLOCK_N any config uses; a launch with a wider BLOCK_N must
    # still write every column (the autotuner runs all configs on the same buffer; on the
    # GPU this test autotunes). Make every launch at least 2x wider than the column grid,
    # poison new buffers with NaN, and check (interpreter, F=48: 3 columns, 2 programs x 2
    # columns each, the last one masked)
    monkeypatch.setenv("DASG_AUTOTUNE", "1")
    narrowest = cfg.min_block_n()
    monkeypatch.setattr(cfg, "min_block_n", lambda: narrowest // 2)
    real_empty = torch.empty

    def nan_empty(*size, **kw):
        t = real_empty(*size, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    n, d, f, e, k = 30, 32, 48, 4, 2
    x = torch.randn(n, d, device=device)
    w1, w2 = _weights(e, d, f, torch.float32, device)
    ids = _ids_topk(n, e, k, device)
    ids[::3, 1] = -1
    out = _compare(x, w1, w2, ids, _routing(ids, device), dtype=torch.float32)
    assert not torch.isnan(out[4]).any()


def _configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in cfg.GPU_CONFIGS]


def _kept(kind, named, bm=128):
    return [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in cfg.prune(_configs(), named, kind=kind, BLOCK_M=bm)]


def test_config_prune_counts_the_operand_dtype_only():
    # the fp32 routing weights / partial sums a kernel also takes are not GEMM operands:
    # they must not make a bf16 launch look fp32-sized to the shared-memory pruning
    named = {"h": torch.empty(2, 2, dtype=torch.bfloat16), "w": torch.empty(2, 2, dtype=torch.bfloat16),
             "weights": torch.empty(2, dtype=torch.float32), "dwp": torch.empty(2, dtype=torch.float32)}
    for kind in (cfg.ROW, cfg.SWIGLU_BWD, cfg.DUAL, cfg.DW):
        kept = _kept(kind, named)
        assert kept[0] == cfg.GPU_CONFIGS[0]
        assert len(kept) > 1
        fp32 = _kept(kind, {k: v.float() for k, v in named.items()})
        assert len(fp32) < len(kept)
        assert cfg.fixed_gpu_config(kind, 128, 2)["BLOCK_N"] == cfg.GPU_CONFIGS[0][0]


def test_config_prune_is_per_kernel():
    # shared memory: two B tiles only in gate/up fwd, so a 128 x 256 output tile (BLOCK_N=256,
    # BLOCK_K=64, 8 warps, 3 stages: 144 KiB in bf16) is offered to the single-B row-tile
    # kernels and to neither gate/up (240 KiB) nor the weight gradients ([256, 128] + [128, 64]
    # per stage, 240 KiB); registers: gate/up's two 128 x 128 accumulators on 4 warps (256 fp32
    # registers a thread) spill, so that config is not offered to it, and down bwd's SwiGLU
    # epilogue spills with 128 accumulators a thread (128 x 256 on 8 warps, 128 x 128 on 4)
    bf16 = {"a": torch.empty(2, 2, dtype=torch.bfloat16)}
    wide, spills = (256, 64, 8, 3), (128, 64, 4, 3)
    assert wide in cfg.GPU_CONFIGS and spills in cfg.GPU_CONFIGS
    assert cfg.smem_estimate(cfg.ROW, 128, 256, 64, 3, 2) <= cfg.SMEM_LIMIT
    assert wide in _kept(cfg.ROW, bf16)
    assert wide not in _kept(cfg.DUAL, bf16) and wide not in _kept(cfg.DW, bf16)
    assert spills in _kept(cfg.ROW, bf16) and spills in _kept(cfg.DW, bf16)
    assert spills not in _kept(cfg.DUAL, bf16)
    assert wide not in _kept(cfg.SWIGLU_BWD, bf16) and spills not in _kept(cfg.SWIGLU_BWD, bf16)
    assert cfg.fixed_gpu_config(cfg.SWIGLU_BWD, 128, 2)["BLOCK_N"] == cfg.GPU_CONFIGS[0][0]
    assert cfg.acc_regs(cfg.DUAL, 128, 128, 64, 4) == 256
    # every GEMM kernel has a kind (the launcher looks it up)
    kernels = {v for k, v in vars(gg).items() if k.startswith("_") and k.endswith("_kernel")}
    assert kernels == set(gg.KERNEL_KIND)


def _saved_bytes(fn):
    """Run ``fn`` and count the bytes autograd saves for the backward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("k", [1, 2])
def test_expert_ffn_recompute_same_result_less_memory(device, k):
    n, d, f, e = 40, 32, 48, 4
    x = torch.randn(n, d, device=device).half()
    w1, w2 = _weights(e, d, f, torch.float16, device)
    ids = _ids_topk(n, e, k, device)
    wt = _routing(ids, device)
    dy = torch.randn(n, d, device=device).half()
    runs, saved = [], []
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, wt)]
        y, nbytes = _saved_bytes(lambda: dk.expert_ffn(leaves[0], leaves[1], leaves[2], (ids, leaves[3]),
                                                       backend="triton", recompute=recompute))
        runs.append([y, *torch.autograd.grad(y, leaves, dy)])
        saved.append(nbytes)
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name
    rows = dk.dispatch(ids, e, block_m=cfg.choose_block_m(n * k, e)).num_rows
    assert saved[0] - saved[1] == rows * 2 * f * 2  # the fp16 gate/up pre-activations
    with pytest.raises(TypeError, match="recompute"):
        dk.expert_ffn(x, w1, w2, (ids, wt), recompute=1)


@pytest.mark.parametrize("block_m", [32, 64])
def test_expert_ffn_block_m(device, block_m):
    n, d, f, e, k = 70, 32, 32, 4, 2
    x, w1, w2, ids, wt = _problem(n, d, f, e, k, device)
    y = dk.expert_ffn(x, w1, w2, (ids, wt), backend="triton", block_m=block_m)
    torch.testing.assert_close(y, expert_ffn_ref(x, w1, w2, ids, wt), rtol=1e-4, atol=1e-5)


def test_expert_ffn_routing_result_and_logit_grad(device):
    n, d, f, e = 29, 32, 16, 8
    x = torch.randn(n, d, device=device, requires_grad=True)
    w1, w2 = _weights(e, d, f, torch.float32, device)
    logits = torch.randn(n, e, device=device, requires_grad=True)
    r = dk.route(logits, top_p=0.6, k_max=3)
    y = dk.expert_ffn(x, w1, w2, r, backend="triton")
    g = torch.autograd.grad(y.square().sum(), (x, logits))
    r_ref = dk.reference.route_ref(logits, top_p=0.6, k_max=3)
    y_ref = expert_ffn_ref(x, w1, w2, r_ref.expert_ids, r_ref.weights)
    g_ref = torch.autograd.grad(y_ref.square().sum(), (x, logits))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_expert_ffn_partial_grads_and_no_grad(device):
    n, d, f, e = 21, 16, 16, 4
    x, w1, w2, ids, wt = _problem(n, d, f, e, 2, device)
    ref = expert_ffn_ref(x, w1, w2, ids, wt)
    with torch.no_grad():
        torch.testing.assert_close(dk.expert_ffn(x, w1, w2, (ids, wt), backend="triton"), ref, rtol=1e-4, atol=1e-5)
    w2r = w2.clone().requires_grad_()  # only one weight needs a gradient
    (g,) = torch.autograd.grad(dk.expert_ffn(x, w1, w2r, (ids, wt), backend="triton").sum(), w2r)
    w2s = w2.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(expert_ffn_ref(x, w1, w2s, ids, wt).sum(), w2s)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_expert_ffn_strided_inputs(device):
    n, d, f, e = 20, 32, 16, 4
    xb = torch.randn(n, 2 * d, device=device)
    x = xb[:, :d]  # row stride 2D
    w1, w2 = _weights(e, d, f, torch.float32, device)
    ids = _ids_topk(n, e, 2, device).long()
    wt = _routing(ids, device)
    y = dk.expert_ffn(x, w1, w2, (ids, wt), backend="triton")
    torch.testing.assert_close(y, expert_ffn_ref(x, w1, w2, ids, wt), rtol=1e-4, atol=1e-5)
    # expert-minor weights (a [2F, E, D] / [D, E, F] buffer seen as [E, ...]), column-major
    # x, routing weights stored transposed: any strides give the same result and gradients
    w1s = w1.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    w2s = w2.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    xs = x.t().contiguous().t()
    wts = wt.t().contiguous().t()
    assert not (w1s.is_contiguous() or w2s.is_contiguous() or xs.is_contiguous() or wts.is_contiguous())
    dy = torch.randn(n, d, device=device)
    a = _run(lambda *t: dk.expert_ffn(t[0], t[1], t[2], (t[3], t[4]), backend="triton"), xs, w1s, w2s, ids, wts, dy)
    b = _run(lambda *t: expert_ffn_ref(*t), x, w1, w2, ids, wt, dy)
    for name, u, v in zip(NAMES, a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype,recompute", [(torch.float32, False), (torch.float16, False), (torch.float16, True)])
@pytest.mark.parametrize("k", [1, 3])
def test_expert_ffn_deterministic(device, dtype, recompute, k):
    n, d, f, e = 40, 32, 32, 4
    x, w1, w2, ids, wt = _problem(n, d, f, e, k, device, dtype)
    dy = torch.randn(n, d, device=device).to(dtype)

    def kernel(*t):
        return dk.expert_ffn(t[0], t[1], t[2], (t[3], t[4]), backend="triton", recompute=recompute)

    a = _run(kernel, x, w1, w2, ids, wt, dy)
    b = _run(kernel, x, w1, w2, ids, wt, dy)
    for name, u, v in zip(NAMES, a, b):
        assert torch.equal(u, v), name


MOE_CASES = {
    "groups-top_p": (33, 32, 16, 8, dict(top_p=0.7, k_max=4, n_group=4, topk_group=2)),
    "k1": (29, 32, 16, 8, dict(k_max=1)),
    "n1": (1, 16, 32, 4, dict(top_p=0.5, k_max=2)),
    "e1": (17, 16, 16, 1, dict(k_max=1)),
    "no-renormalize-min_k": (40, 32, 48, 16, dict(top_p=0.6, k_max=4, min_k=2, renormalize=False)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_ffn_end_to_end(device, case, dtype):
    n, d, f, e, kw = MOE_CASES[case]
    x = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    router = (torch.randn(e, d, device=device) / d ** 0.5).to(dtype).requires_grad_()
    w1, w2 = _weights(e, d, f, dtype, device)
    w1.requires_grad_()
    w2.requires_grad_()
    y, r = dk.moe_ffn(x, router, w1, w2, backend="triton", **kw)
    y_ref, r_ref = dk.moe_ffn(x, router, w1, w2, backend="torch", **kw)
    assert y.dtype == dtype and y.shape == (n, d)
    assert torch.equal(r.expert_ids, r_ref.expert_ids)
    assert torch.equal(r.tokens_per_expert, r_ref.tokens_per_expert)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, router, w1, w2), dy)
    g_ref = torch.autograd.grad(y_ref, (x, router, w1, w2), dy)
    # the torch path computes in the input dtype, like transformers' eager experts: in fp16
    # both paths are held to fp16 accuracy. Max error <= rtol * scale + atol (the tensors
    # are O(1); atol covers gradients that are analytically zero, e.g. d_router at k_max=1)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)
    for name, a, b in zip(["y", "dx", "d_router", "d_gate_up_proj", "d_down_proj"], (y, *g), (y_ref, *g_ref)):
        scale = b.abs().max().item()
        err = (a.float() - b.float()).abs().max().item()
        assert err <= rtol * scale + atol, f"{name}: err {err:.3g}, scale {scale:.3g}"
    # two calls: bitwise equal outputs, ids and gradients
    y2, r2 = dk.moe_ffn(x, router, w1, w2, backend="triton", **kw)
    g2 = torch.autograd.grad(y2, (x, router, w1, w2), dy)
    assert torch.equal(y, y2) and torch.equal(r.expert_ids, r2.expert_ids)
    assert all(torch.equal(u, v) for u, v in zip(g, g2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_ffn_nothing_routed_gives_zero_gradients(device, backend):
    # a bank no token uses (e.g. the deep experts when no token is deep): every input gets a
    # zero gradient on both backends, never None (DDP and optimizers treat None differently)
    x, w1, w2, ids, wt = _problem(6, 16, 16, 4, 2, device)
    ids = torch.full_like(ids, -1)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, wt)]
    y = dk.expert_ffn(leaves[0], leaves[1], leaves[2], (ids, leaves[3]), backend=backend)
    assert torch.all(y == 0)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert all(g is not None and torch.all(g == 0) for g in grads)


def test_expert_ffn_empty_batch(device):
    w1, w2 = _weights(4, 16, 16, torch.float32, device)
    x = torch.randn(0, 16, device=device)
    ids = torch.zeros(0, 2, dtype=torch.int32, device=device)
    y = dk.expert_ffn(x, w1, w2, (ids, torch.zeros(0, 2, device=device)))
    assert y.shape == (0, 16)


def test_expert_ffn_bad_arguments(device):
    n, d, f, e = 4, 32, 48, 4
    x, w1, w2, ids, wt = _problem(n, d, f, e, 2, device)
    r = (ids, wt)
    cases = [
        (dict(gate_up_proj=w1.transpose(1, 2)), ValueError, r"gate_up_proj must have shape \[E, 2F, D\]"),
        (dict(down_proj=w2.transpose(1, 2)), ValueError, r"down_proj must have shape \[E, D, F\]"),
        (dict(down_proj=w2[:3]), ValueError, "down_proj"),
        (dict(gate_up_proj=w1.half()), TypeError, "dtype"),
        (dict(x=x[:, :24], gate_up_proj=w1[:, :, :24], down_proj=w2[:, :24]), ValueError, "multiple of 16"),
        (dict(gate_up_proj=w1[:, :40], down_proj=w2[..., :20]), ValueError, "multiple of 16"),
        (dict(routing=(ids.float(), wt)), TypeError, "expert_ids"),
        (dict(routing=(ids + 4, wt)), ValueError, r"expert_ids must lie in \[-1, 3\]"),
        (dict(routing=(ids[:2], wt[:2])), ValueError, "expert_ids must have 4 rows"),
        (dict(routing=(ids, wt[:, :1])), ValueError, "weights must have the shape"),
        (dict(routing=ids), TypeError, "routing"),
        (dict(activation="gelu"), ValueError, "activation"),
        (dict(x=x[0]), ValueError, "x must have 2 dimensions"),
        (dict(x=x.int()), TypeError, "x must have dtype"),
    ]
    for over, exc, match in cases:
        args = dict(x=x, gate_up_proj=w1, down_proj=w2, routing=r)
        args.update(over)
        act = args.pop("activation", "swiglu")
        if device.type == "cuda" and "lie in" in match:
            continue  # the range check would synchronise on CUDA
        with pytest.raises(exc, match=match):
            dk.expert_ffn(args["x"], args["gate_up_proj"], args["down_proj"], args["routing"],
                          activation=act, backend="triton")
    with pytest.raises(ValueError, match="block_m"):
        dk.expert_ffn(x, w1, w2, r, backend="triton", block_m=8)


def test_moe_ffn_bad_arguments(device):
    n, d, f, e = 4, 32, 16, 4
    x = torch.randn(n, d, device=device)
    w1, w2 = _weights(e, d, f, torch.float32, device)
    with pytest.raises(ValueError, match="router_weight has E=8 experts but gate_up_proj has E=4"):
        dk.moe_ffn(x, torch.randn(8, d, device=device), w1, w2, k_max=2)
    with pytest.raises(ValueError, match="router_weight must have shape"):
        dk.moe_ffn(x, torch.randn(e, d + 1, device=device), w1, w2, k_max=2)
    with pytest.raises(ValueError, match="k_max"):
        dk.moe_ffn(x, torch.randn(e, d, device=device), w1, w2, k_max=5)
    with pytest.raises(ValueError, match="n_group"):
        dk.moe_ffn(x, torch.randn(e, d, device=device), w1, w2, k_max=2, n_group=3)
    router = torch.randn(e, d, device=device)
    for kw, exc, match in [(dict(top_p=0.0), ValueError, "top_p"), (dict(min_k=3), ValueError, "min_k"),
                           (dict(n_group=2, topk_group=3), ValueError, "topk_group"),
                           (dict(recompute="yes"), TypeError, "recompute")]:
        with pytest.raises(exc, match=match):
            dk.moe_ffn(x, router, w1, w2, **{"k_max": 2, **kw})
    with pytest.raises(ValueError, match="gate_up_proj=meta"):
        dk.moe_ffn(x, router, w1.to("meta"), w2, k_max=2)


def test_expert_ffn_device_and_expert_limits(device):
    n, d, f, e = 4, 32, 16, 4
    x, w1, w2, ids, wt = _problem(n, d, f, e, 2, device)
    with pytest.raises(ValueError, match="weights=meta"):
        dk.expert_ffn(x, w1, w2, (ids, wt.to("meta")))
    with pytest.raises(TypeError, match="weights must have dtype"):
        dk.expert_ffn(x, w1, w2, (ids, ids))
    big = dk.moe.interface.E_TRITON_LIMIT + 1
    w1b = w1[:1].expand(big, -1, -1)
    w2b = w2[:1].expand(big, -1, -1)
    with pytest.raises(ValueError, match=f"up to {big - 1} experts.*gate_up_proj.shape.0.={big}"):
        dk.expert_ffn(x, w1b, w2b, (ids, wt), backend="triton")
    with pytest.raises(ValueError, match="num_experts"):
        dk.dispatch(ids, big, block_m=16, backend="triton")
    # the reference path has no such limit
    y = dk.expert_ffn(x, w1b, w2b, (ids, wt), backend="torch")
    torch.testing.assert_close(y, expert_ffn_ref(x, w1[:1].expand(e, -1, -1), w2[:1].expand(e, -1, -1), ids, wt))


def test_expert_ffn_many_experts(device):
    # E above 256 and not a power of two: the dispatch tiles pad E to 512
    n, d, f, e, k = 40, 16, 16, 300, 4
    x = torch.randn(n, d, device=device)
    w1, w2 = _weights(e, d, f, torch.float32, device)
    ids = _ids_topk(n, e, k, device)
    _compare(x, w1, w2, ids, _routing(ids, device), dtype=torch.float32)


@triton.jit
def _swizzle_kernel(out, n_m, n_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    i_m, i_n = _swizzle(pid, n_m, n_n, GROUP_M)
    tl.store(out + 2 * pid, i_m)
    tl.store(out + 2 * pid + 1, i_n)


def _swizzle_ref(n_m, n_n, group_m):
    """The matmul tutorial's grouped order: ``(m, n)`` of each program id."""
    order = []
    for base in range(0, n_m, group_m):
        size = min(group_m, n_m - base)
        for n in range(n_n):
            order += [(m, n) for m in range(base, base + size)]
    return order


@pytest.mark.parametrize("n_m,n_n,group_m", [(5, 3, 2), (7, 4, 8), (1, 5, 3), (6, 1, 4), (9, 2, 1), (16, 3, 8)])
def test_grid_swizzle_order(device, n_m, n_n, group_m):
    # the one helper all grouped GEMMs use: a bijection onto the n_m x n_n tiles, GROUP_M row
    # tiles per group, the row tile fastest inside a group, then the column
    out = torch.full((n_m * n_n, 2), -1, dtype=torch.int32, device=device)
    _swizzle_kernel[(n_m * n_n,)](out, n_m, n_n, GROUP_M=group_m)
    got = [tuple(r) for r in out.cpu().tolist()]
    assert got == _swizzle_ref(n_m, n_n, group_m)
    assert sorted(got) == [(m, n) for m in range(n_m) for n in range(n_n)]


def test_expert_ffn_program_order_does_not_change_results(device, monkeypatch):
    # GROUP_M only reorders the programs: every output tile is computed the same way, so
    # forward and every gradient are bitwise equal for any group size (several row tiles,
    # several column blocks, partial last groups, unused tiles at the end)
    n, d, f, e, k = 40, 64, 96, 3, 2
    x, w1, w2, ids, wt = _problem(n, d, f, e, k, device)
    ids[::5, 1] = -1
    wt = _routing(ids, device)
    dy = torch.randn(n, d, device=device)
    runs = []
    for group_m in (1, 3, 8):
        monkeypatch.setattr(cfg, "GROUP_M", group_m)
        runs.append(_run(_kernel, x, w1, w2, ids, wt, dy))
    for other in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], other):
            assert torch.equal(a, b), name
    ref = _run(lambda *a: expert_ffn_ref(*a), x, w1, w2, ids, wt, dy)
    for name, a, b in zip(NAMES, runs[0], ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_grouped_gemm_grid_limits():
    # axis 0 (the swizzled tiles) up to 2**31 - 1, axis 1 (the expert) up to 65535
    assert gg._checked_grid(lambda meta: (2 ** 31 - 1, 65535))({}) == (2 ** 31 - 1, 65535)
    with pytest.raises(ValueError, match="grid"):
        gg._checked_grid(lambda meta: (2 ** 31,))({})
    with pytest.raises(ValueError, match="grid"):
        gg._checked_grid(lambda meta: (1, 65536))({})


@triton.jit
def _dw_down_recompute_kernel(
    dy, gu, weights, row_pair, expert_offsets, dw,
    D, F, K_SLOTS: tl.constexpr,
    stride_dyn, stride_gr, stride_we, stride_wd,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The d down_proj kernel with w * silu(g) * u recomputed for every output tile."""
    i_p = tl.program_id(0)
    e = tl.program_id(1)
    o_d, o_f, m_d, m_f = gg._dw_out_tile(i_p, D, F, BLOCK_N, BLOCK_K, GROUP_M)
    start = tl.load(expert_offsets + e)
    end = tl.load(expert_offsets + e + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        o_r, pair, m_r, tok = gg._load_rows(row_pair, r0, K_SLOTS, BLOCK_M)
        b_dy = tl.load(dy + tok[None, :] * stride_dyn + o_d[:, None], mask=m_d[:, None] & m_r[None, :], other=0.0)
        m_h = m_r[:, None] & m_f[None, :]
        p_gu = gu + o_r[:, None] * stride_gr + o_f[None, :]
        b_g = tl.load(p_gu, mask=m_h, other=0.0).to(tl.float32)
        b_u = tl.load(p_gu + F, mask=m_h, other=0.0).to(tl.float32)
        b_w8 = tl.load(weights + pair, mask=m_r, other=0.0).to(tl.float32)
        b_h = b_g * tl.sigmoid(b_g) * b_u * b_w8[:, None]
        acc = tl.dot(b_dy, b_h.to(b_dy.dtype), acc, input_precision=DOT_PREC)
    gg._store_dw(dw, acc, e, o_d, o_f, m_d, m_f, stride_we, stride_wd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_dw_down_from_saved_hw_is_bitwise_the_recomputed_one(device, dtype, k, monkeypatch):
    # d down_proj multiplies dy by the w * h the down backward wrote once; it must be
    # bitwise what a kernel recomputing w * silu(g) * u per output tile gives
    monkeypatch.setitem(gg.KERNEL_KIND, _dw_down_recompute_kernel, gg.KERNEL_KIND[gg._dw_down_kernel])
    n, d, f, e = 37, 48, 80, 4
    x, w1, w2, ids, wt = _problem(n, d, f, e, k, device, dtype)
    ids[::4, -1] = -1
    wt = _routing(ids, device)
    dy = torch.randn(n, d, device=device).to(dtype)
    plan = dk.dispatch(ids, e, block_m=cfg.choose_block_m(n * k, e), backend="triton")
    _, gu = gg.gate_up_fwd(x, w1, plan, save_gu=True, write_h=False)
    dgu, _, hw = gg.down_bwd(dy, w2, gu, wt, plan, need_dw=False, need_hw=True)
    dgu_only, _, none = gg.down_bwd(dy, w2, gu, wt, plan, need_dw=False)
    assert none is None
    used = plan.row_pair[:plan.num_rows] >= 0
    assert torch.equal(dgu[used], dgu_only[used])  # writing hw changes nothing else
    new = gg.dw_down(dy, hw, plan, w2)
    old = torch.empty_like(w2)
    gg._launch(
        _dw_down_recompute_kernel,
        lambda META: (triton.cdiv(d, META["BLOCK_N"]) * triton.cdiv(f, META["BLOCK_K"]), e),
        dy, gu, wt, plan.row_pair, plan.expert_offsets, old,
        d, f, plan.num_slots,
        dy.stride(0), gu.stride(0), old.stride(0), old.stride(1),
        DOT_PREC=cfg.dot_precision(dtype), BLOCK_M=plan.block_m,
    )
    assert torch.equal(new, old)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d,f,e,k", [(1, 256, 512, 8, 2), (1000, 512, 256, 64, 6), (4096, 1024, 1408, 16, 2),
                                       (333, 128, 64, 4, 1)])
def test_expert_ffn_gpu(device, dtype, n, d, f, e, k, monkeypatch):
    monkeypatch.setenv("DASG_AUTOTUNE", "0")  # one fixed config: compile once, not per shape and config
    x = torch.randn(n, d, device=device).to(dtype)
    w1, w2 = _weights(e, d, f, dtype, device)
    ids = _ids_topk(n, e, k, device)
    ids[::5, -1] = -1
    _compare(x, w1, w2, ids, _routing(ids, device), dtype=dtype)


@pytest.mark.gpu
def test_expert_ffn_gpu_largest_weights(device, monkeypatch):
    # D=8192, F=16384 in fp32: the fixed config is
    # 64 x 64, so the weight-gradient kernels have cdiv(2F, 64) * cdiv(D, 64) = 65536 output
    # tiles per expert, past CUDA's 65535 limit on grid axes 1 and 2 (they go on axis 0)
    monkeypatch.setenv("DASG_AUTOTUNE", "0")
    n, d, f, e, k = 32, 8192, 16384, 2, 2
    x = torch.randn(n, d, device=device)
    w1, w2 = _weights(e, d, f, torch.float32, device)
    ids = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32, device=device).repeat(n // 2, 1)
    _compare(x, w1, w2, ids, _routing(ids, device), dtype=torch.float32)


@pytest.mark.gpu
def test_moe_ffn_gpu_no_host_sync_and_deterministic(device, monkeypatch):
    n, d, f, e = 2048, 512, 384, 64
    x = torch.randn(n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    router = torch.randn(e, d, device=device, dtype=torch.bfloat16) / d ** 0.5
    w1, w2 = _weights(e, d, f, torch.bfloat16, device)
    w1.requires_grad_()
    w2.requires_grad_()
    kw = dict(top_p=0.7, k_max=6, n_group=8, topk_group=4)
    monkeypatch.setenv("DASG_AUTOTUNE", "1")

    def step():
        y, _ = dk.moe_ffn(x, router, w1, w2, **kw)
        return [y, *torch.autograd.grad(y.float().square().sum(), (x, w1, w2))]

    a = step()  # warm-up: compiles and autotunes (which synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        b = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------- torch backend
# backend="torch" runs dasg_kernels.moe.experts_torch (static shapes, no host read; see
# tests/kernels/moe/test_moe_compile.py for torch.compile), held here to the reference at fp32 rounding.

TORCH_SHAPES = [  # n, d, f, e, k: odd sizes, one expert, k = E, many experts, one token
    (13, 7, 5, 3, 2), (29, 16, 12, 1, 1), (6, 8, 9, 4, 4), (20, 9, 11, 40, 4), (1, 4, 6, 5, 3), (70, 12, 8, 6, 2)]
TORCH_METHODS = [("dense", None), ("grouped", 16), ("grouped", 128), (None, None)]


def _torch_backend(method, block_m):
    return lambda *a: expert_ffn_torch(*a, method=method, block_m=block_m)


@pytest.mark.parametrize("method,block_m", TORCH_METHODS)
@pytest.mark.parametrize("n,d,f,e,k", TORCH_SHAPES)
def test_expert_ffn_torch_backend_matches_reference(device, n, d, f, e, k, method, block_m):
    x = torch.randn(n, d, device=device)
    w1, w2 = _weights(e, d, f, torch.float32, device)
    ids = _ids_topk(n, e, k, device)
    ids[::3, -1] = -1  # k_max padding (top-p took fewer experts)
    ids[1::4] = -1  # tokens routed to no expert
    wt = _routing(ids, device)
    dy = torch.randn(n, d, device=device)
    got = _run(_torch_backend(method, block_m), x, w1, w2, ids, wt, dy)
    want = _run(expert_ffn_ref, x, w1, w2, ids, wt, dy)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    if n > 1:
        assert torch.all(got[0][1] == 0) and torch.all(got[1][1] == 0)  # token 1 is routed nowhere


@pytest.mark.parametrize("method", ["dense", "grouped"])
def test_expert_ffn_torch_backend_edge_cases(device, method):
    # a weight in an unused slot, an id past E (unused, as on the Triton path), an expert
    # taken twice by one token, nothing routed at all, bf16 and an empty batch
    fn = _torch_backend(method, None)
    n, d, f, e = 9, 6, 10, 5
    x = torch.randn(n, d, device=device)
    w1, w2 = _weights(e, d, f, torch.float32, device)
    ids = _ids_topk(n, e, 3, device)
    ids[0, 1], ids[2, 2], ids[3] = -1, e, ids[3, 0]
    wt = torch.rand(n, 3, device=device) + 0.1  # nonzero weights in the unused slots too
    dy = torch.randn(n, d, device=device)
    for name, a, b in zip(NAMES, _run(fn, x, w1, w2, ids, wt, dy), _run(expert_ffn_ref, x, w1, w2, ids, wt, dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    none = torch.full_like(ids, -1)
    out = _run(fn, x, w1, w2, none, wt, dy)
    assert all(torch.all(t == 0) for t in out)  # zero output, zero (not None) gradients
    xb, w1b, w2b = x.bfloat16(), w1.bfloat16(), w2.bfloat16()
    yb = fn(xb, w1b, w2b, ids, wt)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, expert_ffn_ref(xb, w1b, w2b, ids, wt))  # fp32 inside, as the reference
    assert fn(x[:0], w1, w2, ids[:0], wt[:0]).shape == (0, d)


def test_expert_ffn_torch_backend_method_choice():
    # from the sizes alone: one expert (the shared banks) and small banks dense, many
    # experts grouped, with larger tiles when each expert gets many rows
    assert choose_method(4096, 1, 1)[0] == "dense"
    assert choose_method(12, 2, 4)[0] == "dense"
    assert choose_method(2, 2, 64)[0] == "grouped"  # decode: a few tiles, not 64 experts
    method, bm = choose_method(4096, 2, 64)
    assert method == "grouped" and bm > 16
    with pytest.raises(ValueError, match="method"):
        expert_ffn_torch(*_problem(2, 4, 4, 2, 1, "cpu"), method="sparse")
