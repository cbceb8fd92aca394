"""Grouped sliding-window attention (GMHA): the Triton kernels against the reference.

Ground truth: :func:`dasg_kernels.reference.swa_attention_ref` in fp32 (``upcast=True``,
on fp32 copies of the inputs, fp32 gradients). Tolerances:

* fp32: ``max|x - ref| <= 1e-4 * max(1, max|ref|)`` for out, lse, dq, dk, dv.
* fp16 / bf16 (flash-attn style): ``max|x - ref| <= 2 * max|x_lp - ref| + eps`` for
  out and lse, ``3 *`` for dq/dk/dv, where ``x_lp`` is the reference computed in the
  input dtype (``upcast=False``) and ``eps = 1e-4 * max(1, max|ref|) + 2 * rounding``,
  ``rounding`` being the error of storing ``ref`` in the input dtype (flash-attn's
  ``(ref + 0.3 - 0.3) - ref`` term: at T=2 the low-precision reference is nearly exact
  while the kernel, like FA2, takes ``delta`` from the rounded output). On CPU bf16 runs
  the fp32 kernels (the interpreter's bf16 ``tl.dot`` is broken, triton#11584); the
  bf16 kernels themselves run on the GPU.

On CPU (``TRITON_INTERPRET=1``) the axes (T, D, heads, window, causal,
summaries/G, dtype, batch) are covered by a *pairwise* set of cases (every pair of
values of any two axes appears in some case) at T in {17, 128, 200}, every semantic
case at T=1, plus the full product of the semantic axes window x causal x
summaries/G x dtype at one small ragged T. The full product of all axes, D in
{96, 256} at scale, bf16 and long sequences run behind ``@pytest.mark.gpu``.

Every buffer the launchers allocate is filled with NaN first (``POISON_ALLOCATIONS``),
so an output element a kernel never writes fails.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dasg_kernels import reference, swa_attention, swa_attention_with_lse, swa_decode
from dasg_kernels.attention import host
from dasg_kernels.backend import triton_can_run_on

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WINDOWS = [(-1, -1), (0, 0), (16, 0), (64, 0), (7, 5), (-1, 3)]
SUMMARIES = [None, 8, 32, 64]  # None = summaries off, else group size G
HEADS = [(2, 2), (4, 1), (4, 2)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(host, "POISON_ALLOCATIONS", True)


@pytest.fixture(autouse=True)
def _needs_kernels(device):
    if not triton_can_run_on(device):
        pytest.skip("the Triton kernels cannot run here (no CUDA and TRITON_INTERPRET unset)")


# --------------------------------------------------------------------------- helpers


def pairwise(axes: dict[str, list]) -> list[dict]:
    """A deterministic greedy covering array: every value pair of any two axes occurs."""
    names = list(axes)
    todo = {
        (a, va, b, vb)
        for a, b in itertools.combinations(range(len(names)), 2)
        for va in range(len(axes[names[a]]))
        for vb in range(len(axes[names[b]]))
    }
    cases = []
    while todo:
        a, va, b, vb = min(todo)
        pick = {a: va, b: vb}
        for c in range(len(names)):
            if c in pick:
                continue
            def gain(vc, c=c):
                return sum(((min(c, x), vc if c < x else vx, max(c, x), vx if c < x else vc) in todo)
                           for x, vx in pick.items())
            pick[c] = max(range(len(axes[names[c]])), key=lambda vc: (gain(vc), -vc))
        for x, y in itertools.combinations(sorted(pick), 2):
            todo.discard((x, pick[x], y, pick[y]))
        cases.append({names[c]: axes[names[c]][pick[c]] for c in range(len(names))})
    return cases


def make_inputs(b, t, hq, hkv, d, dtype, device, *, tq=None):
    tq = t if tq is None else tq
    q = torch.randn(b, tq, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, t, hkv, d, dtype=dtype, device=device)
    v = torch.randn(b, t, hkv, d, dtype=dtype, device=device)
    return q, k, v


def ref_fwd_bwd(q, k, v, do, upcast, **kw):
    """Reference out, lse and grads. ``upcast``: fp32 ground truth on fp32 leaf copies."""
    leaves = [(x.detach().float() if upcast else x.detach().clone()).requires_grad_() for x in (q, k, v)]
    out, lse = reference.swa_attention_ref(*leaves, upcast=upcast, **kw)
    out.backward(do.float() if upcast else do)
    return out, lse, [x.grad for x in leaves]


def max_err(x, ref):
    """max |x - ref| over finite ref entries; -inf entries (empty rows) must match exactly."""
    x, ref = x.float(), ref.float()
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(x) & (x < 0), inf & (ref < 0)), "-inf (empty-row) positions differ"
    assert not torch.isnan(x).any(), "NaN in kernel output"
    fin = ~inf
    return (x[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def scale_of(ref):
    ref = ref.float()
    ref = ref[torch.isfinite(ref)]
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


def rounding(ref, dtype):
    """flash-attn's atol term: the error of holding ``ref`` in ``dtype``."""
    r = ref.float()
    r = r[torch.isfinite(r)].to(dtype)
    return ((r + 0.3 - 0.3).float() - r.float()).abs().max().item() if r.numel() else 0.0


def assert_close(name, x, ref, lowprec=None, factor=2.0):
    err = max_err(x, ref)
    if lowprec is None:  # fp32
        tol = 1e-4 * scale_of(ref)
    else:
        tol = factor * max_err(lowprec, ref) + 1e-4 * scale_of(ref) + 2 * rounding(ref, lowprec.dtype)
    assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e}"


def check_against_reference(q, k, v, *, grads=True, **kw):
    """Run the kernel (forward, and backward when ``grads``) and compare with the reference."""
    do = torch.randn_like(q)
    qk = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    out, lse = swa_attention_with_lse(*qk, backend="triton", **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    if grads:
        out.backward(do)
    ref_out, ref_lse, ref_grads = ref_fwd_bwd(q, k, v, do, True, **kw)
    lp_out = lp_lse = None
    lp_grads = [None] * 3
    if q.dtype != torch.float32:
        lp_out, lp_lse, lp_grads = ref_fwd_bwd(q, k, v, do, False, **kw)
    assert_close("out", out, ref_out, lp_out)
    assert_close("lse", lse, ref_lse, lp_lse)
    if grads:
        for name, x, r, lp in zip(("dq", "dk", "dv"), qk, ref_grads, lp_grads):
            assert x.grad.dtype == x.dtype
            assert_close(name, x.grad, r, lp, factor=3.0)


# --------------------------------------------------------------------------- forward + backward

AXES = {
    "t": [17, 128, 200],  # 200: six 32-row interpreter tiles + 8, one 128-row GPU tile + 72; T=1 (where window, causal and G make no difference): test_single_position
    "d": [32, 64, 128],
    "heads": HEADS,
    "window": WINDOWS,
    "causal": [True, False],
    "group": SUMMARIES,
    "dtype": [torch.float32, torch.float16],
    "b": [1, 2],
}
PAIRWISE = pairwise(AXES)


def _case_id(c):
    g = "nosum" if c["group"] is None else f"G{c['group']}"
    dt = str(c["dtype"]).replace("torch.", "")
    return (f"T{c['t']}-D{c['d']}-H{c['heads'][0]}x{c['heads'][1]}-w{c['window'][0]}_{c['window'][1]}"
            f"-{'causal' if c['causal'] else 'bidir'}-{g}-{dt}-B{c['b']}")


def test_pairwise_set_covers_every_pair():
    names = list(AXES)
    for a, b in itertools.combinations(names, 2):
        seen = {(repr(c[a]), repr(c[b])) for c in PAIRWISE}
        assert len(seen) == len(AXES[a]) * len(AXES[b]), (a, b)


@pytest.mark.parametrize("case", PAIRWISE, ids=[_case_id(c) for c in PAIRWISE])
def test_matches_reference_pairwise(case, device):
    hq, hkv = case["heads"]
    q, k, v = make_inputs(case["b"], case["t"], hq, hkv, case["d"], case["dtype"], device)
    g = case["group"]
    check_against_reference(q, k, v, window=case["window"], causal=case["causal"],
                            group_size=g, summaries=g is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group", SUMMARIES, ids=lambda g: "nosum" if g is None else f"G{g}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
def test_window_causal_summary_product(window, causal, group, dtype, device):
    """The full product of the semantic axes (window x causal x summaries/G x dtype) at a
    small ragged T (3 query/key blocks under the interpreter), GQA 4/2."""
    q, k, v = make_inputs(1, 70, 4, 2, 32, dtype, device)
    check_against_reference(q, k, v, window=window, causal=causal, group_size=group, summaries=group is not None)


@pytest.mark.parametrize("heads, dtype", [(h, torch.float32) for h in HEADS] + [((4, 2), torch.float16)],
                         ids=lambda x: f"H{x[0]}x{x[1]}" if isinstance(x, tuple) else str(x).replace("torch.", ""))
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
def test_single_position(window, heads, dtype, device):
    """T=1: one query seeing only its own key, every window, causal or not, G or not (every
    head layout in fp32, GQA in fp16)."""
    q, k, v = make_inputs(2, 1, heads[0], heads[1], 32, dtype, device)
    for causal in (True, False):
        for group in (None, 8):
            check_against_reference(q, k, v, window=window, causal=causal, group_size=group,
                                    summaries=group is not None)


def test_bf16_runs_fp32_kernels_under_the_interpreter(device):
    """bf16 is exact to bf16 accuracy on every device: the compiled bf16 kernels on the GPU,
    the fp32 kernels plus rounding under the interpreter (whose bf16 tl.dot is broken)."""
    q, k, v = make_inputs(1, 70, 4, 2, 64, torch.bfloat16, device)
    check_against_reference(q, k, v, window=(16, 0), causal=True, group_size=8, summaries=True)
    check_against_reference(q, k, v, window=(7, 5), causal=False)
    out = swa_decode(q[:, -3:], k, v, window=(16, 0), group_size=8, summaries=True, backend="triton")
    ref, _ = reference.swa_attention_ref(q[:, -3:], k, v, window=(16, 0), group_size=8, summaries=True)
    assert out.dtype == torch.bfloat16
    assert_close("decode bf16", out, ref, reference.swa_attention_ref(
        q[:, -3:], k, v, window=(16, 0), group_size=8, summaries=True, upcast=False)[0])


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [True, False])
def test_windows_with_summaries_small(window, causal, device):
    """Every window x causal with summaries on a short ragged sequence (many partial tiles)."""
    q, k, v = make_inputs(1, 45, 2, 1, 32, torch.float32, device)
    check_against_reference(q, k, v, window=window, causal=causal, group_size=4, summaries=True)


@pytest.mark.parametrize("causal,window", [(True, (16, 0)), (False, (5, 9))])
def test_summary_backward_split_over_query_rows(causal, window, device, monkeypatch):
    """The summary dk/dv kernel splits the query rows (512 per program on GPU): force
    64-row splits so T=200 uses several, and a budget cap that merges some."""
    from dasg_kernels.attention import configs

    monkeypatch.setattr(configs, "SUMMARY_SPLIT_ROWS", 64)
    q, k, v = make_inputs(1, 200, 2, 1, 32, torch.float32, device)
    check_against_reference(q, k, v, window=window, causal=causal, group_size=8, summaries=True)  # 4 splits
    monkeypatch.setattr(configs, "SUMMARY_SPLIT_BUDGET", 2 * 25)  # 25 groups -> 2 splits of 128 rows
    check_against_reference(q, k, v, window=window, causal=causal, group_size=8, summaries=True)


@pytest.mark.parametrize("heads", [(8, 1), (6, 2)], ids=lambda h: f"H{h[0]}x{h[1]}")
def test_large_gqa_groups(heads, device):
    """GQA groups above ``MAX_HEADS_UNROLLED`` (8 and 3 q heads per kv head): the dk/dv
    kernel loops over the heads at run time instead of unrolling them."""
    from dasg_kernels.attention import configs

    group = heads[0] // heads[1]
    assert group > configs.MAX_HEADS_UNROLLED and configs.heads_unrolled(group) == 1
    assert configs.heads_unrolled(2) == 2
    q, k, v = make_inputs(1, 70, heads[0], heads[1], 32, torch.float32, device)
    check_against_reference(q, k, v, window=(16, 0), causal=True, group_size=8, summaries=True)
    check_against_reference(q, k, v, window=(7, 5), causal=False)


TILE_SHAPES = {  # (BLOCK_M, BLOCK_N) of fwd, dkdv, dq: shapes the GPU configs use
    "tall-wide": ((16, 64), (64, 16), (16, 64)),
    "wide-tall": ((64, 16), (16, 64), (64, 16)),
    "large": ((64, 64), (64, 32), (32, 64)),
}


@pytest.mark.parametrize("shapes", list(TILE_SHAPES))
def test_other_tile_shapes(shapes, device, monkeypatch):
    """CPU tests pin 32x32 tiles; the GPU autotunes over others (and ``DASG_AUTOTUNE=0``
    pins one per class). Windows that start and end inside tiles of every shape, summaries
    split over 64 query rows, forward and backward."""
    from dasg_kernels.attention import configs

    for name, (bm, bn) in zip(("fwd", "dkdv", "dq"), TILE_SHAPES[shapes]):
        monkeypatch.setitem(configs.PINNED, name, {"BLOCK_M": bm, "BLOCK_N": bn})
    monkeypatch.setattr(configs, "SUMMARY_SPLIT_ROWS", 64)  # a multiple of every BLOCK_M: 2 splits at T=100
    q, k, v = make_inputs(1, 100, 4, 2, 32, torch.float32, device)  # 100: ragged for every tile shape
    for window, causal, group in [((20, 0), True, 8), ((7, 5), False, 32), ((-1, -1), True, None),
                                  ((-1, 3), False, None), ((0, 0), True, 16)]:
        check_against_reference(q, k, v, window=window, causal=causal, group_size=group, summaries=group is not None)


@pytest.mark.parametrize("d", [96, 256])
def test_other_head_dims_small(d, device):
    """D=96 (BLOCK_D=128 with masked columns) and D=256 on a tiny case (full sweep on GPU)."""
    q, k, v = make_inputs(1, 21, 2, 1, d, torch.float32, device)
    check_against_reference(q, k, v, window=(5, 0), causal=True, group_size=4, summaries=True)


def test_softmax_scale_and_group_one(device):
    q, k, v = make_inputs(1, 40, 2, 2, 32, torch.float32, device)
    check_against_reference(q, k, v, window=(5, 2), causal=False, group_size=1, summaries=True,
                            softmax_scale=0.3)


def test_group_size_without_summaries_is_plain_window(device):
    q, k, v = make_inputs(1, 33, 2, 2, 32, torch.float32, device)
    a = swa_attention(q, k, v, window=(8, 0), group_size=8, summaries=False, backend="triton")
    b = swa_attention(q, k, v, window=(8, 0), backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- layouts and edge cases


def test_noncontiguous_inputs(device):
    """Transposed views (storage [B, H, T, D]) and head slices of a packed qkv tensor."""
    b, t, hq, hkv, d = 2, 70, 4, 2, 32
    qh = torch.randn(b, hq, t, d, device=device)
    q = qh.transpose(1, 2)  # [B, T, Hq, D], strides (H*T*D, D, T*D, 1)
    qkv = torch.randn(b, t, hq + 2 * hkv, d, device=device)
    k = qkv[:, :, hq:hq + hkv]
    v = qkv[:, :, hq + hkv:]
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    check_against_reference(q, k, v, window=(16, 0), causal=True, group_size=8, summaries=True)
    check_against_reference(q, k, v, window=(7, 5), causal=False)


def test_noncontiguous_grad_output(device):
    q, k, v = make_inputs(1, 50, 2, 1, 32, torch.float32, device)
    qk = [x.clone().requires_grad_() for x in (q, k, v)]
    out = swa_attention(*qk, window=(9, 0), backend="triton")
    do = torch.randn(1, 2, 50, 32, device=device).transpose(1, 2)  # non-contiguous dO
    out.backward(do)
    _, _, ref_grads = ref_fwd_bwd(q, k, v, do, True, window=(9, 0))
    for x, r in zip(qk, ref_grads):
        assert_close("grad", x.grad, r)


def test_full_tiles_outside_window_are_never_loaded(device):
    """NaN in q/k/v rows [0, 64): rows and keys far from them must stay finite and exact.

    A masked-but-loaded tile would leak NaN (``0 * NaN``) into the result, so this
    checks that tiles outside the window are skipped, forward and backward.
    """
    b, t, h, d = 1, 512, 1, 32
    q, k, v = make_inputs(b, t, h, h, d, torch.float32, device)
    for x in (q, k, v):
        x[:, :64] = float("nan")
    qk = [x.clone().requires_grad_() for x in (q, k, v)]
    out = swa_attention(*qk, window=(16, 0), backend="triton")
    do = torch.randn_like(q)
    out.backward(do)
    clean = [x.nan_to_num(0.0) for x in (q, k, v)]
    ref_out, _, ref_grads = ref_fwd_bwd(*clean, do, True, window=(16, 0))
    tail = slice(256, None)  # far from the poisoned rows, for any block size <= 128
    assert_close("out", out[:, tail], ref_out[:, tail])
    for name, x, r in zip(("dq", "dk", "dv"), qk, ref_grads):
        assert_close(name, x.grad[:, tail], r[:, tail])


def test_rows_without_visible_key(device):
    """Empty rows: zeros and lse -inf, no NaN (only reachable with a query offset).

    Through the public training API every query sees its own key, so this drives the
    forward launcher directly with queries placed past the end of the keys.
    """
    from dasg_kernels.attention.fwd import swa_fwd

    q, k, v = make_inputs(1, 40, 2, 1, 32, torch.float32, device, tq=8)
    # left beyond Tk (41, 100) or unbounded (-1) from queries past Tk: the bound must not be
    # clipped to Tk (the queries at 38..45 see back to key 0 only with left >= 45)
    for left in (3, 39, 41, 100, -1):
        for summaries in (False, True):
            kw = dict(window=(left, 0), causal=True, group_size=8, summaries=summaries, q_offset=38)
            out, lse, _, _ = swa_fwd(q, k, v, left=left, right=0, causal=True, group_size=8,
                                     summaries=summaries, scale=32 ** -0.5, q_offset=38)
            ref_out, ref_lse = reference.swa_attention_ref(q, k, v, **kw)
            if left == 3 and not summaries:
                assert torch.isinf(ref_lse[..., 5:]).all()  # positions 43.. see nothing
                assert (out[:, 5:] == 0).all()
            assert_close(f"out left={left}", out, ref_out)
            assert_close(f"lse left={left}", lse, ref_lse)


def test_backward_of_sum_with_expanded_grad(device):
    """``out.sum().backward()`` hands the kernel an expanded dO (all strides 0)."""
    q, k, v = make_inputs(1, 40, 2, 1, 32, torch.float32, device)
    qk = [x.clone().requires_grad_() for x in (q, k, v)]
    swa_attention(*qk, window=(6, 0), group_size=8, summaries=True, backend="triton").sum().backward()
    _, _, ref_grads = ref_fwd_bwd(q, k, v, torch.ones_like(q), True, window=(6, 0), group_size=8, summaries=True)
    for name, x, r in zip(("dq", "dk", "dv"), qk, ref_grads):
        assert_close(name, x.grad, r)


def test_custom_op_registration(device):
    """``torch.library.opcheck``: schema, fake tensors, autograd registration, AOT dispatch."""
    q, k, v = [x.requires_grad_() for x in make_inputs(1, 20, 2, 1, 32, torch.float32, device)]
    torch.library.opcheck(torch.ops.dasg_kernels.swa_attention_fwd.default,
                          (q, k, v, 4, 0, True, 8, True, 0.2))


def test_torch_compile_fullgraph(device):
    """One opaque op per call: ``torch.compile(fullgraph=True)`` traces forward and backward."""
    q, k, v = make_inputs(1, 24, 2, 1, 32, torch.float32, device)

    def loss(q, k, v):
        return swa_attention(q, k, v, window=(4, 0), group_size=8, summaries=True,
                             backend="triton").square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (compiled, loss):
        qk = [x.clone().requires_grad_() for x in (q, k, v)]
        fn(*qk).backward()
        grads.append([x.grad for x in qk])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_is_deterministic(device):
    q, k, v = make_inputs(1, 96, 4, 1, 32, torch.float32, device)
    do = torch.randn_like(q)
    grads = []
    for _ in range(2):
        qk = [x.clone().requires_grad_() for x in (q, k, v)]
        swa_attention(*qk, window=(20, 0), group_size=16, summaries=True, backend="triton").backward(do)
        grads.append([x.grad for x in qk])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_lse_is_not_differentiable(device):
    q, k, v = make_inputs(1, 20, 2, 2, 32, torch.float32, device)
    out, lse = swa_attention_with_lse(q.requires_grad_(), k, v, backend="triton")
    assert out.requires_grad and not lse.requires_grad


def test_group_means_kernel(device):
    from dasg_kernels.attention.pool import group_means_fwd

    x = torch.randn(2, 4, 37, 32, device=device).transpose(1, 2)  # [2, 37, 4, 32], strided
    y = torch.randn(2, 37, 4, 32, device=device)
    for g in (1, 5, 8, 37, 64):
        xs, ys = group_means_fwd(x, y, g)
        torch.testing.assert_close(xs, reference.group_means_ref(x, g), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ys, reference.group_means_ref(y, g), rtol=1e-6, atol=1e-6)


def test_sdpa_cross_check(device):
    """The plain window against torch's SDPA with an explicit boolean mask (GQA expanded)."""
    b, t, hq, hkv, d = 2, 80, 4, 2, 32
    q, k, v = make_inputs(b, t, hq, hkv, d, torch.float32, device)
    for window, causal in [((-1, -1), True), ((16, 0), True), ((7, 5), False), ((-1, 3), False)]:
        mask = reference.local_mask(t, t, window, causal, device=device)
        rep = hq // hkv
        ref = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
            v.transpose(1, 2).repeat_interleave(rep, 1), attn_mask=mask,
        ).transpose(1, 2)
        out = swa_attention(q, k, v, window=window, causal=causal, backend="triton")
        assert_close(f"sdpa {window} {causal}", out, ref)


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize("tq,tk,heads,window,causal,group", [
    (1, 37, (4, 2), (-1, -1), True, None),
    (1, 100, (4, 2), (16, 0), True, 8),
    (3, 100, (4, 2), (7, 5), False, 32),
    (4, 64, (2, 2), (0, 0), True, 8),
    (2, 130, (4, 1), (64, 0), True, 64),
    (5, 70, (8, 1), (9, 0), True, 8),  # 40 packed rows: a row block boundary inside a position
])
def test_decode_matches_reference(tq, tk, heads, window, causal, group, device):
    q, k, v = make_inputs(2, tk, heads[0], heads[1], 32, torch.float32, device, tq=tq)
    kw = dict(window=window, causal=causal, group_size=group, summaries=group is not None)
    out, lse = swa_decode(q, k, v, return_lse=True, backend="triton", **kw)
    ref_out, ref_lse = reference.swa_attention_ref(q, k, v, **kw)
    assert out.shape == q.shape
    assert_close("out", out, ref_out)
    assert_close("lse", lse, ref_lse)


def test_decode_with_cached_summaries(device):
    from dasg_kernels.attention.pool import group_means_fwd

    q, k, v = make_inputs(1, 90, 4, 2, 32, torch.float32, device, tq=1)
    kw = dict(window=(16, 0), group_size=8, summaries=True)
    ks, vs = group_means_fwd(k, v, 8)
    out = swa_decode(q, k, v, summary_kv=(ks, vs), backend="triton", **kw)
    assert_close("out", out, reference.swa_attention_ref(q, k, v, **kw)[0])
    other = swa_decode(q, k, v, summary_kv=(ks, vs + 1.0), backend="triton", **kw)
    assert (other - out).abs().max() > 1e-3  # the given summaries are the ones used
    with pytest.raises(ValueError, match=r"k_summary must have shape \(1, 12, 2, 32\)"):
        swa_decode(q, k, v, summary_kv=(ks[:, :-1], vs), backend="triton", **kw)
    with pytest.raises(ValueError, match="only used with summaries=True"):
        swa_decode(q, k, v, summary_kv=(ks, vs), window=(16, 0), backend="triton")


def test_decode_custom_op_and_fullgraph_compile(device):
    """``swa_decode`` runs through ``torch.ops.dasg_kernels.swa_decode`` (schema and fake impl
    checked by ``opcheck``), so ``torch.compile(fullgraph=True)`` traces it, with and without
    cached summaries, and gives eager's bits."""
    from dasg_kernels.attention.pool import group_means_fwd

    q, k, v = make_inputs(1, 30, 4, 2, 16, torch.float32, device, tq=2)
    ks, vs = group_means_fwd(k, v, 4)
    torch.library.opcheck(torch.ops.dasg_kernels.swa_decode.default,
                          (q, k, v, ks, vs, 5, 0, True, 4, True, 0.25), test_utils=("test_schema", "test_faketensor"))
    for summary_kv in (None, (ks, vs)):
        def step(q, k, v):
            return swa_decode(q, k, v, window=(5, 0), group_size=4, summaries=True, summary_kv=summary_kv,
                              return_lse=True, backend="triton")

        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        for got, want in zip(compiled(q, k, v), step(q, k, v)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_decode_fp16_and_consistency_with_training(device):
    q, k, v = make_inputs(1, 50, 4, 1, 64, torch.float16, device)
    full = swa_attention(q, k, v, window=(16, 0), group_size=8, summaries=True, backend="triton")
    last = swa_decode(q[:, -2:], k, v, window=(16, 0), group_size=8, summaries=True, backend="triton")
    torch.testing.assert_close(last, full[:, -2:], rtol=0, atol=2e-3)


# --------------------------------------------------------------------------- backends and errors


def test_torch_backend_is_the_reference(device):
    q, k, v = make_inputs(1, 30, 2, 1, 32, torch.float32, device)
    kw = dict(window=(4, 0), group_size=8, summaries=True)
    out, lse = swa_attention_with_lse(q, k, v, backend="torch", **kw)
    ref_out, ref_lse = reference.swa_attention_ref(q, k, v, **kw)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("d, dv", [(8, 8), (16, 16), (48, 48), (80, 80), (192, 192), (192, 128), (16, 40)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("summaries", [True, False])
def test_any_head_dim_multiple_of_8(d, dv, summaries, device):
    """D not a power of two: BLOCK_D is padded inside the kernels (masked), forward and backward;
    a value head dim of its own (DeepSeek MLA: q/k 192, v 128), forward, backward and decode."""
    if not triton_can_run_on(device):
        pytest.skip("backend='triton' cannot run here")
    q, k, v = make_inputs(1, 37, 4, 2, d, torch.float32, device)
    if dv != d:
        v = torch.randn(*v.shape[:-1], dv, device=device)
    kw = dict(window=(9, 0), group_size=4 if summaries else None, summaries=summaries)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = swa_attention(q, k, v, backend="triton", **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = reference.swa_attention_ref(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert_close("out", out, ref)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r)
    dec = swa_decode(q[:, -2:].detach(), k.detach(), v.detach(), backend="triton", **kw)
    assert_close("decode", dec, ref[:, -2:].detach())


def test_auto_falls_back_for_unsupported_head_dim(device):
    q, k, v = make_inputs(1, 10, 2, 2, 20, torch.float32, device)
    out = swa_attention(q, k, v, window=(3, 0), backend="auto")
    torch.testing.assert_close(out, reference.swa_attention_ref(q, k, v, window=(3, 0))[0])
    with pytest.raises(ValueError, match="head dim"):
        swa_attention(q, k, v, backend="triton")


def _bad_calls():
    t = lambda *s, dt=torch.float32: torch.randn(*s, dtype=dt)  # noqa: E731
    q, k, v = t(1, 8, 2, 32), t(1, 8, 1, 32), t(1, 8, 1, 32)
    return [
        ("q not a tensor", TypeError, "q must be a torch.Tensor", (q.tolist(), k, v), {}),
        ("q rank", ValueError, "q must have 4 dimensions", (t(8, 2, 32), k, v), {}),
        ("int dtype", TypeError, "k must have dtype", (q, k.long(), v), {}),
        ("mixed dtype", TypeError, "must share one dtype", (q, k.half(), v), {}),
        ("fp64", TypeError, "q must have dtype", (q.double(), k, v), {}),
        ("batch", ValueError, "k must have batch size 1", (q, t(2, 8, 1, 32), t(2, 8, 1, 32)), {}),
        ("seq len", ValueError, "k must have sequence length 8", (q, t(1, 9, 1, 32), t(1, 9, 1, 32)), {}),
        ("k/v shapes", ValueError, "k and v must have the same shape", (q, k, t(1, 8, 2, 32)), {}),
        ("head dim", ValueError, "k must have head dim 32", (q, t(1, 8, 1, 64), t(1, 8, 1, 64)), {}),
        ("gqa", ValueError, "multiple of k heads", (t(1, 8, 3, 32), t(1, 8, 2, 32), t(1, 8, 2, 32)), {}),
        ("window len", TypeError, "window must be a", (q, k, v), {"window": (1, 2, 3)}),
        ("window type", TypeError, r"window\[0\] \(left\) must be an int", (q, k, v), {"window": (1.5, 0)}),
        ("window neg", ValueError, r"window\[1\] \(right\) must be -1", (q, k, v), {"window": (0, -2)}),
        ("causal", TypeError, "causal must be a bool", (q, k, v), {"causal": 1}),
        ("no group", ValueError, "summaries=True needs group_size", (q, k, v), {"summaries": True}),
        ("group 0", ValueError, "group_size must be in", (q, k, v), {"summaries": True, "group_size": 0}),
        ("group float", TypeError, "group_size must be an int", (q, k, v), {"summaries": True, "group_size": 2.0}),
        ("scale", ValueError, "softmax_scale must be a finite float > 0", (q, k, v), {"softmax_scale": 0.0}),
        ("scale type", TypeError, "softmax_scale must be a float", (q, k, v), {"softmax_scale": "1"}),
        ("last stride", ValueError, "q must have stride 1 in its last dimension",
         (t(1, 8, 32, 2).transpose(2, 3), k, v), {"backend": "triton"}),
        ("backend", ValueError, "backend must be one of", (q, k, v), {"backend": "cuda"}),
    ]


@pytest.mark.parametrize("name,exc,match,args,kw", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise(name, exc, match, args, kw):
    with pytest.raises(exc, match=match):
        swa_attention(*args, **kw)


def test_decode_bad_inputs_raise():
    q, k = torch.randn(1, 5, 2, 32), torch.randn(1, 4, 2, 32)
    with pytest.raises(ValueError, match="cache only 4"):
        swa_decode(q, k, k)
    with pytest.raises(TypeError, match="k_cache must have dtype"):
        swa_decode(q[:, :1], k.long(), k)
    ks = torch.randn(1, 1, 2, 32)
    kw = dict(window=(1, 0), group_size=4, summaries=True)
    with pytest.raises(TypeError, match="k_cache, k_summary, v_summary must share one dtype"):
        swa_decode(q[:, :1], k, k, summary_kv=(ks, ks.half()), **kw)
    with pytest.raises(TypeError, match="must share one dtype"):
        swa_decode(q[:, :1], k, k, summary_kv=(ks.half(), ks.half()), **kw)
    with pytest.raises(ValueError, match="v_summary=meta"):
        swa_decode(q[:, :1], k, k, summary_kv=(ks, ks.to("meta")), **kw)
    with pytest.raises(ValueError, match=r"k_summary must have shape \(1, 1, 2, 32\)"):
        swa_decode(q[:, :1], k, k, summary_kv=(ks[:, :, :1], ks), **kw)
    with pytest.raises(ValueError, match="only used with summaries=True"):
        swa_decode(q[:, :1], k, k, summary_kv=(ks, ks), window=(1, 0))


def test_mixed_devices_name_the_tensors():
    q, k = torch.randn(1, 8, 2, 32), torch.randn(1, 8, 1, 32)
    with pytest.raises(ValueError, match="q, k, v must share one device.*v=meta"):
        swa_attention(q, k, k.to("meta"))


def test_row_stride_beyond_int32_tiles_is_a_clear_error(device, monkeypatch):
    # the in-tile offsets are int32: a sequence stride that 256 rows would overflow is
    # rejected before any launch, naming the tensor (the real limit, ~8.4M elements
    # between positions, is lowered here so the test needs no huge tensor)
    q, k, v = make_inputs(1, 8, 2, 1, 32, torch.float32, device)
    monkeypatch.setattr(host, "MAX_ROW_STRIDE", 40)
    with pytest.raises(ValueError, match=r"k.stride\(1\) = 64 .* call k.contiguous\(\)"):
        swa_attention(q[:, :, :1].contiguous(), torch.cat([k, k], 2)[:, :, :1], v, backend="triton")
    with pytest.raises(ValueError, match=r"q.stride\(1\) = 64"):
        swa_attention(q, k, v, backend="triton")
    assert host.MAX_ROW_STRIDE * host.MAX_TILE_ROWS < 2**31


def test_grid_limit_is_checked_before_any_launch(device, monkeypatch):
    from dasg_kernels.attention import fwd

    def no_launch(*a, **kw):
        raise AssertionError("a kernel was launched before the grid check")

    monkeypatch.setattr(host, "MAX_GRID_YZ", 3)
    monkeypatch.setattr(fwd, "group_means_fwd", no_launch)
    q, k, v = make_inputs(2, 8, 2, 1, 32, torch.float32, device)  # B * Hq = 4 programs
    with pytest.raises(ValueError, match="batch \\* q heads = 4 exceeds the CUDA grid limit 3"):
        swa_attention(q, k, v, window=(2, 0), group_size=2, summaries=True, backend="triton")
    # decode packs the two q heads of the kv head: B * Hkv = 2 programs fit
    out = swa_decode(q[:, -1:], k, v, window=(2, 0), backend="triton")
    torch.testing.assert_close(out, reference.swa_attention_ref(q[:, -1:], k, v, window=(2, 0))[0])


# --------------------------------------------------------------------------- GPU only


@pytest.fixture
def _no_autotune(monkeypatch):
    """GPU sweeps: one config per head-dim class, no benchmarking of every new shape."""
    monkeypatch.setenv("DASG_AUTOTUNE", "0")


def _sweep(cases):
    failures = []
    for t, d, (hq, hkv), window, causal, g, dtype in cases:
        torch.manual_seed(t * 7 + hq + d)
        q, k, v = make_inputs(2, t, hq, hkv, d, dtype, "cuda")
        try:
            check_against_reference(q, k, v, window=window, causal=causal, group_size=g, summaries=g is not None)
        except AssertionError as e:  # pragma: no cover - only on failure
            failures.append(f"T={t} D={d} H={hq}/{hkv} window={window} causal={causal} G={g} {dtype}: {e}")
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_full_product_gpu(dtype, _no_autotune):
    """The full product of T x heads x window x causal x summaries/G at D=128 (576 cases)."""
    _sweep(itertools.product([1, 17, 128, 300], [128], HEADS, WINDOWS, [True, False], SUMMARIES, [dtype]))


GPU_AXES = dict(AXES, d=[32, 64, 96, 128, 256], dtype=[torch.float16, torch.bfloat16, torch.float32])


@pytest.mark.gpu
def test_pairwise_all_head_dims_and_dtypes_gpu(_no_autotune):
    """Pairwise over every axis, with D in {32..256} and bf16 (the CPU set has neither)."""
    cases = pairwise(GPU_AXES)
    _sweep((c["t"], c["d"], c["heads"], c["window"], c["causal"], c["group"], c["dtype"]) for c in cases)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,group", [((256, 0), 256), ((1024, 0), None), ((-1, -1), None)])
def test_long_sequence_gpu(window, group, dtype, device, _no_autotune):
    q, k, v = make_inputs(1, 4096 + 3, 8, 2, 128, dtype, device)
    check_against_reference(q, k, v, window=window, causal=True, group_size=group, summaries=group is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [96, 256])
def test_decode_gpu(d, device):
    q, k, v = make_inputs(2, 1000, 8, 2, d, torch.bfloat16, device, tq=1)
    kw = dict(window=(128, 0), group_size=64, summaries=True)
    out = swa_decode(q, k, v, backend="triton", **kw)
    ref_out, _ = reference.swa_attention_ref(q, k, v, **kw)
    lp_out, _ = reference.swa_attention_ref(q, k, v, upcast=False, **kw)
    assert_close("out", out, ref_out, lp_out)


def test_autotune_spaces_fit_every_head_dim_and_dtype():
    """The CUDA config spaces (not exercised by the interpreter) prune to valid configs."""
    from dasg_kernels.attention import configs

    for name, space in configs.SPACES.items():
        prune = configs._pruner(space)
        for d in (32, 64, 96, 128, 256):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                kept = prune([c for c, _ in space], {"Q": torch.empty(1, dtype=dtype)}, HEAD_DIM=d)
                assert kept, (name, d, dtype)
                for c in kept:
                    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                    assert bm >= 16 and bn >= 16  # tl.dot minimum on GPUs
                    assert configs.SUMMARY_SPLIT_ROWS % bm == 0
    assert configs.SUMMARY_SPLIT_ROWS % configs.PINNED["dkdv"]["BLOCK_M"] == 0
    assert configs.decode_config(1, 256)["BLOCK_M"] >= 16


def test_forward_space_holds_both_schedules():
    """Per head-dim class the forward's first config (``DASG_AUTOTUNE=0``) is the software-
    pipelined loop and the space also holds an unpipelined one for the autotuner to measure
    against it; ``PIPELINE`` is an argument of the kernel."""
    from dasg_kernels.attention import configs, fwd

    assert "PIPELINE" in configs.untuned(fwd._swa_fwd_kernel).arg_names
    for cls in (64, 128, 256):
        kept = [c for c, dclass in configs.SPACES["fwd"] if dclass == cls]
        assert kept[0].kwargs.get("PIPELINE", True) is True, cls
        assert any(c.kwargs.get("PIPELINE") is False for c in kept), cls
    for name in ("dq", "dkdv"):
        assert all("PIPELINE" not in c.kwargs for c, _ in configs.SPACES[name])


def test_autotuner_wrapping_is_valid():
    """Build the CUDA autotuners here too (the interpreter never does): Triton checks the
    key names against the kernel's arguments when the decorator runs."""
    from dasg_kernels.attention import bwd, configs, fwd

    for name, kernel in [("fwd", fwd._swa_fwd_kernel), ("dkdv", bwd._swa_bwd_dkdv_kernel),
                         ("dq", bwd._swa_bwd_dq_kernel)]:
        tuned = configs.autotuner(name, configs.untuned(kernel))
        assert set(configs.tune_key(name)) <= set(tuned.arg_names)


def test_do_not_specialize_names_are_kernel_args():
    """Triton silently ignores a ``do_not_specialize`` name that is not an argument of the
    kernel (the kernel would then compile anew for every ``T``/window/``G`` on the GPU)."""
    from dasg_kernels.attention import bwd, configs, fwd, pool

    for kernel in (fwd._swa_fwd_kernel, bwd._bwd_preprocess_kernel, bwd._swa_bwd_dkdv_kernel,
                   bwd._swa_bwd_dq_kernel, pool._group_mean_kernel):
        jf = configs.untuned(kernel)
        names = jf.kwargs["do_not_specialize"] if hasattr(jf, "kwargs") else jf.do_not_specialize
        assert names and set(names) <= set(jf.arg_names), (jf.fn.__name__, names)


def test_grid_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds the CUDA grid limit 65535"):
        host.check_grid("swa_attention", 65536, "batch * q heads")
    host.check_grid("swa_attention", 65535, "batch * q heads")


def test_math_constants():
    assert math.isclose(host.LOG2E * host.LN2, 1.0, rel_tol=1e-15)
