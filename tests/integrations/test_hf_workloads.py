"""The transformers drop-in on the workloads people run: a left-padded batch, a
packed batch (``DataCollatorWithFlattening``), ``torch.compile`` and static-cache generation,
on tiny random Qwen3-MoE, OLMoE, Gemma-3 and Mistral models: each equals transformers' own
path with the matching semantics on the real tokens, and no attention call falls back.

Mostly ``backend="torch"`` (the integration glue); one case per mode runs the Triton kernels
(the interpreter on CPU) through ``backend="auto"``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

from dasg_model.integrations import transformers as dt  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=32, max_position_embeddings=128)
ARCHS = ["qwen3_moe", "olmoe", "gemma3", "mistral"]


def build(arch: str):
    t = transformers
    if arch == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                               num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
        cls = t.Qwen3MoeForCausalLM
    elif arch == "olmoe":
        cfg = t.OlmoeConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"}, intermediate_size=48,
                            num_experts=4, num_experts_per_tok=2)
        cls = t.OlmoeForCausalLM
    elif arch == "gemma3":
        cfg = t.Gemma3TextConfig(**COMMON, intermediate_size=64, sliding_window=8, query_pre_attn_scalar=16,
                                 layer_types=["sliding_attention", "full_attention"])
        cls = t.Gemma3ForCausalLM
    elif arch == "mistral":
        cfg = t.MistralConfig(**COMMON, intermediate_size=96, sliding_window=8)
        cls = t.MistralForCausalLM
    elif arch == "deepseek_v3":
        cfg = t.DeepseekV3Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=128,
                                 qk_rope_head_dim=64, v_head_dim=128, intermediate_size=64,
                                 moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                 topk_group=1, first_k_dense_replace=1, max_position_embeddings=128)
        cls = t.DeepseekV3ForCausalLM
    else:  # pragma: no cover
        raise KeyError(arch)
    torch.manual_seed(0)
    return cls(cfg).float().eval()


def set_impl(model, name: str, backend: str = "torch"):
    if name == "dasg":
        return dt.enable(model, backend=backend)
    model.set_attn_implementation(name)
    if model._can_set_experts_implementation():
        model.set_experts_implementation("eager")
    return model


class no_fallback:
    """Counts calls; any DASGFallbackWarning is an error."""

    def __enter__(self):
        dt.reset_call_counts()
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", dt.DASGFallbackWarning)
        return self

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
        self.counts = dt.call_counts()
        return False


def assert_ran_kernels(counts, calls: int | None = None):
    assert counts["attention_fallback"] == 0, counts
    assert counts["attention"] > 0, counts
    if calls is not None:
        assert counts["attention"] == calls, counts


TOL = dict(atol=1e-5, rtol=1e-4)


def left_padded(b=3, t=14, pads=(0, 5, 9)):
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (b, t))
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    return ids, mask


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch(arch):
    model = build(arch)
    ids, mask = left_padded(t=20)  # longer than the window (8)
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids, attention_mask=mask).logits
        with no_fallback() as c:
            out = set_impl(model, "dasg")(ids, attention_mask=mask).logits
    assert_ran_kernels(c.counts, calls=2)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], **TOL)


# --------------------------------------------------------------------------- packed


def _docs(lengths=(5, 11, 3)):
    torch.manual_seed(2)
    return [torch.randint(1, VOCAB, (n,)) for n in lengths]


@pytest.mark.parametrize("mode", ["mask", "restarts", "cu_seq_lens"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_batch_equals_each_document_alone(arch, mode):
    """mask: no cache, transformers' mask says packed; restarts: with a cache (use_cache
    default) only the position_ids tell, as in its flash-attention path; cu_seq_lens: the
    collator's flash-attention keywords."""
    from transformers import DataCollatorWithFlattening

    model = build(arch)
    docs = _docs((5, 11, 3) if mode != "cu_seq_lens" else (9, 4))
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=mode == "cu_seq_lens")(
        [{"input_ids": d.tolist()} for d in docs])
    batch.pop("labels", None)
    if mode == "mask":
        batch["use_cache"] = False
    with torch.no_grad():
        set_impl(model, "eager")
        ref = torch.cat([model(d[None]).logits[0] for d in docs])
        with no_fallback() as c:
            out = set_impl(model, "dasg")(**batch).logits[0]
    assert_ran_kernels(c.counts, calls=2)
    torch.testing.assert_close(out, ref, **TOL)


def test_packed_batch_kernels_and_gradients():
    """The packed path through the Triton kernels (interpreter on CPU), with gradients."""
    from transformers import DataCollatorWithFlattening

    model = build("mistral")
    docs = _docs((10, 6))
    batch = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
    set_impl(model, "eager")
    ref = torch.cat([model(d[None]).logits[0] for d in docs])
    ref.square().mean().backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with no_fallback() as c:
        out = set_impl(model, "dasg", "auto")(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        out.square().mean().backward()
    assert_ran_kernels(c.counts, calls=2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    for n, p in model.named_parameters():
        if n in g_ref:
            torch.testing.assert_close(p.grad, g_ref[n], atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_runs_the_kernels(arch):
    """torch.compile: the pattern is read from the config, the keywords and the shapes (no
    mask values), so every attention call runs our kernels. Experts: transformers'
    batched_mm (the MoE torch reference graph-breaks on its data-dependent routing)."""
    torch._dynamo.reset()
    model = build(arch)
    ids, mask = left_padded(t=12, pads=(0, 4, 0))
    with torch.no_grad():
        set_impl(model, "eager")
        ref_plain = model(ids[:1]).logits
        ref_pad = model(ids, attention_mask=mask).logits
        dt.enable(model, backend="torch", experts=False)
        if model._can_set_experts_implementation():
            model.set_experts_implementation("batched_mm")
        compiled = torch.compile(model, backend="eager")
        with no_fallback() as c:
            out_plain = compiled(ids[:1], use_cache=False).logits  # a packed-sequence overlay may be there
            out_pad = compiled(ids, attention_mask=mask).logits  # rolled rows
    assert_ran_kernels(c.counts, calls=4)
    torch.testing.assert_close(out_plain, ref_plain, **TOL)
    real = mask.bool()
    torch.testing.assert_close(out_pad[real], ref_pad[real], **TOL)


# --------------------------------------------------------------------------- static cache


def _generate(model, ids, mask, new=5, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          disable_compile=True, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_generation(arch):
    """Left-padded greedy generation with a static cache (sliding layers: a
    StaticSlidingWindowLayer that fills and rolls): every step's logits equal eager's."""
    model = build(arch)
    ids, mask = left_padded(b=3, t=12, pads=(0, 3, 9))
    kw = dict(cache_implementation="static", new=8, output_scores=True, return_dict_in_generate=True)
    ref = _generate(set_impl(model, "eager"), ids, mask, **kw)
    with no_fallback() as c:
        out = _generate(set_impl(model, "dasg"), ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), **TOL)
    assert_ran_kernels(c.counts, calls=2 * 8)  # prefill + 7 decode steps, 2 layers


def test_static_cache_generation_kernels():
    """Static cache through the Triton kernels (interpreter): sliding layers of Gemma-3 whose
    window (8) the prompt (12) and the generated tokens pass."""
    model = build("gemma3")
    ids, mask = left_padded(b=2, t=12, pads=(0, 3))
    ref = _generate(set_impl(model, "eager"), ids, mask, cache_implementation="static")
    with no_fallback() as c:
        out = _generate(set_impl(model, "dasg", "auto"), ids, mask, cache_implementation="static")
    assert torch.equal(out, ref)
    assert_ran_kernels(c.counts, calls=10)


def test_static_cache_generation_compiled_fullgraph():
    """What generate does on a GPU with a static cache: the decode step compiled
    (fullgraph=True here, backend eager): the valid lengths come from the cache's position
    tensors, no mask values are read, the kernels run on every call."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = build("gemma3")
    ids, mask = left_padded(b=2, t=12, pads=(0, 3))
    ref = _generate(set_impl(model, "eager"), ids, mask, cache_implementation="static")
    dt.enable(model, backend="torch", experts=False)
    cc = CompileConfig(backend="eager", fullgraph=True, mode=None)
    cc._compile_all_devices = True  # compile on CPU too
    with no_fallback() as c:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             cache_implementation="static", compile_config=cc)
    assert torch.equal(out, ref)
    assert_ran_kernels(c.counts, calls=10)


def test_static_cache_forward_without_a_mask():
    """A StaticCache driven by hand (no attention_mask): the valid length comes from the cache."""
    from transformers import StaticCache

    model = build("mistral")
    ids = torch.randint(1, VOCAB, (1, 10))
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids).logits
        set_impl(model, "dasg")
        cache = StaticCache(config=model.config, max_cache_len=32)
        with no_fallback() as c:
            a = model(ids[:, :7], past_key_values=cache, use_cache=True).logits
            b = model(ids[:, 7:], past_key_values=cache, use_cache=True).logits
    assert_ran_kernels(c.counts, calls=4)
    torch.testing.assert_close(torch.cat([a, b], 1), ref, **TOL)


# --------------------------------------------------------------------------- MLA head dims, Llama-4 experts


def test_deepseek_v3_head_dims():
    """q/k head dim 192, v 128 (MLA): our kernels run every attention call (Dv != D), and the
    answer equals eager."""
    model = build("deepseek_v3")
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        ref = set_impl(model, "eager")(ids).logits
        dt.calls._WARNED.clear()
        dt.reset_call_counts()
        out = set_impl(model, "dasg")(ids).logits
    counts = dt.call_counts()
    torch.testing.assert_close(out, ref, **TOL)
    assert counts["attention"] == 2 and counts["attention_fallback"] == 0, counts


def test_llama4_experts_bypass_warns():
    t = transformers
    cfg = t.Llama4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                             num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = t.Llama4ForCausalLM(cfg).eval()
    dt.calls._WARNED.clear()
    with pytest.warns(dt.DASGFallbackWarning, match="experts_implementation='dasg' has no effect"):
        dt.enable(model, backend="torch")


# --------------------------------------------------------------------------- reasons


def test_fallbacks_are_counted_by_reason():
    model = build("mistral")
    ids = torch.randint(1, VOCAB, (1, 10))
    mask = torch.ones_like(ids)
    mask[0, 4] = 0  # a hole
    set_impl(model, "dasg")
    dt.calls._WARNED.clear()
    dt.reset_call_counts()
    with torch.no_grad(), pytest.warns(dt.DASGFallbackWarning, match="not one run of tokens"):
        model(ids, attention_mask=mask)
        model(ids, output_attentions=True)
    reasons = dt.call_counts()["attention_fallback_reasons"]
    assert reasons == {"padding that is not one run of tokens per row (holes in attention_mask)": 2,
                       "output_attentions=True": 2}, reasons


def test_mask_function_takes_the_cache_position_convention():
    """Earlier transformers 5.x call the mask interface with cache_position instead of
    q_length / q_offset."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    t = 12
    kw = dict(batch_size=2, kv_length=t, mask_function=sliding_window_causal_mask_function(8), local_size=8)
    assert dt.dasg_mask(cache_position=torch.arange(t), **kw) is None
    pad = torch.ones(2, t, dtype=torch.bool)
    pad[1, :3] = False
    assert torch.equal(dt.dasg_mask(cache_position=torch.arange(t), attention_mask=pad, **kw)[:, 0, 0].bool(), pad)
    # a static cache of 12 slots, 5 written, 1 new query: the valid length
    n = dt.dasg_mask(cache_position=torch.arange(5, 6), **kw)
    assert n.dtype == torch.int32 and n.view(-1).tolist() == [6, 6]
    pad[1, 4] = False  # a hole: transformers' eager mask, in the cache_position convention too
    m = dt.dasg_mask(cache_position=torch.arange(t), attention_mask=pad, **kw)
    assert m.shape == (2, 1, t, t) and "not one run" in m._dasg_reason
