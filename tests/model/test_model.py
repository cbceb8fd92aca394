"""dasg_model modules: config validation, each module against a plain-PyTorch composition
of the references, backend="torch" vs backend="triton" (forward and gradients), from_dense.

The triton comparisons run when the Triton backend of the op works here (interpreter on
CPU, real kernels on GPU); otherwise they skip with the reason measured at runtime.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import require_triton
from dasg_kernels import reference
from dasg_model import (
    AdaptiveDynamicRouter,
    DASGBlock,
    DASGConfig,
    DASGForCausalLM,
    DASGMoE,
    DualScaleSharedExperts,
    GroupedMultiHeadAttention,
    routing_summary,
    set_backend,
)

# --------------------------------------------------------------------------- helpers

def tol(device: torch.device) -> dict:
    # fp32 everywhere; GPU kernels may use TF32 tensor-core dots.
    return dict(atol=2e-3, rtol=2e-3) if device.type == "cuda" else dict(atol=1e-4, rtol=1e-4)


def small_config(**kw) -> DASGConfig:
    base = dict(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, attention_window=5,
                group_size=4, use_summaries=True, shallow_shared_size=32, deep_shared_size=64, shallow_num_experts=4,
                shallow_expert_size=32, deep_num_experts=4, deep_expert_size=32, top_p=0.6, k_max=2,
                complexity_threshold=0.5, backend="torch")
    base.update(kw)
    return DASGConfig(**base)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def run_both(module: torch.nn.Module, fn, *inputs: torch.Tensor):
    """Run ``fn(module, *inputs)`` with backend torch and triton; return outputs and grads."""
    results = []
    for backend in ("torch", "triton"):
        m = set_backend(module, backend)
        m.zero_grad(set_to_none=True)
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = fn(m, *xs)
        (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
        results.append((out.detach(), grads(m), [x.grad for x in xs]))
    return results


def assert_same(results, device) -> None:
    (o_t, g_t, xg_t), (o_k, g_k, xg_k) = results
    torch.testing.assert_close(o_k, o_t, **tol(device))
    assert g_t.keys() == g_k.keys()
    for n in g_t:
        torch.testing.assert_close(g_k[n], g_t[n], **tol(device), msg=lambda m: f"grad of {n}: {m}")
    for a, b in zip(xg_k, xg_t):
        if b is not None:
            torch.testing.assert_close(a, b, **tol(device))


def rope_plain(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE written out pair by pair: ``x [B, T, H, D]``, pairs ``(i, i + D/2)``."""
    d = x.shape[-1]
    pos = torch.arange(x.shape[1], dtype=torch.float32, device=x.device)
    ang = pos[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def moe_plain(moe: DASGMoE, x: torch.Tensor) -> torch.Tensor:
    """DASGMoE written as a composition of the references (route_ref, swiglu_ref)."""
    cfg = moe.config
    c = torch.sigmoid(F.linear(x, moe.router.complexity_gate.weight, moe.router.complexity_gate.bias)).squeeze(-1)
    deep = (c >= cfg.complexity_threshold).float()
    kw = dict(top_p=cfg.router_top_p, k_max=cfg.k_max, min_k=cfg.min_k, n_group=cfg.n_group, topk_group=cfg.topk_group)
    rs = reference.route_ref(F.linear(x, moe.router.shallow_router.weight), **kw)
    rd = reference.route_ref(F.linear(x, moe.router.deep_router.weight), **kw)
    y = moe.shared.shallow_scale * reference.swiglu_ref(x, moe.shared.shallow.gate_up_proj[0], moe.shared.shallow.down_proj[0])
    deep_out = reference.swiglu_ref(x, moe.shared.deep.gate_up_proj[0], moe.shared.deep.down_proj[0])
    for n in range(x.shape[0]):
        for slot in range(cfg.k_max):
            e = int(rs.expert_ids[n, slot])
            if e >= 0:
                y[n] = y[n] + moe.routed_scale[0] * rs.weights[n, slot] * reference.swiglu_ref(
                    x[n:n + 1], moe.shallow_experts.gate_up_proj[e], moe.shallow_experts.down_proj[e])[0]
            e = int(rd.expert_ids[n, slot])
            if e >= 0:
                deep_out[n] = deep_out[n] + moe.routed_scale[1] * rd.weights[n, slot] * reference.swiglu_ref(
                    x[n:n + 1], moe.deep_experts.gate_up_proj[e], moe.deep_experts.down_proj[e])[0]
    return y + (deep * c)[:, None] * deep_out


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("changes, match", [
    (dict(hidden_size=65), "num_heads"),
    (dict(num_heads=3, num_kv_heads=2, hidden_size=96), "num_kv_heads"),
    (dict(k_max=5), "k_max"),
    (dict(min_k=3, k_max=2), "min_k"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(top_p=0.0), "top_p"),
    (dict(complexity_threshold=1.5), "complexity_threshold"),
    (dict(attention_window=-1, use_summaries=True), "use_summaries"),
    (dict(attention_window=-2, use_summaries=False), "attention_window"),
    (dict(backend="cuda"), "backend"),
    (dict(head_dim=7), "head_dim"),
    (dict(deep_num_experts=0), "deep_num_experts"),
])
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        small_config(**changes)


def test_config_round_trip(tmp_path):
    cfg = small_config(topk_group=1, n_group=2)
    assert DASGConfig.from_dict(cfg.to_dict()) == cfg
    assert DASGConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "config.json"
    cfg.to_json(str(path))
    assert DASGConfig.from_json(str(path)) == cfg
    assert json.loads(path.read_text())["attention_window"] == 5
    with pytest.raises(ValueError, match="unknown fields"):
        DASGConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    assert cfg.window == (5, 0) and cfg.resolved_head_dim == 32


# --------------------------------------------------------------------------- GMHA


@pytest.mark.parametrize("summaries", [True, False])
def test_attention_matches_plain_composition(summaries):
    cfg = small_config(use_summaries=summaries)
    attn = GroupedMultiHeadAttention(cfg)
    x = torch.randn(2, 19, cfg.hidden_size)
    b, t, _ = x.shape
    q = rope_plain(F.linear(x, attn.q_proj.weight).view(b, t, 2, 32))
    k = rope_plain(F.linear(x, attn.k_proj.weight).view(b, t, 1, 32))
    v = F.linear(x, attn.v_proj.weight).view(b, t, 1, 32)
    o, _ = reference.swa_attention_ref(q, k, v, window=(5, 0), causal=True, group_size=4 if summaries else None,
                                       summaries=summaries)
    want = F.linear(o.reshape(b, t, 64), attn.o_proj.weight)
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_attention_summaries_carry_far_context():
    cfg = small_config()
    attn = GroupedMultiHeadAttention(cfg)
    x = torch.randn(1, 24, cfg.hidden_size)
    x2 = x.clone()
    x2[0, 0] += 1.0  # far outside the window of the last query
    with_s = attn(x2)[0, -1] - attn(x)[0, -1]
    attn_no = GroupedMultiHeadAttention(small_config(use_summaries=False))
    attn_no.load_state_dict(attn.state_dict())
    without = attn_no(x2)[0, -1] - attn_no(x)[0, -1]
    assert with_s.abs().max() > 1e-4
    assert without.abs().max() == 0


def test_attention_torch_vs_triton(device):
    require_triton(device, "swa_attention")
    cfg = small_config()
    attn = GroupedMultiHeadAttention(cfg).to(device)
    x = torch.randn(2, 23, cfg.hidden_size, device=device)
    assert_same(run_both(attn, lambda m, x: m(x), x), device)


# --------------------------------------------------------------------------- router / DSSE / MoE


def test_router_losses_stats_and_gate_gradient():
    cfg = small_config()
    router = AdaptiveDynamicRouter(cfg)
    with torch.no_grad():
        router.complexity_gate.weight.normal_(std=0.5)
    x = torch.randn(40, cfg.hidden_size)
    out = router(x)
    c = torch.sigmoid(router.complexity_gate(x)).squeeze(-1)
    torch.testing.assert_close(out.gate, c)
    assert torch.equal(out.deep_mask, c >= cfg.complexity_threshold)
    assert 0 < int(out.deep_mask.sum()) < 40
    deep = out.levels["deep"].routing
    assert (deep.expert_ids[~out.deep_mask] == -1).all() and (deep.weights[~out.deep_mask] == 0).all()
    assert (deep.expert_ids[out.deep_mask, 0] >= 0).all()
    assert int(deep.tokens_per_expert.sum()) == int((deep.expert_ids >= 0).sum())
    # aux losses by hand, shallow level (all rows)
    logits = F.linear(x, router.shallow_router.weight)
    p = torch.softmax(logits, -1)
    r = out.levels["shallow"].routing
    f = r.tokens_per_expert.float() / r.tokens_per_expert.sum()
    torch.testing.assert_close(out.aux_losses["shallow/load_balance"], 4 * (f * p.mean(0)).sum())
    torch.testing.assert_close(out.aux_losses["shallow/z_loss"], torch.logsumexp(logits, -1).square().mean())
    torch.testing.assert_close(out.aux_losses["shallow/entropy"], -(p * p.log()).sum(-1).mean())
    # deep level: means over the deep rows only
    dl = F.linear(x, router.deep_router.weight)[out.deep_mask]
    torch.testing.assert_close(out.aux_losses["deep/z_loss"], torch.logsumexp(dl, -1).square().mean())
    torch.testing.assert_close(out.aux_losses["load_balance"],
                               out.aux_losses["shallow/load_balance"] + out.aux_losses["deep/load_balance"])
    assert float(out.stats["deep_fraction"]) == pytest.approx(float(out.deep_mask.float().mean()))
    assert 1.0 <= float(out.stats["shallow/mean_experts_per_token"]) <= cfg.k_max
    # the entropy term reaches the router weights
    out.aux_losses["entropy"].backward()
    assert router.shallow_router.weight.grad.abs().sum() > 0 and router.deep_router.weight.grad.abs().sum() > 0


def test_dsse_deep_expert_runs_only_on_deep_rows(monkeypatch):
    import dasg_model.experts as experts_mod

    cfg = small_config()
    dsse = DualScaleSharedExperts(DASGMoE(cfg).config)
    for p in dsse.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(10, cfg.hidden_size)
    gate = torch.rand(10, requires_grad=True)
    deep = gate.detach() >= 0.5
    calls = []
    real = experts_mod.expert_ffn

    def spy(x, gu, dp, routing, **kw):
        calls.append((gu.shape, routing[0].clone()))
        return real(x, gu, dp, routing, **kw)

    monkeypatch.setattr(experts_mod, "expert_ffn", spy)
    y = dsse(x, gate, deep)
    deep_ids = [ids for shape, ids in calls if shape[1] == 2 * cfg.deep_shared_size][0]
    assert torch.equal(deep_ids[:, 0] >= 0, deep)  # non-deep rows are never computed
    shallow = reference.swiglu_ref(x, dsse.shallow.gate_up_proj[0], dsse.shallow.down_proj[0])
    deep_y = reference.swiglu_ref(x, dsse.deep.gate_up_proj[0], dsse.deep.down_proj[0])
    torch.testing.assert_close(y, dsse.shallow_scale * shallow + (gate * deep)[:, None] * deep_y, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert (gate.grad[~deep] == 0).all() and (gate.grad[deep] != 0).all()


def test_moe_matches_plain_composition():
    cfg = small_config(n_group=2, topk_group=1)
    moe = DASGMoE(cfg)
    with torch.no_grad():
        moe.router.complexity_gate.weight.normal_(std=0.5)
        moe.routed_scale.copy_(torch.tensor([0.7, 1.3]))
        moe.shared.shallow_scale.fill_(0.9)
    x = torch.randn(2, 9, cfg.hidden_size)
    y, aux = moe(x)
    torch.testing.assert_close(y, moe_plain(moe, x.reshape(-1, 64)).view_as(y), atol=1e-5, rtol=1e-5)
    assert set(aux.aux_losses) >= {"load_balance", "z_loss", "entropy"}
    y.square().sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_moe_torch_vs_triton(device):
    require_triton(device, "route", "expert_ffn")
    cfg = small_config()
    moe = DASGMoE(cfg).to(device)
    with torch.no_grad():
        moe.router.complexity_gate.weight.normal_(std=0.5)
    x = torch.randn(21, cfg.hidden_size, device=device)
    assert_same(run_both(moe, lambda m, x: m(x)[0], x), device)


def test_block_torch_vs_triton(device):
    require_triton(device, "swa_attention", "route", "expert_ffn")
    cfg = small_config()
    block = DASGBlock(cfg).to(device)
    x = torch.randn(2, 17, cfg.hidden_size, device=device)
    assert_same(run_both(block, lambda m, x: m(x)[0], x), device)


# --------------------------------------------------------------------------- from_dense


class DenseSwiGLU(torch.nn.Module):
    def __init__(self, d: int, i: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, i, bias=False)
        self.up_proj = torch.nn.Linear(d, i, bias=False)
        self.down_proj = torch.nn.Linear(i, d, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _dense_mlp(d: int, i: int) -> torch.nn.Module:
    try:
        from transformers import MistralConfig
        from transformers.models.mistral.modeling_mistral import MistralMLP

        return MistralMLP(MistralConfig(hidden_size=d, intermediate_size=i))
    except ImportError:  # transformers is optional
        return DenseSwiGLU(d, i)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_from_dense_equals_dense_mlp(backend, device):
    if backend == "triton":
        require_triton(device, "route", "expert_ffn")
    mlp = _dense_mlp(64, 96).to(device)
    moe = DASGMoE.from_dense(mlp, small_config(backend=backend), shallow_expert_size=48, deep_expert_size=128)
    assert moe.config.deep_shared_size == 96 and moe.config.hidden_size == 64
    torch.testing.assert_close(moe.shared.deep.gate_up_proj[0, :96], mlp.gate_proj.weight)
    torch.testing.assert_close(moe.deep_experts.down_proj[1], mlp.down_proj.weight[:, torch.arange(128, 256) % 96])
    x = torch.randn(3, 11, 64, device=device)
    y, aux = moe(x)
    torch.testing.assert_close(y, mlp(x), **tol(device))
    assert float(aux.stats["deep_fraction"]) == 1.0
    # the routed experts and the shallow expert start switched off but learn
    y.square().sum().backward()
    assert moe.routed_scale.grad.abs().min() > 0 and moe.shared.shallow_scale.grad.abs() > 0


def test_from_dense_rejects_non_swiglu():
    mlp = DenseSwiGLU(64, 96)
    mlp.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="SiLU"):
        DASGMoE.from_dense(mlp, small_config())
    with pytest.raises(ValueError, match="complexity_threshold"):
        DASGMoE.from_dense(DenseSwiGLU(64, 96), small_config(complexity_threshold=0.99))


# --------------------------------------------------------------------------- the LM


def test_causal_lm_loss_generate_and_stats():
    cfg = small_config()
    model = DASGForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    out = model(ids, labels=ids)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)
    aux = sum(getattr(cfg, f"{n}_coef") * torch.stack([o.aux_losses[n] for o in out.moe]).mean()
              for n in ("load_balance", "z_loss", "entropy"))
    torch.testing.assert_close(out.loss, ce + aux)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    stats = routing_summary(out.moe)
    assert len(stats["layer1/deep/tokens_per_expert"]) == cfg.deep_num_experts
    assert 0.0 <= stats["layer0/deep_fraction"] <= 1.0
    # greedy generation appends the argmax of a full forward
    gen = model.generate(ids[:, :6], max_new_tokens=3)
    assert gen.shape == (2, 9) and torch.equal(gen[:, :6], ids[:, :6])
    with torch.no_grad():
        assert torch.equal(gen[:, 6], model(ids[:, :6]).logits[:, -1].argmax(-1))
        assert torch.equal(gen[:, 8], model(gen[:, :8]).logits[:, -1].argmax(-1))


def test_causal_lm_loss_ignores_masked_labels_and_never_nans():
    cfg = small_config()
    model = DASGForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, 3:] = -100
    out = model(ids, labels=labels)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)
    # no target at all (every label -100, or T=1): lm_loss is 0, not NaN, and so is its gradient
    for ids_, labels_ in ((ids, torch.full_like(ids, -100)), (ids[:, :1], ids[:, :1])):
        out = model(ids_, labels=labels_)
        assert out.lm_loss.item() == 0.0 and torch.isfinite(out.loss)
        model.zero_grad()
        out.lm_loss.backward()
        assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_causal_lm_torch_vs_triton(device):
    require_triton(device, "swa_attention", "route", "expert_ffn")
    cfg = small_config()
    model = DASGForCausalLM(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), device=device)
    res = []
    for backend in ("torch", "triton"):
        set_backend(model, backend)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        res.append((out.logits.detach(), out.loss.detach(), grads(model)))
    torch.testing.assert_close(res[1][0], res[0][0], **tol(device))
    torch.testing.assert_close(res[1][1], res[0][1], **tol(device))
    for n in res[0][2]:
        torch.testing.assert_close(res[1][2][n], res[0][2][n], **tol(device), msg=lambda m: f"grad of {n}: {m}")


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend"):
        set_backend(DASGMoE(small_config()), "cuda")
    moe = set_backend(copy.deepcopy(DASGMoE(small_config())), "auto")
    assert moe.config.backend == "auto" and moe.deep_experts.backend == "auto"
    assert math.isfinite(float(moe(torch.randn(4, 64))[0].detach().sum()))
