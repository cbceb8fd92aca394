"""Training runs of DASGForCausalLM.

- ``test_long_range_recall_needs_summaries`` (slow, ~30-90 s on 2 CPU cores, depending on
  load): a tiny model (one DASG block) learns to recall the value of a key/value pair placed
  further back than its attention window. It runs the ``torch`` backend (the PyTorch
  references of the same ops): 1,200 optimizer steps are far too many for Triton's CPU
  interpreter. With group summaries the model reaches high accuracy on these
  beyond-the-window queries; without them it stays at chance, because no key of the pair
  is visible to the query.
- ``test_trains_end_to_end_with_triton_kernels``: a few steps with every op on the Triton
  backend (the interpreter on CPU, the real kernels on a GPU): the loss falls and the first
  step matches the torch backend.
"""
from __future__ import annotations

import time

import pytest
import torch

import dasg_kernels
from dasg_model import DASGConfig, DASGForCausalLM, set_backend

# Vocabulary of the recall task: filler tokens, keys, values.
FILL0, NFILL, KEY0, NKEY, VAL0, NVAL = 0, 4, 4, 8, 12, 8
VOCAB = FILL0 + NFILL + NKEY + NVAL


def recall_batch(batch: int, seq: int, pairs: int, group: int, gen: torch.Generator):
    """``ids [batch, seq + 1]``: ``pairs`` (key, value) pairs, pair ``p`` at the start of group ``p``,
    random filler elsewhere, a query key at ``seq - 1`` and its value at ``seq`` (the only label)."""
    ids = FILL0 + torch.randint(0, NFILL, (batch, seq + 1), generator=gen)
    keys = torch.stack([torch.randperm(NKEY, generator=gen)[:pairs] for _ in range(batch)]) + KEY0
    vals = torch.randint(0, NVAL, (batch, pairs), generator=gen) + VAL0
    for p in range(pairs):
        ids[:, p * group] = keys[:, p]
        ids[:, p * group + 1] = vals[:, p]
    rows = torch.arange(batch)
    which = torch.randint(0, pairs, (batch,), generator=gen)
    ids[:, seq - 1] = keys[rows, which]
    ids[:, seq] = vals[rows, which]
    labels = torch.full_like(ids, -100)
    labels[:, seq] = ids[:, seq]
    return ids, labels


def recall_config(summaries: bool, window: int, group: int, backend: str = "torch", layers: int = 1) -> DASGConfig:
    return DASGConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=layers, num_heads=2, num_kv_heads=2, attention_window=window,
        group_size=group, use_summaries=summaries, shallow_shared_size=32, deep_shared_size=64,
        shallow_num_experts=4, shallow_expert_size=32, deep_num_experts=4, deep_expert_size=32, top_p=0.7,
        k_max=2, max_position_embeddings=64, backend=backend,
    )


def train_recall(summaries: bool, *, steps: int, seq: int, window: int, group: int, pairs: int, seed: int = 0):
    torch.manual_seed(seed)
    model = DASGForCausalLM(recall_config(summaries, window, group))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        ids, labels = recall_batch(32, seq, pairs, group, gen)
        out = model(ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    ids, _ = recall_batch(512, seq, pairs, group, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        pred = model(ids[:, :-1]).logits[:, -1].argmax(-1)
    acc = (pred == ids[:, -1]).float().mean().item()
    return losses, acc


@pytest.mark.slow
def test_long_range_recall_needs_summaries():
    seq, window, group, pairs, steps = 32, 4, 4, 2, 600
    # the pairs end at position pairs*group - 1 = 7; the query at seq - 1 = 31 sees keys 27..31 only
    assert (seq - 1) - window > pairs * group
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and steadier on a shared 2-core box
    try:
        t0 = time.time()
        loss_s, acc_s = train_recall(True, steps=steps, seq=seq, window=window, group=group, pairs=pairs)
        loss_n, acc_n = train_recall(False, steps=steps, seq=seq, window=window, group=group, pairs=pairs)
        elapsed = time.time() - t0
    finally:
        torch.set_num_threads(threads)
    first_s, last_s = sum(loss_s[:20]) / 20, sum(loss_s[-20:]) / 20
    first_n, last_n = sum(loss_n[:20]) / 20, sum(loss_n[-20:]) / 20
    print(
        f"\nlong-range recall (backend=torch, 1 layer, {steps} steps each, T={seq}, window={window}, G={group}, "
        f"{pairs} pairs, chance {1 / NVAL:.3f}, {elapsed:.0f}s):\n"
        f"  with summaries:    loss {first_s:.3f} -> {last_s:.3f}, beyond-window accuracy {acc_s:.3f}\n"
        f"  without summaries: loss {first_n:.3f} -> {last_n:.3f}, beyond-window accuracy {acc_n:.3f}"
    )
    assert last_s < 0.5 * first_s, "the loss with summaries did not fall"
    assert acc_s >= 0.75, f"with summaries the model should recall beyond its window, got {acc_s:.3f}"
    assert acc_n <= 0.3, f"without summaries the value is invisible; accuracy {acc_n:.3f} is above chance"
    assert acc_s >= acc_n + 0.45


def _triton_missing() -> str | None:
    device = torch.device("cuda" if torch.cuda.is_available() and not dasg_kernels.interpreter_enabled() else "cpu")
    try:
        q = torch.randn(1, 8, 2, 32, device=device)
        dasg_kernels.swa_attention(q, q[:, :, :1], q[:, :, :1], window=(3, 0), group_size=2, summaries=True,
                                   backend="triton")
        dasg_kernels.route(torch.randn(4, 4, device=device), top_p=0.5, k_max=2, backend="triton")
        ids = torch.zeros(4, 1, dtype=torch.int32, device=device)
        dasg_kernels.expert_ffn(torch.randn(4, 32, device=device), torch.randn(1, 64, 32, device=device),
                                torch.randn(1, 32, 32, device=device), (ids, torch.ones(4, 1, device=device)),
                                backend="triton")
    except (NotImplementedError, ValueError) as e:
        return f"backend='triton' not available here: {type(e).__name__}: {e}"
    return None


def test_trains_end_to_end_with_triton_kernels(device):
    if (reason := _triton_missing()) is not None:
        pytest.skip(reason)
    cfg = recall_config(True, window=4, group=4, backend="triton")
    torch.manual_seed(0)
    model = DASGForCausalLM(cfg).to(device)
    ids, _ = recall_batch(4, 16, 2, 4, torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with torch.no_grad():
        ref = set_backend(model, "torch")(ids, labels=ids).loss
    set_backend(model, "triton")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        out = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    print(f"\ntriton backend ({device.type}), 4 steps on one batch: losses {[round(v, 3) for v in losses]}")
    torch.testing.assert_close(torch.tensor(losses[0]), ref.cpu(), atol=2e-3, rtol=2e-3)
    assert losses[-1] < losses[0] - 0.05
