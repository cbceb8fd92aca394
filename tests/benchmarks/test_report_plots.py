"""The benchmark report's plots: a panel with no data says so ("no data on CPU ...") instead of
being left as empty axes. Checked on the matplotlib objects (texts, their position and
transform), not by comparing images; no benchmark runs here (hand-made results, seconds)."""
from __future__ import annotations

import os

import pytest

from benchmarks import common, report

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402


def _results(device_kind: str, *, peak: bool) -> dict:
    """A results dict as the runner writes it: attention, MoE, model and generate records,
    with peak memory only when ``peak`` (a CPU run has none: it needs CUDA)."""
    cuda = device_kind == "cuda"
    env = {"device": "NVIDIA H100" if cuda else "CPU (x86_64)", "device_kind": device_kind, "torch": "2.13.0",
           "triton": "3.9.0", "cuda": "12.8" if cuda else None, "date": "2026-12-06T00:00:00Z",
           "git_commit": "abc", "timings_meaningful": cuda, "quick": True}
    mem = {"peak_mib": 12.0} if peak else {}
    recs = []
    for t in (64, 128):
        case = {"T": t, "W": 16, "D": 32, "summaries": False}
        for mode in ("fwd", "fwd+bwd"):
            recs.append({"family": "attention", "case_id": f"T={t} W=16 D=32 summaries=0", "case": case,
                         "method": "ours", "mode": mode, "status": "ok", "ms": 1.0 * t, "tflops": 1.0, **mem})
        for mode in ("train", "infer"):
            recs.append({"family": "model", "case_id": f"T={t}", "case": {"T": t}, "method": "ours", "mode": mode,
                         "status": "ok", "ms": 2.0, "tokens_per_s": 100.0 * t, "peak_mib": mem.get("peak_mib")})
        recs.append({"family": "moe", "case_id": f"mixtral N={t}", "case": {"N": t, "shape": "mixtral"},
                     "method": "ours", "mode": "fwd+bwd", "status": "ok", "ms": 1.0, "tflops": 0.5, **mem})
        recs.append({"family": "generate", "case_id": f"T={t}", "case": {"T": t}, "method": "ours", "mode": "decode",
                     "status": "ok", "ms": 3.0, "cache_bytes": 1000 * t})
    return {"schema": common.SCHEMA, "env": env, "families": {}, "correctness": [], "records": recs}


@pytest.fixture
def figures(monkeypatch):
    """Every figure ``make_plots`` saves, by plot name (nothing is written to disk)."""
    saved: dict[str, Figure] = {}

    def savefig(fig, path, *args, **kwargs):
        saved[os.path.basename(path).removeprefix("run-").removesuffix(".png")] = fig

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def _notes(ax) -> list[str]:
    """The texts centred on ``ax`` in axes coordinates (what ``mark_empty_panel`` writes)."""
    return [t.get_text() for t in ax.texts if t.get_transform() == ax.transAxes
            and tuple(t.get_position()) == (0.5, 0.5) and t.get_ha() == "center" and t.get_va() == "center"]


def test_cpu_run_says_no_data_in_the_empty_panels(figures, tmp_path):
    report.make_plots(_results("cpu", peak=False), str(tmp_path), "run")
    assert {"attention-time", "attention-memory", "model", "moe-tflops", "generate", "speedup"} <= set(figures)
    mem = figures["attention-memory"].axes
    assert len(mem) == 1 and _notes(mem[0]) == ["no data on CPU (peak-memory figures need a GPU)"]
    tokens, peak = figures["model"].axes
    assert _notes(tokens) == [] and tokens.has_data()
    assert _notes(peak) == ["no data on CPU (peak-memory figures need a GPU)"] and not peak.has_data()
    # every other panel: data and no note, or (speed-up panels) its own explanation
    for name, fig in figures.items():
        for ax in fig.axes:
            notes = _notes(ax)
            if ax.has_data():
                assert notes == [], (name, notes)
            else:
                assert len(notes) == 1 and notes[0].startswith(("no data on CPU", "no speed-ups")), (name, notes)


@pytest.mark.parametrize("device_kind", ["cpu", "cuda"])
def test_mark_empty_panel_only_marks_empty_axes(device_kind):
    env = {"device_kind": device_kind}
    fig = Figure()
    empty, full, bars = fig.subplots(1, 3)
    full.plot([1, 2], [3, 4])
    bars.bar([0, 1], [1.0, 2.0])
    assert report.mark_empty_panel(empty, env) is True
    assert report.mark_empty_panel(full, env) is False and report.mark_empty_panel(bars, env) is False
    want = "no data on CPU (timings need a GPU)" if device_kind == "cpu" else "no data (nothing measured)"
    assert _notes(empty) == [want] and _notes(full) == [] and _notes(bars) == []


def test_gpu_run_with_every_figure_has_no_note(figures, tmp_path):
    report.make_plots(_results("cuda", peak=True), str(tmp_path), "run")
    assert figures
    for name, fig in figures.items():
        if name == "speedup":  # no baselines in these records: that panel explains itself
            continue
        for ax in fig.axes:
            assert ax.has_data() and _notes(ax) == [], name
