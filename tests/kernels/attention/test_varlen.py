"""``swa_attention_varlen`` (packed sequences) against the reference run on each sequence alone.

Ground truth: :func:`dasg_kernels.reference.swa_attention_ref` in fp32 on each sequence
(``q_offset = len_k - len_q``: a sequence's queries are its last positions), outputs and
gradients scattered back to the packed rows. Tolerances: fp32 ``atol = rtol = 1e-4``
(out, lse, dq, dk, dv); fp16 ``atol = rtol = 2e-3`` on out and ``1e-2`` on the gradients
(inputs of unit scale; the fp16 kernels round P and dS to fp16 before their dots).
Every buffer the launchers allocate is NaN-filled first, so a row no program writes fails.
"""
from __future__ import annotations

import math

import pytest
import torch
from _helpers import require_triton
from torch.testing import assert_close

from dasg_kernels import reference, swa_attention, swa_attention_varlen
from dasg_kernels.attention import host

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(host, "POISON_ALLOCATIONS", True)


def _cu(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(total_q, total_k, hq, hkv, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(total_q, hq, d, generator=gen).to(device, dtype)
    k = torch.randn(total_k, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(total_k, hkv, d, generator=gen).to(device, dtype)
    return q, k, v


def _per_sequence_ref(q, k, v, lq, lk, dout=None, **kw):
    """Reference out / lse (and grads with ``dout``) from each sequence alone."""
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    outs, lses = [], []
    cq, ck = 0, 0
    for nq, nk in zip(lq, lk):
        if nq == 0:
            cq, ck = cq + nq, ck + nk
            continue
        o, l_ = reference.swa_attention_ref(qf[None, cq:cq + nq], kf[None, ck:ck + nk], vf[None, ck:ck + nk],
                                            q_offset=nk - nq, **kw)
        outs.append(o[0])
        lses.append(l_[0])
        cq, ck = cq + nq, ck + nk
    out = torch.cat(outs) if outs else qf.new_zeros(qf.shape)
    lse = torch.cat(lses, 1) if lses else qf.new_zeros(qf.shape[1], 0)
    grads = None
    if dout is not None:
        (out * dout.float()).sum().backward()
        grads = (qf.grad, kf.grad, vf.grad)
    return out.detach(), lse.detach(), grads


CASES = [
    # lengths (some 0 and 1), window, causal, G (None = no summaries), heads (hq, hkv), d
    dict(lengths=[5, 0, 1, 37, 16], window=(8, 0), causal=True, g=4, heads=(4, 2), d=16),
    dict(lengths=[33, 2, 19], window=(-1, -1), causal=True, g=None, heads=(2, 2), d=32),
    dict(lengths=[1, 1, 40], window=(6, 3), causal=False, g=8, heads=(2, 1), d=16),
    dict(lengths=[0, 29, 0], window=(3, 0), causal=True, g=5, heads=(4, 1), d=24),
    dict(lengths=[12, 70], window=(16, 0), causal=True, g=16, heads=(2, 2), d=16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c["lengths"])))
def test_varlen_matches_each_sequence_alone(case, device):
    require_triton(device, "swa_attention_varlen")
    lengths, hq, hkv, d = case["lengths"], *case["heads"], case["d"]
    total = sum(lengths)
    q, k, v = _inputs(total, total, hq, hkv, d, torch.float32, device)
    cu = _cu(lengths, device)
    kw = dict(window=case["window"], causal=case["causal"], group_size=case["g"], summaries=case["g"] is not None)
    dout = torch.randn(total, hq, d, generator=torch.Generator().manual_seed(1)).to(device)

    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = swa_attention_varlen(qt, kt, vt, cu, cu, max(lengths), max(lengths), return_lse=True,
                                    backend="triton", **kw)
    (out * dout).sum().backward()
    ref_out, ref_lse, (dq, dk, dv) = _per_sequence_ref(q, k, v, lengths, lengths, dout, **kw)

    t = dict(atol=1e-4, rtol=1e-4)
    assert_close(out, ref_out, **t)
    assert_close(lse, ref_lse, **t)
    assert_close(qt.grad, dq, **t)
    assert_close(kt.grad, dk, **t)
    assert_close(vt.grad, dv, **t)


def test_varlen_queries_are_the_last_positions(device):
    """len_q < len_k (prefill after a prefix): each sequence's queries are its last rows."""
    require_triton(device, "swa_attention_varlen")
    lq, lk = [3, 0, 1, 9], [20, 4, 1, 9]
    q, k, v = _inputs(sum(lq), sum(lk), 4, 2, 16, torch.float32, device)
    kw = dict(window=(5, 0), causal=True, group_size=4, summaries=True)
    with torch.no_grad():
        out = swa_attention_varlen(q, k, v, _cu(lq, device), _cu(lk, device), max(lq), max(lk), backend="triton",
                                   **kw)
    ref, _, _ = _per_sequence_ref(q, k, v, lq, lk, **kw)
    assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_varlen_fp16_and_loose_max_seqlen(device):
    """fp16, forward and gradients; ``max_seqlen`` larger than the longest sequence (a static
    bound) changes nothing."""
    require_triton(device, "swa_attention_varlen")
    lengths = [7, 22, 1]
    q, k, v = _inputs(sum(lengths), sum(lengths), 2, 1, 32, torch.float16, device)
    kw = dict(window=(4, 0), causal=True, group_size=4, summaries=True)
    cu = _cu(lengths, device)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out = swa_attention_varlen(qt, kt, vt, cu, cu, 64, 64, backend="triton", **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device, torch.float16)
    (out.float() * dout.float()).sum().backward()
    ref, _, grads = _per_sequence_ref(q, k, v, lengths, lengths, dout, **kw)
    assert out.dtype == torch.float16 and qt.grad.dtype == torch.float16
    assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    for name, g, r in zip(("dq", "dk", "dv"), (qt.grad, kt.grad, vt.grad), grads):
        assert_close(g.float(), r, atol=1e-2, rtol=1e-2, msg=name)


def test_varlen_one_sequence_equals_dense(device):
    require_triton(device, "swa_attention_varlen")
    q, k, v = _inputs(45, 45, 4, 2, 16, torch.float32, device)
    kw = dict(window=(9, 0), causal=True, group_size=8, summaries=True, backend="triton")
    cu = _cu([45], device)
    assert_close(swa_attention_varlen(q, k, v, cu, cu, 45, 45, **kw), swa_attention(q[None], k[None], v[None], **kw)[0],
                 atol=1e-5, rtol=1e-5)


def test_varlen_torch_backend_matches_triton(device):
    require_triton(device, "swa_attention_varlen")
    lengths = [9, 0, 14]
    q, k, v = _inputs(sum(lengths), sum(lengths), 2, 2, 16, torch.float32, device)
    cu = _cu(lengths, device)
    kw = dict(window=(3, 0), causal=True, group_size=4, summaries=True)
    tr = swa_attention_varlen(q, k, v, cu, cu, 14, 14, backend="triton", **kw)
    to = swa_attention_varlen(q, k, v, cu, cu, 14, 14, backend="torch", **kw)
    assert_close(tr, to, atol=1e-4, rtol=1e-4)


def test_varlen_empty_batch_and_all_empty(device):
    require_triton(device, "swa_attention_varlen")
    q, k, v = _inputs(0, 0, 2, 1, 16, torch.float32, device)
    for cu in (torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(3, dtype=torch.int32, device=device)):
        out, lse = swa_attention_varlen(q, k, v, cu, cu, 0, 0, return_lse=True, backend="triton")
        assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


def test_varlen_backward_needs_equal_bounds(device):
    require_triton(device, "swa_attention_varlen")
    q, k, v = _inputs(4, 6, 2, 1, 16, torch.float32, device)
    q.requires_grad_()
    out = swa_attention_varlen(q, k, v, _cu([2, 2], device), _cu([3, 3], device), 2, 3, backend="triton")
    with pytest.raises(ValueError, match="cu_seqlens_q == cu_seqlens_k"):
        out.sum().backward()


@pytest.mark.parametrize("bad, match", [
    (dict(cu_dtype=torch.int64), "cu_seqlens_q must have dtype in \\(int32\\)"),
    (dict(q_ndim=4), "q must have 3 dimensions"),
    (dict(max_q=-1), "max_seqlen_q must be in"),
    (dict(max_q=9, max_k=4), "max_seqlen_q \\(9\\) must be <= max_seqlen_k"),
    (dict(cu_k_len=2), "must both have B \\+ 1 entries"),
])
def test_varlen_bad_input(bad, match, device):
    q, k, v = _inputs(8, 8, 2, 1, 16, torch.float32, device)
    cu = torch.tensor([0, 3, 8], dtype=bad.get("cu_dtype", torch.int32), device=device)
    cu_k = cu[: bad["cu_k_len"]] if "cu_k_len" in bad else cu
    if bad.get("q_ndim") == 4:
        q = q[None]
    with pytest.raises((ValueError, TypeError), match=match):
        swa_attention_varlen(q, k, v, cu, cu_k, bad.get("max_q", 5), bad.get("max_k", 5))


def test_varlen_trailing_empty_sequences(device):
    """``cu_seqlens`` sized for the worst case (many empty trailing sequences, as the
    transformers drop-in passes under compile) gives the same rows."""
    require_triton(device, "swa_attention_varlen")
    lengths = [6, 11]
    q, k, v = _inputs(17, 17, 2, 1, 16, torch.float32, device)
    kw = dict(window=(4, 0), causal=True, group_size=4, summaries=True, backend="triton")
    cu = _cu(lengths, device)
    cu_wide = torch.cat([cu, cu[-1:].expand(30)])
    qt = q.clone().requires_grad_()
    out = swa_attention_varlen(qt, k, v, cu_wide, cu_wide, 17, 17, **kw)
    out.sum().backward()
    qr = q.clone().requires_grad_()
    ref = swa_attention_varlen(qr, k, v, cu, cu, 11, 11, **kw)
    ref.sum().backward()
    assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert_close(qt.grad, qr.grad, atol=1e-6, rtol=1e-6)


def test_varlen_compiles_fullgraph(device):
    """One opaque custom op under ``torch.compile(fullgraph=True)``, forward and backward."""
    require_triton(device, "swa_attention_varlen")
    lengths = [5, 9]
    q, k, v = _inputs(14, 14, 2, 2, 16, torch.float32, device)
    cu = _cu(lengths, device)
    kw = dict(window=(3, 0), causal=True, group_size=4, summaries=True, backend="triton")

    def f(q, k, v, cu):
        return swa_attention_varlen(q, k, v, cu, cu, 9, 9, **kw)

    qc, qe = q.clone().requires_grad_(), q.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(qc, k, v, cu)
    out.sum().backward()
    ref = f(qe, k, v, cu)
    ref.sum().backward()
    assert_close(out, ref)
    assert_close(qc.grad, qe.grad)


def test_varlen_value_head_dim_of_its_own(device):
    """MLA-style head dims (q/k 24, v 16 here; 192 / 128 in DeepSeek-V3), forward and backward."""
    require_triton(device, "swa_attention_varlen")
    lengths = [9, 1, 20]
    total = sum(lengths)
    q, k, _ = _inputs(total, total, 4, 2, 24, torch.float32, device)
    v = torch.randn(total, 2, 16, device=device)
    cu = _cu(lengths, device)
    kw = dict(window=(5, 0), causal=True, group_size=4, summaries=True)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out = swa_attention_varlen(qt, kt, vt, cu, cu, 20, 20, backend="triton", **kw)
    assert out.shape == (total, 4, 16)
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    ref, _, (dq, dk, dv) = _per_sequence_ref(q, k, v, lengths, lengths, dout, **kw)
    t = dict(atol=1e-4, rtol=1e-4)
    assert_close(out, ref, **t)
    for g, r in zip((qt.grad, kt.grad, vt.grad), (dq, dk, dv)):
        assert_close(g, r, **t)


# --------------------------------------------------------------------------- bad cu_seqlens

# (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, message) for q of 30 rows and
# k, v of 30 rows; cu_seqlens_k None: the same tensor as cu_seqlens_q.
BAD_BOUNDS = {
    "q-ends-past": ([0, 10, 40], None, 30, 30, r"cu_seqlens_q must end at the packed length q.shape\[0\] = 30, "
                                               r"got cu_seqlens_q\[-1\] = 40"),
    "q-ends-before": ([0, 10, 25], [0, 10, 30], 20, 20, r"cu_seqlens_q must end at the packed length"),
    "q-starts-at-2": ([2, 10, 30], [0, 10, 30], 20, 20, r"cu_seqlens_q must start at 0, got cu_seqlens_q\[0\] = 2"),
    "q-decreasing": ([0, 20, 8, 30], None, 22, 22, r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q\[1\] = 20 "
                                                   r"> cu_seqlens_q\[2\] = 8"),
    "k-ends-past": ([0, 10, 30], [0, 10, 40], 30, 30, r"cu_seqlens_k must end at the packed length k.shape\[0\] = 30"),
    "k-negative": ([0, 10, 30], [0, -2, 30], 32, 32, r"cu_seqlens_k must be non-decreasing"),
    "max-q-small": ([0, 10, 30], None, 10, 20, r"max_seqlen_q \(10\) must be >= the longest sequence of "
                                               r"cu_seqlens_q \(20, sequence 1\)"),
    "max-k-small": ([0, 10, 30], [0, 5, 30], 20, 20, r"max_seqlen_k \(20\) must be >= the longest sequence of "
                                                     r"cu_seqlens_k \(25, sequence 1\)"),
    "q-longer-than-k": ([0, 20, 30], [0, 10, 30], 20, 20, r"sequence 0 has 20 queries \(cu_seqlens_q\) and 10 keys "
                                                          r"\(cu_seqlens_k\)"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(BAD_BOUNDS))
def test_varlen_bad_bounds_raise(name, backend, device):
    """Every bad ``cu_seqlens`` / ``max_seqlen`` value raises a ``ValueError`` naming the
    argument before any launch, on both backends (one host read in eager mode)."""
    if backend == "triton":
        require_triton(device, "swa_attention_varlen")
    bq, bk, max_q, max_k, match = BAD_BOUNDS[name]
    q, k, v = _inputs(30, 30, 2, 1, 16, torch.float32, device)
    cu_q = torch.tensor(bq, dtype=torch.int32, device=device)
    cu_k = cu_q if bk is None else torch.tensor(bk, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=match):
        swa_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window=(3, 0), group_size=4, summaries=True,
                             backend=backend)


GUARD = 4096  # elements of NaN before and after every input, of a finite sentinel around every launcher buffer
SENTINEL = 12345.0

# (cu_seqlens, max_seqlen, packed rows every kernel writes) of 30 packed rows, run with validate=False
UNCHECKED_BOUNDS = {
    "ends-past": ([0, 10, 40], 30, 30),  # clamped: rows [10, 30)
    "negative": ([0, -6, 30], 36, 30),  # clamped: [0, 0) and [0, 30)
    "decreasing": ([0, 20, 8, 30], 22, 30),  # clamped: [0, 20), [20, 20), [8, 30)
    "max-small": ([0, 10, 30], 10, 20),  # sequence 1 cut to its first 10 rows: rows [20, 30) unwritten
}


def _guarded(shape, dtype, device, fill, bufs):
    """A contiguous tensor of ``shape`` inside a buffer with ``GUARD`` elements of ``fill`` on
    each side (kept in ``bufs``, to check that no kernel wrote there)."""
    n = math.prod(shape)
    buf = torch.full((n + 2 * GUARD,), fill, dtype=dtype, device=device)
    bufs.append(buf)
    return buf[GUARD:GUARD + n].view(shape)


@pytest.mark.parametrize("name", list(UNCHECKED_BOUNDS))
def test_varlen_unchecked_bounds_stay_in_bounds(name, device, monkeypatch):
    """With ``validate=False`` (as under ``torch.compile``) bad ``cu_seqlens`` never make a
    kernel read or write outside its buffers, forward and backward: the inputs sit between NaN
    guards (a row read past the packed length turns the rows that see it NaN) and every buffer
    the launchers allocate between sentinel guards (a row written past its end changes them).
    A window that looks both ways makes rows past the end visible to the last rows."""
    require_triton(device, "swa_attention_varlen")
    bounds, max_len, n_ok = UNCHECKED_BOUNDS[name]
    inputs, allocated = [], []
    monkeypatch.setattr(host, "new_empty",
                        lambda shape, dtype, dev: _guarded(shape, dtype, dev, SENTINEL, allocated).fill_(float("nan")))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_guarded(s, torch.float32, device, float("nan"), inputs).copy_(torch.randn(s, generator=gen))
               .requires_grad_() for s in ((30, 2, 16), (30, 1, 16), (30, 1, 16)))
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    kw = dict(window=(3, 3), causal=False, group_size=4, summaries=True, backend="triton")
    out = swa_attention_varlen(q, k, v, cu, cu, max_len, max_len, validate=False, **kw)
    (out * torch.randn(out.shape, generator=gen).to(device)).sum().backward()
    for t, what in ((out, "out"), (q.grad, "dq"), (k.grad, "dk"), (v.grad, "dv")):
        assert torch.isfinite(t[:n_ok]).all(), f"{what}: a kernel read past its buffer"
    assert allocated, "the launchers allocate through host.new_empty"
    for buf in allocated:
        assert (buf[:GUARD] == SENTINEL).all() and (buf[-GUARD:] == SENTINEL).all(), "a kernel wrote past a buffer"
    for buf in inputs:
        assert buf[:GUARD].isnan().all() and buf[-GUARD:].isnan().all()
    if name == "ends-past":  # clamped to the packed length: the bounds [0, 10, 30]
        monkeypatch.undo()
        ref = swa_attention_varlen(q.detach(), k.detach(), v.detach(), _cu([10, 20], device), _cu([10, 20], device),
                                   20, 20, **kw)
        assert torch.equal(out.detach(), ref)


def test_varlen_torch_backend_checks_unvalidated_bounds(device):
    """The ``torch`` backend reads ``cu_seqlens`` on the host anyway: it checks them even with
    ``validate=False``."""
    q, k, v = _inputs(30, 30, 2, 1, 16, torch.float32, device)
    cu = torch.tensor([0, 10, 40], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the packed length"):
        swa_attention_varlen(q, k, v, cu, cu, 30, 30, validate=False, backend="torch")
