"""route (Triton) against route_ref: exact ids, num_selected, tokens_per_expert; weights; gradients."""
import pytest
import torch

import dasg_kernels as dk
from dasg_kernels.reference import route_ref

# (n_group, topk_group) per E for the "groups on" runs; E=4 with one group of two
# also exercises k_max above the number of eligible experts.
GROUPS = {1: None, 4: (2, 1), 8: (4, 2), 16: (4, 2), 64: (8, 3)}


def _check(logits, **kw):
    r = dk.route(logits, backend="triton", **kw)
    ref = route_ref(logits, **kw)
    assert r.expert_ids.dtype == torch.int32 and r.num_selected.dtype == torch.int32
    assert r.tokens_per_expert.dtype == torch.int32
    assert torch.equal(r.expert_ids, ref.expert_ids), kw
    assert torch.equal(r.num_selected, ref.num_selected), kw
    assert torch.equal(r.tokens_per_expert, ref.tokens_per_expert), kw
    torch.testing.assert_close(r.weights, ref.weights, rtol=1e-6, atol=1e-7)
    return r, ref


@pytest.mark.parametrize("n", [1, 7, 64, 300])
@pytest.mark.parametrize("e,k_max", [(e, k) for e in (1, 4, 8, 16, 64) for k in (1, 2, 4) if k <= e])
def test_route_matches_reference(device, n, e, k_max):
    logits = torch.randn(n, e, device=device) * 2
    for top_p in (1.0, 0.9, 0.5):
        for groups in (None, GROUPS[e]):
            kw = dict(top_p=top_p, k_max=k_max)
            if groups is not None:
                kw.update(n_group=groups[0], topk_group=groups[1])
            _check(logits, **kw)


@pytest.mark.parametrize("top_p", [1.0, 0.75, 0.5, 0.25])
def test_route_ties_go_to_lower_index(device, top_p):
    # integer logits: many exact ties, in experts and in group scores; uniform rows put
    # the prefix mass exactly on top_p (0.25 steps)
    logits = torch.randint(0, 3, (200, 16), device=device).float()
    logits[:8] = 0.0
    for kw in (dict(k_max=4), dict(k_max=4, n_group=4, topk_group=2), dict(k_max=8, min_k=2)):
        _check(logits, top_p=top_p, **kw)


def test_route_min_k_and_renormalize(device):
    logits = torch.randn(64, 8, device=device) * 4
    for min_k in (1, 2, 3):
        r, _ = _check(logits, top_p=0.3, k_max=3, min_k=min_k)
        assert int(r.num_selected.min()) >= min_k
    r, _ = _check(logits, top_p=0.9, k_max=4, renormalize=False)
    assert float(r.weights.sum(-1).max()) <= 1.0 + 1e-6


def test_route_deterministic(device):
    logits = torch.randn(300, 64, device=device)
    a = dk.route(logits, top_p=0.8, k_max=4, n_group=8, topk_group=3, backend="triton")
    b = dk.route(logits, top_p=0.8, k_max=4, n_group=8, topk_group=3, backend="triton")
    for name, x, y in zip(a._fields, a, b):
        assert torch.equal(x, y), name


def test_route_layout_invariants(device):
    logits = torch.randn(300, 16, device=device)
    r = dk.route(logits, top_p=0.6, k_max=4, backend="triton")
    used = r.expert_ids >= 0
    assert torch.equal(used.sum(-1).int(), r.num_selected)
    # used slots form a prefix; unused weights are zero; used rows sum to 1
    assert torch.equal(used, torch.arange(4, device=device)[None] < r.num_selected[:, None])
    assert torch.all(r.weights[~used] == 0)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(300, device=device))
    assert int(r.tokens_per_expert.sum()) == int(r.num_selected.sum())


@pytest.mark.parametrize("n,e", [(1, 4), (33, 16), (64, 64)])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("renormalize,min_k", [(True, 1), (False, 1), (True, 2)])
def test_route_gradient(device, n, e, top_p, groups, renormalize, min_k):
    logits = torch.randn(n, e, device=device, requires_grad=True)
    kw = dict(top_p=top_p, k_max=4, min_k=min_k, renormalize=renormalize)
    if groups:
        kw.update(n_group=GROUPS[e][0], topk_group=GROUPS[e][1])
    g = torch.randn(n, 4, device=device)
    r = dk.route(logits, backend="triton", **kw)
    (grad,) = torch.autograd.grad((r.weights * g).sum(), logits)
    ref = route_ref(logits, **kw)
    assert torch.equal(r.expert_ids, ref.expert_ids)
    (grad_ref,) = torch.autograd.grad((ref.weights * g).sum(), logits)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [None, (4, 2)])
@pytest.mark.parametrize("top_p,min_k", [(1.0, 1), (0.6, 1), (0.6, 2)])
def test_route_nan_rows_stay_in_bounds(device, groups, top_p, min_k):
    # NaN, +inf or all -inf logits make a row's probabilities NaN: the row must go to
    # its lowest eligible experts like torch.sort ranks NaN, with NaN weights, and
    # never write an expert id outside [0, E) (the histogram would be written out of bounds)
    logits = torch.randn(12, 8, device=device)
    logits[1] = float("-inf")
    logits[4, 3] = float("nan")
    logits[7, 5] = float("inf")
    logits[9, :4] = float("-inf")  # partly -inf is a normal row
    kw = dict(top_p=top_p, k_max=3, min_k=min_k)
    if groups:
        kw.update(n_group=groups[0], topk_group=groups[1])
    r = dk.route(logits, backend="triton", **kw)
    ref = route_ref(logits, **kw)
    assert torch.equal(r.expert_ids, ref.expert_ids)
    assert torch.equal(r.num_selected, ref.num_selected)
    assert torch.equal(r.tokens_per_expert, ref.tokens_per_expert)
    assert int(r.expert_ids.max()) < 8 and int(r.tokens_per_expert.sum()) == int(r.num_selected.sum())
    torch.testing.assert_close(r.weights, ref.weights, rtol=1e-6, atol=1e-7, equal_nan=True)
    bad = torch.tensor([1, 4, 7], device=device)
    assert torch.isnan(r.weights[bad, 0]).all() and torch.isfinite(r.weights[9]).all()


def test_route_low_precision_logits(device):
    logits = torch.randn(50, 8, device=device).half()
    _check(logits, top_p=0.8, k_max=2)


def test_route_torch_backend_is_reference(device):
    logits = torch.randn(20, 8, device=device)
    r = dk.route(logits, top_p=0.5, k_max=2, backend="torch")
    ref = route_ref(logits, top_p=0.5, k_max=2)
    assert torch.equal(r.expert_ids, ref.expert_ids)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(k_max=0), ValueError, "k_max"),
        (dict(k_max=9), ValueError, "k_max"),
        (dict(k_max=2.0), TypeError, "k_max"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_p="0.5"), TypeError, "top_p"),
        (dict(k_max=2, min_k=3), ValueError, "min_k"),
        (dict(min_k=0), ValueError, "min_k"),
        (dict(n_group=3), ValueError, "n_group"),
        (dict(n_group=4, topk_group=5), ValueError, "topk_group"),
        (dict(n_group=4, topk_group=0), ValueError, "topk_group"),
        (dict(renormalize=1), TypeError, "renormalize"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_route_bad_arguments(device, kw, exc, match):
    logits = torch.randn(4, 8, device=device)
    with pytest.raises(exc, match=match):
        dk.route(logits, **kw)


def test_route_bad_logits(device):
    with pytest.raises(ValueError, match="k_max=4 exceeds the number of experts E=2"):
        dk.route(torch.randn(4, 2, device=device), k_max=4)
    with pytest.raises(ValueError, match="logits"):
        dk.route(torch.randn(4, device=device))
    with pytest.raises(TypeError, match="logits"):
        dk.route(torch.zeros(4, 8, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="logits"):
        dk.route([[0.0, 1.0]])


@pytest.mark.gpu
def test_route_gpu_large(device):
    logits = torch.randn(100_000, 256, device=device)
    for kw in (dict(top_p=1.0, k_max=8, n_group=8, topk_group=4), dict(top_p=0.7, k_max=4)):
        r = dk.route(logits, backend="triton", **kw)
        ref = route_ref(logits, **kw)
        # CUDA's fp32 cumsum may differ from the kernel's correctly rounded prefix by an ulp:
        # allow a handful of boundary tokens under top-p, none under top-k
        bad = (r.expert_ids != ref.expert_ids).any(-1).sum().item()
        assert bad <= (0 if kw["top_p"] >= 1 else 10)
