"""The references define the semantics: check them against brute-force loops
written straight from DESIGN.md, so every kernel test rests on a checked base."""
import math

import pytest
import torch
import torch.nn.functional as F

from dasg_kernels import reference as ref


def _visible(i, j_count, left, right):
    lo = 0 if left < 0 else max(0, i - left)
    hi = j_count - 1 if right < 0 else min(j_count - 1, i + right)
    return set(range(lo, hi + 1))


def _brute_attention(q, k, v, window, causal, group_size, summaries):
    """Per-query loop: list visible keys and summaries by the definitions."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    left, right = window[0], (0 if causal else window[1])
    out = torch.zeros(b, t, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, t), -math.inf, dtype=torch.float64)
    ng = -(-t // group_size) if summaries else 0
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(t):
                keys, vals = [], []
                for j in sorted(_visible(i, t, left, right)):
                    keys.append(k[bi, j, kh].double())
                    vals.append(v[bi, j, kh].double())
                for g in range(ng):
                    start, end = g * group_size, min((g + 1) * group_size, t)
                    before = left >= 0 and (g + 1) * group_size - 1 < i - left
                    after = (not causal) and right >= 0 and g * group_size > i + right
                    if before or after:
                        keys.append(k[bi, start:end, kh].double().mean(0))
                        vals.append(v[bi, start:end, kh].double().mean(0))
                if not keys:
                    continue
                s = torch.stack(keys) @ q[bi, i, h].double() / math.sqrt(d)
                lse[bi, h, i] = torch.logsumexp(s, 0)
                out[bi, i, h] = torch.softmax(s, 0) @ torch.stack(vals)
    return out, lse


@pytest.mark.parametrize(
    "t,window,causal,group_size,summaries",
    [
        (13, (-1, -1), True, None, False),
        (13, (3, 0), True, 4, True),
        (13, (2, 5), False, 3, True),
        (17, (0, 0), False, 4, True),
        (17, (-1, 3), False, 4, True),
        (9, (4, -1), False, 2, True),
        (10, (5, 2), True, 3, True),
    ],
)
def test_attention_reference_matches_definition(t, window, causal, group_size, summaries):
    q, k, v = (torch.randn(2, t, h, 8) for h in (4, 2, 2))
    out, lse = ref.swa_attention_ref(
        q, k, v, window=window, causal=causal, group_size=group_size, summaries=summaries
    )
    want_out, want_lse = _brute_attention(q, k, v, window, causal, group_size or 1, summaries)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_attention_reference_matches_sdpa_for_plain_window():
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    mask = ref.local_mask(40, 40, (7, 0), True)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    out, _ = ref.swa_attention_ref(q, k, v, window=(7, 0), causal=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_attention_reference_empty_rows_are_zero_not_nan():
    # Queries placed before every key (q_offset < 0) see nothing under a causal mask.
    q, k, v = (torch.randn(1, 4, 1, 8) for _ in range(3))
    out, lse = ref.swa_attention_ref(q, k, v, window=(2, 0), causal=True, q_offset=-3)
    assert torch.isfinite(out).all()
    assert (out[0, :3] == 0).all() and torch.isneginf(lse[0, 0, :3]).all()
    assert torch.isfinite(lse[0, 0, 3])


def test_group_means_partial_last_group():
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1, 1)
    means = ref.group_means_ref(x, 3)
    assert means.flatten().tolist() == [1.0, 4.0, 6.0]


def _brute_route(p, top_p, k_max, min_k, n_group, topk_group):
    e = len(p)
    allowed = list(range(e))
    if n_group > 1:
        size = e // n_group
        scores = [max(p[g * size:(g + 1) * size]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: (-scores[g], g))[:topk_group]
        allowed = [x for x in range(e) if x // size in groups]
    order = sorted(allowed, key=lambda x: (-p[x], x))[:k_max]
    if top_p >= 1.0:
        return order
    chosen, mass = [], 0.0
    for x in order:
        if mass >= top_p and len(chosen) >= min_k:
            break
        chosen.append(x)
        mass += p[x]
    return chosen


@pytest.mark.parametrize(
    "top_p,k_max,min_k,n_group,topk_group",
    [(1.0, 2, 1, 1, None), (0.5, 4, 1, 1, None), (0.9, 4, 2, 1, None), (0.7, 3, 1, 4, 2), (1.0, 4, 1, 8, 1)],
)
def test_route_reference_matches_definition(top_p, k_max, min_k, n_group, topk_group):
    logits = torch.randn(50, 16) * 2
    logits[3, :] = 0.0  # a token with all-equal probabilities: ties to the lower index
    r = ref.route_ref(logits, top_p=top_p, k_max=k_max, min_k=min_k, n_group=n_group, topk_group=topk_group)
    probs = torch.softmax(logits.double(), -1)
    for n in range(logits.shape[0]):
        want = _brute_route(probs[n].tolist(), top_p, k_max, min_k, n_group, topk_group or n_group)
        got = [x for x in r.expert_ids[n].tolist() if x >= 0]
        assert got == want, n
        assert r.num_selected[n].item() == len(want)
        w = probs[n, want] / probs[n, want].sum()
        torch.testing.assert_close(r.weights[n, : len(want)].double(), w, atol=1e-6, rtol=1e-5)
        assert (r.weights[n, len(want):] == 0).all()
    assert r.tokens_per_expert.tolist() == torch.bincount(
        r.expert_ids[r.expert_ids >= 0].long(), minlength=16
    ).tolist()
    assert r.tokens_per_expert.dtype == torch.int32 and r.expert_ids.dtype == torch.int32


def test_route_reference_weights_are_differentiable():
    logits = torch.randn(8, 6, requires_grad=True)
    r = ref.route_ref(logits, top_p=0.8, k_max=3)
    (r.weights * torch.randn_like(r.weights)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_expert_ffn_reference_matches_dense_formula():
    n, d, f, e = 6, 8, 12, 3
    x = torch.randn(n, d)
    gate_up, down = torch.randn(e, 2 * f, d), torch.randn(e, d, f)
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [0, 1], [2, -1], [1, 2]])
    w = torch.rand(n, 2) * (ids >= 0)
    y = ref.expert_ffn_ref(x, gate_up, down, ids, w)
    want = torch.zeros(n, d)
    for i in range(n):
        for s in range(2):
            ex = ids[i, s].item()
            if ex < 0:
                continue
            g, u = gate_up[ex, :f] @ x[i], gate_up[ex, f:] @ x[i]
            want[i] += w[i, s] * (down[ex] @ (F.silu(g) * u))
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
