"""Model benchmark: one training step and one inference forward of ``DASGForCausalLM``.

Variants (same weights, same input, batch 1):

=============  ==============================================================================
``ours``       the model as shipped: ``backend="auto"`` (the Triton kernels on CUDA)
``reference``  the same model with ``backend="torch"``: every op is its PyTorch reference
               (``dasg_kernels.reference``: materialised attention masks, per-expert loop)
``dense_sdpa`` the same model with its attention replaced by dense causal SDPA (flash backend
               where it applies): what a same-size dense-attention model costs; the MoE still
               runs our kernels, so the difference is the attention alone
=============  ==============================================================================

Modes: ``train`` (forward + loss + backward) and ``infer`` (no-grad forward). Reported:
ms, tokens/s and peak memory, at T in {4k, 16k, 32k} on CUDA (bf16). The issue-5 target:
at T=16k ``ours`` reaches at least 2x the reference's tokens/s with at most half its peak
memory. Before timing, the model's loss and logits with our kernels are checked against
an fp32 copy of the model on the reference backend (the bf16 reference backend gives the
tolerance, as in the op checks).

If ``dasg_model`` or the API used here is missing, the family reports "unavailable" with
the reason instead of crashing.

Run alone: ``python -m benchmarks.bench_model [--quick]``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import Context

FAMILY = "model"
VARIANTS = ("ours", "dense_sdpa", "reference")
METHODS = VARIANTS
MODES = ("train", "infer")
GPU_T = (4096, 16384, 32768)

# A two-layer model: hidden 512, 4 query heads / 1 kv head of 128, window 1024 with summaries
# G=1024, 2 x 16 routed experts. Few heads and layers keep the reference model (fp32 T x T
# scores per head, three of them kept per layer for the backward) inside 80 GB at T=16k.
GPU_CONFIG: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=512, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=128,
    max_position_embeddings=65536, attention_window=1023, group_size=1024, use_summaries=True,
    shallow_shared_size=256, deep_shared_size=1408, shallow_num_experts=16, shallow_expert_size=256,
    deep_num_experts=16, deep_expert_size=512, top_p=0.7, k_max=4, tie_word_embeddings=True,
)
CPU_CONFIG: dict[str, Any] = dict(
    vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
    max_position_embeddings=1024, attention_window=15, group_size=16, use_summaries=True,
    shallow_shared_size=16, deep_shared_size=32, shallow_num_experts=4, shallow_expert_size=16,
    deep_num_experts=4, deep_expert_size=32, top_p=0.7, k_max=2,
)


def sequence_lengths(quick: bool, device: torch.device) -> tuple[int, ...]:
    if device.type == "cuda":
        return (16384,) if quick else GPU_T
    return (64,)


def cases(quick: bool, device: torch.device) -> list[int]:
    return list(sequence_lengths(quick, device))


def _api():
    """The model API, or :class:`benchmarks.runner.FamilyUnavailable` naming what is missing."""
    from benchmarks.runner import FamilyUnavailable

    try:
        import dasg_model
        from dasg_model import DASGConfig, DASGForCausalLM
    except Exception as exc:
        raise FamilyUnavailable(f"dasg_model.DASGForCausalLM / DASGConfig cannot be imported: "
                                f"{type(exc).__name__}: {exc}") from exc
    set_backend = getattr(dasg_model, "set_backend", None)
    return dasg_model, DASGConfig, DASGForCausalLM, set_backend


def make_config(DASGConfig, base: dict[str, Any]):
    """``DASGConfig`` from ``base``, keeping only the fields this version of it has."""
    from benchmarks.runner import FamilyUnavailable

    try:
        import dasg_model.config as config_module

        fields = getattr(config_module, "FIELDS", None)  # a PretrainedConfig: its own field table
        names = (set(fields) | set(getattr(config_module, "KEYWORD_ALIASES", {})) if fields is not None
                 else {f.name for f in dataclasses.fields(DASGConfig)})
        kw = {k: v for k, v in base.items() if k in names}
        return DASGConfig(**kw), sorted(set(base) - names)
    except Exception as exc:
        raise FamilyUnavailable(f"DASGConfig rejected the benchmark config: {type(exc).__name__}: {exc}") from exc


def _set_backend(model, backend: str, set_backend) -> None:
    if set_backend is not None:
        set_backend(model, backend)
        return
    for m in model.modules():  # older API: a config object per module
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "backend"):
            cfg.backend = backend
        if hasattr(m, "backend") and isinstance(getattr(m, "backend"), str):
            m.backend = backend


def _sdpa_causal(q, k, v, *, window=(-1, -1), causal=True, group_size=None, summaries=False,
                 softmax_scale=None, backend="auto"):
    """Drop-in for ``swa_attention`` that does dense causal attention with SDPA."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


@contextlib.contextmanager
def dense_attention(dasg_model):
    """Inside this block the model's attention runs dense causal SDPA."""
    mod = getattr(dasg_model, "attention", None)
    if mod is None or not hasattr(mod, "swa_attention"):
        raise NotImplementedError("dasg_model.attention.swa_attention not found: cannot swap in SDPA")
    orig = mod.swa_attention
    mod.swa_attention = _sdpa_causal
    try:
        yield
    finally:
        mod.swa_attention = orig


def _reference_memory_bytes(cfg, t: int, train: bool) -> float:
    """What the reference attention materialises: fp32 ``[Hq, T, T + T/G]`` scores; training
    keeps three of them per layer for the backward, and any forward has ~3-4 in flight."""
    heads = getattr(cfg, "num_heads", 8)
    g = getattr(cfg, "group_size", 0) or 0
    tk = t + (t // g if g and getattr(cfg, "use_summaries", False) else 0)
    unit = heads * t * tk * 4
    return unit * (3 * getattr(cfg, "num_layers", 1) + 3 if train else 4)


def run(ctx: Context) -> None:
    dasg_model, DASGConfig, DASGForCausalLM, set_backend = _api()
    dev = ctx.device
    on_cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    cfg, dropped = make_config(DASGConfig, GPU_CONFIG if on_cuda else CPU_CONFIG)
    if dropped:
        ctx.log(f"model: DASGConfig has no field(s) {dropped}; using its defaults for them")
    from benchmarks.runner import FamilyUnavailable

    try:
        torch.manual_seed(0)
        model = DASGForCausalLM(cfg).to(device=dev, dtype=dtype)
    except Exception as exc:
        raise FamilyUnavailable(f"DASGForCausalLM(config) failed: {type(exc).__name__}: {exc}") from exc
    n_params = sum(p.numel() for p in model.parameters())
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
    ctx.families[FAMILY].update(config=cfg_dict, parameters=n_params, dtype=str(dtype).replace("torch.", ""))

    from benchmarks.bench_attention import kernel_available as attn_ok
    from benchmarks.bench_moe import kernel_available as moe_ok

    a_ok, a_why = attn_ok(dev)
    m_ok, m_why = moe_ok(dev)
    kernels = a_ok and m_ok
    why = "; ".join(w for w in (a_why, m_why) if w)
    stand_in = not kernels
    if stand_in:
        ctx.log(f"model: {why}; 'ours' runs on whatever backend='auto' picks (no speed-ups reported)")
    ctx.families[FAMILY].update(kernel_available=kernels, kernel_reason=why)

    if not _check_model(ctx, model, cfg, dev, dtype, set_backend, DASGForCausalLM):
        for t in cases(ctx.settings.quick, dev):
            ctx.add_record(case_id=f"T={t}", case={"T": t}, method="ours", mode="*", status="error",
                           reason="wrong output (see the correctness table): not timed")
        return

    ts = sorted(cases(ctx.settings.quick, dev), key=lambda t: (t != 16384, t))
    for t in ts:
        gen = torch.Generator(device=dev).manual_seed(t)
        ids = torch.randint(0, cfg.vocab_size, (1, t), device=dev, generator=gen)
        params = {"T": t, "B": 1, "parameters": n_params, "dtype": str(dtype).replace("torch.", "")}
        for variant in VARIANTS:
            ctx.step(f"T={t} {variant}")
            base = {"case_id": f"T={t}", "case": params, "method": variant, "tokens": t,
                    "stand_in": variant == "ours" and stand_in}
            if ctx.out_of_time():
                ctx.add_record(**base, mode="*", status="skipped", reason=ctx.budget_reason())
                continue
            if variant == "ours" and not kernels and on_cuda:
                ctx.add_record(**base, mode="*", status="unavailable", reason=why)
                continue
            _set_backend(model, "torch" if variant == "reference" else "auto", set_backend)
            for mode in MODES:
                train = mode == "train"
                if variant == "reference" and on_cuda:
                    need = _reference_memory_bytes(cfg, t, train)
                    free = common.free_memory_bytes(dev) or 0
                    if need > 0.8 * free:
                        ctx.add_record(**base, mode=mode, status="skipped",
                                       reason=f"reference attention would need ~{need / 2**30:.0f} GiB "
                                              f"({free / 2**30:.0f} GiB free): does not fit")
                        continue
                params_list = [p for p in model.parameters() if p.requires_grad]

                def step():
                    out = model(ids, labels=ids)
                    out.loss.backward()

                def infer():
                    with torch.no_grad():
                        return model(ids).logits

                try:
                    cm = dense_attention(dasg_model) if variant == "dense_sdpa" else contextlib.nullcontext()
                    with cm:
                        model.train(train)
                        rec = ctx.timed({**base, "mode": mode}, step if train else infer,
                                        grad_to_none=params_list if train else None, memory=True)
                except NotImplementedError as exc:
                    rec = ctx.add_record(**base, mode=mode, status="unavailable", reason=str(exc))
                if rec.get("status") == "ok":
                    rec["tokens_per_s"] = t / (rec["ms"] * 1e-3)
                model.zero_grad(set_to_none=True)
                common.cleanup(dev)
            ctx.log(_line(ctx, t, variant))
    _set_backend(model, "auto", set_backend)
    del model
    common.cleanup(dev)


def _check_model(ctx: Context, model, cfg, dev, dtype, set_backend, DASGForCausalLM) -> bool:
    """Loss and logits of the model with our kernels vs an fp32 copy on the reference backend."""
    t = 2048 if dev.type == "cuda" else 64
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, t), device=dev, generator=gen)
    case = f"T={t} model"
    try:
        with torch.no_grad():
            model.eval()
            _set_backend(model, "auto", set_backend)
            ours = model(ids, labels=ids)
            _set_backend(model, "torch", set_backend)
            low = model(ids, labels=ids)
            ref_model = copy.deepcopy(model).float()
            _set_backend(ref_model, "torch", set_backend)
            ref = ref_model(ids, labels=ids)
            del ref_model
            _set_backend(model, "auto", set_backend)
        ok = True
        r = common.compare("loss", ours.loss.reshape(1), ref.loss.reshape(1), low.loss.reshape(1),
                           dtype=dtype, factor=2.0)
        ok &= ctx.add_check(case, "DASGForCausalLM", r)["passed"]
        # logits: mean abs error (routing near-ties may flip an expert for a few tokens in
        # any low-precision run, so the max error is not a fair test at model level)
        mae = lambda a: float((a.float() - ref.logits.float()).abs().mean())  # noqa: E731
        e_ours, e_low = mae(ours.logits), mae(low.logits)
        tol = 2 * e_low + common.ATOL.get(dtype, 1e-4)
        ok &= ctx.add_check(case, "DASGForCausalLM", {"check": "logits (mean abs err)", "max_err": e_ours,
                                                       "tol": tol, "ref_lowp_err": e_low,
                                                       "passed": e_ours <= tol, "note": ""})["passed"]
        return ok
    except Exception as exc:
        if common.is_oom(exc):
            ctx.log("model check: out of memory, skipped")
            common.cleanup(dev)
            return True
        ctx.add_check(case, "DASGForCausalLM", {"check": "runs", "passed": False, "max_err": None, "tol": None,
                                                "note": f"{type(exc).__name__}: {str(exc)[:300]}"})
        return False
    finally:
        common.cleanup(dev)


def _line(ctx: Context, t: int, variant: str) -> str:
    parts = []
    for r in ctx.records:
        if r.get("family") == FAMILY and r.get("case_id") == f"T={t}" and r.get("method") == variant:
            if r["status"] == "ok":
                parts.append(f"{r['mode']}={r['ms']:.1f}ms ({r.get('tokens_per_s', 0):,.0f} tok/s)")
            else:
                parts.append(f"{r['mode']}:{r['status']}")
    return f"  model T={t:<6} {variant:<11} " + " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.runner import main as runner_main

    return runner_main(["--only", FAMILY, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
