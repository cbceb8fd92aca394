"""The ``torch`` backend: blockwise attention equals the reference and stays linear in T;
and regression tests: NaN propagation, ``TRITON_INTERPRET`` set after import, MoE
``auto`` fallback, huge ``group_size``, ``torch.compile`` of the MoE torch path."""
import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dasg_kernels as dk
from dasg_kernels import reference as ref
from dasg_kernels.attention.blockwise import group_means, swa_attention_blockwise
from dasg_kernels.moe import interface as moe_interface

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _qkv(b, t, hq, hkv, d, dtype=torch.float32, tk=None, device="cpu"):
    tk = t if tk is None else tk
    mk = lambda *s: torch.randn(*s, device=device).to(dtype).requires_grad_()  # noqa: E731
    return mk(b, t, hq, d), mk(b, tk, hkv, d), mk(b, tk, hkv, d)


def _fwd_bwd(fn, q, k, v, **kw):
    out, lse = fn(q, k, v, **kw)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), do))


def _assert_matches(got, want, atol, rtol):
    names = ("out", "lse", "dq", "dk", "dv")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=name)


# --------------------------------------------------------------------------- equals the reference

WINDOWS = [(-1, -1), (5, 0), (3, 4), (0, 0), (-1, 3), (6, -1)]
SEMANTICS = list(itertools.product(
    [(4, 2), (3, 1), (2, 2)],     # (Hq, Hkv): GQA, MQA, MHA
    WINDOWS,
    [True, False],                # causal
    [(None, False), (4, True), (7, True), (7, False)],  # (G, summaries)
))


# T ragged, not multiples of the block or of G: with the default block (one block at these
# T) T=1 and T=70; with 8-row blocks T=37 (4 whole blocks and a partial one, groups of 4 and
# 7 straddling blocks)
@pytest.mark.parametrize("block_size, lengths", [(None, (1, 70)), (8, (37,))])
def test_blockwise_equals_reference_fp32(block_size, lengths):
    """fp32, forward and every gradient, over the product of heads, windows, causal and
    groups at each T: the same fp32 math in another order (atol 2e-5)."""
    torch.manual_seed(0)
    for t, ((hq, hkv), window, causal, (g, summaries)) in itertools.product(lengths, SEMANTICS):
        q, k, v = _qkv(2, t, hq, hkv, 16)
        kw = dict(window=window, causal=causal, group_size=g, summaries=summaries)
        got = _fwd_bwd(swa_attention_blockwise, q, k, v, block_size=block_size, **kw)
        want = _fwd_bwd(ref.swa_attention_ref, q, k, v, **kw)
        _assert_matches(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blockwise_equals_reference_16bit(dtype):
    """16-bit inputs: both compute in fp32 and round once at the end, so the outputs and
    gradients agree to one rounding of the output dtype (atol/rtol 1e-2)."""
    torch.manual_seed(0)
    for window, causal in [((9, 0), True), ((4, 6), False), ((-1, -1), True)]:
        q, k, v = _qkv(1, 45, 4, 2, 32, dtype)
        kw = dict(window=window, causal=causal, group_size=8, summaries=True)
        got = _fwd_bwd(swa_attention_blockwise, q, k, v, block_size=16, **kw)
        want = _fwd_bwd(ref.swa_attention_ref, q, k, v, **kw)
        _assert_matches(got, want, atol=1e-2, rtol=1e-2)


def test_public_torch_backend_is_blockwise():
    """``backend="torch"`` of the public ops (training and decode) equals the reference."""
    q, k, v = _qkv(1, 40, 4, 2, 16)
    kw = dict(window=(6, 0), group_size=5, summaries=True)
    out, lse = dk.swa_attention_with_lse(q, k, v, backend="torch", **kw)
    ro, rl = ref.swa_attention_ref(q, k, v, **kw)
    torch.testing.assert_close(out, ro, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=2e-5, rtol=1e-5)
    out, lse = dk.swa_decode(q[:, -3:], k, v, backend="torch", return_lse=True, **kw)
    ro, rl = ref.swa_attention_ref(q[:, -3:], k, v, **kw)
    torch.testing.assert_close(out, ro, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("q_offset", [None, 0, 3, 30])
def test_decode_offsets_and_empty_rows(q_offset):
    """Queries at ``q_offset + r`` against a longer cache. With ``q_offset`` past the cache
    and no summaries, the rows see no key: output 0, lse -inf, zero gradients, no NaN."""
    q, k, v = _qkv(1, 3, 4, 2, 16, tk=12)
    for window, summaries in [((4, 0), False), ((4, 0), True), ((2, 3), True)]:
        kw = dict(window=window, causal=window[1] == 0, group_size=4, summaries=summaries, q_offset=q_offset)
        got = _fwd_bwd(swa_attention_blockwise, q, k, v, block_size=2, **kw)
        want = _fwd_bwd(ref.swa_attention_ref, q, k, v, **kw)
        assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
        _assert_matches(got, want, atol=2e-5, rtol=1e-5)
        assert not any(t.isnan().any() for t in got)
    kw = dict(window=(4, 0), causal=True, q_offset=30)
    out, lse, dq, dk_, dv = _fwd_bwd(swa_attention_blockwise, q, k, v, **kw)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    assert not dq.any() and not dk_.any() and not dv.any()


def test_empty_sequence_and_compile():
    q, k, v = _qkv(2, 0, 4, 2, 16)
    out, lse = swa_attention_blockwise(q, k, v, group_size=4, summaries=True)
    assert out.shape == (2, 0, 4, 16) and lse.shape == (2, 4, 0)
    # no host reads: torch.compile traces it whole (k passed twice is fine too)
    q, k, _ = _qkv(1, 20, 4, 2, 16)
    fn = lambda q, k: dk.swa_attention(q, k, k, window=(5, 0), group_size=4, summaries=True,  # noqa: E731
                                       backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k), fn(q, k), rtol=0, atol=0)


# --------------------------------------------------------------------------- memory linear in T


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage any op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _largest_bytes(fn, t, **kw):
    """On the meta device (no memory, no compute): the largest intermediate of a forward
    and backward at sequence length ``t`` (8 q heads, 2 kv heads, D 64)."""
    q, k, v = _qkv(1, t, 8, 2, 64, device="meta")
    with _LargestTensor() as mode:
        out, _ = fn(q, k, v, **kw)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return mode.largest


def test_memory_is_linear_in_t():
    """Doubling T at most doubles the largest tensor of the blockwise backend (forward and
    backward), where the reference's grows 4x; at T=16k it stays within O(T) buffers."""
    kw = dict(window=(255, 0), group_size=64, summaries=True)
    sizes = {t: _largest_bytes(swa_attention_blockwise, t, **kw) for t in (4096, 8192, 16384)}
    assert sizes[8192] <= 2 * sizes[4096] and sizes[16384] <= 2 * sizes[8192], sizes
    assert sizes[16384] <= 16384 * 8 * 64 * 4, sizes  # one fp32 [T, Hq, D] buffer
    r = [_largest_bytes(ref.swa_attention_ref, t, **kw) for t in (1024, 2048)]
    assert r[1] >= 3.5 * r[0]  # the check can tell: the reference is quadratic


# --------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("fn", [swa_attention_blockwise, ref.swa_attention_ref], ids=["blockwise", "reference"])
def test_nan_propagates_only_rows_without_keys_are_zero(fn):
    """A NaN query or key shows in the rows that use it (as SDPA and the kernels), not 0;
    rows that never see it stay finite; a row that sees no key is 0."""
    q, k, v = (t.detach() for t in _qkv(1, 24, 2, 1, 8))
    q[0, 5, 1] = float("nan")
    k[0, 20, 0, 3] = float("nan")
    out, lse = fn(q, k, v, window=(2, 0), causal=True)
    assert out[0, 5, 1].isnan().all() and lse[0, 1, 5].isnan()
    assert out[0, 20:23].isnan().all()  # rows 20, 21, 22 see key 20
    assert out[0, 5, 0].isfinite().all()
    finite_rows = [r for r in range(24) if r != 5 and r not in (20, 21, 22)]
    assert out[0, finite_rows].isfinite().all()
    # with summaries: a NaN key's group mean reaches every row that sees that summary
    k2 = k.clone()
    k2[0, 20, 0, 3] = 0.0
    k2[0, 2, 0, 0] = float("nan")  # group 0 = [0, 4): seen by rows i with 3 < i - 2
    out, _ = fn(q, k2, v, window=(2, 0), causal=True, group_size=4, summaries=True)
    assert out[0, 2:5].isnan().all() and out[0, 6:].isnan().all()  # local key 2 / summary 0
    assert out[0, :2].isfinite().all() and out[0, 5, 0].isfinite().all()
    # an empty row (queries past the cache) is still 0, NaN elsewhere or not
    out, lse = fn(q[:, :2], k, v, window=(2, 0), causal=True, q_offset=40)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


def test_interpret_set_after_import_subprocess():
    """``TRITON_INTERPRET=1`` set after ``import dasg_kernels``: ``auto`` runs the torch
    backend (no InterpreterError), ``triton`` is the clear ValueError."""
    code = textwrap.dedent("""
        import os, torch
        import dasg_kernels as dk
        os.environ["TRITON_INTERPRET"] = "1"
        q = torch.randn(1, 16, 2, 32)
        out = dk.swa_attention(q, q, q, window=(3, 0), backend="auto")
        torch.testing.assert_close(out, dk.reference.swa_attention_ref(q, q, q, window=(3, 0))[0])
        try:
            dk.swa_attention(q, q, q, backend="triton")
        except ValueError as e:
            assert "before importing dasg_kernels" in str(e), e
            print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr[-3000:]


def _moe_problem(n=6, d=20, f=12, e=3):
    x = torch.randn(n, d)
    w1, w2 = torch.randn(e, 2 * f, d) / d ** 0.5, torch.randn(e, d, f) / f ** 0.5
    ids = torch.stack([torch.randperm(e)[:2] for _ in range(n)]).int()
    return x, w1, w2, ids, torch.rand(n, 2)


@pytest.mark.parametrize("d,f,kind", [(20, 16, "hidden size D"), (16, 12, "expert size F")])
def test_moe_auto_falls_back_for_sizes_the_kernels_lack(monkeypatch, d, f, kind):
    """D or F not a multiple of 16: ``auto`` warns once (naming the reason) and runs the
    torch path, like attention; ``triton`` raises."""
    monkeypatch.setattr(moe_interface, "_FALLBACK_WARNED", set(), raising=False)
    x, w1, w2, ids, wt = _moe_problem(d=d, f=f)
    want = ref.expert_ffn_ref(x, w1, w2, ids, wt)
    with pytest.warns(RuntimeWarning, match=kind):
        y = dk.expert_ffn(x, w1, w2, (ids, wt), backend="auto")
    torch.testing.assert_close(y, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        dk.expert_ffn(x, w1, w2, (ids, wt), backend="auto")
    router = torch.randn(3, d)
    with pytest.warns(RuntimeWarning, match=kind):
        y, r = dk.moe_ffn(x, router, w1, w2, k_max=2, backend="auto")
    torch.testing.assert_close(y, ref.expert_ffn_ref(x, w1, w2, r.expert_ids, r.weights))
    if dk.resolve_backend("auto", x) == "triton":
        with pytest.raises(ValueError, match="multiple of 16"):
            dk.expert_ffn(x, w1, w2, (ids, wt), backend="triton")


def test_huge_group_size_is_linear_memory():
    """``group_size=10**9`` pools in O(T) memory, never ``[ng * G]`` padded rows (128 GB)."""
    x = torch.randn(1, 100, 2, 8, device="meta")
    with _LargestTensor() as mode:
        ref.group_means_ref(x, 10 ** 9)
    assert mode.largest <= x.numel() * 4
    q, k, v = _qkv(1, 30, 2, 2, 8, device="meta")
    with _LargestTensor() as mode:
        dk.swa_attention(q, k, v, window=(4, 0), group_size=10 ** 9, summaries=True, backend="torch")
    assert mode.largest <= 30 * 2 * 8 * 4 * 4
    q, k, v = _qkv(1, 30, 2, 2, 8)
    got = dk.swa_attention(q, k, v, window=(4, 0), group_size=10 ** 9, summaries=True, backend="torch")
    torch.testing.assert_close(got, dk.swa_attention(q, k, v, window=(4, 0), backend="torch"))  # never visible
    torch.testing.assert_close(ref.group_means_ref(k, 10 ** 9), k.mean(1, keepdim=True))


@pytest.mark.parametrize("t, g", [(1, 4), (13, 4), (16, 4), (7, 1), (5, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_group_means_equal_the_oracle(t, g, dtype):
    """The torch core pools its own summaries (it imports no oracle): the same means,
    the last partial group averaged over the positions it has, in the input dtype."""
    x = torch.randn(2, t, 3, 8).to(dtype)
    got = group_means(x, g)
    assert got.dtype == dtype and got.shape == (2, -(-t // g), 3, 8)
    torch.testing.assert_close(got, ref.group_means_ref(x, g), rtol=0, atol=0)
    torch.testing.assert_close(got[:, -1].float(), x[:, (got.shape[1] - 1) * g:].float().mean(1).to(dtype).float())


def test_expert_ffn_torch_path_compiles_fullgraph():
    """The id range check reads the ids back: skipped while torch.compile traces, so the
    torch path compiles with ``fullgraph=True``; eager still rejects bad ids."""
    x, w1, w2, ids, wt = _moe_problem(d=16, f=16)
    ids[::3, -1] = -1
    fn = lambda x, w1, w2, ids, wt: dk.expert_ffn(x, w1, w2, (ids, wt), backend="torch")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, y_ref = compiled(xs[0], w1, w2, ids, wt), fn(xs[1], w1, w2, ids, wt)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, xs[0], dy)[0], torch.autograd.grad(y_ref, xs[1], dy)[0])
    router = torch.randn(3, 16)
    moe = lambda x, r: dk.moe_ffn(x, r, w1, w2, top_p=0.7, k_max=2, backend="torch")[0]  # noqa: E731
    torch.testing.assert_close(torch.compile(moe, fullgraph=True, backend="eager")(x, router), moe(x, router))
    with pytest.raises(ValueError, match="expert_ids must lie in"):
        dk.expert_ffn(x, w1, w2, (ids + 3, wt), backend="torch")
