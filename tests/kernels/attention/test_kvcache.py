"""swa_attention_with_kvcache: a bounded ring + group-mean cache equals swa_attention over the history.

Rows are prefilled alone to different lengths (through batch-1 views of the cache), then
advance together in decode steps and chunks that cross group and window boundaries. Each
output is compared with ``swa_attention`` (torch backend) over the row's whole history.
"""
from __future__ import annotations

import pytest
import torch

import dasg_kernels as dk
from dasg_kernels.attention.kvcache import alloc_kvcache, swa_attention_with_kvcache
from _helpers import require_triton

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SUMMARY_NAMES = ("k_means", "v_means", "k_sum", "v_sum")
BACKENDS = ["torch", "triton"]


@pytest.fixture
def dev(backend, device) -> torch.device:
    """CPU for the torch backend; the kernels' device (CUDA, or the CPU interpreter) for triton."""
    if backend == "triton":
        require_triton(device, "swa_attention_with_kvcache")
        return device
    return torch.device("cpu")


def _row_slice(cache: dict, b: int) -> dict:
    return {n: t[b:b + 1] for n, t in cache.items()}


def _call(q, k, v, cache, seqlens, *, left, g, summaries, backend):
    kw = {n: cache[n] for n in SUMMARY_NAMES if n in cache}
    return swa_attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], seqlens, k, v, window=left,
                                      group_size=g, summaries=summaries, backend=backend, **kw)


def _history(b, t, hq, hkv, d, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, t, h, d, generator=gen).to(device, dtype) for h in (hq, hkv, hkv))


def _expected(q, k, v, left, g, summaries):
    return dk.swa_attention(q.float(), k.float(), v.float(), window=(left, 0), group_size=g,
                            summaries=summaries, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("summaries", [True, False])
@pytest.mark.parametrize("left,g,chunk,hq,hkv,d", [(7, 4, 5, 4, 2, 32), (16, 8, 11, 2, 2, 16), (3, 5, 1, 6, 2, 32)])
def test_prefill_then_decode_matches_full_history(backend, dev, summaries, left, g, chunk, hq, hkv, d):
    dtype = torch.float32
    starts = [0, 9, 22]  # rows prefilled alone to different lengths
    steps = 13  # then decode together, `chunk` positions per call (last call shorter)
    b, t = len(starts), max(starts) + steps + chunk
    q, k, v = _history(b, t, hq, hkv, d, dtype, device=dev)
    ref = _expected(q, k, v, left, g, summaries)
    cache = alloc_kvcache(b, left + chunk, hkv, d, group_size=g, max_seqlen=t, dtype=dtype, device=dev)
    seqlens = cache.pop("cache_seqlens")
    if not summaries:
        cache = {n: x for n, x in cache.items() if n not in SUMMARY_NAMES}
    for r, n0 in enumerate(starts):
        row = _row_slice(cache, r)
        for p in range(0, n0, chunk):
            n = min(chunk, n0 - p)
            out = _call(q[r:r + 1, p:p + n], k[r:r + 1, p:p + n], v[r:r + 1, p:p + n], row, seqlens[r:r + 1],
                        left=left, g=g, summaries=summaries, backend=backend)
            torch.testing.assert_close(out[0], ref[r, p:p + n], atol=TOL[dtype], rtol=TOL[dtype])
            seqlens[r] += n
    for step in range(0, steps, chunk):
        n = min(chunk, steps - step)
        idx = torch.tensor(starts, device=dev)[:, None] + step + torch.arange(n, device=dev)
        rows = torch.arange(b, device=dev)[:, None]
        gather = [x[rows, idx] for x in (q, k, v)]
        out = _call(*gather, cache, seqlens, left=left, g=g, summaries=summaries, backend=backend)
        torch.testing.assert_close(out, ref[rows, idx], atol=TOL[dtype], rtol=TOL[dtype])
        seqlens += n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_decode(backend, dev, dtype):
    left, g, hq, hkv, d, t = 6, 4, 4, 1, 32, 30
    q, k, v = _history(2, t, hq, hkv, d, dtype, seed=1, device=dev)
    ref = _expected(q, k, v, left, g, True)
    cache = alloc_kvcache(2, left + 1, hkv, d, group_size=g, max_seqlen=t, dtype=dtype, device=dev)
    seqlens = cache.pop("cache_seqlens")
    for p in range(t):
        out = _call(q[:, p:p + 1], k[:, p:p + 1], v[:, p:p + 1], cache, seqlens, left=left, g=g, summaries=True,
                    backend=backend)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref[:, p:p + 1], atol=TOL[dtype], rtol=TOL[dtype])
        seqlens += 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_already_in_cache_and_lse(backend, dev):
    """Without k, v the queries are the last Tq positions the cache holds."""
    left, g, t = 5, 3, 12
    q, k, v = _history(1, t, 2, 1, 16, torch.float32, seed=2, device=dev)
    cache = alloc_kvcache(1, left + 2, 1, 16, group_size=g, max_seqlen=t, device=dev)
    seqlens = cache.pop("cache_seqlens")
    for p in range(0, t, 2):  # append 0..11, two positions a call
        _call(q[:, p:p + 2], k[:, p:p + 2], v[:, p:p + 2], cache, seqlens, left=left, g=g, summaries=True,
              backend=backend)
        seqlens += 2
    kw = {n: cache[n] for n in ("k_means", "v_means")}
    out, lse = swa_attention_with_kvcache(q[:, 10:12], cache["k_cache"], cache["v_cache"], seqlens, window=left,
                                          group_size=g, summaries=True, return_lse=True, backend=backend, **kw)
    ref, ref_lse = dk.swa_attention_with_lse(q[:, :12], k[:, :12], v[:, :12], window=(left, 0), group_size=g,
                                             summaries=True, backend="torch")
    torch.testing.assert_close(out, ref[:, 10:12], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse[:, :, 10:12], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_is_never_cached_attended_or_averaged(backend, dev):
    """cache_seqlens = -p: the first p appended positions are padding; real tokens start at 0."""
    left, g, chunk, t = 4, 3, 6, 16
    pads = [0, 5, 9]  # row 2 is all padding in its first chunk
    b = len(pads)
    q, k, v = _history(b, t, 4, 2, 32, torch.float32, seed=5, device=dev)
    cache = alloc_kvcache(b, left + chunk, 2, 32, group_size=g, max_seqlen=t, device=dev)
    seqlens = -torch.tensor(pads, dtype=torch.int32, device=dev)
    cache.pop("cache_seqlens")
    outs = []
    for p in range(0, t, chunk):
        n = min(chunk, t - p)
        garbage = [x[:, p:p + n].clone() for x in (q, k, v)]
        for r, pad in enumerate(pads):  # what sits in the padding must not matter
            for x in garbage:
                x[r, :max(0, pad - p)] = 1e4
        outs.append(_call(*garbage, cache, seqlens, left=left, g=g, summaries=True, backend=backend))
        seqlens += n
    out = torch.cat(outs, 1)
    for r, pad in enumerate(pads):
        ref = _expected(q[r:r + 1, pad:], k[r:r + 1, pad:], v[r:r + 1, pad:], left, g, True)
        torch.testing.assert_close(out[r:r + 1, pad:], ref, atol=2e-5, rtol=2e-5)
        assert torch.isfinite(out[r, :pad]).all()


def test_unbounded_window_ring_holds_everything():
    t = 9
    q, k, v = _history(1, t, 2, 2, 16, torch.float32, seed=3)
    cache = alloc_kvcache(1, t, 2, 16)
    seqlens = cache.pop("cache_seqlens")
    out = _call(q, k, v, cache, seqlens, left=-1, g=None, summaries=False, backend="torch")
    torch.testing.assert_close(out, dk.swa_attention(q, k, v, backend="torch"), atol=2e-5, rtol=2e-5)


def test_empty_ring_row_gives_zero_not_nan():
    """left=0 sees only itself; a query whose own key was never written is still finite."""
    q, k, v = _history(1, 1, 2, 1, 16, torch.float32, seed=4)
    cache = alloc_kvcache(1, 1, 1, 16)
    seqlens = cache.pop("cache_seqlens")
    out = _call(q, k, v, cache, seqlens, left=0, g=None, summaries=False, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=2))


def test_bad_input_is_a_clear_error():
    q, k, v = _history(1, 2, 2, 1, 16, torch.float32)
    cache = alloc_kvcache(1, 4, 1, 16, group_size=4, max_seqlen=8)
    seqlens = cache.pop("cache_seqlens")
    with pytest.raises(ValueError, match="C >= left \\+ Tq"):
        _call(q, k, v, cache, seqlens, left=3, g=4, summaries=True, backend="torch")
    with pytest.raises(TypeError, match="cache_seqlens"):
        _call(q, k, v, cache, seqlens.long(), left=1, g=4, summaries=True, backend="torch")
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0 without k, v"):
        _call(q, None, None, cache, seqlens - 1, left=1, g=4, summaries=True, backend="torch")
    with pytest.raises(ValueError, match="k_means has 3 rows"):
        _call(q, k, v, cache, seqlens + 10, left=1, g=4, summaries=True, backend="torch")
    with pytest.raises(ValueError, match="needs k_sum"):
        _call(q, k, v, {**cache, "k_sum": None}, seqlens, left=1, g=4, summaries=True, backend="torch")
    with pytest.raises(ValueError, match="window\\[1\\] must be 0"):
        swa_attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], seqlens, k, v, window=(1, 1))
    with pytest.raises(ValueError, match="both k and v"):
        swa_attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], seqlens, k, None, window=1)
