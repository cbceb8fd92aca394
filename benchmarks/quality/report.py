"""Results of the quality benchmark: aggregation over seeds, Markdown tables and PNG plots.

:func:`aggregate` groups the runs that differ only in their seed and gives each metric's
mean, standard deviation (``statistics.stdev``, 0 for one seed), min and max.
:func:`write_report` writes ``<stem>.json`` (every run and the aggregates), ``<stem>.md``
and the plots a user reads at a glance:

- ``<stem>-distance.png``: accuracy vs distance to the answer, one line per attention
  variant, one panel per task (the window ``W`` marked);
- ``<stem>-group.png``: MQAR accuracy beyond the stacked windows' reach (``distance >
  num_layers * W``) vs the group size ``G`` at fixed ``W`` (dense attention and the window
  alone as reference lines);
- ``<stem>-bpb.png``: bits per byte vs position in the context (byte-level LM);
- ``<stem>-steptime.png``: accuracy vs training step time, every MQAR variant.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

from benchmarks.quality.variants import ATTENTIONS, EXPERTS

SCHEMA = "dasg-quality/1"
METRICS: tuple[str, ...] = (
    "accuracy", "accuracy_in_window", "accuracy_beyond_window", "accuracy_beyond_reach", "final_loss", "eval_loss",
    "bits_per_byte", "step_ms", "cpu_step_ms", "tokens_per_s", "peak_mem_bytes", "mean_experts_per_token", "deep_fraction", "ffn_active_params_mean",
)
TASK_ORDER = ("mqar", "listops", "copy", "passkey", "lm")


def group_key(result: dict) -> str:
    """The run's key without its seed: runs with the same group key are seeds of one variant."""
    return result["key"].rsplit("/seed", 1)[0]


def _stats(values: list[float]) -> dict[str, float] | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _metric(result: dict, name: str) -> Any:
    if name == "cpu_step_ms" and name not in result and result.get("train_cpu_s") is not None:
        return 1000 * result["train_cpu_s"] / result["steps"]
    return result.get(name)


def label(result: dict) -> str:
    """A short name of a variant: ``dasg G=16``, ``swa``, ``dasg G=16 + adr``."""
    s = result["attention"]
    if s in ("dasg", "sumonly"):
        s += f" G={result['group_size']}"
    if result["experts"] != "dense":
        s += f" + {result['experts']}"
    return s


def aggregate(runs: list[dict]) -> list[dict[str, Any]]:
    """One entry per variant (group of seeds), in task / attention / G / experts order."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if "error" not in r:
            groups.setdefault(group_key(r), []).append(r)
    out = []
    for key, rs in groups.items():
        first = rs[0]
        entry: dict[str, Any] = {
            "group": key, "label": label(first), "task": first["task"], "attention": first["attention"],
            "experts": first["experts"], "seq_len": first["seq_len"], "window": first["window"],
            "group_size": first["group_size"], "steps": first["steps"], "seeds": sorted(r["seed"] for r in rs),
            "num_layers": first.get("model", {}).get("num_layers", 1),
            "chance": first.get("chance"), "task_info": first.get("task_info"),
        }
        for m in METRICS:
            st = _stats([_metric(r, m) for r in rs])
            if st is not None:
                entry[m] = st
        buckets: dict[tuple[int, int], dict[str, list[float]]] = {}
        for r in rs:
            for b in r.get("by_distance", []):
                slot = buckets.setdefault((b["lo"], b["hi"]), {"accuracy": [], "loss": [], "n": []})
                slot["accuracy"].append(b["accuracy"])
                slot["loss"].append(b["loss"])
                slot["n"].append(b["n"])
        entry["by_distance"] = [
            {"lo": lo, "hi": hi, "n": sum(v["n"]), "accuracy": _stats(v["accuracy"]), "loss": _stats(v["loss"])}
            for (lo, hi), v in sorted(buckets.items())
        ]
        out.append(entry)

    def order(e):
        return (TASK_ORDER.index(e["task"]) if e["task"] in TASK_ORDER else 99, e["seq_len"], e["window"],
                EXPERTS.index(e["experts"]), ATTENTIONS.index(e["attention"]), e["group_size"])

    return sorted(out, key=order)


# ----------------------------------------------------------------------------- Markdown


def _fmt(st: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    if st is None:
        return "-"
    if st["n"] > 1:
        return f"{st['mean'] / scale:.{digits}f} ± {st['std'] / scale:.{digits}f}"
    return f"{st['mean'] / scale:.{digits}f}"


def _task_title(e: dict) -> str:
    info = {k: v for k, v in (e.get("task_info") or {}).items()
            if k not in ("task", "seq_len", "vocab_size", "chance", "corpus_crc32")}
    opts = ", ".join(f"{k}={v}" for k, v in info.items())
    return f"{e['task']} (T={e['seq_len']}, W={e['window']}, {e['steps']} steps{', ' + opts if opts else ''})"


def markdown(results: dict) -> str:
    """The Markdown report of a results dict (:func:`write_report`'s ``results``)."""
    env, agg = results["env"], results["aggregates"]
    lines = [f"# Quality benchmark: what the summaries buy ({results['grid']} grid)", "",
             f"`{results.get('command', 'python -m benchmarks.quality')}` on {env['device']}, torch {env['torch']}, "
             f"python {env['python']}, {env.get('threads')} thread(s) per run, {env.get('jobs', 1)} run(s) at a time; "
             f"commit {str(env.get('git_commit'))[:10]}{' (dirty)' if env.get('git_dirty') else ''}; "
             f"{env['date']}. {len(results['runs'])} runs"
             f"{'' if results['complete'] else _incomplete(results)}, "
             f"about {results.get('elapsed_s', 0) / 60:.0f} min of training (the runs' wall time over the runs at a time).",
             ""]
    if env.get("device_kind") != "cuda":
        loads = [r["load_avg"] for r in results["runs"] if r.get("load_avg") is not None]
        load = (f" The 1-minute load average at the end of the runs was {min(loads):.1f}-{max(loads):.1f} on "
                f"{os.cpu_count()} cores." if loads else "")
        lines += ["CPU run (the PyTorch backend of the same ops): *ms/step* is the median wall-clock step, "
                  "*CPU ms/step* the process time per step (one thread; it moves less than the wall clock when "
                  "the machine is shared), memory the resident-set peak above the one before training: figures "
                  "of a small model on a CPU, to compare the variants with each other, not GPU speed." + load, ""]
    lines += ["Accuracy is on held-out sequences (the same for every variant and seed), mean ± standard deviation "
              "over seeds; *in window* = answers at distance <= W (visible through one window), *beyond window* = "
              "the rest, *beyond L·W* = answers further back than the L stacked windows reach (L layers), where the "
              "sliding window alone is at chance and only dense attention or the group summaries can help. "
              "Chance is given per task.", ""]
    by_task: dict[str, list[dict]] = {}
    for e in agg:
        by_task.setdefault(_task_title(e), []).append(e)
    for title, es in by_task.items():
        lm = es[0]["task"] == "lm"
        lines += [f"## {title}", ""]
        if not lm:
            lines += [f"Chance: {es[0]['chance']:.3f}.", ""]
        head = ("| variant | seeds | " + ("bits/byte | bpb in window | next-byte acc | acc beyond window"
                                         if lm else "accuracy | in window | beyond window | beyond L·W | eval loss")
                + " | ms/step | CPU ms/step | tokens/s | peak MiB | routed experts/token | active FFN params/token |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for e in es:
            if lm:
                cells = [_fmt(e.get("bits_per_byte")), _fmt(_bpb_in(e)), _fmt(e.get("accuracy")),
                         _fmt(e.get("accuracy_beyond_window"))]
            else:
                cells = [_fmt(e.get("accuracy")), _fmt(e.get("accuracy_in_window")),
                         _fmt(e.get("accuracy_beyond_window")), _fmt(e.get("accuracy_beyond_reach")),
                         _fmt(e.get("eval_loss"))]
            mem = e.get("peak_mem_bytes")
            cells += [_fmt(e.get("step_ms"), 0), _fmt(e.get("cpu_step_ms"), 0), _fmt(e.get("tokens_per_s"), 0),
                      _fmt(mem, 0, 2 ** 20) if mem else "-",
                      _fmt(e.get("mean_experts_per_token"), 2) if e["experts"] != "dense" else "-",
                      _fmt(e.get("ffn_active_params_mean"), 0)]
            lines.append(f"| {e['label']} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
        lines.append("")
        edges = sorted({(b["lo"], b["hi"]) for e in es for b in e["by_distance"]})
        if edges:
            what = "bits per byte by position in the context" if lm else "accuracy by distance to the answer"
            lines += [f"{what.capitalize()} (mean over seeds):", ""]
            head = "| variant | " + " | ".join(f"{lo}-{hi}" for lo, hi in edges) + " |"
            lines += [head, "|" + "---|" * (len(edges) + 1)]
            for e in es:
                cells = []
                by = {(b["lo"], b["hi"]): b for b in e["by_distance"]}
                for edge in edges:
                    b = by.get(edge)
                    if b is None:
                        cells.append("-")
                    elif lm:
                        cells.append(f"{b['loss']['mean'] / math.log(2):.2f}")
                    else:
                        cells.append(f"{b['accuracy']['mean']:.2f}")
                lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
            lines.append("")
    for p in results.get("plots", []):
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    errors = [r for r in results["runs"] if "error" in r]
    if errors:
        lines += ["## Runs that failed", ""] + [f"- `{r['key']}`: {r['error']}" for r in errors] + [""]
    return "\n".join(lines)


def _incomplete(results: dict) -> str:
    planned = results.get("planned")
    of = f" of the grid's {planned}" if planned else ""
    return f"{of} (INCOMPLETE: the same command trains the rest and rewrites this report)"


def _bpb_in(e: dict) -> dict | None:
    """Bits per byte of the positions inside the window (from the per-bucket losses)."""
    w = e["window"]
    inside = [b for b in e.get("by_distance", []) if b["hi"] <= w and b["loss"]]
    if not inside:
        return None
    n = sum(b["n"] for b in inside)
    mean = sum(b["loss"]["mean"] * b["n"] for b in inside) / n / math.log(2)
    return {"mean": mean, "std": 0.0, "n": 1}


# ----------------------------------------------------------------------------- plots


def _centre(b: dict) -> float:
    return math.sqrt(max(b["lo"], 1) * max(b["hi"], 1))


def plots(results: dict, out_dir: str, stem: str) -> list[str]:
    """Write the PNG plots; returns their paths (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib not installed
        return []
    agg = results["aggregates"]
    paths = []
    dev = results["env"]["device"]

    # accuracy vs distance, one panel per task, the default variants (experts dense, the most common G)
    tasks = [t for t in TASK_ORDER if any(e["task"] == t for e in agg)]
    if tasks:
        ncols = min(3, len(tasks))
        nrows = math.ceil(len(tasks) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.5 * nrows), squeeze=False)
        for ax in axes.flat[len(tasks):]:
            ax.set_visible(False)
        for ax, task in zip(axes.flat, tasks):
            es = [e for e in agg if e["task"] == task and e["experts"] == "dense"]
            # the dasg line at the G of the baselines' runs (the task's default), else the most seeded G
            base_g = [e["group_size"] for e in es if e["attention"] in ("dense", "swa")]
            gs = [e["group_size"] for e in es if e["attention"] == "dasg" for _ in e["seeds"]]
            g0 = base_g[0] if base_g and base_g[0] in gs else (max(set(gs), key=gs.count) if gs else None)
            for e in es:
                if e["attention"] in ("dasg", "sumonly") and e["group_size"] != g0:
                    continue
                bs = [b for b in e["by_distance"] if b["accuracy"] is not None]
                if not bs:
                    continue
                x = [_centre(b) for b in bs]
                if task == "lm":
                    y = [b["loss"]["mean"] / math.log(2) for b in bs]
                else:
                    y = [b["accuracy"]["mean"] for b in bs]
                    sd = [b["accuracy"]["std"] for b in bs]
                    ax.fill_between(x, [a - s for a, s in zip(y, sd)], [a + s for a, s in zip(y, sd)], alpha=0.15)
                ax.plot(x, y, marker="o", ms=3, label=e["label"])
            if task != "lm":
                ax.set_ylim(-0.02, 1.02)
                if es and es[0].get("chance"):
                    ax.axhline(es[0]["chance"], color="grey", ls="-.", lw=0.8, label="chance")
            if es:
                w, lw = es[0]["window"], es[0]["window"] * es[0]["num_layers"]
                ax.axvline(w, color="grey", ls=":", lw=1)
                ax.text(w, ax.get_ylim()[1], " W", va="top", color="grey", fontsize=8)
                if lw != w:
                    ax.axvline(lw, color="grey", ls="--", lw=0.8)
                    ax.text(lw, ax.get_ylim()[1], " L·W", va="top", color="grey", fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_title(task, fontsize=10)
            ax.set_xlabel("distance to the answer (tokens)" if task != "lm" else "position in the context")
            ax.set_ylabel("accuracy" if task != "lm" else "bits per byte")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left" if task != "lm" else "upper right")
        fig.suptitle(f"Accuracy vs distance ({dev})", fontsize=10)
        fig.tight_layout()
        paths.append(_save(fig, plt, out_dir, f"{stem}-distance.png"))

    # accuracy vs G (MQAR, beyond the window), the window alone and dense as references
    mq = [e for e in agg if e["task"] == "mqar" and e["experts"] == "dense"]
    sweep = [e for e in mq if e["attention"] == "dasg"]
    if len({e["group_size"] for e in sweep}) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for att, style in (("dasg", "o-"), ("sumonly", "s--")):
            pts = sorted((e["group_size"], e["accuracy_beyond_reach"]) for e in mq
                         if e["attention"] == att and e.get("accuracy_beyond_reach"))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                            fmt=style, capsize=3, label=att)
        for att, color in (("dense", "k"), ("swa", "r")):
            for e in mq:
                if e["attention"] == att and e.get("accuracy_beyond_reach"):
                    ax.axhline(e["accuracy_beyond_reach"]["mean"], color=color, ls=":", label=att)
        if mq and mq[0].get("chance"):
            ax.axhline(mq[0]["chance"], color="grey", ls="-.", lw=0.8, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("group size G")
        reach = sweep[0]["num_layers"] * sweep[0]["window"]
        ax.set_ylabel(f"MQAR accuracy, distance > L·W = {reach}")
        ax.set_title(f"MQAR, T={sweep[0]['seq_len']}, W={sweep[0]['window']} ({dev})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, plt, out_dir, f"{stem}-group.png"))

    # bits per byte vs position (LM), every variant
    lm = [e for e in agg if e["task"] == "lm"]
    if lm:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for e in lm:
            bs = [b for b in e["by_distance"] if b["loss"] is not None]
            ax.plot([_centre(b) for b in bs], [b["loss"]["mean"] / math.log(2) for b in bs], marker="o", ms=3,
                    ls="-" if e["experts"] == "dense" else "--", label=e["label"])
        ax.axvline(lm[0]["window"], color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the context (bytes)")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(f"Byte-level LM on the stdlib's .py sources ({dev})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, plt, out_dir, f"{stem}-bpb.png"))

    # accuracy vs step time, every MQAR variant
    pts = [e for e in agg if e["task"] == "mqar" and e.get("step_ms") and e.get("accuracy")]
    if pts:
        # the CPU's process time per step (steadier than the wall clock on a shared machine); GPU: wall
        key = "cpu_step_ms" if results["env"].get("device_kind") != "cuda" and all(
            e.get("cpu_step_ms") for e in pts) else "step_ms"
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for e in pts:
            ax.errorbar(e[key]["mean"], e["accuracy"]["mean"], xerr=e[key]["std"],
                        yerr=e["accuracy"]["std"], fmt="o", capsize=2)
            ax.annotate(e["label"], (e[key]["mean"], e["accuracy"]["mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("CPU time per training step (ms, one thread)" if key == "cpu_step_ms"
                      else "training step time (ms)")
        ax.set_ylabel("MQAR accuracy (all distances)")
        ax.set_title(f"Accuracy vs cost, MQAR T={pts[0]['seq_len']} ({dev})", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, plt, out_dir, f"{stem}-steptime.png"))
    return paths


def _save(fig, plt, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- files


def write_report(results: dict, out_dir: str, stem: str, *, with_plots: bool = True) -> list[str]:
    """Aggregate ``results["runs"]`` and write ``<stem>.json``, ``<stem>.md`` and the plots
    into ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    results["aggregates"] = aggregate(results["runs"])
    results["plots"] = plots(results, out_dir, stem) if with_plots else []
    json_path = os.path.join(out_dir, stem + ".json")
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, json_path)
    md_path = os.path.join(out_dir, stem + ".md")
    with open(md_path, "w") as f:
        f.write(markdown(results))
    return [json_path, md_path, *results["plots"]]
