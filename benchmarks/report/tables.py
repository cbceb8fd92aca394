"""The run's Markdown page: header, targets, one table per family, plots, correctness."""
from __future__ import annotations

import json
import os
from typing import Any

from benchmarks.report.index import VARLEN_METHODS, Index, fmt, ratio, t_label
from benchmarks.report.targets import target_lines


def header_md(results: dict[str, Any]) -> list[str]:
    env = results["env"]
    commit = str(env.get("git_commit"))[:10] + (" (dirty)" if env.get("git_dirty") else "")
    lines = [
        f"**{env['device']}** · torch {env['torch']} · triton {env['triton']} · CUDA {env.get('cuda')} · "
        f"{env['date']} · commit `{commit}`" + (" · `--quick`" if env.get("quick") else ""),
        "",
    ]
    if not env.get("timings_meaningful"):
        lines += ["> **CPU run: the timings are NOT meaningful.** The kernels ran in Triton's interpreter "
                  "(or the torch reference stood in) and were timed by wall clock. Only the correctness "
                  "table counts; no speed-ups are shown.", ""]
    for fam, info in results.get("families", {}).items():
        if info.get("kernel_available") is False:
            lines += [f"> **{fam}: kernel not available** — {info.get('kernel_reason')}. "
                      + ("The torch reference was timed as a stand-in; no speed-up is reported for it."
                         if info.get("kernel_backend") == "torch" else "Our kernel was not timed."), ""]
        if info.get("status") not in ("ok", None):
            lines += [f"> **{fam}: {info.get('status')}** — {info.get('reason', '')}", ""]
    return lines


def correctness_md(results: dict[str, Any]) -> list[str]:
    checks = results.get("correctness", [])
    failed = [c for c in checks if not c.get("passed")]
    lines = ["## Correctness (checked before timing)", ""]
    if not checks:
        return lines + ["No checks ran.", ""]
    lines.append(f"{len(checks) - len(failed)} of {len(checks)} checks passed"
                 + (f", **{len(failed)} FAILED**." if failed else ".")
                 + " Tolerance: error vs the fp32 reference <= 2x (gradients and baselines 3x) the error of "
                   "the same reference in the benchmark dtype, plus a dtype floor.")
    rows = failed + [c for c in checks if c.get("passed")]
    long = len(rows) > 40
    if failed:
        lines += ["", "Failed checks first."]
    lines += ["", "<details><summary>All checks</summary>" if long else "",
              "", "| family | case | op | check | max err | tol | result |", "|---|---|---|---|---|---|---|"]
    for c in rows:
        res = "ok" if c.get("passed") else f"**FAIL** {c.get('note') or ''}".strip()
        op = c.get("op", "") + (" (baseline)" if c.get("baseline") else "")
        lines.append(f"| {c.get('family')} | {c.get('case_id')} | {op} | {c.get('check')} | "
                     f"{fmt(c.get('max_err'))} | {fmt(c.get('tol'))} | {res} |")
    return lines + (["", "</details>", ""] if long else [""])


def targets_md(results: dict[str, Any]) -> list[str]:
    return ["## Targets", "", "```", *target_lines(results), "```", ""]


def _skips(ix: Index, family: str) -> list[str]:
    seen, lines = set(), []
    for r in ix.records(family):
        if r.get("status") in ("skipped", "error", "unavailable"):
            key = (r.get("method"), r.get("reason"))
            item = f"- {r.get('case_id')} · {r.get('method')} · {r.get('mode')}: {r.get('status')} — {r.get('reason')}"
            if key in seen and r.get("status") == "skipped":
                continue
            seen.add(key)
            lines.append(item)
    if lines:
        return ["", "<details><summary>Skipped / failed measurements (first of each reason)</summary>", "",
                *lines, "", "</details>", ""]
    return [""]


def _cases(ix: Index, family: str, key: str | None = None) -> list[tuple[str, dict]]:
    """``(case_id, case params)`` of ``family``'s records, first seen first (only cases with ``key``)."""
    cases: dict[str, dict] = {}
    for r in ix.records(family):
        c = r.get("case")
        if c and (key is None or key in c):
            cases.setdefault(r["case_id"], c)
    return list(cases.items())


def attention_md(ix: Index) -> list[str]:
    recs = ix.records("attention", method="ours")
    if not recs and not ix.records("attention"):
        return []
    show, why = ix.speedups_meaningful("attention")
    cases = _cases(ix, "attention")
    cases.sort(key=lambda x: (x[1]["D"], x[1]["T"], x[1]["W"], x[1]["summaries"]))
    lines = ["## Attention: `swa_attention` (causal sliding window, W keys per query, summaries G=W)", ""]
    if not show:
        lines += [f"Speed-ups not shown: {why}.", ""]
    lines += ["ms = median; x = baseline ms / ours ms (> 1: ours faster); flash = SDPA flash on *full* causal "
              "attention at the same T; TFLOP/s count visible pairs only.", "",
              "| T | W | D | summ | mode | ours ms | ours TFLOP/s | flex ms | x flex | fla ms | x fla | dense-mask ms "
              "| x dense | flash (full) ms | x flash | peak MiB ours / flex / dense |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cid, c in cases:
        flash_cid = f"T={c['T']} W=-1 D={c['D']} summaries=0"
        for mode in ("fwd", "bwd", "fwd+bwd"):
            o = ix.get("attention", cid, "ours", mode)
            oms = o["ms"] if o and o.get("status") == "ok" else None
            cells = [t_label(c["T"]), str(c["W"]), str(c["D"]), "G=W" if c["summaries"] else "—", mode,
                     fmt(oms) if oms else (o or {}).get("status", "—"),
                     fmt(o.get("tflops")) if oms else "—"]
            for meth, cc in (("flex", cid), ("fla", cid), ("sdpa_dense_mask", cid), ("sdpa_flash", flash_cid)):
                b = ix.get("attention", cc, meth, mode)
                bms = b["ms"] if b and b.get("status") == "ok" else None
                cells.append(fmt(bms) if bms else (b or {}).get("status", "—"))
                cells.append(fmt(ratio(bms, oms), 2) + "x" if show and bms and oms else "—")
            mem = []
            if mode == "fwd+bwd":
                for meth in ("ours", "flex", "sdpa_dense_mask"):
                    b = ix.get("attention", cid, meth, mode)
                    mem.append(fmt(b.get("peak_mib"), 0) if b and b.get("peak_mib") is not None else "—")
            cells.append(" / ".join(mem) if mem else "")
            lines.append("| " + " | ".join(cells) + " |")
    return lines + _skips(ix, "attention")


def varlen_md(ix: Index) -> list[str]:
    if not ix.records("varlen"):
        return []
    show, why = ix.speedups_meaningful("varlen")
    cases = _cases(ix, "varlen")
    lines = ["## Attention, packed sequences: `swa_attention_varlen` vs padding and FlexAttention "
             "(document mask)", ""]
    if not show:
        lines += [f"Speed-ups not shown: {why}.", ""]
    lines += ["padded = `swa_attention` on the batch padded to its longest sequence (padded before timing); flex = "
              "compiled FlexAttention on the packed batch, document + window block mask (+ each sequence's summary "
              "keys). x = baseline ms / varlen ms (> 1: varlen faster); TFLOP/s count each sequence's visible "
              "pairs only, so padding shows as lost throughput.", ""]
    for cid, c in cases:
        if c.get("lengths"):
            pad = ix.get("varlen", cid, "ours_padded", "fwd") or {}
            waste = (f"; padded: B x {c['max_len']} = {c['padded_tokens']} tokens "
                     f"({1 - c['tokens'] / c['padded_tokens']:.0%} padding)" if c.get("padded_tokens") else "")
            if pad.get("padded_pairs") and pad.get("pairs"):
                waste += f", {pad['padded_pairs'] / pad['pairs']:.2f}x the useful pairs"
            lines.append(f"- `{cid}`: lengths {c['lengths']}, Hq={c['Hq']}, Hkv={c['Hkv']}, "
                         f"G={c['G'] or '—'}, {c['dtype']}{waste}")
    lines += ["", "| case | mode | varlen ms | varlen TFLOP/s | padded ms | padded TFLOP/s | x padded | flex ms "
              "| flex TFLOP/s | x flex | peak MiB varlen / padded / flex |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cid, c in cases:
        for mode in ("fwd", "bwd", "fwd+bwd"):
            o = ix.get("varlen", cid, "ours_varlen", mode)
            oms = o["ms"] if o and o.get("status") == "ok" else None
            cells = [cid, mode, fmt(oms) if oms else (o or {}).get("status", "—"),
                     fmt(o.get("tflops")) if oms else "—"]
            for meth, _ in VARLEN_METHODS[1:]:
                b = ix.get("varlen", cid, meth, mode)
                bms = b["ms"] if b and b.get("status") == "ok" else None
                cells += [fmt(bms) if bms else (b or {}).get("status", "—"), fmt(b.get("tflops")) if bms else "—",
                          fmt(ratio(bms, oms), 2) + "x" if show and bms and oms else "—"]
            mem = []
            if mode == "fwd+bwd":
                for meth, _ in VARLEN_METHODS:
                    b = ix.get("varlen", cid, meth, mode)
                    mem.append(fmt(b.get("peak_mib"), 0) if b and b.get("peak_mib") is not None else "—")
            cells.append(" / ".join(mem))
            lines.append("| " + " | ".join(cells) + " |")
    return lines + _skips(ix, "varlen")


def moe_md(ix: Index) -> list[str]:
    if not ix.records("moe"):
        return []
    show, why = ix.speedups_meaningful("moe")
    cases = _cases(ix, "moe", key="shape")
    lines = ["## MoE: `expert_ffn` (routed SwiGLU experts)", ""]
    if not show:
        lines += [f"Speed-ups not shown: {why}.", ""]
    lines += ["x = baseline ms / ours ms; TFLOP/s count routed FLOPs actually done; dense = the same FLOPs as one "
              "dense SwiGLU (cuBLAS).", "",
              "| shape | N | mean k | mode | ours ms | ours TFLOP/s | loop ms | x loop | grouped_mm ms | x gmm | "
              "dense TFLOP/s | ours % of dense | peak MiB ours / gmm |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cid, c in cases:
        for mode in ("fwd", "fwd+bwd"):
            o = ix.get("moe", cid, "ours", mode)
            oms = o["ms"] if o and o.get("status") == "ok" else None
            mk = c.get("mean_k")
            cells = [c["shape"], str(c["N"]), f"{mk:.2f}" if mk is not None else "—", mode,
                     fmt(oms) if oms else (o or {}).get("status", "—"), fmt(o.get("tflops")) if oms else "—"]
            for meth in ("loop", "grouped_mm"):
                b = ix.get("moe", cid, meth, mode)
                bms = b["ms"] if b and b.get("status") == "ok" else None
                cells.append(fmt(bms) if bms else (b or {}).get("status", "—"))
                cells.append(fmt(ratio(bms, oms), 2) + "x" if show and bms and oms else "—")
            d = ix.get("moe", cid, "dense_gemm", mode)
            dt = d.get("tflops") if d and d.get("status") == "ok" else None
            cells.append(fmt(dt))
            cells.append(f"{o['tflops'] / dt:.0%}" if show and dt and oms and o.get("tflops") else "—")
            g = ix.get("moe", cid, "grouped_mm", mode)
            cells.append(" / ".join(fmt(x.get("peak_mib"), 0) if x and x.get("peak_mib") is not None else "—"
                                    for x in (o, g)))
            lines.append("| " + " | ".join(cells) + " |")
    extra = []
    for r in ix.records("moe", method="copy_bandwidth"):
        if r.get("status") == "ok":
            extra.append(f"- copy bandwidth (read + write): {r.get('bandwidth_gbs', 0):,.0f} GB/s")
    for r in ix.records("moe", method="decode_bound"):
        o = ix.ms("moe", r["case_id"], "ours", "fwd")
        extra.append(f"- decode bound {r['case_id']}: {r['weight_bytes'] / 2**20:,.1f} MiB of active experts -> "
                     f"{fmt(r['ms'])} ms; ours fwd {fmt(o)} ms"
                     + (f" = {o / r['ms']:.2f}x the bound" if show and o else ""))
    for r in ix.records("moe", method="layer", mode="fwd"):
        cid = r["case_id"]
        route, disp, layer = (ix.ms("moe", cid, m, "fwd") for m in ("route", "dispatch", "layer"))
        extra.append(f"- routing share {cid}: route {fmt(route)} ms, dispatch {fmt(disp)} ms, layer fwd "
                     f"{fmt(layer)} ms" + (f" -> {(route + (disp or 0)) / layer:.1%}" if route and layer else "")
                     + f" ({r.get('note', '')})")
    if extra:
        lines += ["", *extra]
    return lines + _skips(ix, "moe")


def model_md(ix: Index) -> list[str]:
    fam = ix.results.get("families", {}).get("model")
    if not fam:
        return []
    lines = ["## Model: `DASGForCausalLM` (batch 1)", ""]
    if fam.get("status") != "ok":
        return lines + [f"**{fam.get('status')}**: {fam.get('reason', '')}", ""]
    show, why = ix.speedups_meaningful("model")
    if fam.get("parameters"):
        lines += [f"{fam['parameters'] / 1e6:.1f} M parameters, {fam.get('dtype')}; config: "
                  f"`{json.dumps({k: v for k, v in (fam.get('config') or {}).items() if k in ('hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'attention_window', 'group_size', 'use_summaries', 'shallow_num_experts', 'deep_num_experts', 'k_max', 'top_p')})}`", ""]
    if not show:
        lines += [f"Speed-ups not shown: {why}.", ""]
    lines += ["| T | mode | variant | ms | tokens/s | peak GiB | ours speed-up | ours memory ratio |",
              "|---|---|---|---|---|---|---|---|"]
    ts = sorted({r["case"]["T"] for r in ix.records("model") if r.get("case")})
    for t in ts:
        cid = f"T={t}"
        for mode in ("train", "infer"):
            o = ix.get("model", cid, "ours", mode)
            for v in ("ours", "dense_sdpa", "reference"):
                r = ix.get("model", cid, v, mode)
                if r is None:
                    continue
                ok = r.get("status") == "ok"
                sp = mr = "—"
                if v != "ours" and show and ok and o and o.get("status") == "ok":
                    sp = f"{r['ms'] / o['ms']:.2f}x"
                    if r.get("peak_mib") and o.get("peak_mib"):
                        mr = f"{o['peak_mib'] / r['peak_mib']:.2f}"
                lines.append(f"| {t_label(t)} | {mode} | {v} | {fmt(r['ms']) if ok else r.get('status')} | "
                             f"{fmt(r.get('tokens_per_s')) if ok else '—'} | "
                             f"{fmt(r['peak_mib'] / 1024, 2) if ok and r.get('peak_mib') else '—'} | {sp} | {mr} |")
    return lines + _skips(ix, "model")


def generate_md(ix: Index) -> list[str]:
    fam = ix.results.get("families", {}).get("generate")
    if not fam:
        return []
    lines = ["## Generation: decode step and cache bytes vs context (batch 1)", ""]
    if fam.get("status") != "ok":
        return lines + [f"**{fam.get('status')}**: {fam.get('reason', '')}", ""]
    if fam.get("parameters"):
        lines += [f"{fam['parameters'] / 1e6:.1f} M parameters, {fam.get('dtype')}; `ours` = bounded DASGCache, "
                  "`full_kv` = the same model keeping every position, `dense_sdpa` = a same-size dense model "
                  "(SDPA, DynamicCache).", ""]
    show, why = ix.speedups_meaningful("generate")
    if not show:
        lines += [f"Timings not meaningful: {why}.", ""]
    lines += ["| T | variant | ms / token | tokens/s | cache MiB | prefill peak GiB | ours cache / this |",
              "|---|---|---|---|---|---|---|"]
    for t in sorted({r["case"]["T"] for r in ix.records("generate") if r.get("case")}):
        cid = f"T={t}"
        o = ix.get("generate", cid, "ours", "decode")
        for v in ("ours", "full_kv", "dense_sdpa"):
            r = ix.get("generate", cid, v, "decode")
            if r is None:
                continue
            ok = r.get("status") == "ok"
            ratio = "—"
            if v != "ours" and ok and o and o.get("status") == "ok" and r.get("cache_bytes"):
                ratio = f"{o['cache_bytes'] / r['cache_bytes']:.3f}"
            peak = r.get("prefill_peak_mib")
            lines.append(f"| {t_label(t)} | {v} | {fmt(r['ms']) if ok else r.get('status')} | "
                         f"{fmt(r.get('tokens_per_s')) if ok else '—'} | "
                         f"{fmt(r['cache_bytes'] / 2**20, 3) if ok else '—'} | "
                         f"{fmt(peak / 1024, 2) if peak else '—'} | {ratio} |")
    return lines + _skips(ix, "generate")


def markdown(results: dict[str, Any], plots: list[str] | None = None, title: str | None = None) -> str:
    ix = Index(results)
    env = results["env"]
    lines = [f"# {title or 'dasg-kernels benchmarks'} — {env['device']}", ""]
    lines += header_md(results)
    lines += targets_md(results)
    lines += attention_md(ix)
    lines += varlen_md(ix)
    lines += moe_md(ix)
    lines += model_md(ix)
    lines += generate_md(ix)
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            name = os.path.basename(p)
            lines += [f"![{name}]({name})", ""]
    lines += correctness_md(results)
    lines += [f"Run took {results.get('elapsed_s')} s. Timing: "
              + ("median of `triton.testing.do_bench` (CUDA events, L2 flushed between repeats); slow calls: a few "
                 "CUDA-event repeats. Raw figures in the JSON." if env.get("timings_meaningful")
                 else "wall-clock on the CPU (not meaningful)."), ""]
    return "\n".join(lines)
