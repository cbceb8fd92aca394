"""Results JSON -> Markdown tables, PASS/MISS target lines and PNG plots; README snippet.

::

    python -m benchmarks.report benchmarks/results/<file>.json   # regenerate its .md and .png
    python -m benchmarks.report --latest                          # write benchmarks/results/LATEST.md
    python -m benchmarks.report --latest --readme README.md       # also replace the block between
                                                                  # <!-- BENCHMARKS:START/END --> in README.md

``--latest`` picks the newest *committed* (``git ls-files``) GPU results file, so the
README never shows numbers that are not in the repository; with none it writes a note
saying that no GPU run has been committed yet.

Speed-ups are ``baseline ms / our ms`` for the same case and mode (> 1: ours is faster).
They are shown only for GPU runs of the real kernels: on the CPU (interpreter) or with
the torch stand-in they would be meaningless, and a family whose kernel failed a
correctness check shows none at all.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
README_START, README_END = "<!-- BENCHMARKS:START -->", "<!-- BENCHMARKS:END -->"

# ----------------------------------------------------------------------------- lookups


class Index:
    """Records by (family, case_id, method, mode)."""

    def __init__(self, results: dict[str, Any]):
        self.results = results
        self.env = results["env"]
        self.by_key: dict[tuple, dict] = {}
        for r in results.get("records", []):
            self.by_key[(r.get("family"), r.get("case_id"), r.get("method"), r.get("mode"))] = r

    def get(self, family, case_id, method, mode) -> dict | None:
        return self.by_key.get((family, case_id, method, mode)) or self.by_key.get((family, case_id, method, "*"))

    def ms(self, family, case_id, method, mode) -> float | None:
        r = self.get(family, case_id, method, mode)
        return r["ms"] if r and r.get("status") == "ok" and r.get("ms") else None

    def bwd_ms(self, case_id, method) -> tuple[float | None, str]:
        """Backward time: measured, or fwd+bwd minus fwd when the direct figure is missing."""
        ms = self.ms("attention", case_id, method, "bwd")
        if ms:
            return ms, ""
        fb, f = self.ms("attention", case_id, method, "fwd+bwd"), self.ms("attention", case_id, method, "fwd")
        if fb and f and fb > f:
            return fb - f, " (bwd derived as fwd+bwd - fwd)"
        return None, ""

    def kernel_ok(self, family: str) -> bool:
        """Whether every correctness check of our kernels in ``family`` passed."""
        return all(c.get("passed") for c in self.results.get("correctness", [])
                   if c.get("family") == family and not c.get("baseline"))

    def speedups_meaningful(self, family: str) -> tuple[bool, str]:
        if not self.env.get("timings_meaningful"):
            return False, "CPU run: timings are not meaningful"
        fam = self.results.get("families", {}).get(family, {})
        if fam.get("kernel_available") is False:
            return False, f"kernel not available ({fam.get('kernel_reason')})"
        if not self.kernel_ok(family):
            return False, "our kernel failed a correctness check"
        return True, ""

    def records(self, family: str, **match) -> list[dict]:
        out = []
        for r in self.results.get("records", []):
            if r.get("family") != family:
                continue
            if all(r.get(k) == v for k, v in match.items()):
                out.append(r)
        return out


def _ratio(base: float | None, ours: float | None) -> float | None:
    return base / ours if base and ours else None


def _fmt(x: float | None, nd: int = 3) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}g}" if abs(x) < 1 else f"{x:.{nd}f}".rstrip("0").rstrip(".") if nd else f"{x:.0f}"


def _t(t: int) -> str:
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)


# ----------------------------------------------------------------------------- targets


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The speed targets of issues 2, 3 and 5, each PASS / MISS / N/A with the measured value."""
    ix = Index(results)
    env = ix.env
    from benchmarks.common import is_target_device

    on_target = is_target_device(env)
    out: list[dict[str, Any]] = []

    def add(family, name, case, measured, threshold, higher_better=True, note="", unit="x"):
        ok, why = ix.speedups_meaningful(family)
        if not on_target:
            status, note2 = "N/A", ("CPU run" if env.get("device_kind") != "cuda"
                                    else f"targets are for H100/H200, this is {env.get('device')}")
        elif not ok:
            status, note2 = "N/A", why
        elif measured is None:
            status, note2 = "N/A", "not measured"
        else:
            good = measured >= threshold if higher_better else measured <= threshold
            status, note2 = ("PASS" if good else "MISS"), ""
        out.append({"family": family, "target": name, "case": case, "measured": measured, "threshold": threshold,
                    "unit": unit, "higher_is_better": higher_better, "status": status,
                    "note": "; ".join(x for x in (note, note2) if x)})

    # --- attention (issue 2): bf16, D=128, causal
    attn = [r["case"] for r in ix.records("attention", method="ours") if r.get("case")]
    seen = set()
    for c in attn:
        key = (c["T"], c["W"], c["D"], c["summaries"])
        if key in seen or c["D"] != 128:
            continue
        seen.add(key)
        cid = f"T={c['T']} W={c['W']} D={c['D']} summaries={int(c['summaries'])}"
        if c["W"] > 0 and c["T"] >= 16384 and not c["summaries"]:
            add("attention", "fwd >= 1.3x FlexAttention", cid,
                _ratio(ix.ms("attention", cid, "flex", "fwd"), ix.ms("attention", cid, "ours", "fwd")), 1.3)
            fb, n1 = ix.bwd_ms(cid, "flex")
            ob, n2 = ix.bwd_ms(cid, "ours")
            add("attention", "bwd >= 1.0x FlexAttention", cid, _ratio(fb, ob), 1.0, note=(n1 or n2).strip(" ()"))
        if c["W"] == -1:
            add("attention", "full causal fwd >= 0.9x SDPA flash", cid,
                _ratio(ix.ms("attention", cid, "sdpa_flash", "fwd"), ix.ms("attention", cid, "ours", "fwd")), 0.9)
        if c["W"] > 0 and c["summaries"]:
            plain = cid.replace("summaries=1", "summaries=0")
            for mode in ("fwd", "fwd+bwd"):
                a, b = ix.ms("attention", cid, "ours", mode), ix.ms("attention", plain, "ours", mode)
                add("attention", f"summaries (G=W) {mode} cost <= 1.15x without", cid,
                    a / b if a and b else None, 1.15, higher_better=False)

    # --- MoE (issue 3)
    moe_cases = {}
    for r in ix.records("moe", method="ours"):
        if r.get("case"):
            moe_cases[r["case_id"]] = r["case"]
    for cid, c in moe_cases.items():
        n, shape = c["N"], c["shape"]
        if n >= 4096:
            need = 1.0 if shape == "mixtral" else 1.2
            add("moe", f"fwd+bwd >= {need}x torch._grouped_mm", cid,
                _ratio(ix.ms("moe", cid, "grouped_mm", "fwd+bwd"), ix.ms("moe", cid, "ours", "fwd+bwd")), need)
            # the 60% clause belongs to its forward+backward sentence
            o, d = ix.get("moe", cid, "ours", "fwd+bwd"), ix.get("moe", cid, "dense_gemm", "fwd+bwd")
            frac = (o["tflops"] / d["tflops"] if o and d and o.get("status") == "ok" and d.get("status") == "ok"
                    and o.get("tflops") and d.get("tflops") else None)
            add("moe", "fwd+bwd >= 60% of equal-FLOP dense GEMM TFLOP/s", cid, frac, 0.6, unit="fraction")
        if n <= 16:
            o, b = ix.ms("moe", cid, "ours", "fwd"), ix.ms("moe", cid, "decode_bound", "fwd")
            add("moe", "decode fwd <= 1.5x (active expert bytes / copy bandwidth)", cid,
                o / b if o and b else None, 1.5, higher_better=False)
    for r in ix.records("moe", method="layer", mode="fwd"):
        cid = r["case_id"]
        if r.get("case", {}).get("N", 0) < 16384:  # the issue states this target at N=16384
            continue
        layer = ix.ms("moe", cid, "layer", "fwd")
        route = ix.ms("moe", cid, "route", "fwd")
        disp = ix.ms("moe", cid, "dispatch", "fwd") or 0.0
        add("moe", "routing + dispatch <= 10% of the layer forward", cid,
            (route + disp) / layer if route and layer else None, 0.10, higher_better=False, unit="fraction",
            note="" if ix.ms("moe", cid, "dispatch", "fwd") else "dispatch not timed separately")

    # --- model (issue 5): T=16k (or the largest T the reference ran at)
    for mode in ("train", "infer"):
        cid = "T=16384"
        o, r = ix.get("model", cid, "ours", mode), ix.get("model", cid, "reference", mode)
        if o is None:
            continue
        reason = (r or {}).get("reason") or ""
        ref_oom = r is not None and r.get("status") == "skipped" and ("fit" in reason or "memory" in reason)
        if r is not None and r.get("status") == "ok" and o.get("status") == "ok":
            add("model", f"{mode} tokens/s >= 2x the reference model", cid, r["ms"] / o["ms"], 2.0)
            if o.get("peak_mib") and r.get("peak_mib"):
                add("model", f"{mode} peak memory <= 0.5x the reference model", cid,
                    o["peak_mib"] / r["peak_mib"], 0.5, higher_better=False, unit="fraction")
        elif ref_oom and o.get("status") == "ok":
            add("model", f"{mode} tokens/s >= 2x the reference model", cid, math.inf, 2.0,
                note="the reference model does not fit in memory at this T")
            add("model", f"{mode} peak memory <= 0.5x the reference model", cid, 0.0, 0.5, higher_better=False,
                unit="fraction", note="the reference model does not fit in memory at this T")
        else:
            add("model", f"{mode} tokens/s >= 2x the reference model", cid, None, 2.0)

    # --- generation (issue 10): decode at 128k vs 4k, cache bytes vs the full KV cache
    gen = {r["case"]["T"]: r for r in ix.records("generate", method="ours") if r.get("status") == "ok"}
    full = {r["case"]["T"]: r for r in ix.records("generate", method="full_kv") if r.get("status") == "ok"}
    if gen:
        hi, lo = max(gen), min(gen)
        cid = f"T={hi}"
        add("generate", f"decode step at T={_t(hi)} <= 1.2x the step at T={_t(lo)}", cid,
            gen[hi]["ms"] / gen[lo]["ms"] if hi != lo else None, 1.2, higher_better=False, unit="x")
        cfg = (ix.results.get("families", {}).get("generate") or {}).get("config") or {}
        if hi in full and cfg.get("group_size"):
            bound = (cfg.get("attention_window", 0) + hi / cfg["group_size"]) / hi
            add("generate", f"cache bytes at T={_t(hi)} <= (W + T/G)/T = {bound:.3f} of the full cache", cid,
                gen[hi]["cache_bytes"] / full[hi]["cache_bytes"], bound, higher_better=False, unit="fraction",
                note="after the decode steps (ring W + 1)")
        if gen[hi].get("prefill_peak_mib"):
            add("generate", f"prefill of T={_t(hi)} fits in 80 GB", cid, gen[hi]["prefill_peak_mib"] / 1024, 80.0,
                higher_better=False, unit="GiB")
    return out


def target_lines(results: dict[str, Any]) -> list[str]:
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


# ----------------------------------------------------------------------------- markdown


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
                     f"{_fmt(c.get('max_err'))} | {_fmt(c.get('tol'))} | {res} |")
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
            cells = [_t(c["T"]), str(c["W"]), str(c["D"]), "G=W" if c["summaries"] else "—", mode,
                     _fmt(oms) if oms else (o or {}).get("status", "—"),
                     _fmt(o.get("tflops")) if oms else "—"]
            for meth, cc in (("flex", cid), ("fla", cid), ("sdpa_dense_mask", cid), ("sdpa_flash", flash_cid)):
                b = ix.get("attention", cc, meth, mode)
                bms = b["ms"] if b and b.get("status") == "ok" else None
                cells.append(_fmt(bms) if bms else (b or {}).get("status", "—"))
                cells.append(_fmt(_ratio(bms, oms), 2) + "x" if show and bms and oms else "—")
            mem = []
            if mode == "fwd+bwd":
                for meth in ("ours", "flex", "sdpa_dense_mask"):
                    b = ix.get("attention", cid, meth, mode)
                    mem.append(_fmt(b.get("peak_mib"), 0) if b and b.get("peak_mib") is not None else "—")
            cells.append(" / ".join(mem) if mem else "")
            lines.append("| " + " | ".join(cells) + " |")
    return lines + _skips(ix, "attention")


VARLEN_METHODS = (("ours_varlen", "varlen"), ("ours_padded", "padded"), ("flex_document", "flex"))


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
            cells = [cid, mode, _fmt(oms) if oms else (o or {}).get("status", "—"),
                     _fmt(o.get("tflops")) if oms else "—"]
            for meth, _ in VARLEN_METHODS[1:]:
                b = ix.get("varlen", cid, meth, mode)
                bms = b["ms"] if b and b.get("status") == "ok" else None
                cells += [_fmt(bms) if bms else (b or {}).get("status", "—"), _fmt(b.get("tflops")) if bms else "—",
                          _fmt(_ratio(bms, oms), 2) + "x" if show and bms and oms else "—"]
            mem = []
            if mode == "fwd+bwd":
                for meth, _ in VARLEN_METHODS:
                    b = ix.get("varlen", cid, meth, mode)
                    mem.append(_fmt(b.get("peak_mib"), 0) if b and b.get("peak_mib") is not None else "—")
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
                     _fmt(oms) if oms else (o or {}).get("status", "—"), _fmt(o.get("tflops")) if oms else "—"]
            for meth in ("loop", "grouped_mm"):
                b = ix.get("moe", cid, meth, mode)
                bms = b["ms"] if b and b.get("status") == "ok" else None
                cells.append(_fmt(bms) if bms else (b or {}).get("status", "—"))
                cells.append(_fmt(_ratio(bms, oms), 2) + "x" if show and bms and oms else "—")
            d = ix.get("moe", cid, "dense_gemm", mode)
            dt = d.get("tflops") if d and d.get("status") == "ok" else None
            cells.append(_fmt(dt))
            cells.append(f"{o['tflops'] / dt:.0%}" if show and dt and oms and o.get("tflops") else "—")
            g = ix.get("moe", cid, "grouped_mm", mode)
            cells.append(" / ".join(_fmt(x.get("peak_mib"), 0) if x and x.get("peak_mib") is not None else "—"
                                    for x in (o, g)))
            lines.append("| " + " | ".join(cells) + " |")
    extra = []
    for r in ix.records("moe", method="copy_bandwidth"):
        if r.get("status") == "ok":
            extra.append(f"- copy bandwidth (read + write): {r.get('bandwidth_gbs', 0):,.0f} GB/s")
    for r in ix.records("moe", method="decode_bound"):
        o = ix.ms("moe", r["case_id"], "ours", "fwd")
        extra.append(f"- decode bound {r['case_id']}: {r['weight_bytes'] / 2**20:,.1f} MiB of active experts -> "
                     f"{_fmt(r['ms'])} ms; ours fwd {_fmt(o)} ms"
                     + (f" = {o / r['ms']:.2f}x the bound" if show and o else ""))
    for r in ix.records("moe", method="layer", mode="fwd"):
        cid = r["case_id"]
        route, disp, layer = (ix.ms("moe", cid, m, "fwd") for m in ("route", "dispatch", "layer"))
        extra.append(f"- routing share {cid}: route {_fmt(route)} ms, dispatch {_fmt(disp)} ms, layer fwd "
                     f"{_fmt(layer)} ms" + (f" -> {(route + (disp or 0)) / layer:.1%}" if route and layer else "")
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
                lines.append(f"| {_t(t)} | {mode} | {v} | {_fmt(r['ms']) if ok else r.get('status')} | "
                             f"{_fmt(r.get('tokens_per_s')) if ok else '—'} | "
                             f"{_fmt(r['peak_mib'] / 1024, 2) if ok and r.get('peak_mib') else '—'} | {sp} | {mr} |")
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
            lines.append(f"| {_t(t)} | {v} | {_fmt(r['ms']) if ok else r.get('status')} | "
                         f"{_fmt(r.get('tokens_per_s')) if ok else '—'} | "
                         f"{_fmt(r['cache_bytes'] / 2**20, 3) if ok else '—'} | "
                         f"{_fmt(peak / 1024, 2) if peak else '—'} | {ratio} |")
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


# ----------------------------------------------------------------------------- plots

#: What a panel that has no data says; CPU runs measure neither CUDA timings nor peak memory.
NO_DATA_CPU = "no data on CPU ({what} need a GPU)"


def mark_empty_panel(ax: Any, env: dict[str, Any], what: str = "timings") -> bool:
    """Write a centred note on a matplotlib ``ax`` that nothing was drawn on (no line, bar or
    marker), instead of leaving empty axes; ``what`` names the measurement the panel shows
    (``"timings"``, ``"peak-memory figures"``). Returns whether the panel was empty."""
    if ax.has_data():
        return False
    msg = NO_DATA_CPU.format(what=what) if env.get("device_kind") != "cuda" else "no data (nothing measured)"
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="dimgray")
    ax.grid(False, which="both")
    ax.tick_params(axis="both", which="both", bottom=False, left=False, labelbottom=False, labelleft=False)
    return True


def make_plots(results: dict[str, Any], out_dir: str, stem: str) -> list[str]:
    """PNG plots; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception:
        return []
    ix = Index(results)
    env = results["env"]
    label = f"{env['device']} · torch {env['torch']} · triton {env['triton']} · {env['date'][:10]}"
    if not env.get("timings_meaningful"):
        label += "\nCPU run: timings NOT meaningful"
    paths = []

    def save(fig, name):
        fig.suptitle(label, fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, f"{stem}-{name}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    # attention: time vs T (log-log) and peak memory vs T
    arecs = [r for r in ix.records("attention") if r.get("status") == "ok" and r.get("case")]
    if arecs:
        d = max(r["case"]["D"] for r in arecs)
        ws = sorted({r["case"]["W"] for r in arecs if r["case"]["W"] > 0})
        mid_w = ws[len(ws) // 2] if ws else None
        series = []  # (label, method, W, summaries, style)
        for w in ws:
            series.append((f"ours W={w}", "ours", w, False, "-"))
        if mid_w:
            series.append((f"ours W={mid_w} + summaries G=W", "ours", mid_w, True, "-"))
        series.append(("ours full causal", "ours", -1, False, "-"))
        for w in ws:
            series.append((f"flex W={w}", "flex", w, False, "--"))
        if mid_w:
            series.append((f"SDPA dense mask W={mid_w}", "sdpa_dense_mask", mid_w, False, ":"))
        series.append(("SDPA flash full causal", "sdpa_flash", -1, False, "-."))
        for what, key, ylabel, fname in (("time", "ms", "ms", "attention-time"),
                                         ("memory", "peak_mib", "peak MiB (fwd+bwd)", "attention-memory")):
            modes = ("fwd", "fwd+bwd") if what == "time" else ("fwd+bwd",)
            fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
            for ax, mode in zip(axes[0], modes):
                drawn = False
                for lab, meth, w, summ, style in series:
                    pts = sorted((r["case"]["T"], r.get(key)) for r in arecs
                                 if r["method"] == meth and r["case"]["W"] == w and r["case"]["D"] == d
                                 and r["case"]["summaries"] == summ and r["mode"] == mode and r.get(key))
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=lab)
                        drawn = True
                if drawn and what == "time":
                    ts = sorted({r["case"]["T"] for r in arecs})
                    ref = [r for r in arecs if r["method"] == "ours" and r["mode"] == mode and r["case"]["D"] == d
                           and r["case"]["T"] == ts[0] and r.get("ms")]
                    if ref and len(ts) > 1:
                        y0 = min(r["ms"] for r in ref)
                        ax.plot(ts, [y0 * t / ts[0] for t in ts], color="grey", lw=0.8, alpha=0.6,
                                label="∝ T·W (linear in T)")
                        ax.plot(ts, [y0 * (t / ts[0]) ** 2 for t in ts], color="black", lw=0.8, alpha=0.6,
                                label="∝ T² (quadratic)")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length T")
                ax.set_ylabel(ylabel)
                ax.set_title(f"attention {mode}, D={d}, bf16" if env.get("timings_meaningful") else
                             f"attention {mode}, D={d}")
                if drawn:
                    ax.legend(fontsize=6)
                ax.grid(True, which="both", alpha=0.3)
                mark_empty_panel(ax, env, "timings" if what == "time" else "peak-memory figures")
            save(fig, fname)

    # MoE: TFLOP/s vs tokens
    mrecs = [r for r in ix.records("moe") if r.get("status") == "ok" and r.get("tflops") and r.get("case")]
    if mrecs:
        shapes = sorted({r["case"]["shape"] for r in mrecs})
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            for meth, style in (("ours", "-"), ("grouped_mm", "--"), ("loop", ":"), ("dense_gemm", "-.")):
                pts = sorted((r["case"]["N"], r["tflops"]) for r in mrecs
                             if r["case"]["shape"] == shape and r["method"] == meth and r["mode"] == "fwd+bwd")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=meth)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens N")
            ax.set_ylabel("TFLOP/s (fwd+bwd, routed FLOPs)")
            ax.set_title(shape)
            ax.grid(True, which="both", alpha=0.3)
            if not mark_empty_panel(ax, env):
                ax.legend(fontsize=7)
        save(fig, "moe-tflops")

    # varlen: useful TFLOP/s per method and mode, one panel per case
    vrecs = [r for r in ix.records("varlen") if r.get("status") == "ok" and r.get("tflops") and r.get("case")]
    if vrecs:
        vcases = list(dict.fromkeys(r["case_id"] for r in vrecs))
        fig, axes = plt.subplots(1, len(vcases), figsize=(5.5 * len(vcases), 4), squeeze=False)
        modes = ("fwd", "bwd", "fwd+bwd")
        for ax, cid in zip(axes[0], vcases):
            width = 0.8 / len(VARLEN_METHODS)
            for i, (meth, lab) in enumerate(VARLEN_METHODS):
                vals = [(ix.get("varlen", cid, meth, m) or {}).get("tflops") for m in modes]
                if any(vals):
                    ax.bar([j + i * width for j in range(len(modes))], [v or 0 for v in vals], width, label=lab)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))])
            ax.set_xticklabels(modes)
            ax.set_ylabel("useful TFLOP/s")
            ax.set_title(cid, fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
            if not mark_empty_panel(ax, env):
                ax.legend(fontsize=7)
        save(fig, "varlen")

    # speed-up bars against each baseline
    panels = []
    show_a, why_a = ix.speedups_meaningful("attention")
    show_m, why_m = ix.speedups_meaningful("moe")
    if arecs:
        d = max(r["case"]["D"] for r in arecs)
        t = max(r["case"]["T"] for r in arecs)
        bars = {}
        for r in arecs:
            c = r["case"]
            if r["method"] != "ours" or c["D"] != d or c["T"] != t or r["mode"] not in ("fwd", "bwd"):
                continue
            for meth in ("flex", "sdpa_dense_mask", "sdpa_flash"):
                cc = r["case_id"] if meth != "sdpa_flash" else f"T={t} W=-1 D={d} summaries=0"
                b = ix.ms("attention", cc, meth, r["mode"])
                if b and show_a:
                    lab = (c["W"], c["summaries"], r["mode"])
                    bars.setdefault(meth, {})[lab] = b / r["ms"]
        panels.append((f"attention T={_t(t)} D={d}: baseline ms / ours ms", bars, why_a))
    if mrecs or ix.records("moe"):
        bars = {}
        for r in ix.records("moe", method="ours", mode="fwd+bwd"):
            if r.get("status") != "ok":
                continue
            for meth in ("loop", "grouped_mm"):
                b = ix.ms("moe", r["case_id"], meth, "fwd+bwd")
                if b and show_m:
                    bars.setdefault(meth, {})[(r["case"]["shape"], r["case"]["N"])] = b / r["ms"]
        panels.append(("MoE fwd+bwd: baseline ms / ours ms", bars, why_m))
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4 * len(panels)), squeeze=False)
        for ax, (title, bars, why) in zip(axes[:, 0], panels):
            if not bars:
                ax.text(0.5, 0.5, f"no speed-ups: {why or 'nothing measured'}", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9)
                ax.set_axis_off()
                continue
            keys = sorted({k for b in bars.values() for k in b})

            def name(k):
                if isinstance(k[0], str):  # MoE: (shape, N)
                    return f"{k[0]} N={k[1]}"
                return f"{'full' if k[0] < 0 else 'W=' + str(k[0])}{'+S' if k[1] else ''} {k[2]}"

            width = 0.8 / len(bars)
            for i, (meth, vals) in enumerate(sorted(bars.items())):
                xs = [j + i * width for j in range(len(keys))]
                ax.bar(xs, [vals.get(k, float("nan")) for k in keys], width, label=f"vs {meth}")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_yscale("log")
            fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(fmt)
            ax.yaxis.set_minor_formatter(fmt)
            ax.tick_params(axis="y", which="minor", labelsize=6)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
            ax.set_xticklabels([name(k) for k in keys], rotation=30, ha="right", fontsize=7)
            ax.set_ylabel("speed-up (x, log scale; > 1: ours faster)")
            ax.set_title(title)
            ax.legend(fontsize=7)
        save(fig, "speedup")

    # model: tokens/s and peak memory vs T
    mod = [r for r in ix.records("model") if r.get("status") == "ok" and r.get("case")]
    if mod:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
        for v, style in (("ours", "-"), ("dense_sdpa", "--"), ("reference", ":")):
            for mode, marker in (("train", "o"), ("infer", "s")):
                pts = sorted((r["case"]["T"], r.get("tokens_per_s"), r.get("peak_mib")) for r in mod
                             if r["method"] == v and r["mode"] == mode)
                if pts:
                    axes[0, 0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, label=f"{v} {mode}")
                    if all(p[2] is not None for p in pts):
                        axes[0, 1].plot([p[0] for p in pts], [p[2] / 1024 for p in pts], style, marker=marker,
                                        label=f"{v} {mode}")
        for ax, yl, what in zip(axes[0], ("tokens/s", "peak GiB"), ("timings", "peak-memory figures")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
            if not mark_empty_panel(ax, env, what):
                ax.legend(fontsize=7)
        save(fig, "model")

    # generation: cache bytes and decode step time vs context
    gen = [r for r in ix.records("generate") if r.get("status") == "ok" and r.get("case")]
    if gen:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
        for v, style in (("ours", "-"), ("full_kv", "--"), ("dense_sdpa", ":")):
            pts = sorted((r["case"]["T"], r["cache_bytes"], r["ms"]) for r in gen if r["method"] == v)
            if pts:
                axes[0, 0].plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], style, marker="o", label=v)
                axes[0, 1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=v)
        for ax, yl in zip(axes[0], ("cache MiB", "ms per decode step")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length T")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
            if not mark_empty_panel(ax, env):
                ax.legend(fontsize=7)
        save(fig, "generate")
    return paths


def write_report(results: dict[str, Any], out_dir: str, stem: str, *, plots: bool = True) -> list[str]:
    """Write ``<stem>.md`` (and ``<stem>-*.png``) next to the JSON; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    pngs = make_plots(results, out_dir, stem) if plots else []
    md = os.path.join(out_dir, stem + ".md")
    with open(md, "w") as f:
        f.write(markdown(results, pngs))
    return [md, *pngs]


# ----------------------------------------------------------------------------- README snippet


def committed_results(results_dir: str) -> list[str]:
    """Results JSON files under ``results_dir`` that git tracks (committed or staged)."""
    try:
        out = subprocess.run(["git", "ls-files", "--", "*.json"], capture_output=True, text=True, timeout=10,
                             cwd=results_dir)
        if out.returncode == 0:
            return [os.path.join(results_dir, p) for p in out.stdout.split() if "/" not in p]
    except Exception:
        pass
    return []


def pick_latest(paths: list[str]) -> tuple[str, dict] | None:
    """The newest GPU run among ``paths`` (full runs before ``--quick`` ones)."""
    best = None
    for p in paths:
        try:
            with open(p) as f:
                res = json.load(f)
        except Exception:
            continue
        env = res.get("env", {})
        if res.get("schema", "").split("/")[0] != "dasg-bench" or env.get("device_kind") != "cuda":
            continue
        key = (not env.get("quick"), env.get("date", ""))
        if best is None or key > best[0]:
            best = (key, p, res)
    return (best[1], best[2]) if best else None


def latest_snippet(results_dir: str = RESULTS_DIR, *, link_prefix: str = "", include_uncommitted: bool = False) -> str:
    """The README block: the latest committed GPU results, or a note that there are none yet."""
    paths = (sorted(glob.glob(os.path.join(results_dir, "*.json"))) if include_uncommitted
             else committed_results(results_dir))
    found = pick_latest(paths)
    if found is None:
        return "\n".join([
            "### Benchmark results",
            "",
            "No GPU benchmark run has been committed yet, so there are no numbers to show: the GPU figures are "
            "still owed. Run `python -m benchmarks` on a GPU, commit `benchmarks/results/`, then "
            "`python -m benchmarks.report --latest` regenerates this section.",
            "",
        ])
    path, res = found
    stem = os.path.splitext(os.path.basename(path))[0]
    ix = Index(res)
    env = res["env"]
    lines = [
        f"### Benchmark results: {env['device']}",
        "",
        f"Generated by `python -m benchmarks.report --latest` from [`{stem}.json`]({link_prefix}{stem}.json) "
        f"({env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, "
        f"{env['date'][:10]}, commit `{str(env.get('git_commit'))[:10]}`). Full tables: "
        f"[`{stem}.md`]({link_prefix}{stem}.md).",
        "",
        "```",
        *target_lines(res),
        "```",
        "",
    ]
    # a compact table: the headline cases
    rows = []
    show_a, _ = ix.speedups_meaningful("attention")
    for r in ix.records("attention", method="ours", mode="fwd"):
        c = r.get("case") or {}
        if r.get("status") == "ok" and c.get("D") == 128 and not c.get("summaries") and c.get("T", 0) >= 16384:
            f = ix.ms("attention", r["case_id"], "flex", "fwd")
            rows.append(f"| attention fwd T={_t(c['T'])} W={c['W']} D=128 | {_fmt(r['ms'])} ms | "
                        f"{_fmt(r.get('tflops'))} TFLOP/s | "
                        + (f"{f / r['ms']:.2f}x vs FlexAttention" if f and show_a else "—") + " |")
    show_v, _ = ix.speedups_meaningful("varlen")
    for r in ix.records("varlen", method="ours_varlen", mode="fwd+bwd"):
        c = r.get("case") or {}
        if r.get("status") == "ok":
            base = {lab: ix.ms("varlen", r["case_id"], meth, "fwd+bwd") for meth, lab in VARLEN_METHODS[1:]}
            x = [f"{b / r['ms']:.2f}x vs {lab}" for lab, b in base.items() if b and show_v]
            rows.append(f"| varlen fwd+bwd {_t(c['tokens'])} tokens in {c['B']} sequences"
                        f"{' + summaries' if c.get('summaries') else ''} | {_fmt(r['ms'])} ms | "
                        f"{_fmt(r.get('tflops'))} TFLOP/s | {', '.join(x) or '—'} |")
    show_m, _ = ix.speedups_meaningful("moe")
    for r in ix.records("moe", method="ours", mode="fwd+bwd"):
        c = r.get("case") or {}
        if r.get("status") == "ok" and c.get("N", 0) >= 4096:
            g = ix.ms("moe", r["case_id"], "grouped_mm", "fwd+bwd")
            rows.append(f"| MoE fwd+bwd {c['shape']} N={c['N']} | {_fmt(r['ms'])} ms | {_fmt(r.get('tflops'))} "
                        "TFLOP/s | " + (f"{g / r['ms']:.2f}x vs torch._grouped_mm" if g and show_m else "—") + " |")
    if rows:
        lines += ["| case | ours | throughput | speed-up |", "|---|---|---|---|", *rows, ""]
    for name in ("attention-time", "attention-memory", "varlen", "moe-tflops", "speedup", "model", "generate"):
        png = os.path.join(os.path.dirname(path), f"{stem}-{name}.png")
        if os.path.exists(png):
            lines += [f"![{name}]({link_prefix}{stem}-{name}.png)", ""]
    return "\n".join(lines)


def write_latest(results_dir: str = RESULTS_DIR, out: str | None = None, readme: str | None = None,
                 include_uncommitted: bool = False) -> list[str]:
    out = out or os.path.join(results_dir, "LATEST.md")
    written = []
    rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(out)))
    prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
    with open(out, "w") as f:
        f.write(latest_snippet(results_dir, link_prefix=prefix, include_uncommitted=include_uncommitted))
    written.append(out)
    if readme:
        rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(readme)))
        snippet = latest_snippet(results_dir, link_prefix=rel.replace(os.sep, "/") + "/",
                                 include_uncommitted=include_uncommitted)
        text = open(readme).read()
        pat = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
        if not pat.search(text):
            raise SystemExit(f"{readme}: no {README_START} ... {README_END} block to replace")
        text = pat.sub(lambda m: f"{README_START}\n{snippet}\n{README_END}", text)
        with open(readme, "w") as f:
            f.write(text)
        written.append(readme)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", help="a results JSON to render (its .md and .png are rewritten)")
    p.add_argument("--latest", action="store_true", help="write LATEST.md from the newest committed GPU run")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--out", default=None, help="where --latest writes (default <results-dir>/LATEST.md)")
    p.add_argument("--readme", default=None, help="also replace the BENCHMARKS block of this README")
    p.add_argument("--include-uncommitted", action="store_true", help="--latest also considers untracked files")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if not args.results and not args.latest:
        p.error("give a results JSON or --latest")
    if args.results:
        with open(args.results) as f:
            res = json.load(f)
        res["targets"] = evaluate_targets(res)
        d, stem = os.path.dirname(os.path.abspath(args.results)), os.path.splitext(os.path.basename(args.results))[0]
        for path in write_report(res, d, stem, plots=not args.no_plots):
            print(f"wrote {path}")
        print("\n".join(target_lines(res)))
    if args.latest:
        for path in write_latest(args.results_dir, args.out, args.readme, args.include_uncommitted):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
