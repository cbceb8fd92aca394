"""The attention kernels' two load paths: TMA descriptors (2-byte inputs with aligned
strides; the forward's loop software-pipelined or not, as its config says) and pointer
loads (everything else).

Under the interpreter fp16 inputs take the TMA path and fp32 the pointer path, so the
other test modules cover both; here the same fp16 inputs run through both paths (the
choice forced with a monkeypatch), forward and backward, against the fp32 reference, on
ragged lengths whose last tiles (and the pipelined loop's spare tile) lie past the keys.
The launch-time helpers (:func:`host.tma_loads_ok`, :func:`host.tma_scratch`) are
checked without kernels.
"""
from __future__ import annotations

import pytest
import torch
from _helpers import require_triton

from dasg_kernels import reference, swa_attention_varlen, swa_attention_with_lse
from dasg_kernels.attention import host

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(host, "POISON_ALLOCATIONS", True)


def _paths(monkeypatch, tma: bool) -> list[bool]:
    """Force the load path; returns the list of the decisions the launchers asked for."""
    asked: list[bool] = []
    real = host.tma_loads_ok

    def decide(*tensors):
        ok = real(*tensors) if tma else False
        asked.append(ok)
        return ok

    monkeypatch.setattr(host, "tma_loads_ok", decide)
    return asked


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    assert torch.equal(torch.isinf(x), torch.isinf(ref)) and not torch.isnan(x).any()
    fin = torch.isfinite(ref)
    return (x[fin] - ref[fin]).abs().max().item()


# (window, causal, summaries): local tiles only; "before" summaries (causal); "after" ones too
CASES = [((20, 0), True, False), ((20, 0), True, True), ((7, 5), False, True)]


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("window,causal,summaries", CASES, ids=["local", "before", "after"])
def test_both_load_paths_match_the_reference(window, causal, summaries, tma, device, monkeypatch):
    require_triton(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9 and tma:
        pytest.skip("TMA needs compute capability 9+")
    asked = _paths(monkeypatch, tma)
    gen = torch.Generator().manual_seed(0)
    b, t, hq, hkv, d = 1, 100, 4, 2, 64  # 100: the last key tile is partial for every tile shape
    q, k, v, do = (torch.randn(b, t, h, d, generator=gen).to(device, torch.float16) for h in (hq, hkv, hkv, hq))
    kw = dict(window=window, causal=causal, group_size=8 if summaries else None, summaries=summaries)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = swa_attention_with_lse(*leaves, backend="triton", **kw)
    out.backward(do)
    assert asked and all(a == tma for a in asked), asked  # forward, dk/dv and dq took the path asked for
    ref_leaves = [x.float().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference.swa_attention_ref(*ref_leaves, **kw)
    ref_out.backward(do.float())
    assert _max_err(out, ref_out) < 2e-3
    assert _max_err(lse, ref_lse) < 2e-3
    for x, r in zip(leaves, ref_leaves):
        assert _max_err(x.grad, r.grad) < 1e-2


@pytest.fixture
def fwd_schedule(monkeypatch):
    """``force(pipeline)``: run the forward with the software-pipelined loop or without it
    (the config's ``PIPELINE``): the interpreter's pinned config; on CUDA the first config
    of the autotune space, reordered, with autotuning off."""
    from dasg_kernels.attention import configs, fwd

    space = configs.SPACES["fwd"]
    saved = list(space)

    def force(pipeline: bool) -> None:
        monkeypatch.setitem(configs.PINNED, "fwd", dict(configs.PINNED["fwd"], PIPELINE=pipeline))
        if not configs.INTERPRET:
            monkeypatch.setattr(configs, "autotune_enabled", lambda: False)
            space[:] = sorted(saved, key=lambda s: s[0].kwargs.get("PIPELINE", True) != pipeline)
            if hasattr(fwd._swa_fwd_kernel, "cache"):
                fwd._swa_fwd_kernel.cache.clear()

    yield force
    space[:] = saved
    if hasattr(fwd._swa_fwd_kernel, "cache"):
        fwd._swa_fwd_kernel.cache.clear()


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "unpipelined"])
@pytest.mark.parametrize("window,causal,summaries", CASES, ids=["local", "before", "after"])
def test_forward_schedules_match_the_reference(window, causal, summaries, pipeline, device, monkeypatch,
                                                fwd_schedule):
    """The TMA forward with and without its software-pipelined loop (both are in the
    autotune space) on ragged lengths: same output and lse as the fp32 reference."""
    require_triton(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs compute capability 9+")
    asked = _paths(monkeypatch, True)
    fwd_schedule(pipeline)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 100, h, 64, generator=gen).to(device, torch.float16) for h in (4, 2, 2))
    kw = dict(window=window, causal=causal, group_size=8 if summaries else None, summaries=summaries)
    out, lse = swa_attention_with_lse(q, k, v, backend="triton", **kw)
    assert asked and all(asked)
    if device.type == "cuda":  # the autotuner ran the schedule asked for
        from dasg_kernels.attention import fwd

        assert fwd._swa_fwd_kernel.best_config.kwargs.get("PIPELINE", True) is pipeline
    ref_out, ref_lse = reference.swa_attention_ref(q.float(), k.float(), v.float(), **kw)
    assert _max_err(out, ref_out) < 2e-3
    assert _max_err(lse, ref_lse) < 2e-3


@pytest.mark.parametrize("d, dv", [(48, 48), (80, 40)])
def test_tma_path_pads_head_dims(d, dv, device, monkeypatch):
    """Head dims below their power-of-two block (descriptor columns past D read 0) and a
    value head dim of its own, forward and backward through the TMA path."""
    require_triton(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs compute capability 9+")
    asked = _paths(monkeypatch, True)
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 37, h, d, generator=gen).to(device, torch.float16) for h in (4, 2))
    v = torch.randn(1, 37, 2, dv, generator=gen).to(device, torch.float16)
    do = torch.randn(1, 37, 4, dv, generator=gen).to(device, torch.float16)
    kw = dict(window=(9, 0), causal=True, group_size=4, summaries=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = swa_attention_with_lse(*leaves, backend="triton", **kw)
    out.backward(do)
    assert asked and all(asked)
    ref_leaves = [x.float().requires_grad_() for x in (q, k, v)]
    ref, _ = reference.swa_attention_ref(*ref_leaves, **kw)
    ref.backward(do.float())
    assert _max_err(out, ref) < 2e-3
    for x, r in zip(leaves, ref_leaves):
        assert _max_err(x.grad, r.grad) < 1e-2


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_varlen_descriptors_stop_at_each_sequence(tma, device, monkeypatch):
    """A packed batch: each sequence's descriptors end at its own last key, so a tile past
    it reads zeros, not the next sequence (made NaN here: a leak would show)."""
    require_triton(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9 and tma:
        pytest.skip("TMA needs compute capability 9+")
    _paths(monkeypatch, tma)
    gen = torch.Generator().manual_seed(1)
    lens, h, d = [37, 70], 2, 32
    total = sum(lens)
    q, k, v = (torch.randn(total, h, d, generator=gen).to(device, torch.float16) for _ in range(3))
    cu = torch.tensor([0, lens[0], total], dtype=torch.int32, device=device)
    kw = dict(window=(16, 0), causal=True, group_size=8, summaries=True)
    # the second sequence's rows NaN: the first sequence must not see them
    k2, v2 = k.clone(), v.clone()
    k2[lens[0]:], v2[lens[0]:] = float("nan"), float("nan")
    out = swa_attention_varlen(q, k2, v2, cu, cu, max(lens), max(lens), backend="triton", **kw)
    ref, _ = reference.swa_attention_ref(q[None, :lens[0]].float(), k[None, :lens[0]].float(),
                                         v[None, :lens[0]].float(), **kw)
    assert _max_err(out[:lens[0]], ref[0]) < 2e-3


def test_tma_loads_ok_rules():
    f16 = torch.empty(2, 40, 4, 64, dtype=torch.float16)
    assert host.tma_loads_ok(f16, f16[:, :, :2])
    assert host.tma_loads_ok(torch.empty(2, 40, 4, 64, dtype=torch.bfloat16, device="meta"))
    assert not host.tma_loads_ok(f16.float())  # fp32: exact FMA dots, pointer loads
    assert not host.tma_loads_ok(torch.empty(2, 40, 4, 20, dtype=torch.float16))  # 40-byte rows
    assert not host.tma_loads_ok(torch.empty(2, 40, 4, 65, dtype=torch.float16)[..., 1:])  # misaligned start
    assert not host.tma_loads_ok(f16[:, :1].expand(2, 40, 4, 64))  # row stride 0 (an expanded grad)
    assert not host.tma_loads_ok(f16[..., 0])  # not [B, T, H, D]
    packed = torch.empty(50, 4, 64, dtype=torch.float16)  # varlen: batch stride 0 moves no descriptor
    assert host.tma_loads_ok(packed.unsqueeze(0).expand(3, *packed.shape))


def test_tma_scratch_installs_an_allocator_only_when_none_is_set():
    var = host._scratch_allocator_var()
    if var is None:
        pytest.skip("this Triton has no scratch allocator to set")
    cuda = torch.device("cuda")  # no GPU needed: nothing is allocated here
    assert type(var.get()).__name__ == "NullAllocator"
    with host.tma_scratch(cuda):
        assert type(var.get()).__name__ != "NullAllocator"
    assert type(var.get()).__name__ == "NullAllocator"
    for dev, enabled in ((torch.device("cpu"), True), (cuda, False)):
        with host.tma_scratch(dev, enabled):
            assert type(var.get()).__name__ == "NullAllocator"

    def mine(size, alignment, stream):
        raise AssertionError("not called here")

    token = var.set(mine)
    try:
        with host.tma_scratch(cuda):
            assert var.get() is mine  # the caller's allocator is kept
    finally:
        var.reset(token)
