"""The speed targets as data, and their PASS / MISS / N/A verdicts on a run.

:data:`TARGETS` holds every speed target (attention, MoE, the whole model, generation) with
its threshold; the ``*_T`` / ``*_N`` constants say which cases each applies to. :func:`evaluate_targets` looks the measured values up in a
run's records; a target is judged only on an H100 / H200 whose kernel passed its
correctness checks (N/A otherwise, with the reason).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from benchmarks.report.index import Index, ratio, t_label


@dataclass(frozen=True)
class Target:
    """One speed target: ``name`` (``str.format`` fields filled per case, ``{threshold}``
    among them), the threshold, its direction and its unit (``"x"``, ``"fraction"``, ``"GiB"``)."""

    family: str
    name: str
    threshold: float | None  # None: computed per case
    higher_is_better: bool = True
    unit: str = "x"


TARGETS: dict[str, Target] = {
    # attention, bf16, D = ATTENTION_D, causal
    "attn_fwd_vs_flex": Target("attention", "fwd >= {threshold}x FlexAttention", 1.3),
    "attn_bwd_vs_flex": Target("attention", "bwd >= {threshold}x FlexAttention", 1.0),
    "attn_full_vs_flash": Target("attention", "full causal fwd >= {threshold}x SDPA flash", 0.9),
    "attn_summary_cost": Target("attention", "summaries (G=W) {mode} cost <= {threshold}x without", 1.15, False),
    # MoE
    "moe_vs_grouped_mm_mixtral": Target("moe", "fwd+bwd >= {threshold}x torch._grouped_mm", 1.0),
    "moe_vs_grouped_mm": Target("moe", "fwd+bwd >= {threshold}x torch._grouped_mm", 1.2),
    "moe_of_dense": Target("moe", "fwd+bwd >= {threshold:.0%} of equal-FLOP dense GEMM TFLOP/s", 0.6, unit="fraction"),
    "moe_decode": Target("moe", "decode fwd <= {threshold}x (active expert bytes / copy bandwidth)", 1.5, False),
    "moe_routing_share": Target("moe", "routing + dispatch <= {threshold:.0%} of the layer forward", 0.10, False, "fraction"),
    # the whole model
    "model_speed": Target("model", "{mode} tokens/s >= {threshold:g}x the reference model", 2.0),
    "model_memory": Target("model", "{mode} peak memory <= {threshold:g}x the reference model", 0.5, False, "fraction"),
    # generation: decode at the longest context vs the shortest, cache bytes vs the full KV cache
    "gen_decode_flat": Target("generate", "decode step at T={hi} <= {threshold}x the step at T={lo}", 1.2, False),
    "gen_cache_bytes": Target("generate", "cache bytes at T={hi} <= (W + T/G)/T = {threshold:.3f} of the full "
                              "cache", None, False, "fraction"),
    "gen_prefill_fits": Target("generate", "prefill of T={hi} fits in {threshold:g} GB", 80.0, False, "GiB"),
}
#: attention targets: head dim and shortest sequence (the FlexAttention ones)
ATTENTION_D, ATTENTION_MIN_T = 128, 16384
#: MoE targets: the GEMM ones from this many tokens, decode up to this many
MOE_MIN_N, MOE_DECODE_MAX_N = 4096, 16
#: the routing-share target is stated at this many tokens
MOE_ROUTING_N = 16384
#: the model targets' case
MODEL_CASE = "T=16384"


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of :data:`TARGETS` that ``results`` has a case for, each a dict with
    family, target, case, measured, threshold, unit, higher_is_better, status (PASS / MISS /
    N/A) and note."""
    ix = Index(results)
    env = ix.env
    from benchmarks.common import is_target_device

    on_target = is_target_device(env)
    out: list[dict[str, Any]] = []

    def add(tid: str, case: str, measured: float | None, note: str = "", threshold: float | None = None,
            **fields: Any) -> None:
        t = TARGETS[tid]
        threshold = t.threshold if threshold is None else threshold
        ok, why = ix.speedups_meaningful(t.family)
        if not on_target:
            status, note2 = "N/A", ("CPU run" if env.get("device_kind") != "cuda"
                                    else f"targets are for H100/H200, this is {env.get('device')}")
        elif not ok:
            status, note2 = "N/A", why
        elif measured is None:
            status, note2 = "N/A", "not measured"
        else:
            good = measured >= threshold if t.higher_is_better else measured <= threshold
            status, note2 = ("PASS" if good else "MISS"), ""
        out.append({"family": t.family, "target": t.name.format(threshold=threshold, **fields), "case": case,
                    "measured": measured, "threshold": threshold, "unit": t.unit,
                    "higher_is_better": t.higher_is_better, "status": status,
                    "note": "; ".join(x for x in (note, note2) if x)})

    # --- attention
    attn = [r["case"] for r in ix.records("attention", method="ours") if r.get("case")]
    seen = set()
    for c in attn:
        key = (c["T"], c["W"], c["D"], c["summaries"])
        if key in seen or c["D"] != ATTENTION_D:
            continue
        seen.add(key)
        cid = f"T={c['T']} W={c['W']} D={c['D']} summaries={int(c['summaries'])}"
        if c["W"] > 0 and c["T"] >= ATTENTION_MIN_T and not c["summaries"]:
            add("attn_fwd_vs_flex", cid,
                ratio(ix.ms("attention", cid, "flex", "fwd"), ix.ms("attention", cid, "ours", "fwd")))
            fb, n1 = ix.bwd_ms(cid, "flex")
            ob, n2 = ix.bwd_ms(cid, "ours")
            add("attn_bwd_vs_flex", cid, ratio(fb, ob), note=(n1 or n2).strip(" ()"))
        if c["W"] == -1:
            add("attn_full_vs_flash", cid,
                ratio(ix.ms("attention", cid, "sdpa_flash", "fwd"), ix.ms("attention", cid, "ours", "fwd")))
        if c["W"] > 0 and c["summaries"]:
            plain = cid.replace("summaries=1", "summaries=0")
            for mode in ("fwd", "fwd+bwd"):
                a, b = ix.ms("attention", cid, "ours", mode), ix.ms("attention", plain, "ours", mode)
                add("attn_summary_cost", cid, a / b if a and b else None, mode=mode)

    # --- MoE
    moe_cases = {}
    for r in ix.records("moe", method="ours"):
        if r.get("case"):
            moe_cases[r["case_id"]] = r["case"]
    for cid, c in moe_cases.items():
        n, shape = c["N"], c["shape"]
        if n >= MOE_MIN_N:
            add("moe_vs_grouped_mm_mixtral" if shape == "mixtral" else "moe_vs_grouped_mm", cid,
                ratio(ix.ms("moe", cid, "grouped_mm", "fwd+bwd"), ix.ms("moe", cid, "ours", "fwd+bwd")))
            # the 60% clause belongs to its forward+backward sentence
            o, d = ix.get("moe", cid, "ours", "fwd+bwd"), ix.get("moe", cid, "dense_gemm", "fwd+bwd")
            frac = (o["tflops"] / d["tflops"] if o and d and o.get("status") == "ok" and d.get("status") == "ok"
                    and o.get("tflops") and d.get("tflops") else None)
            add("moe_of_dense", cid, frac)
        if n <= MOE_DECODE_MAX_N:
            o, b = ix.ms("moe", cid, "ours", "fwd"), ix.ms("moe", cid, "decode_bound", "fwd")
            add("moe_decode", cid, o / b if o and b else None)
    for r in ix.records("moe", method="layer", mode="fwd"):
        cid = r["case_id"]
        if r.get("case", {}).get("N", 0) < MOE_ROUTING_N:
            continue
        layer = ix.ms("moe", cid, "layer", "fwd")
        route = ix.ms("moe", cid, "route", "fwd")
        disp = ix.ms("moe", cid, "dispatch", "fwd") or 0.0
        add("moe_routing_share", cid, (route + disp) / layer if route and layer else None,
            note="" if ix.ms("moe", cid, "dispatch", "fwd") else "dispatch not timed separately")

    # --- model
    for mode in ("train", "infer"):
        cid = MODEL_CASE
        o, r = ix.get("model", cid, "ours", mode), ix.get("model", cid, "reference", mode)
        if o is None:
            continue
        reason = (r or {}).get("reason") or ""
        ref_oom = r is not None and r.get("status") == "skipped" and ("fit" in reason or "memory" in reason)
        if r is not None and r.get("status") == "ok" and o.get("status") == "ok":
            add("model_speed", cid, r["ms"] / o["ms"], mode=mode)
            if o.get("peak_mib") and r.get("peak_mib"):
                add("model_memory", cid, o["peak_mib"] / r["peak_mib"], mode=mode)
        elif ref_oom and o.get("status") == "ok":
            oom = "the reference model does not fit in memory at this T"
            add("model_speed", cid, math.inf, note=oom, mode=mode)
            add("model_memory", cid, 0.0, note=oom, mode=mode)
        else:
            add("model_speed", cid, None, mode=mode)

    # --- generation
    gen = {r["case"]["T"]: r for r in ix.records("generate", method="ours") if r.get("status") == "ok"}
    full = {r["case"]["T"]: r for r in ix.records("generate", method="full_kv") if r.get("status") == "ok"}
    if gen:
        hi, lo = max(gen), min(gen)
        cid = f"T={hi}"
        add("gen_decode_flat", cid, gen[hi]["ms"] / gen[lo]["ms"] if hi != lo else None,
            hi=t_label(hi), lo=t_label(lo))
        cfg = (ix.results.get("families", {}).get("generate") or {}).get("config") or {}
        if hi in full and cfg.get("group_size"):
            bound = (cfg.get("attention_window", 0) + hi / cfg["group_size"]) / hi
            add("gen_cache_bytes", cid, gen[hi]["cache_bytes"] / full[hi]["cache_bytes"],
                note="after the decode steps (ring W + 1)", threshold=bound, hi=t_label(hi))
        if gen[hi].get("prefill_peak_mib"):
            add("gen_prefill_fits", cid, gen[hi]["prefill_peak_mib"] / 1024, hi=t_label(hi))
    return out


def target_lines(results: dict[str, Any]) -> list[str]:
    """One line per target (status, family, name, case, measured vs threshold), the counts,
    then one verdict per target over its cases (with the worst case)."""
    targets = results.get("targets") or evaluate_targets(results)
    lines = []
    for t in targets:
        m = t["measured"]
        if m is None:
            val = "not measured"
        elif t["unit"] == "fraction":
            val = f"{m:.0%}" if math.isfinite(m) else "inf"
        else:
            val = f"{m:.2f}x" if math.isfinite(m) else "inf"
        thr = f"{t['threshold']:.0%}" if t["unit"] == "fraction" else f"{t['threshold']}x"
        note = f"  [{t['note']}]" if t.get("note") else ""
        lines.append(f"{t['status']:<4} {t['family']}: {t['target']} | {t['case']} | measured {val} "
                     f"(target {'>=' if t['higher_is_better'] else '<='} {thr}){note}")
    n = {s: sum(1 for t in targets if t["status"] == s) for s in ("PASS", "MISS", "N/A")}
    lines.append(f"targets: {n['PASS']} PASS, {n['MISS']} MISS, {n['N/A']} N/A")
    by_name: dict[tuple, list] = {}
    for t in targets:
        by_name.setdefault((t["family"], t["target"]), []).append(t)
    for (fam, name), ts in by_name.items():
        judged = [t for t in ts if t["status"] in ("PASS", "MISS")]
        if not judged:
            continue
        worst = (min if judged[0]["higher_is_better"] else max)(t["measured"] for t in judged)
        w = f"{worst:.0%}" if judged[0]["unit"] == "fraction" else f"{worst:.2f}x"
        verdict = "PASS" if all(t["status"] == "PASS" for t in judged) else "MISS"
        lines.append(f"  {verdict} {fam}: {name}: {sum(t['status'] == 'PASS' for t in judged)}/{len(judged)} "
                     f"cases pass, worst {w}")
    return lines

