"""``DASGForCausalLM`` under transformers' ``Trainer``: gradient accumulation gives the update of
one large batch.

The model honours ``num_items_in_batch`` (``accepts_loss_kwargs``), so ``Trainer`` does not
divide by the accumulation steps: one step of ``per_device_train_batch_size=2,
gradient_accumulation_steps=2`` must move the parameters as one step of batch 4 (SGD, constant
learning rate, no clipping, the same four samples in order) and log the same loss.

Measured here: with the auxiliary losses off and micro-batches of different target counts the
two updates agree to fp32 rounding (relative difference 1e-7). With the default auxiliary
coefficients and equal micro-batches the norms of the updates agree to 5e-5 and the logged
losses to 4e-5 (4.17371 vs 4.17375); the update vectors differ by 1.0e-3 relative, all of it
from the aux losses being per-batch statistics (load balance is a product of two batch means,
the deep level's terms are means over each micro-batch's deep rows; see
``DASGForCausalLM.forward``), concentrated in the router weights, whose small updates come
mostly from the load-balance term. A model that ignores ``num_items_in_batch`` gives an
accumulated update of 2.000x the large batch's.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

from dasg_model import DASGConfig, DASGForCausalLM

T = 12


def tiny_model(**kw) -> DASGForCausalLM:
    torch.manual_seed(0)
    cfg = DASGConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, attention_window=5,
                     group_size=4, shallow_shared_size=16, deep_shared_size=32, shallow_num_experts=4,
                     shallow_expert_size=16, deep_num_experts=4, deep_expert_size=16, backend="torch", **kw)
    return DASGForCausalLM(cfg)


def samples(masked: tuple[int, ...] = (0, 0, 0, 0)) -> list[dict[str, torch.Tensor]]:
    """Four samples of ``T`` tokens; sample ``i`` has its first ``masked[i]`` labels ignored."""
    g = torch.Generator().manual_seed(1)
    out = []
    for m in masked:
        ids = torch.randint(0, 64, (T,), generator=g)
        labels = ids.clone()
        labels[:m] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def train_one_step(model: DASGForCausalLM, data, tmp_path, batch: int, accumulation: int):
    """One optimizer step of Trainer; returns (parameter update, logged loss)."""
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}x{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        train_sampling_strategy="sequential", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.model_accepts_loss_kwargs
    update = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    logged = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return update, logged


@pytest.mark.parametrize("aux", ["off", "default"])
def test_accumulation_equals_large_batch(tmp_path, aux):
    # aux off: unequal micro-batches (targets 11+11 | 3+7), only the LM term -- exact;
    # aux on: equal micro-batches, the aux terms per micro-batch (per-batch statistics)
    model = tiny_model(**(dict(load_balance_coef=0.0, z_loss_coef=0.0, entropy_coef=0.0) if aux == "off" else {}))
    data = samples((0, 0, 8, 4) if aux == "off" else (0, 0, 0, 0))
    full, loss_full = train_one_step(model, data, tmp_path, batch=4, accumulation=1)
    acc, loss_acc = train_one_step(model, data, tmp_path, batch=2, accumulation=2)

    ratio = (acc.norm() / full.norm()).item()
    rel = ((acc - full).norm() / full.norm()).item()
    assert abs(ratio - 1) < (1e-5 if aux == "off" else 1e-3), ratio
    assert rel < (1e-5 if aux == "off" else 5e-3), rel
    # the logged loss is the large batch's loss (Trainer rounds it to 4 decimals)
    batch4 = {k: torch.stack([s[k] for s in data]) for k in data[0]}
    with torch.no_grad():
        expected = model(**batch4).loss.item()
    assert loss_full == pytest.approx(expected, abs=1e-4)
    assert loss_acc == pytest.approx(expected, abs=1e-4 if aux == "off" else 1e-3)


def test_loss_with_num_items_in_batch():
    """``loss = sum of token losses / N + (n / N) * aux_loss``; the mean without ``N``."""
    model = tiny_model()
    data = samples((0, 5, 0, 0))[:2]
    batch = {k: torch.stack([s[k] for s in data]) for k in data[0]}
    n = int((batch["labels"][:, 1:] != -100).sum())
    plain = model(**batch)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(plain.logits[:, :-1].reshape(-1, 64), batch["labels"][:, 1:].reshape(-1),
                                               ignore_index=-100, reduction="sum")
    torch.testing.assert_close(plain.lm_loss, ce / n)
    torch.testing.assert_close(plain.loss, ce / n + plain.aux_loss)
    out = model(**batch, num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(out.lm_loss, ce / 50)
    torch.testing.assert_close(out.loss, ce / 50 + n / 50 * out.aux_loss)
    # shift_labels (padding-free collators) are the already shifted targets
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    via_shift = model(batch["input_ids"], shift_labels=shifted, num_items_in_batch=50)
    torch.testing.assert_close(via_shift.loss, out.loss)
