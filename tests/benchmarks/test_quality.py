"""The quality benchmark (``benchmarks.quality``): generators, variants, a smoke run.

- Task generators are deterministic by seed and their labels are right: MQAR queries
  point at the pair they claim, ListOps answers agree with an independent stack
  evaluator written here (``numpy.median`` for MED), copy / passkey targets are the
  tokens they name, the LM split is by file and its targets are the next bytes.
- Variants hold the parameter counts they claim (counted from the modules), the
  attention variants exactly the same, the expert variants the same active expert
  parameters per token (routers within the stated tolerance), and the SDPA baseline
  equals GMHA with an unbounded window.
- A tiny single run (the CLI's ``--json``) and a tiny grid (JSONL, resume, JSON, Markdown,
  plots) produce every key. No test asserts a quality figure.
"""
from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout
from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks.quality import cli, grids, tasks
from benchmarks.quality.report import aggregate
from benchmarks.quality.tasks import IGNORE, ListOps, MQAR, Passkey, SelectiveCopy
from benchmarks.quality.train import RESULT_KEYS, RunSpec, summarize_targets
from benchmarks.quality.variants import (
    ACTIVE_PARAM_TOLERANCE,
    ATTENTIONS,
    EXPERTS,
    ModelSpec,
    build_model,
    count_params,
)

SYNTHETIC = [
    ("mqar", 96, {"num_pairs": 5}),
    ("mqar", 61, {"num_pairs": 3, "num_keys": 7, "num_values": 5}),
    ("listops", 97, {"max_depth": 4, "max_args": 4, "min_len": 6, "max_len": 40}),
    ("listops", 64, {"max_depth": 2, "max_args": 9, "min_len": 4, "max_len": 12}),
    ("copy", 70, {"num_tokens": 6}),
    ("copy", 33, {"num_tokens": 1, "num_data": 3}),
    ("passkey", 77, {"num_digits": 5}),
    ("passkey", 16, {"num_digits": 1}),
]


def _sample(name, seq_len, opts, seed, batch=6):
    return tasks.make_task(name, seq_len, **opts).sample(batch, np.random.default_rng(seed))


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name,seq_len,opts", SYNTHETIC)
def test_generators_deterministic_by_seed(name, seq_len, opts):
    a, b, c = (_sample(name, seq_len, opts, s) for s in (3, 3, 4))
    for field in ("ids", "targets", "distance"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert getattr(a, field).shape == (6, seq_len) and getattr(a, field).dtype == np.int64
    assert not np.array_equal(a.ids, c.ids)
    task = tasks.make_task(name, seq_len, **opts)
    assert a.ids.min() >= 0 and a.ids.max() < task.vocab_size
    scored = a.targets != IGNORE
    assert scored.any(1).all(), "every sequence has a target"
    assert (a.distance[scored] >= 1).all() and (a.distance[~scored] == -1).all()
    assert (a.targets[scored] < task.vocab_size).all()


@pytest.mark.parametrize("seq_len,pairs", [(96, 5), (61, 3), (512, 8)])
def test_mqar_queries_point_at_their_pairs(seq_len, pairs):
    task = MQAR(seq_len, num_pairs=pairs)
    batch = task.sample(16, np.random.default_rng(0))
    is_key = (batch.ids >= task.key0) & (batch.ids < task.val0)
    for b in range(16):
        qs = np.flatnonzero(batch.targets[b] != IGNORE)
        assert len(qs) == pairs
        for q in qs:
            key = batch.ids[b, q]
            assert task.key0 <= key < task.val0
            where = np.flatnonzero(batch.ids[b] == key)
            assert len(where) == 2 and where[1] == q, "a key occurs once as a pair and once as its query"
            p = where[0]
            assert batch.ids[b, p + 1] == batch.targets[b, q] == batch.ids[b, q + 1]
            assert task.val0 <= batch.targets[b, q] < task.vocab_size
            assert batch.distance[b, q] == q - (p + 1)
        assert is_key[b].sum() == 2 * pairs
    d = batch.distance[batch.targets != IGNORE]
    assert (d <= 8).any() and (d > seq_len // 4).any(), "distances span the short and the long range"


def _listops_eval(tokens: list[int]) -> int:
    """Independent evaluator: a stack machine over the token string (numpy's median)."""
    names = {10: "MIN", 11: "MAX", 12: "MED", 13: "SM"}
    stack: list = []
    for t in tokens:
        if t in names:
            stack.append([names[t]])
        elif t == ListOps.END:
            op, *args = stack.pop()
            v = {"MIN": min, "MAX": max, "MED": lambda a: int(np.median(a)),
                 "SM": lambda a: int(np.sum(a)) % 10}[op](args)
            if not stack:
                return v
            stack[-1].append(v)
        else:
            assert 0 <= t <= 9
            stack[-1].append(t)
    raise AssertionError("unterminated expression")


def _listops_depth(tokens: list[int]) -> int:
    depth = best = 0
    for t in tokens:
        if 10 <= t <= 13:
            depth += 1
            best = max(best, depth)
        elif t == ListOps.END:
            depth -= 1
    return best


@pytest.mark.parametrize("max_depth,max_args,min_len,max_len", [(4, 4, 6, 40), (2, 9, 4, 12), (6, 3, 20, 90)])
def test_listops_answers_match_an_independent_evaluator(max_depth, max_args, min_len, max_len):
    task = ListOps(128, max_depth=max_depth, max_args=max_args, min_len=min_len, max_len=max_len)
    batch = task.sample(24, np.random.default_rng(1))
    ops_seen, n = set(), 0
    for b in range(24):
        start = 0
        for q in np.flatnonzero(batch.targets[b] != IGNORE):
            assert batch.ids[b, q] == ListOps.EQ
            expr = batch.ids[b, start:q].tolist()
            assert _listops_eval(expr) == batch.targets[b, q] == batch.ids[b, q + 1]
            assert batch.distance[b, q] == len(expr)
            assert min_len <= len(expr) <= max_len
            # the root is depth 1; operators below max_depth only
            assert 1 <= _listops_depth(expr) <= max_depth - 1
            ops_seen |= {t for t in expr if 10 <= t <= 13}
            start, n = q + 2, n + 1
        assert (batch.ids[b, start:] == ListOps.PAD).all()
    assert n >= 24 and ops_seen == {10, 11, 12, 13}


def test_listops_median_truncates_like_lra():
    # LRA's MED is int(np.median(values)): the mean of the middle two, truncated
    assert tasks.listops_apply("MED", [2, 5]) == int(np.median([2, 5])) == 3
    assert tasks.listops_apply("MED", [9, 0, 4]) == 4
    assert tasks.listops_apply("SM", [9, 9, 3]) == 1


@pytest.mark.parametrize("seq_len,n", [(70, 6), (256, 8), (33, 1)])
def test_copy_targets_are_the_data_tokens_in_order(seq_len, n):
    task = SelectiveCopy(seq_len, num_tokens=n)
    batch = task.sample(8, np.random.default_rng(2))
    L = seq_len - n
    for b in range(8):
        where = np.flatnonzero(batch.ids[b, :L] != SelectiveCopy.BLANK)
        assert len(where) == n and batch.ids[b, L] == SelectiveCopy.MARK
        data = batch.ids[b, where]
        np.testing.assert_array_equal(batch.targets[b, L:], data)
        np.testing.assert_array_equal(batch.ids[b, L + 1:], data[:-1])
        np.testing.assert_array_equal(batch.distance[b, L:], np.arange(L, seq_len) - where)
        assert (batch.targets[b, :L] == IGNORE).all()


@pytest.mark.parametrize("seq_len,digits", [(77, 5), (16, 1), (300, 7)])
def test_passkey_targets_are_the_passkey(seq_len, digits):
    task = Passkey(seq_len, num_digits=digits)
    batch = task.sample(8, np.random.default_rng(3))
    q = seq_len - digits
    for b in range(8):
        (p,) = np.flatnonzero(batch.ids[b] == task.KEY)
        assert batch.ids[b, q] == task.QUERY and (batch.ids[b] == task.QUERY).sum() == 1
        key = batch.ids[b, p + 1:p + 1 + digits]
        assert (key < 10).all()
        np.testing.assert_array_equal(batch.targets[b, q:], key)
        np.testing.assert_array_equal(batch.ids[b, q + 1:], key[:-1])
        assert (batch.distance[b, q:] == q - 1 - p).all()
        filler = np.delete(batch.ids[b], np.r_[p:p + 1 + digits, q:seq_len])
        assert ((filler >= 10) & (filler < 10 + task.num_fill)).all()


def test_lm_split_by_file_and_next_byte_targets(tmp_path):
    for i in range(40):
        sub = tmp_path / ("pkg" if i % 3 else "") / f"m{i}.py"
        sub.parent.mkdir(exist_ok=True)
        sub.write_bytes(f"# module {i}\n".encode() + bytes([65 + i % 26]) * (50 + i))
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "x.py").write_text("not stdlib")
    files = tasks.stdlib_files(str(tmp_path))
    assert len(files) == 40 and not any("site-packages" in f for f in files)
    held = [f for f in files if tasks.is_heldout(f)]
    assert 0 < len(held) < 40
    assert tasks.stdlib_files(str(tmp_path)) == files  # deterministic order
    train, heldout = tasks.stdlib_corpus("train", str(tmp_path)), tasks.stdlib_corpus("heldout", str(tmp_path))
    assert train.size + heldout.size + 2 == sum((tmp_path / f).stat().st_size + 1 for f in files)
    task = tasks.ByteLM(32, root=str(tmp_path))
    a = task.sample(4, np.random.default_rng(0), split="heldout")
    b = task.sample(4, np.random.default_rng(0), split="heldout")
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.ids[:, 1:], a.targets[:, :-1])
    hb = heldout.tobytes()
    for row, tgt in zip(a.ids, a.targets):
        assert hb.find(bytes(row.tolist()) + bytes([int(tgt[-1])])) >= 0, "a held-out window comes from held-out files"
    np.testing.assert_array_equal(a.distance[0], np.arange(32))


def test_distance_buckets_and_window_split():
    dist = np.array([1, 2, 3, 8, 9, 40, 100])
    correct = np.array([1, 1, 0, 1, 0, 1, 0], bool)
    nll = np.arange(7, dtype=float)
    s = summarize_targets(dist, correct, nll, seq_len=128, window=8, num_layers=2)
    assert s["accuracy"] == pytest.approx(4 / 7)
    assert s["accuracy_in_window"] == pytest.approx(3 / 4) and s["n_in_window"] == 4
    assert s["accuracy_beyond_window"] == pytest.approx(1 / 3) and s["n_beyond_window"] == 3
    assert s["accuracy_beyond_reach"] == pytest.approx(1 / 2) and s["n_beyond_reach"] == 2  # > 2 * 8
    assert sum(b["n"] for b in s["by_distance"]) == 7
    assert any(b["hi"] == 8 for b in s["by_distance"])


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("experts", EXPERTS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_variants_hold_the_parameters_they_claim(attention, experts):
    spec = ModelSpec(vocab_size=37, seq_len=64, attention=attention, experts=experts, window=8, group_size=4,
                     hidden_size=32, num_layers=2, num_heads=2, ffn_size=96, num_experts=8, k=2)
    model = build_model(spec)
    claimed = spec.claimed_params()
    assert count_params(model) == claimed["total"]
    for layer in model.model.layers:
        assert count_params(layer.attn) == claimed["attention_per_layer"]
        assert count_params(layer.moe) == claimed["ffn_per_layer"]
    cfg = model.config
    assert cfg.attention_window == {"dense": -1, "swa": 8, "dasg": 8, "sumonly": 1}[attention]
    assert cfg.use_summaries == (attention in ("dasg", "sumonly"))


def test_matched_sizes_across_variants():
    def spec(**kw):
        return ModelSpec(vocab_size=50, seq_len=64, hidden_size=64, ffn_size=192, **kw)

    attn = {a: spec(attention=a).claimed_params() for a in ATTENTIONS}
    assert len({c["total"] for c in attn.values()}) == 1, "attention variants: same parameter count"
    ex = {e: spec(experts=e).claimed_params() for e in EXPERTS}
    assert len({c["ffn_active_experts_max_per_token"] for c in ex.values()}) == 1
    dense = ex["dense"]["ffn_active_max_per_token"]
    for e, c in ex.items():
        assert abs(c["ffn_active_max_per_token"] - dense) <= ACTIVE_PARAM_TOLERANCE * dense, e
    # the expert weights one token can reach, counted from the built modules
    d = 64
    topk = build_model(spec(experts="topk")).model.layers[0].moe
    per_expert = topk.experts.gate_up_proj[0].numel() + topk.experts.down_proj[0].numel()
    assert 2 * per_expert == 3 * d * 192
    dsse = build_model(spec(experts="dsse")).model.layers[0].moe
    reach = sum(b.gate_up_proj[0].numel() + b.down_proj[0].numel() for b in (dsse.shared.shallow, dsse.shared.deep))
    reach += 2 * sum(b.gate_up_proj[0].numel() + b.down_proj[0].numel() for b in (dsse.shallow_experts,
                                                                                   dsse.deep_experts))
    assert reach == 3 * d * 192 and dsse.config.k_max == 2


def test_sdpa_baseline_equals_gmha_with_unbounded_window():
    spec = ModelSpec(vocab_size=40, seq_len=48, attention="dense", hidden_size=32, num_heads=2, ffn_size=96)
    dense = build_model(spec, seed=5)
    ref = build_model(replace(spec, attention="swa"), seed=5)
    for name, p in dense.state_dict().items():  # every attention variant of a seed starts alike
        torch.testing.assert_close(p, ref.state_dict()[name], atol=0, rtol=0)
    ref.config.attention_window = -1  # the same modules read it at call time
    for layer in ref.model.layers:
        layer.attn.config.attention_window = -1
    ids = torch.randint(0, 40, (2, 48))
    torch.testing.assert_close(dense(ids).logits, ref(ids).logits, atol=2e-5, rtol=2e-5)
    ref.model.layers[0].attn.config.attention_window = 8
    assert not torch.allclose(dense(ids).logits, ref(ids).logits, atol=1e-3)


# ----------------------------------------------------------------------------- smoke runs

TINY = ["--seq-len", "32", "--window", "4", "--group-size", "4", "--steps", "3", "--batch-size", "4",
        "--eval-size", "4", "--hidden-size", "32", "--heads", "2", "--ffn-size", "96", "--threads", "1",
        "--no-progress"]


@pytest.mark.parametrize("task,attention,experts", [("mqar", "dasg", "adr"), ("lm", "dense", "dsse")])
def test_single_run_json_has_every_key(task, attention, experts):
    argv = ["--task", task, "--attention", attention, "--experts", experts, "--seed", "1", "--json", *TINY]
    if task == "mqar":
        argv += ["--num-pairs", "2"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(argv) == 0
    r = json.loads(out.getvalue())
    for k in RESULT_KEYS:
        assert k in r, k
    assert (r["task"], r["attention"], r["experts"], r["seq_len"], r["window"], r["group_size"], r["steps"],
            r["seed"]) == (task, attention, experts, 32, 4, 4, 3, 1)
    assert 0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_s"] > 0 and len(r["loss_curve"]) >= 1
    assert r["mean_experts_per_token"] >= 1.0
    assert r["params_total"] == r["params_claimed"]["total"]
    if task == "lm":
        assert r["bits_per_byte"] > 0


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit):
        cli.parse_args(["--task", "copy", "--num-pairs", "3"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--steps", "3"])  # a single-run flag without --task
    with pytest.raises(SystemExit):
        cli.parse_args(["--task", "mqar", "--attention", "flash"])


def test_grid_writes_resumes_and_reports(tmp_path, monkeypatch):
    base = RunSpec(task="mqar", seq_len=32, window=4, group_size=4, steps=2, batch_size=4, eval_size=4,
                   hidden_size=32, num_heads=2, ffn_size=96, task_options={"num_pairs": 2})
    specs = [replace(base, attention=a, seed=s) for s in (0, 1) for a in ("swa", "dasg")]
    specs.append(replace(base, task="passkey", attention="dense", task_options={"num_digits": 2}))
    monkeypatch.setattr(grids, "grid", lambda kind, **kw: specs)
    argv = ["--quick", "--out", str(tmp_path), "--jobs", "0", "--threads", "1", "--no-progress"]
    with redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    stem = tmp_path / "quality-cpu-quick"
    lines = (tmp_path / "quality-cpu-quick.jsonl").read_text().splitlines()
    assert len(lines) == 5
    results = json.loads(stem.with_suffix(".json").read_text())
    assert results["complete"] and len(results["runs"]) == 5
    for r in results["runs"]:
        assert all(k in r for k in RESULT_KEYS)
    labels = {a["label"]: a for a in results["aggregates"]}
    assert labels["dasg G=4"]["seeds"] == [0, 1] and labels["dasg G=4"]["accuracy"]["n"] == 2
    md = stem.with_suffix(".md").read_text()
    assert "| swa | 2 |" in md and "passkey" in md
    assert os.path.exists(str(stem) + "-distance.png") and os.path.exists(str(stem) + "-steptime.png")
    # a second call trains nothing: every run is in the JSONL
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    with redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    assert len((tmp_path / "quality-cpu-quick.jsonl").read_text().splitlines()) == 5


def test_aggregate_groups_seeds():
    runs = [{"key": f"k/seed{s}", "task": "mqar", "attention": "dasg", "experts": "dense", "seq_len": 8,
             "window": 2, "group_size": 2, "steps": 1, "seed": s, "accuracy": a, "by_distance": []}
            for s, a in ((0, 0.5), (1, 0.7))]
    (agg,) = aggregate(runs)
    assert agg["accuracy"]["mean"] == pytest.approx(0.6) and agg["accuracy"]["n"] == 2


def test_benchmarks_runner_delegates_only_quality(monkeypatch, tmp_path):
    from benchmarks import runner
    from benchmarks.quality import cli as qcli

    seen = []
    monkeypatch.setattr(qcli, "main", lambda argv: seen.append(argv) or 0)
    assert runner.main(["--only", "quality", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert seen == [["--out", str(tmp_path), "--quick", "--device", "cpu"]]
    assert "quality" not in runner.FAMILIES  # a plain `python -m benchmarks` does not train models


def test_grids_are_well_formed():
    for kind in ("quick", "cpu", "gpu"):
        specs = grids.grid(kind)
        keys = [s.key() for s in specs]
        assert len(keys) == len(set(keys)), kind
        for s in specs:
            s.make_task()
            s.model_spec(300).validate()
    cpu = grids.grid("cpu")
    assert {s.task for s in cpu} == {"mqar", "listops", "copy", "passkey", "lm"}
    assert {s.seed for s in cpu} == {0, 1, 2}
    assert {s.experts for s in cpu} == set(EXPERTS)
    quick = grids.grid("quick")
    assert {s.attention for s in quick} == {"dense", "swa", "dasg"} and "mqar" in {s.task for s in quick}
