"""The run's PNG plots, one function per figure: attention time and peak memory vs T
(log-log, with ``∝ T·W`` and ``∝ T²`` guides), MoE TFLOP/s vs tokens, varlen TFLOP/s per
method, speed-up bars, model tokens/s and memory, generation cache bytes and step time.

Every ``*_figures`` function takes the run's :class:`Index` and yields ``(name, figure)``;
:func:`make_plots` titles and saves them as ``<stem>-<name>.png``. matplotlib is optional:
without it there are no plots.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from benchmarks.report.index import VARLEN_METHODS, Index, t_label

#: What a panel that has no data says; CPU runs measure neither CUDA timings nor peak memory.
NO_DATA_CPU = "no data on CPU ({what} need a GPU)"

Figures = Iterator[tuple[str, Any]]


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


def _attention_records(ix: Index) -> list[dict]:
    return [r for r in ix.records("attention") if r.get("status") == "ok" and r.get("case")]


def _moe_records(ix: Index) -> list[dict]:
    return [r for r in ix.records("moe") if r.get("status") == "ok" and r.get("tflops") and r.get("case")]


def attention_series(ws: list[int]) -> list[tuple[str, str, int, bool, str]]:
    """The attention plots' lines for the windows ``ws``: ``(label, method, W, summaries,
    line style)``; summaries and the dense-mask baseline at the middle window."""
    mid_w = ws[len(ws) // 2] if ws else None
    series = [(f"ours W={w}", "ours", w, False, "-") for w in ws]
    if mid_w:
        series.append((f"ours W={mid_w} + summaries G=W", "ours", mid_w, True, "-"))
    series.append(("ours full causal", "ours", -1, False, "-"))
    series += [(f"flex W={w}", "flex", w, False, "--") for w in ws]
    if mid_w:
        series.append((f"SDPA dense mask W={mid_w}", "sdpa_dense_mask", mid_w, False, ":"))
    series.append(("SDPA flash full causal", "sdpa_flash", -1, False, "-."))
    return series


def _attention_panel(ax: Any, arecs: list[dict], series: list, d: int, mode: str, what: str, key: str,
                     ylabel: str, env: dict[str, Any]) -> None:
    """One panel of ``attention-time`` (``what="time"``) or ``attention-memory``: ``key`` of
    every series vs T at head dim ``d`` in ``mode``; time panels get the T·W and T² guides
    through our fastest figure at the smallest T."""
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


def attention_figures(ix: Index) -> Figures:
    """``attention-time`` (fwd and fwd+bwd ms vs T) and ``attention-memory`` (fwd+bwd peak
    MiB vs T) at the largest head dim."""
    import matplotlib.pyplot as plt

    arecs = _attention_records(ix)
    if not arecs:
        return
    d = max(r["case"]["D"] for r in arecs)
    series = attention_series(sorted({r["case"]["W"] for r in arecs if r["case"]["W"] > 0}))
    for what, key, ylabel, fname in (("time", "ms", "ms", "attention-time"),
                                     ("memory", "peak_mib", "peak MiB (fwd+bwd)", "attention-memory")):
        modes = ("fwd", "fwd+bwd") if what == "time" else ("fwd+bwd",)
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            _attention_panel(ax, arecs, series, d, mode, what, key, ylabel, ix.env)
        yield fname, fig


def moe_figures(ix: Index) -> Figures:
    """``moe-tflops``: fwd+bwd TFLOP/s vs tokens per method, one panel per shape."""
    import matplotlib.pyplot as plt

    mrecs = _moe_records(ix)
    if not mrecs:
        return
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
        if not mark_empty_panel(ax, ix.env):
            ax.legend(fontsize=7)
    yield "moe-tflops", fig


def varlen_figures(ix: Index) -> Figures:
    """``varlen``: useful TFLOP/s per method and mode, one panel per case."""
    import matplotlib.pyplot as plt

    vrecs = [r for r in ix.records("varlen") if r.get("status") == "ok" and r.get("tflops") and r.get("case")]
    if not vrecs:
        return
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
        if not mark_empty_panel(ax, ix.env):
            ax.legend(fontsize=7)
    yield "varlen", fig


def speedup_panels(ix: Index) -> list[tuple[str, dict, str]]:
    """The speed-up figure's panels: ``(title, {baseline: {bar key: baseline ms / ours ms}},
    why there are none)``. Attention at the largest T and D (keys ``(W, summaries, mode)``),
    MoE fwd+bwd (keys ``(shape, N)``); empty when speed-ups are not meaningful."""
    panels = []
    arecs = _attention_records(ix)
    show_a, why_a = ix.speedups_meaningful("attention")
    show_m, why_m = ix.speedups_meaningful("moe")
    if arecs:
        d = max(r["case"]["D"] for r in arecs)
        t = max(r["case"]["T"] for r in arecs)
        bars: dict = {}
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
        panels.append((f"attention T={t_label(t)} D={d}: baseline ms / ours ms", bars, why_a))
    if _moe_records(ix) or ix.records("moe"):
        bars = {}
        for r in ix.records("moe", method="ours", mode="fwd+bwd"):
            if r.get("status") != "ok":
                continue
            for meth in ("loop", "grouped_mm"):
                b = ix.ms("moe", r["case_id"], meth, "fwd+bwd")
                if b and show_m:
                    bars.setdefault(meth, {})[(r["case"]["shape"], r["case"]["N"])] = b / r["ms"]
        panels.append(("MoE fwd+bwd: baseline ms / ours ms", bars, why_m))
    return panels


def _bar_name(k: tuple) -> str:
    if isinstance(k[0], str):  # MoE: (shape, N)
        return f"{k[0]} N={k[1]}"
    return f"{'full' if k[0] < 0 else 'W=' + str(k[0])}{'+S' if k[1] else ''} {k[2]}"


def _speedup_panel(ax: Any, title: str, bars: dict, why: str) -> None:
    """Log-scale bars of one :func:`speedup_panels` panel, or the reason there are none."""
    import matplotlib.ticker

    if not bars:
        ax.text(0.5, 0.5, f"no speed-ups: {why or 'nothing measured'}", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
        ax.set_axis_off()
        return
    keys = sorted({k for b in bars.values() for k in b})
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
    ax.set_xticklabels([_bar_name(k) for k in keys], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speed-up (x, log scale; > 1: ours faster)")
    ax.set_title(title)
    ax.legend(fontsize=7)


def speedup_figures(ix: Index) -> Figures:
    """``speedup``: one row per :func:`speedup_panels` panel."""
    import matplotlib.pyplot as plt

    panels = speedup_panels(ix)
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4 * len(panels)), squeeze=False)
    for ax, (title, bars, why) in zip(axes[:, 0], panels):
        _speedup_panel(ax, title, bars, why)
    yield "speedup", fig


def model_figures(ix: Index) -> Figures:
    """``model``: tokens/s and peak GiB vs T per variant and mode."""
    import matplotlib.pyplot as plt

    mod = [r for r in ix.records("model") if r.get("status") == "ok" and r.get("case")]
    if not mod:
        return
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
        if not mark_empty_panel(ax, ix.env, what):
            ax.legend(fontsize=7)
    yield "model", fig


def generate_figures(ix: Index) -> Figures:
    """``generate``: cache MiB and ms per decode step vs context length per variant."""
    import matplotlib.pyplot as plt

    gen = [r for r in ix.records("generate") if r.get("status") == "ok" and r.get("case")]
    if not gen:
        return
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
        if not mark_empty_panel(ax, ix.env):
            ax.legend(fontsize=7)
    yield "generate", fig


#: every figure, in the order the report lists them
FIGURES = (attention_figures, moe_figures, varlen_figures, speedup_figures, model_figures, generate_figures)


def make_plots(results: dict[str, Any], out_dir: str, stem: str) -> list[str]:
    """Save every figure of :data:`FIGURES` as ``<out_dir>/<stem>-<name>.png`` (titled with
    the device and versions); returns their paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    ix = Index(results)
    env = results["env"]
    label = f"{env['device']} · torch {env['torch']} · triton {env['triton']} · {env['date'][:10]}"
    if not env.get("timings_meaningful"):
        label += "\nCPU run: timings NOT meaningful"
    paths = []
    for figures in FIGURES:
        for name, fig in figures(ix):
            fig.suptitle(label, fontsize=8)
            fig.tight_layout()
            p = os.path.join(out_dir, f"{stem}-{name}.png")
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths
