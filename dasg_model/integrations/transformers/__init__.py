"""Run the DASG kernels inside Hugging Face transformers models.

``register()`` adds ``"dasg"`` to transformers' ``AttentionInterface`` (and the matching
``AttentionMaskInterface``) and to its ``ExpertsInterface``, so that existing models run our
kernels with their existing weights::

    from dasg_model.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="dasg", experts_implementation="dasg")

(or ``model.set_attn_implementation("dasg")`` / ``model.set_experts_implementation("dasg")`` on
a loaded model).

Attention (``q, k, v [B, H, T, D]`` from transformers, passed to the kernels as transposed
views): honours ``is_causal``, GQA, ``scaling`` and the causal ``sliding_window``
(transformers' window ``W`` lets query ``i`` see keys ``i - W + 1 .. i``, i.e. our
``window=(W - 1, 0)``); the window comes from the ``sliding_window`` keyword, else the
module's ``sliding_window`` attribute (Qwen2), else the config (see :func:`_config_window`).

The ``"dasg"`` mask function never builds a ``T x T`` mask for a pattern the kernels cover.
It hands the attention a small description instead (private; see :func:`dasg_mask`), a
4-D tensor with two unit dims in a dtype no transformers mask uses, so that transformers
passes it on unchanged (``generate`` builds the mask once, then the forward gets it again):

- nothing (``None``): plain causal / sliding causal, the queries are the last keys;
  dense :func:`dasg_kernels.swa_attention`, or :func:`dasg_kernels.swa_decode` against a
  KV cache;
- a ``[B, 1, 1, Tk]`` uint8 mask of the valid keys (padding; a static cache's unwritten tail), one
  run of tokens per row (left or right padding): each row is rolled so its run starts at
  column 0 (a gather), the kernels run, the rows are rolled back; padding rows are 0. Windows
  follow each row's first real token, as in transformers (its RoPE positions are the model's
  own, applied before the attention); padding is never attended;
- ``[B, 1, 1, 1]`` int32 valid lengths (a ``StaticCache`` / ``StaticSlidingWindowLayer`` without
  padding): :func:`dasg_kernels.swa_attention_with_kvcache` on each row's valid length;
- ``[1, 1, 1, N + 1]`` int32 ``cu_seqlens`` (packed sequences: ``position_ids`` that restart, e.g.
  ``DataCollatorWithFlattening``): :func:`dasg_kernels.swa_attention_varlen`, a restart
  being a document boundary as in transformers' flash-attention path. The
  ``cu_seq_lens_q/k`` + ``max_length_q/k`` keywords, when the model passes them, are used as
  they are.

Under ``torch.compile`` the decision reads only the config, the keywords, the shapes and
the mask function's identity (never mask values, never closures, which dynamo cannot read):
a 2-D ``attention_mask`` is taken to be one run per row, and a full-sequence call without
one whose mask function may hold a packed-sequence overlay takes its documents from the
``position_ids`` keyword (``cu_seqlens`` sized for the worst case of ``B * T`` documents,
``max_seqlen = T``: no host sync).

Everything else runs transformers' own SDPA (or the model's eager) path, with a one-time
:class:`DASGFallbackWarning` naming the real cause: chunked attention, ``or``/``and`` mask
overlays (e.g. bidirectional image tokens), padding with holes or with bidirectional
attention, ``output_attentions``, attention dropout, softcap, attention sinks, gradients
through KV-cache attention, a head dim the Triton kernels lack (with ``backend="triton"``;
``"auto"`` also falls back there), query / value head dims that differ while the kernels do
not take them, and for experts biases, non-SwiGLU or transposed / interleaved layouts,
post-expert norms, expert parallelism and sizes that are not multiples of 16 on the Triton
path. A model whose experts bypass transformers' ``ExpertsInterface`` (Llama-4's
``Llama4TextExperts``) gets a one-time warning that ``experts_implementation="dasg"`` has no
effect.

:func:`call_counts` tells how many calls ran our kernels and how many fell back, and why.

Host synchronisations kept (outside ``torch.compile``; none under it): the mask function
reads the 2-D padding mask (all ones? one run per row?) and, for packed sequences, the
number of documents and ``max_seqlen`` in one read, once per mask built by the model (one
per forward and attention type), not per layer; a one-row full-sequence call without a
mask reads its ``position_ids`` once per forward for restarts (packed documents the mask
did not flag, e.g. with a cache: transformers' flash-attention semantics); ``max_length_q/k``
keywords given as tensors are read once per layer; the experts path adds none.

Under compile, packed documents from ``position_ids`` get ``cu_seqlens`` with ``B*T + 1``
entries (trailing empty documents) and ``max_seqlen = T``; pass the collator's
``cu_seq_lens_q/k`` + ``max_length_q/k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``)
to give the exact ones.

Modules: :mod:`.masks` (the mask function), :mod:`.attention` (the attention function),
:mod:`.experts` (the experts function), :mod:`.registration` (:func:`register`,
:func:`enable`), :mod:`.calls` (the default backend, call counters, warnings).
"""
from dasg_model.integrations.transformers.attention import VALUE_HEAD_DIM_OPS, dasg_attention_forward  # noqa: F401
from dasg_model.integrations.transformers.calls import (  # noqa: F401
    NAME,
    DASGFallbackWarning,
    call_counts,
    reset_call_counts,
)
from dasg_model.integrations.transformers.experts import dasg_experts_forward
from dasg_model.integrations.transformers.masks import dasg_mask
from dasg_model.integrations.transformers.registration import enable, register

__all__ = [
    "DASGFallbackWarning",
    "call_counts",
    "dasg_attention_forward",
    "dasg_experts_forward",
    "dasg_mask",
    "enable",
    "register",
    "reset_call_counts",
]
