"""flash-linear-attention's ``parallel_attn`` computes what our kernels compute, so the
benchmarks may time it beside ours: ``window_size=W`` (keys ``[i - W + 1, i]``) is our
``window=(W - 1, 0)``, causal, GQA by head groups, no summary keys.

Checked against :func:`dasg_kernels.reference.swa_attention_ref` on fla's own reference
(``naive_parallel_attn``) and on fla's Triton kernel under the interpreter, at tiny
ragged shapes. Skipped cleanly when ``fla-core`` (the ``bench`` extra) is not installed.
"""
import os

import pytest
import torch

fla_naive = pytest.importorskip("fla.ops.attn.naive", reason="fla-core not installed (pip install -e '.[bench]')")

from dasg_kernels.reference import swa_attention_ref  # noqa: E402

#: fp32 on both sides: the two references differ only in the order of their sums
TOL = {torch.float32: 5e-6}


def _inputs(b: int, t: int, hq: int, hkv: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g)
    k = torch.randn(b, t, hkv, d, generator=g)
    v = torch.randn(b, t, hkv, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("w", [1, 3, 16, 37, 200])
@pytest.mark.parametrize("t,hq,hkv,d", [(37, 4, 2, 16), (64, 2, 2, 32), (23, 6, 1, 8)])
def test_fla_reference_window_equals_ours(w, t, hq, hkv, d):
    """fla's reference with ``window_size=W`` equals ours with ``window=(W-1, 0)``
    (``W > T``: the whole causal prefix)."""
    q, k, v = _inputs(2, t, hq, hkv, d)
    out, _ = fla_naive.naive_parallel_attn(q, k, v, scale=d ** -0.5, window_size=w)
    ref, _ = swa_attention_ref(q, k, v, window=(w - 1, 0), causal=True)
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=0)


def test_window_off_by_one_is_detected():
    """The check above tells ``W`` from ``W + 1`` (it would pass a wrong mapping otherwise)."""
    q, k, v = _inputs(1, 40, 2, 2, 16, seed=3)
    out, _ = fla_naive.naive_parallel_attn(q, k, v, scale=16 ** -0.5, window_size=8)
    wrong, _ = swa_attention_ref(q, k, v, window=(8, 0), causal=True)
    assert (out - wrong).abs().max() > 1e-3


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="the kernel check runs in Triton's interpreter (CPU); on a GPU the benchmark checks it")
@pytest.mark.parametrize("w,t,hq,hkv", [(5, 45, 4, 2), (24, 70, 2, 1), (300, 33, 2, 2)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0/0 in the padded rows past T, masked at the store
def test_fla_kernel_window_equals_ours(w, t, hq, hkv):
    """fla's Triton kernel (``parallel_attn``, run by the interpreter) with ``window_size=W``
    equals our reference with ``window=(W-1, 0)``, GQA included."""
    fla_parallel = pytest.importorskip("fla.ops.attn.parallel")
    d = 16
    q, k, v = _inputs(1, t, hq, hkv, d, seed=w)
    out = fla_parallel.parallel_attn(q, k, v, scale=d ** -0.5, window_size=w)
    ref, _ = swa_attention_ref(q, k, v, window=(w - 1, 0), causal=True)
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=0)


# ----------------------------------------------------------------------------- the benchmarks' fla methods

_interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                       reason="runs fla's kernel in Triton's interpreter (CPU)")


@_interpreter_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bench_attention_fla_method_is_checked():
    """bench_attention's fla method, built as on a GPU, passes the baseline check against our
    reference (no summaries); built for W+1 keys it fails the check of the W case; it is not
    built with summaries or on the CPU (the reason is returned instead)."""
    import dataclasses
    import types

    from benchmarks import bench_attention as ba
    from benchmarks.common import Context

    c = ba.AttnCase(64, 16, 32, False, 2, dtype=torch.float32)
    q, k, v, _ = ba._inputs(c, torch.device("cpu"))
    cuda_like = types.SimpleNamespace(type="cuda")  # build_method only asks the device's type
    m = ba.build_method("fla", c, q, k, v, cuda_like, "torch")
    assert isinstance(m, ba.Method) and m.bthd
    ctx = Context.standalone("attention", torch.device("cpu"))
    assert ba.check_baseline(ctx, c, m)
    wrong = ba.build_method("fla", dataclasses.replace(c, w=17), q, k, v, cuda_like, "torch")
    assert not ba.check_baseline(ctx, c, wrong)
    assert ba.build_method("fla", dataclasses.replace(c, summaries=True), q, k, v, cuda_like,
                           "torch") == ba.FLA_NO_SUMMARIES
    assert ba.build_method("fla", c, q, k, v, torch.device("cpu"), "torch") == ba.FLA_CUDA_ONLY


@_interpreter_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bench_varlen_fla_method_is_checked():
    """bench_varlen's fla method (cu_seqlens, GQA) passes the baseline check on a packed batch."""
    import types

    from benchmarks import bench_varlen as bv
    from benchmarks.common import Context

    c = bv.VarlenCase((31, 27, 14), 16, 32, False, 2, 1, 4, torch.float32)
    q, k, v, _ = bv._inputs(c, torch.device("cpu"))
    m = bv.build_method("fla_varlen", c, q, k, v, types.SimpleNamespace(type="cuda"), "torch")
    assert isinstance(m, bv.Method)
    ctx = Context.standalone("varlen", torch.device("cpu"))
    assert bv.check_method(ctx, c, m, q, k, v, bv.reference_rows_packed(q, k, v, c), "torch", set())


def test_peer_ratio_on_records():
    """The fla records carry ours' speed-up in the same mode (fla ms / ours ms)."""
    from benchmarks import bench_attention as ba
    from benchmarks.common import Context

    ctx = Context.standalone("attention", torch.device("cpu"))
    for method, ms in (("ours", 2.0), ("fla", 3.0)):
        ctx.add_record(case_id="x", method=method, mode="fwd", ms=ms)
    ctx.add_record(case_id="x", method="fla", mode="bwd", ms=5.0)  # ours not timed in bwd: no ratio
    ba.peer_ratios(ctx, "attention", "x", "fla")
    fla = {r["mode"]: r for r in ctx.records if r["method"] == "fla"}
    assert fla["fwd"]["ours_speedup"] == 1.5 and "ours_speedup" not in fla["bwd"]
