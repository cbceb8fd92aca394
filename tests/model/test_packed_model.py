"""Packed documents in the native model (``DASGForCausalLM``): every document of a batch from
transformers' ``DataCollatorWithFlattening`` -- restarting ``position_ids``, ``cu_seq_lens_q/k``
+ ``max_length_q/k``, ``seq_idx`` -- gives the logits, loss and gradients of the document run
alone; unsupported combinations raise ``ValueError``.

Documents are of odd lengths, longer than the window (5) plus several groups (4), so the
summaries of earlier groups are used (and would leak across documents if the groups did
not restart). fp32 throughout: logits agree to ~1e-7 here, gradients to ~1e-7 relative; the
tolerances (1e-5) are far below the leak without packing (0.2-0.3 in the logits).
"""
from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from _helpers import require_triton
from dasg_model import DASGCache, DASGConfig, DASGForCausalLM, set_backend
from dasg_model.packing import (
    PackedDocuments,
    doc_starts_from_cu_seqlens,
    doc_starts_from_positions,
    doc_starts_from_seq_idx,
    positions_in_documents,
)

DOC_LENGTHS = (13, 19, 7)
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_config(**kw) -> DASGConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, attention_window=5,
                group_size=4, use_summaries=True, shallow_shared_size=16, deep_shared_size=32,
                shallow_num_experts=4, shallow_expert_size=16, deep_num_experts=4, deep_expert_size=16,
                backend="torch")
    base.update(kw)
    return DASGConfig(**base)


@pytest.fixture(scope="module")
def model() -> DASGForCausalLM:
    torch.manual_seed(0)
    return DASGForCausalLM(tiny_config()).eval()


def documents(lengths=DOC_LENGTHS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=g) for n in lengths]


#: collator keywords of each mode; the explicit modes are tried with and without position_ids
#: (without them, the RoPE positions must restart per document from cu_seq_lens / seq_idx alone)
MODES = {
    "position_ids": {},
    "flash_attn_kwargs": dict(return_flash_attn_kwargs=True),
    "flash_attn_kwargs_only": dict(return_flash_attn_kwargs=True, return_position_ids=False),
    "seq_idx": dict(return_seq_idx=True),
    "seq_idx_only": dict(return_seq_idx=True, return_position_ids=False),
}


def collate(docs: list[torch.Tensor], mode: str) -> dict:
    return DataCollatorWithFlattening(**MODES[mode])([{"input_ids": d.tolist()} for d in docs])


def targets_of(docs: list[torch.Tensor]) -> int:
    return sum(len(d) - 1 for d in docs)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_packed_equals_alone(model, docs, batch, *, grad: bool = True) -> None:
    """Logits and losses of each document equal to the document alone; with ``grad`` the
    gradient of the packed LM loss (summed over targets) equals the sum of the documents'."""
    n_items = targets_of(docs)
    model.zero_grad(set_to_none=True)
    out = model(**batch, num_items_in_batch=n_items)
    if grad:
        out.lm_loss.backward()
        packed_grads = grads(model)
        model.zero_grad(set_to_none=True)
    mean = model(**batch).lm_loss.detach()  # no num_items: the mean over the packed targets
    flat_logits = out.logits.detach().reshape(-1, out.logits.shape[-1])
    off, summed, total = 0, 0.0, 0.0
    for d in docs:
        alone = model(d[None], labels=d[None], num_items_in_batch=n_items)
        torch.testing.assert_close(flat_logits[off:off + len(d)], alone.logits[0].detach(), **TOL)
        off += len(d)
        if grad:
            alone.lm_loss.backward()  # accumulates: the sum over the documents
        summed = summed + alone.lm_loss.detach()
        total = total + model(d[None], labels=d[None]).lm_loss.detach() * (len(d) - 1)
    torch.testing.assert_close(out.lm_loss.detach(), summed, **TOL)
    torch.testing.assert_close(mean, total / n_items, **TOL)
    if grad:
        alone_grads = grads(model)
        assert packed_grads.keys() == alone_grads.keys()
        for name, g in packed_grads.items():
            torch.testing.assert_close(g, alone_grads[name], **TOL, msg=lambda m: f"{name}: {m}")
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_packed_documents_equal_documents_alone(model, mode):
    docs = documents()
    batch = collate(docs, mode)
    assert batch["input_ids"].shape == (1, sum(DOC_LENGTHS))
    check_packed_equals_alone(model, docs, batch)


@pytest.mark.parametrize("mode", ["position_ids", "flash_attn_kwargs_only", "seq_idx_only"])
def test_loss_never_crosses_documents(model, mode):
    """With ``labels = input_ids`` (no separator at the document starts) the last token of a
    document still does not predict the next document's first."""
    docs = documents()
    batch = collate(docs, mode)
    batch["labels"] = batch["input_ids"].clone()
    check_packed_equals_alone(model, docs, batch, grad=False)


def test_packed_rows_by_position_ids_at_batch_two(model):
    """Restarting position_ids without an attention mask pack each row (transformers' sdpa
    semantics); two rows of two documents each."""
    docs = documents((11, 9, 14, 6), seed=2)
    rows = [torch.cat(docs[:2]), torch.cat(docs[2:])]
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in pair]) for pair in (docs[:2], docs[2:])])
    labels = torch.stack(rows)
    out = model(torch.stack(rows), position_ids=pos, labels=labels, num_items_in_batch=targets_of(docs))
    flat = out.logits.detach().reshape(-1, out.logits.shape[-1])
    off, summed = 0, 0.0
    for d in docs:
        alone = model(d[None], labels=d[None], num_items_in_batch=targets_of(docs))
        torch.testing.assert_close(flat[off:off + len(d)], alone.logits[0].detach(), **TOL)
        off += len(d)
        summed = summed + alone.lm_loss.detach()
    torch.testing.assert_close(out.lm_loss.detach(), summed, **TOL)


def test_position_ids_without_restarts_keep_the_dense_path(model):
    """Unpacked position_ids (0..T-1, or any start) change nothing but RoPE."""
    x = documents((17,))[0][None]
    torch.testing.assert_close(model(x, position_ids=torch.arange(17)[None]).logits, model(x).logits, atol=0, rtol=0)


def test_triton_backend_packed(device):
    """The Triton kernels (interpreter on CPU: one layer, two documents, to stay fast),
    forward and backward, documents from restarting position_ids."""
    require_triton(device, "swa_attention_varlen", "route", "expert_ffn")
    torch.manual_seed(0)
    m = set_backend(DASGForCausalLM(tiny_config(num_layers=1)).eval(), "triton").to(device)
    docs = [d.to(device) for d in documents((11, 7))]
    batch = {k: v.to(device) for k, v in collate(docs, "position_ids").items()}
    check_packed_equals_alone(m, docs, batch)


def test_packing_helpers():
    """Document starts from each collator mode, RoPE positions restarting per document (RoPE
    being relative, the logits above cannot tell restarted positions from shifted ones)."""
    want = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(doc_starts_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]]), 1), want)
    assert torch.equal(doc_starts_from_seq_idx(torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3]])), want)
    cu = torch.tensor([0, 3, 5, 6, 8, 8], dtype=torch.int32)  # a trailing empty document
    assert torch.equal(doc_starts_from_cu_seqlens(cu, 8), want[0])
    assert positions_in_documents(want).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    docs = PackedDocuments.from_starts(want)
    assert docs.cu_seqlens_q.tolist() == [0, 3, 5, 6, 8] and docs.max_seqlen_q == 3


def test_compiled_packed_forward_has_no_graph_break(device):
    """``torch.compile(fullgraph=True)`` of a packed forward: documents from position_ids
    without a host read (a slot per token). Triton kernels (interpreter on CPU) through their
    custom ops; dynamo's eager backend keeps it fast."""
    require_triton(device, "swa_attention_varlen", "route", "expert_ffn")
    torch.manual_seed(0)
    m = set_backend(DASGForCausalLM(tiny_config(num_layers=1)).eval(), "triton").to(device)
    batch = {k: v.to(device) for k, v in collate(documents((11, 7)), "position_ids").items()}
    torch._dynamo.reset()
    compiled = torch.compile(lambda **kw: m(**kw).logits, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(**batch), m(**batch).logits, **TOL)


def test_unsupported_combinations_raise(model):
    docs = documents()
    fa = collate(docs, "flash_attn_kwargs_only")
    sq = collate(docs, "seq_idx_only")
    ids = fa["input_ids"]
    with pytest.raises(ValueError, match="batch size 1"):
        model(ids.expand(2, -1), **{k: v for k, v in fa.items() if k.startswith(("cu_", "max_"))})
    with pytest.raises(ValueError, match="batch size 1"):
        model(ids.expand(2, -1), seq_idx=sq["seq_idx"].expand(2, -1))
    with pytest.raises(ValueError, match="max_length_q"):
        model(ids, cu_seq_lens_q=fa["cu_seq_lens_q"], cu_seq_lens_k=fa["cu_seq_lens_k"])
    with pytest.raises(ValueError, match="generation cache"):
        model(ids, seq_idx=sq["seq_idx"], use_cache=True)
    with pytest.raises(ValueError, match="generation cache"):
        model(ids, position_ids=collate(docs, "position_ids")["position_ids"], past_key_values=DASGCache(model.config))
    padded = torch.ones_like(ids)
    padded[0, -3:] = 0
    with pytest.raises(ValueError, match="attention_mask that holds padding"):
        model(ids, attention_mask=padded, seq_idx=sq["seq_idx"])
    with pytest.raises(ValueError, match="seq_idx must be"):
        model(ids, seq_idx=sq["seq_idx"][0])
    bad = fa["cu_seq_lens_k"].clone()
    bad[1] += 1
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        model(ids, cu_seq_lens_q=fa["cu_seq_lens_q"], cu_seq_lens_k=bad, max_length_q=19, max_length_k=19)
    with pytest.raises(ValueError, match="max_seqlen"):  # the op's own check: the longest document is 19
        model(ids, cu_seq_lens_q=fa["cu_seq_lens_q"], cu_seq_lens_k=fa["cu_seq_lens_k"], max_length_q=12,
              max_length_k=12)
    # an attention_mask of ones is harmless
    ok = model(ids, attention_mask=torch.ones_like(ids), seq_idx=sq["seq_idx"]).logits
    torch.testing.assert_close(ok, model(ids, seq_idx=sq["seq_idx"]).logits, atol=0, rtol=0)
