"""The runner's cases through pytest-benchmark, for tracking regressions::

    pytest benchmarks/ --benchmark-only                      # GPU: the full matrices
    DASG_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only   # the --quick subset
    pytest benchmarks/ --benchmark-only -k "attention and ours" --benchmark-json out.json

Every test checks its method against the reference first (a wrong kernel fails the test
instead of producing a timing), then times it with ``benchmark.pedantic``; the timed call
ends with ``torch.cuda.synchronize()``, so the figures are GPU-synchronised. Methods that
do not run here (FlexAttention on the CPU, a kernel not built yet) are skipped with the
reason. Groups are per case and mode, so ``--benchmark-group-by=group`` lines up ours
with its baselines.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import bench_attention as BA
from benchmarks import bench_model as BMo
from benchmarks import bench_moe as BM
from benchmarks import bench_varlen as BV
from benchmarks import common

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
QUICK = not ON_GPU or os.environ.get("DASG_BENCH_QUICK", "0") == "1"
ROUNDS, WARMUP = (20, 3) if ON_GPU else (1, 1)


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _bench(benchmark, fn, group: str, grad_to_none=(), **info):
    def setup():
        for t in grad_to_none:
            t.grad = None

    def target():
        fn()
        _sync()

    benchmark.group = group
    benchmark.extra_info.update({k: v for k, v in info.items() if v is not None})
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def _ctx(family):
    return common.Context.standalone(family, DEVICE)


def _require(ctx, what):
    bad = [c for c in ctx.checks if not c.get("passed")]
    if bad:
        pytest.fail(f"{what} disagrees with the reference: {bad}")


# ----------------------------------------------------------------------------- attention

_ATTN_OK = None


def _attn_backend():
    global _ATTN_OK
    if _ATTN_OK is None:
        _ATTN_OK = BA.kernel_available(DEVICE)
    if not _ATTN_OK[0]:
        pytest.skip(_ATTN_OK[1])
    return "triton"


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("method", ["ours", "flex", "fla", "sdpa_dense_mask", "sdpa_flash"])
@pytest.mark.parametrize("case", BA.cases(QUICK, DEVICE), ids=lambda c: c.id.replace(" ", ","))
def test_attention(benchmark, case, method, mode):
    backend = _attn_backend() if method == "ours" else "triton"
    q, k, v, do = BA._inputs(case, DEVICE)
    m = BA.build_method(method, case, q, k, v, DEVICE, backend)
    if isinstance(m, str):
        pytest.skip(m)
    ctx = _ctx("attention")
    if method == "ours":
        BA.check_ours(ctx, case, q, k, v, backend, set())
    else:
        BA.check_baseline(ctx, case, m)
    _require(ctx, method)
    d_o = do if m.bthd else do.transpose(1, 2).contiguous()
    flops = common.attention_flops(case.pairs(), case.batch, case.heads, case.d, mode)
    _bench(benchmark, _attn_mode_fn(m, d_o, mode), f"attention {case.id} {mode}", m.inputs, flops=flops,
           method=method, **case.params())


def _attn_mode_fn(m, d_o, mode):
    """The timed call of an attention ``Method`` in ``mode`` (bwd: of a retained graph)."""
    if mode == "fwd":
        return lambda: m.fn(*m.inputs)
    if mode == "bwd":
        out = m.fn(*m.inputs)
        return lambda: out.backward(d_o, retain_graph=True)
    return lambda: m.fn(*m.inputs).backward(d_o)


# ----------------------------------------------------------------------------- varlen (packed sequences)

_VARLEN_OK = None


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("method", list(BV.METHODS))
@pytest.mark.parametrize("case", BV.cases(QUICK, DEVICE), ids=lambda c: c.id.replace(" ", ","))
def test_varlen(benchmark, case, method, mode):
    global _VARLEN_OK
    if method.startswith("ours"):
        if _VARLEN_OK is None:
            _VARLEN_OK = BV.kernel_available(DEVICE)
        if not _VARLEN_OK[0]:
            pytest.skip(_VARLEN_OK[1])
    q, k, v, do = BV._inputs(case, DEVICE)
    m = BV.build_method(method, case, q, k, v, DEVICE, "triton")
    if isinstance(m, str):
        pytest.skip(m)
    ctx = _ctx("varlen")
    BV.check_method(ctx, case, m, q, k, v, BV.reference_rows_packed(q, k, v, case), "triton", set())
    _require(ctx, method)
    flops = common.attention_flops(case.pairs(), 1, case.hq, case.d, mode)  # useful pairs only
    _bench(benchmark, _attn_mode_fn(m, BV.grad_out(m, case, do), mode), f"varlen {case.id} {mode}", m.inputs,
           flops=flops, method=method, **case.params())


# ----------------------------------------------------------------------------- MoE

_MOE_OK = None


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", list(BM.METHODS))
@pytest.mark.parametrize("case", BM.cases(QUICK, DEVICE), ids=lambda c: c.id.replace(" ", ","))
def test_moe(benchmark, case, method, mode):
    global _MOE_OK
    if method == "ours":
        if _MOE_OK is None:
            _MOE_OK = BM.kernel_available(DEVICE)
        if not _MOE_OK[0]:
            pytest.skip(_MOE_OK[1])
    inp = BM.Inputs(case, DEVICE)
    built = BM.build_method(method, case, inp, DEVICE, "triton", BM.grouped_mm_available(DEVICE))
    if isinstance(built, str):
        pytest.skip(built)
    fn, leaves, _note = built
    ctx = _ctx("moe")
    if method in ("ours", "loop", "grouped_mm"):
        BM.check_forward(ctx, case, inp, method, fn, factor=2.0 if method == "ours" else 3.0,
                         baseline=method != "ours")
    _require(ctx, method)
    dy = inp.dy if method != "dense_gemm" else torch.randn_like(leaves[0].detach())
    run = fn if mode == "fwd" else (lambda: fn().backward(dy))
    _bench(benchmark, run, f"moe {case.id} {mode}", leaves, flops=common.moe_flops(inp.used_pairs, case.d, case.f,
                                                                                     mode),
           method=method, **case.params())


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def dasg_model_setup():
    from benchmarks.runner import FamilyUnavailable

    try:
        dasg_model, DASGConfig, DASGForCausalLM, set_backend = BMo._api()
        cfg, _ = BMo.make_config(DASGConfig, BMo.GPU_CONFIG if ON_GPU else BMo.CPU_CONFIG)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if ON_GPU else torch.float32
        model = DASGForCausalLM(cfg).to(DEVICE, dtype)
    except FamilyUnavailable as exc:
        pytest.skip(str(exc))
    ctx = _ctx("model")  # checked once: the model with our kernels against the fp32 reference model
    BMo._check_model(ctx, model, cfg, DEVICE, dtype, set_backend, DASGForCausalLM)
    return dasg_model, cfg, model, set_backend, ctx


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("variant", list(BMo.VARIANTS))
@pytest.mark.parametrize("t", BMo.cases(QUICK, DEVICE))
def test_model(benchmark, dasg_model_setup, t, variant, mode):
    import contextlib

    dasg_model, cfg, model, set_backend, ctx = dasg_model_setup
    _require(ctx, "DASGForCausalLM")
    if variant == "reference" and ON_GPU and BMo._reference_memory_bytes(cfg, t, mode == "train") > \
            0.8 * common.free_memory_bytes(DEVICE):
        pytest.skip("the reference model does not fit at this T")
    BMo._set_backend(model, "torch" if variant == "reference" else "auto", set_backend)
    ids = torch.randint(0, cfg.vocab_size, (1, t), device=DEVICE)
    model.train(mode == "train")

    def step():
        cm = BMo.dense_attention(dasg_model) if variant == "dense_sdpa" else contextlib.nullcontext()
        with cm:
            if mode == "train":
                model(ids, labels=ids).loss.backward()
            else:
                with torch.no_grad():
                    model(ids)

    params = [p for p in model.parameters() if p.requires_grad] if mode == "train" else ()
    _bench(benchmark, step, f"model T={t} {mode}", params, tokens=t, variant=variant)
    BMo._set_backend(model, "auto", set_backend)
    model.zero_grad(set_to_none=True)
