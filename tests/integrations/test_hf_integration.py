"""attn_implementation="dasg" / experts_implementation="dasg" inside transformers models.

Tiny randomly initialised models built from configs (no downloads), fp32: logits, loss and
the gradients of the loss with "dasg" equal those with "eager". backend="triton" runs the
kernels (interpreter on CPU) and skips, with the reason measured at runtime, while a kernel
is not available; backend="torch" checks the integration glue alone.
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

from dasg_model.integrations import transformers as dt  # noqa: E402
from _helpers import require_triton  # noqa: E402

VOCAB, T = 97, 23
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=32, max_position_embeddings=128)



def build(arch: str, **overrides):
    t = transformers
    if arch == "mistral":
        cfg = t.MistralConfig(**COMMON, intermediate_size=96, sliding_window=8)
        cls = t.MistralForCausalLM
    elif arch == "mixtral":
        cfg = t.MixtralConfig(**COMMON, intermediate_size=64, sliding_window=8, num_local_experts=4,
                              num_experts_per_tok=2)
        cls = t.MixtralForCausalLM
    elif arch == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=48,
                               shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                               use_sliding_window=True, sliding_window=8, max_window_layers=2)
        cls = t.Qwen2MoeForCausalLM
    elif arch == "phimoe":  # builds a sliding mask, passes no window to the attention
        cfg = t.PhimoeConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                             sliding_window=8)
        cls = t.PhimoeForCausalLM
    elif arch == "gemma2":
        cfg = t.Gemma2Config(**COMMON, intermediate_size=64, sliding_window=8, query_pre_attn_scalar=16,
                             final_logit_softcapping=None)
        cls = t.Gemma2ForCausalLM
    elif arch == "gpt_oss":
        cfg = t.GptOssConfig(**COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                             sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        cls = t.GptOssForCausalLM
    else:  # pragma: no cover
        raise KeyError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    # eval: PhiMoE's router samples experts at random in training mode
    return cls(cfg).float().eval()


def has_experts(model) -> bool:
    return model._can_set_experts_implementation()


def set_impl(model, name: str, backend: str = "torch"):
    if name == "dasg":
        dt.enable(model, backend=backend)
    else:
        model.set_attn_implementation(name)
        if has_experts(model):
            model.set_experts_implementation(name)
    return model


def loss_and_grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kw)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def tol(device) -> dict:
    return dict(atol=2e-3, rtol=2e-3) if device.type == "cuda" else dict(atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["mistral", "mixtral", "qwen2_moe", "phimoe"])
def test_dasg_equals_eager(arch, backend, device):
    model = build(arch).to(device)
    if backend == "triton":
        require_triton(device, "swa_attention", "expert_ffn")
    ids = torch.randint(0, VOCAB, (2, T), device=device)
    assert T > model.config.sliding_window
    ref, g_ref = loss_and_grads(set_impl(model, "eager"), ids)
    set_impl(model, "dasg", backend)
    assert model.config._attn_implementation == "dasg"
    dt.reset_call_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", dt.DASGFallbackWarning)
        out, g = loss_and_grads(model, ids)
    counts = dt.call_counts()
    layers = model.config.num_hidden_layers
    assert counts["attention"] == layers and counts["attention_fallback"] == 0
    if has_experts(model):
        assert model.config._experts_implementation == "dasg"
        assert counts["experts"] == layers and counts["experts_fallback"] == 0
    torch.testing.assert_close(out.logits, ref.logits, **tol(device))
    torch.testing.assert_close(out.loss, ref.loss, **tol(device))
    assert g.keys() == g_ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], **tol(device), msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_dasg_half_precision_error_bound(arch, backend, device):
    """fp16 (bf16 arithmetic is broken in Triton's CPU interpreter): the error of "dasg" in
    fp16 against fp32 eager is at most twice the error of eager itself in fp16."""
    model = build(arch).to(device)
    if backend == "triton":
        require_triton(device, "swa_attention", "expert_ffn")
    ids = torch.randint(0, VOCAB, (2, T), device=device)
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids).logits
        model = model.half()
        eager16 = model(ids).logits.float()
        dasg16 = set_impl(model, "dasg", backend)(ids).logits.float()
    err_eager = (eager16 - ref).abs().max().item()
    err_dasg = (dasg16 - ref).abs().max().item()
    print(f"{arch} {backend}: fp16 max error dasg {err_dasg:.2e}, eager {err_eager:.2e}, logits scale {ref.abs().max().item():.2e}")
    assert err_dasg <= 2 * err_eager + 1e-4, (err_dasg, err_eager)


def test_sliding_window_is_honoured():
    """Without the window the logits would differ: the test above is not vacuous."""
    model = build("mistral")
    ids = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids).logits
        wide = build("mistral", sliding_window=None)
        wide.load_state_dict(model.state_dict())
        full = set_impl(wide, "dasg")(ids).logits
    assert (full - ref)[:, 8:].abs().max() > 1e-4
    torch.testing.assert_close(full[:, :8], ref[:, :8], atol=1e-5, rtol=1e-4)


def test_gemma2_scaling_and_alternating_windows():
    model = build("gemma2", attn_logit_softcapping=None)
    ids = torch.randint(0, VOCAB, (2, T))
    ref, g_ref = loss_and_grads(set_impl(model, "eager"), ids)
    dt.reset_call_counts()
    out, g = loss_and_grads(set_impl(model, "dasg"), ids)
    assert dt.call_counts()["attention"] == 2 and dt.call_counts()["attention_fallback"] == 0
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- fallbacks


def _expect_fallback(model, match: str, **kw):
    dt.calls._WARNED.clear()
    dt.reset_call_counts()
    with pytest.warns(dt.DASGFallbackWarning, match=match):
        out = model(**kw)
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "mistral"])
def test_padding_runs_the_kernels_and_matches_eager(arch):
    """Left and right padding: rows are rolled so their tokens start at column 0 (no [T, T]
    mask); the real tokens' logits equal eager's, and no call falls back."""
    model = build(arch)
    ids = torch.randint(0, VOCAB, (3, T))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0   # left padding
    mask[2, -4:] = 0  # right padding
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids, attention_mask=mask).logits
        dt.reset_call_counts()
        with warnings.catch_warnings():
            warnings.simplefilter("error", dt.DASGFallbackWarning)
            out = set_impl(model, "dasg")(ids, attention_mask=mask).logits
        assert dt.call_counts()["attention"] == 2 and dt.call_counts()["attention_fallback"] == 0
        real = mask.bool()
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-4)
        # an all-ones mask is no padding: our kernels run
        dt.reset_call_counts()
        model(ids, attention_mask=torch.ones_like(ids))
        assert dt.call_counts()["attention"] == 2 and dt.call_counts()["attention_fallback"] == 0


def test_mask_with_holes_falls_back_naming_the_cause():
    model = build("mistral")
    ids = torch.randint(0, VOCAB, (1, T))
    mask = torch.ones_like(ids)
    mask[0, 7] = 0  # a hole: not one run of tokens
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids, attention_mask=mask).logits
        out = _expect_fallback(set_impl(model, "dasg"), "not one run of tokens", input_ids=ids,
                               attention_mask=mask).logits
    torch.testing.assert_close(out[0, mask[0].bool()], ref[0, mask[0].bool()], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_left_padded_generation_runs_the_kernels(backend):
    """Batched generation with left padding: prefill and every decode step run our kernels
    (decode through swa_attention_with_kvcache with each row's length) and equal eager."""
    if backend == "triton":
        require_triton(torch.device("cpu"), "swa_attention", "swa_attention_with_kvcache")
    model = build("mixtral")
    ids = torch.randint(1, VOCAB, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref = set_impl(model, "eager").generate(ids, **kw)
    dt.reset_call_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", dt.DASGFallbackWarning)
        out = set_impl(model, "dasg", backend).generate(ids, **kw)
    assert torch.equal(out, ref)
    assert dt.call_counts()["attention"] == 10 and dt.call_counts()["attention_fallback"] == 0


def test_output_attentions_falls_back_to_eager():
    model = build("mistral")
    ids = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids, output_attentions=True)
        out = _expect_fallback(set_impl(model, "dasg"), "output_attentions", input_ids=ids, output_attentions=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.attentions[0], ref.attentions[0], atol=1e-6, rtol=1e-5)
    assert out.attentions[0][0, 0, -1, : T - 8].abs().max() == 0  # the sliding window, in the fallback too


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_unsupported_head_dim_falls_back_to_the_model(backend):
    # with "auto" the op would quietly run our PyTorch reference: the model's own path runs
    # instead, with a warning, and is counted as a fallback
    model = build("mistral", head_dim=12)  # not a multiple of 8
    ids = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids).logits
        out = _expect_fallback(set_impl(model, "dasg", backend), "head dim 12", input_ids=ids).logits
    assert dt.call_counts()["attention"] == 0 and dt.call_counts()["attention_fallback"] == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_attention_dropout_falls_back():
    model = build("mistral", attention_dropout=0.5).train()
    _expect_fallback(set_impl(model, "dasg"), "dropout", input_ids=torch.randint(0, VOCAB, (1, T)))
    assert dt.call_counts()["attention"] == 0


def test_softcap_falls_back_and_matches_eager():
    model = build("gemma2", attn_logit_softcapping=5.0)
    ids = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids).logits
        out = _expect_fallback(set_impl(model, "dasg"), "softcap", input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_expert_biases_and_sinks_fall_back_and_match_eager():
    model = build("gpt_oss")
    ids = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids).logits
        set_impl(model, "dasg")
        dt.calls._WARNED.clear()
        with pytest.warns(dt.DASGFallbackWarning) as record:
            out = model(ids).logits
    messages = " | ".join(str(w.message) for w in record)
    assert "biases in experts" in messages and "attention sinks" in messages
    assert dt.call_counts()["experts_fallback"] == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_generate_with_kv_cache_matches_eager(backend):
    model = build("mixtral").eval()
    if backend == "triton":
        require_triton(torch.device("cpu"), "swa_attention", "expert_ffn")
    ids = torch.randint(0, VOCAB, (1, 12))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = set_impl(model, "eager").generate(ids, **kw)
    dt.reset_call_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", dt.DASGFallbackWarning)
        out = set_impl(model, "dasg", backend).generate(ids, **kw)
    assert torch.equal(out, ref)
    # prefill and the 5 decode steps (swa_decode against the KV cache) ran our kernels, 2 layers each
    assert dt.call_counts()["attention"] == 12 and dt.call_counts()["attention_fallback"] == 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_decode_with_gradients_falls_back():
    model = build("mistral")
    ids = torch.randint(0, VOCAB, (1, 12))
    out = model(ids[:, :10], use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    set_impl(model, "dasg")
    dt.calls._WARNED.clear()
    with pytest.warns(dt.DASGFallbackWarning, match="gradients through KV-cache"):
        model(ids[:, 10:], past_key_values=cache, use_cache=True).logits.sum().backward()


def test_mask_function_builds_no_mask_for_plain_patterns():
    from transformers.masking_utils import chunked_causal_mask_function, sliding_window_causal_mask_function

    kw = dict(batch_size=2, q_length=T, kv_length=T)
    assert dt.dasg_mask(**kw, mask_function=sliding_window_causal_mask_function(8), local_size=8) is None
    assert dt.dasg_mask(**kw) is None
    chunked = chunked_causal_mask_function(8, torch.zeros(2, dtype=torch.long))
    assert dt.dasg_mask(**kw, mask_function=chunked, local_size=8) is not None
    pad = torch.ones(2, T, dtype=torch.bool)
    assert dt.dasg_mask(**kw, attention_mask=pad) is None
    pad[1, 0] = False
    m = dt.dasg_mask(**kw, attention_mask=pad)  # left padding: the [B, 1, 1, T] valid keys, no [T, T]
    assert m.shape == (2, 1, 1, T) and m.dtype == torch.uint8 and torch.equal(m[:, 0, 0].bool(), pad)
    pad[1, 5] = False  # a hole: transformers' eager mask (the fallback), naming the cause
    m = dt.dasg_mask(**kw, attention_mask=pad)
    assert m.shape == (2, 1, T, T) and m[1, 0, :, 0].min() < -1e30 and m[0, 0, -1, 0] == 0
    assert "not one run" in m._dasg_reason
    pad = torch.ones(2, T, dtype=torch.bool)
    pad[0, -3:] = False  # right padding only: per-row lengths, no roll
    m = dt.dasg_mask(**kw, attention_mask=pad)
    assert m.dtype == torch.int32 and m.view(-1).tolist() == [T - 3, T]


def test_register_three_lines(tmp_path):
    """The README's three lines, verbatim."""
    src = build("mixtral")
    src.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, T))
    from transformers import AutoModelForCausalLM

    from dasg_model.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="dasg", experts_implementation="dasg")

    assert model.config._attn_implementation == "dasg" and model.config._experts_implementation == "dasg"
    dt.reset_call_counts()
    with torch.no_grad():
        out = model(ids).logits
        ref = set_impl(src, "eager")(ids).logits
    assert dt.call_counts()["attention"] == 2 and dt.call_counts()["experts"] == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_window_from_the_config_when_the_call_names_none():
    # the window the model passes wins (None included); else the module's attribute; else
    # the config: the layer's layer_types entry, or the config's window for every layer
    from types import SimpleNamespace as NS

    cfg = NS(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert dt.attention._sliding_window(NS(config=cfg, layer_idx=0), dt.attention._UNSET) == 8
    assert dt.attention._sliding_window(NS(config=cfg, layer_idx=1), dt.attention._UNSET) is None
    assert dt.attention._sliding_window(NS(config=cfg, layer_idx=0), None) is None
    assert dt.attention._sliding_window(NS(config=cfg, layer_idx=0, sliding_window=4), dt.attention._UNSET) == 4
    assert dt.attention._sliding_window(NS(config=NS(sliding_window=8)), dt.attention._UNSET) == 8
    assert dt.attention._sliding_window(NS(config=NS(sliding_window=8, use_sliding_window=False)), dt.attention._UNSET) is None
    q = torch.randn(1, 2, 5, 32)
    with pytest.raises(RuntimeError, match="cannot tell this layer's sliding window"):
        dt.dasg_attention_forward(NS(config=cfg), q, q[:, :1], q[:, :1], None)


def test_enable_sets_the_backend_per_model(monkeypatch):
    seen = []
    real = dt.attention.swa_attention

    def spy(*a, backend, **kw):
        seen.append(backend)
        return real(*a, backend="torch", **kw)

    monkeypatch.setattr(dt.attention, "swa_attention", spy)
    m1, m2 = build("mistral"), build("mistral")
    dt.enable(m1, backend="torch")
    dt.enable(m2, backend="auto")  # must not switch m1
    ids = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        m1(ids)
        assert seen == ["torch", "torch"]
        m2(ids)
        assert seen[2:] == ["auto", "auto"]
