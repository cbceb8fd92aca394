"""Generation benchmark: decode step time and cache bytes against context length.

Variants (batch 1; the prompt of ``T`` tokens is prefilled, then single-token decode steps
are timed against the filled cache):

=============  ==============================================================================
``ours``       ``DASGForCausalLM`` with the bounded :class:`dasg_model.DASGCache`
               (ring of ``W + chunk`` positions + one mean per finished group)
``full_kv``    the same model with ``DASGCache(bounded=False)``: every position kept (the
               same attention, ``O(T)`` cache)
``dense_sdpa`` a same-size dense-attention model (transformers' ``LlamaForCausalLM``, SDPA,
               ``DynamicCache``; its MLP sized to our active expert parameters)
=============  ==============================================================================

Reported per context: ms per decode step, tokens/s, cache bytes, and the prefill's peak
memory. ``cache_bytes`` is the cache after the timed decode steps (the decode-time state:
the ring holds ``W + 1`` positions then), ``cache_bytes_prefill`` right after the prefill
(ring of ``W + chunk``). ``full_kv`` also keeps the group means (and rounds to whole chunks),
so it is a little above a plain K/V cache. GPU: a ~1B-parameter model (bf16) at T in
4k..128k; CPU: a tiny fp32 model on ``backend="torch"`` at T in {64, 256} (``--quick``: 64). Targets (GPU): the decode step at
128k within 1.2x of that at 4k; cache bytes at 128k at most ``(W + T/G) / T`` of the full
cache; the 128k prefill fits in 80 GB.

Before timing, greedy tokens with the bounded cache are checked against ``use_cache=False``.
Run alone: ``python -m benchmarks.bench_generate [--quick]``.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from benchmarks import common
from benchmarks.common import Context

FAMILY = "generate"
METHODS = ("ours", "full_kv", "dense_sdpa")
GPU_T = (4096, 16384, 65536, 131072)
DECODE_STEPS = 8  # tokens per timed call (CPU: 2)

GPU_CONFIG: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=2048, num_layers=12, num_heads=16, num_kv_heads=4, head_dim=128,
    max_position_embeddings=131072 + 1024, attention_window=2047, group_size=256, use_summaries=True,
    shallow_shared_size=512, deep_shared_size=1024, shallow_num_experts=8, shallow_expert_size=512,
    deep_num_experts=8, deep_expert_size=1024, top_p=0.7, k_max=2, prefill_chunk_size=4096,
)
CPU_CONFIG: dict[str, Any] = dict(
    vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
    max_position_embeddings=1024, attention_window=15, group_size=16, use_summaries=True,
    shallow_shared_size=16, deep_shared_size=32, shallow_num_experts=4, shallow_expert_size=16,
    deep_num_experts=4, deep_expert_size=32, top_p=0.7, k_max=2, prefill_chunk_size=64,
    backend="torch",  # the CPU: PyTorch against PyTorch (the Triton interpreter's times mean nothing)
)


def contexts(quick: bool, device: torch.device) -> tuple[int, ...]:
    if device.type == "cuda":
        return (4096, 131072) if quick else GPU_T
    return (64,) if quick else (64, 256)


def cases(quick: bool, device: torch.device) -> list[int]:
    return list(contexts(quick, device))


def _models(device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dasg_model import DASGConfig, DASGForCausalLM

    cfg = DASGConfig(**(GPU_CONFIG if device.type == "cuda" else CPU_CONFIG))
    torch.manual_seed(0)
    ours = DASGForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    # dense MLP with the routed + shared parameters a token activates (shallow level, k_max experts)
    inter = cfg.shallow_shared_size + cfg.k_max * cfg.shallow_expert_size
    dense_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=inter,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
                            max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True)
    dense_cfg._attn_implementation = "sdpa"
    dense = LlamaForCausalLM(dense_cfg).to(device=device, dtype=dtype).eval()
    return cfg, ours, dense


def _cache_bytes(cache) -> int:
    mb = getattr(cache, "memory_bytes", None)
    if mb is not None:
        return int(mb())
    n = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
    return n


def _check(ctx: Context, ours, device: torch.device) -> bool:
    ids = torch.randint(1, ours.config.vocab_size, (2, 3 * ours.config.group_size + 5), device=device)
    with torch.no_grad():
        a = ours.generate(ids, max_new_tokens=8, do_sample=False)
        b = ours.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    same = bool(torch.equal(a, b))
    res = {"check": "greedy tokens: bounded cache == use_cache=False", "passed": same,
           "max_err": float((a != b).float().mean()), "tol": 0.0}
    ctx.add_check(f"T={ids.shape[1]}", "generate", res)
    return same


def run(ctx: Context) -> None:
    from benchmarks.runner import FamilyUnavailable

    from dasg_model import DASGCache

    dev = ctx.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        cfg, ours, dense = _models(dev, dtype)
    except Exception as exc:
        raise FamilyUnavailable(f"models cannot be built: {type(exc).__name__}: {exc}") from exc
    ctx.families[FAMILY].update(config=cfg.dasg_dict(), parameters=sum(p.numel() for p in ours.parameters()),
                                dtype=str(dtype).replace("torch.", ""))
    from benchmarks.bench_attention import kernel_available

    ok, why = kernel_available(dev)
    ctx.families[FAMILY].update(kernel_available=ok, kernel_reason=why)
    if not _check(ctx, ours, dev):
        for t in cases(ctx.settings.quick, dev):
            ctx.add_record(case_id=f"T={t}", case={"T": t}, method="ours", mode="decode", status="error",
                           reason="wrong output (see the correctness table): not timed")
        return
    for t in cases(ctx.settings.quick, dev):
        ids = torch.randint(1, cfg.vocab_size, (1, t), device=dev, generator=torch.Generator(dev).manual_seed(t))
        for method in METHODS:
            ctx.step(f"T={t} {method}")
            base = {"case_id": f"T={t}", "case": {"T": t, "B": 1}, "method": method, "mode": "decode"}
            if ctx.out_of_time():
                ctx.add_record(**base, status="skipped", reason=ctx.budget_reason())
                continue
            ctx.add_record(**_one(ctx, base, method, ours, dense, ids, DASGCache))
            common.cleanup(dev)
        ctx.log(_line(ctx, t))


def _one(ctx: Context, base: dict, method: str, ours, dense, ids: torch.Tensor, DASGCache) -> dict:
    dev = ctx.device
    model = dense if method == "dense_sdpa" else ours
    rec = dict(base)
    try:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.no_grad():
            if method == "dense_sdpa":
                out = model(ids, use_cache=True)
                cache = getattr(out, "cache", None) or out.past_key_values
            else:
                cache = DASGCache(ours.config, bounded=method == "ours")
                model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if dev.type == "cuda":
            rec["prefill_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        rec["cache_bytes_prefill"] = _cache_bytes(cache)
        tok = ids[:, -1:]

        n_steps = DECODE_STEPS if dev.type == "cuda" else 2

        def steps():
            with torch.no_grad():
                for _ in range(n_steps):
                    model(tok, past_key_values=cache, use_cache=True)

        m = common.measure(steps, ctx.settings)
        rec.update(m)
        rec["ms"] = m["ms"] / n_steps
        rec["tokens_per_s"] = 1e3 / rec["ms"]
        rec["cache_bytes"] = _cache_bytes(cache)  # after the decode steps
        rec["status"] = "ok"
    except Exception as exc:
        if common.is_oom(exc):
            rec.update(status="skipped", reason="out of memory")
        else:
            rec.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    return rec


def _line(ctx: Context, t: int) -> str:
    parts = [f"generate T={t}:"]
    for r in ctx.records:
        if r.get("family") == FAMILY and r.get("case_id") == f"T={t}":
            if r.get("status") == "ok":
                parts.append(f"{r['method']} {r['ms']:.2f} ms/token, cache {r['cache_bytes'] / 2**20:.2f} MiB")
            else:
                parts.append(f"{r['method']} {r.get('status')}")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.runner import main as runner_main

    return runner_main(["--only", FAMILY, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
