"""The benchmark runner's CPU path (tiny shapes, Triton's interpreter) and its outputs.

One ``python -m benchmarks --quick`` run (in-process) is shared by the structure tests;
the wrong-kernel tests shrink the case matrix to one case so they cost a few seconds.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from benchmarks import bench_attention, bench_model, bench_moe, bench_varlen, common, report, runner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REC_STATUSES = {"ok", "skipped", "error", "unavailable"}


def _run(out, *args):
    # Always the CPU path, also on a GPU machine: without ``--device cpu`` the runner picks CUDA
    # there, and the "quick" run below would be the real GPU benchmark (minutes of compiling and
    # timing inside the test suite, and a CUDA results file that the CPU assertions reject). On a
    # GPU machine the interpreter is off, so "ours" runs the torch reference as a stand-in: these
    # tests check the runner, its checks and its files; the kernels run in the GPU benchmark itself.
    return runner.main(["--out", str(out), "--device", "cpu", "--cpu-repeats", "1", "--no-progress", "--name", "run",
                        *args])


def _load(out):
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    rc = _run(out, "--quick")
    return rc, out


# ----------------------------------------------------------------------------- the CPU run


def test_quick_run_passes_every_correctness_check(quick_run):
    """Our kernels pass the benchmark's own checks (so a GPU run is not lost to a false
    failure of its tolerances); the exit status is 0."""
    rc, out = quick_run
    failed = [c for c in _load(out)["correctness"] if not c["passed"]]
    assert not failed, failed
    assert rc == 0


def test_quick_run_writes_every_file(quick_run):
    rc, out = quick_run
    assert rc in (0, 1)  # 1 only when a kernel failed a check: the files are written either way
    files = sorted(os.listdir(out))
    assert "run.json" in files and "run.md" in files
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    pngs = [f for f in files if f.endswith(".png")]
    for name in ("attention-time", "attention-memory", "varlen", "moe-tflops", "speedup", "model"):
        assert f"run-{name}.png" in pngs, pngs
    for p in pngs:
        with open(os.path.join(out, p), "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_results_json_schema(quick_run):
    _, out = quick_run
    res = _load(out)
    assert res["schema"] == common.SCHEMA
    env = res["env"]
    for key in ("date", "device", "device_kind", "torch", "triton", "cuda", "git_commit", "timings_meaningful",
                "interpreter", "quick"):
        assert key in env, key
    assert env["device_kind"] == "cpu" and env["timings_meaningful"] is False and env["quick"] is True
    assert set(res["families"]) == {"attention", "varlen", "moe", "model", "generate"}
    for fam, info in res["families"].items():
        assert info["status"] == "ok", (fam, info)
        assert "kernel_available" in info
    assert res["correctness"], "no correctness checks ran"
    for c in res["correctness"]:
        assert {"family", "case_id", "op", "check", "passed", "max_err", "tol"} <= set(c)
    ops = {(c["family"], c["op"]) for c in res["correctness"] if not c.get("baseline")}
    assert {("attention", "swa_attention"), ("varlen", "swa_attention_varlen"), ("varlen", "swa_attention (padded)"),
            ("moe", "expert_ffn"), ("model", "DASGForCausalLM"), ("generate", "generate")} <= ops
    if all(c["passed"] for c in res["correctness"]):
        assert ("moe", "route") in ops
        assert {"dq", "dk", "dv"} <= {c["check"] for c in res["correctness"] if c["op"] == "swa_attention"}
        assert {"dq", "dk", "dv", "lse (sampled rows)", "out == padded swa_attention (every row)"} <= {
            c["check"] for c in res["correctness"] if c["op"] == "swa_attention_varlen"}
    for r in res["records"]:
        assert {"family", "case_id", "method", "mode", "status"} <= set(r), r
        assert r["status"] in REC_STATUSES
        if r["status"] == "ok" and r["method"] not in ("decode_bound",):
            assert r["ms"] > 0 and r["ms_all"] and r["meaningful"] is False
            assert r["timing"].startswith("wall-clock")
        elif r["status"] != "ok":
            assert r.get("reason"), r
    timed = {(r["family"], r["method"]) for r in res["records"] if r["status"] == "ok"}
    for fam, meth in [("attention", "sdpa_dense_mask"), ("attention", "sdpa_flash"),
                      ("moe", "loop"), ("moe", "grouped_mm"), ("moe", "dense_gemm")]:
        assert (fam, meth) in timed, (fam, meth)
    # ours: timed, or (a kernel that failed its check) recorded as not timed with the reason
    for fam, meth in (("attention", "ours"), ("moe", "ours"), ("model", "ours"), ("varlen", "ours_varlen"),
                      ("varlen", "ours_padded")):
        ours = [r for r in res["records"] if r["family"] == fam and r["method"] == meth]
        assert ours and all(r["status"] == "ok" or ("wrong output" in r["reason"] and "ms" not in r)
                            for r in ours), ours
    # the attention kernels' autotuned configs ride on ours' records (none under the interpreter)
    assert all(r.get("tuned_configs") == {} for r in res["records"] if r["family"] == "attention"
               and r["method"] == "ours" and r["status"] == "ok")
    # FlexAttention needs compile on CUDA: recorded as skipped, with the reason
    for meth in ("flex", "flex_document"):
        flex = [r for r in res["records"] if r["method"] == meth]
        assert flex and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in flex)
    # useful FLOPs are recorded with the attention timings
    fwd = [r for r in res["records"] if r["family"] == "attention" and r["method"] == "sdpa_dense_mask"
           and r["mode"] == "fwd" and r["status"] == "ok"]
    assert fwd and all(r["flops"] > 0 and r["pairs"] > 0 for r in fwd)
    # varlen: FLOPs of the useful pairs only, for the padded batch too (its waste is recorded)
    vfwd = {r["method"]: r for r in res["records"] if r["family"] == "varlen" and r["mode"] == "fwd"
            and r["status"] == "ok"}
    if {"ours_varlen", "ours_padded"} <= set(vfwd):
        o, p = vfwd["ours_varlen"], vfwd["ours_padded"]
        assert o["flops"] == p["flops"] > 0 and p["padded_pairs"] > p["pairs"] == o["pairs"]
        assert p["padded_tokens"] > o["case"]["tokens"] == sum(o["case"]["lengths"])
    # every target is N/A on a CPU run
    assert res["targets"] and all(t["status"] == "N/A" for t in res["targets"])


def test_markdown_report_structure(quick_run):
    _, out = quick_run
    md = open(os.path.join(out, "run.md")).read()
    assert "NOT meaningful" in md
    for section in ("## Targets", "## Attention", "## Attention, packed sequences", "## MoE", "## Model",
                    "## Correctness", "## Plots"):
        assert section in md, section
    assert "| T | W | D | summ | mode | ours ms" in md
    assert "| case | mode | varlen ms | varlen TFLOP/s | padded ms" in md
    assert "| shape | N | mean k | mode | ours ms" in md
    assert ("**FAIL**" in md) == (quick_run[0] == 1)
    # no speed-up is printed on a CPU run
    assert "Speed-ups not shown: CPU run" in md
    for line in md.splitlines():
        if line.startswith("| ") and ("ours" not in line):
            assert not any(cell.strip().endswith("x") and cell.strip()[:-1].replace(".", "").isdigit()
                           for cell in line.split("|")), line


def test_report_regenerates_from_json(quick_run, tmp_path):
    _, out = quick_run
    src = os.path.join(out, "run.json")
    dst = tmp_path / "copy.json"
    dst.write_text(open(src).read())
    assert report.main([str(dst), "--no-plots"]) == 0
    assert (tmp_path / "copy.md").read_text().startswith("# dasg-kernels benchmarks")


# ----------------------------------------------------------------------------- wrong kernels fail


def _shift(fn, delta):
    def wrong(*a, **k):
        out = fn(*a, **k)
        if isinstance(out, tuple):
            return (out[0] + delta, *out[1:])
        return out + delta
    return wrong


def test_wrong_attention_kernel_fails_the_run(tmp_path, monkeypatch, capsys):
    import dasg_kernels

    one = [bench_attention.AttnCase(64, 16, 32, True, 2, dtype=torch.float32)]
    monkeypatch.setattr(bench_attention, "cases", lambda quick, device: one)
    monkeypatch.setattr(dasg_kernels, "swa_attention", _shift(dasg_kernels.swa_attention, 0.05))
    monkeypatch.setattr(dasg_kernels, "swa_attention_with_lse", _shift(dasg_kernels.swa_attention_with_lse, 0.05))
    rc = _run(tmp_path, "--only", "attention", "--no-plots")
    text = capsys.readouterr().out
    assert rc == 1
    assert "FAILED" in text and "PASS " not in text
    res = _load(tmp_path)
    bad = [c for c in res["correctness"] if not c["passed"]]
    assert bad and all(c["op"] == "swa_attention" for c in bad)
    ours = [r for r in res["records"] if r["method"] == "ours"]
    assert ours and all(r["status"] == "error" and "ms" not in r for r in ours)
    md = (tmp_path / "run.md").read_text()
    assert "**FAIL**" in md


def test_wrong_varlen_kernel_fails_the_run(tmp_path, monkeypatch, capsys):
    """A wrong varlen op (and a wrong dense op, so that the padded method is not timed either:
    a few seconds of interpreter) fails the run; nothing of ours is timed."""
    import dasg_kernels

    monkeypatch.setattr(dasg_kernels, "swa_attention_varlen", _shift(dasg_kernels.swa_attention_varlen, 0.05))
    monkeypatch.setattr(dasg_kernels, "swa_attention", _shift(dasg_kernels.swa_attention, 0.05))
    rc = _run(tmp_path, "--only", "varlen", "--quick", "--no-plots")
    assert rc == 1
    assert "FAILED" in capsys.readouterr().out
    res = _load(tmp_path)
    bad = {(c["op"], c["check"]) for c in res["correctness"] if not c["passed"]}
    assert ("swa_attention_varlen", "out (sampled rows)") in bad and ("swa_attention (padded)",
                                                                      "out (sampled rows)") in bad
    ours = [r for r in res["records"] if r["method"].startswith("ours")]
    assert ours and all(r["status"] == "error" and "ms" not in r for r in ours)


def test_wrong_expert_kernel_fails_the_run(tmp_path, monkeypatch, capsys):
    import dasg_kernels

    one = [bench_moe.MoECase("mixtral", 8, dtype=torch.float32, **bench_moe.SHAPES_CPU["mixtral"])]
    monkeypatch.setattr(bench_moe, "cases", lambda quick, device: one)
    monkeypatch.setattr(dasg_kernels, "expert_ffn", _shift(dasg_kernels.expert_ffn, 0.05))
    rc = _run(tmp_path, "--only", "moe", "--no-plots")
    assert rc == 1
    assert "FAILED" in capsys.readouterr().out
    res = _load(tmp_path)
    assert any(not c["passed"] and c["op"] == "expert_ffn" for c in res["correctness"])
    assert all(r["status"] != "ok" for r in res["records"] if r["method"] == "ours")


def test_missing_model_api_is_reported_not_a_crash(tmp_path, monkeypatch, capsys):
    def missing():
        raise runner.FamilyUnavailable("dasg_model.DASGForCausalLM cannot be imported: ImportError: test")

    monkeypatch.setattr(bench_model, "_api", missing)
    rc = _run(tmp_path, "--only", "model", "--no-plots")
    assert rc == 3
    res = _load(tmp_path)
    assert res["families"]["model"]["status"] == "unavailable"
    assert "cannot be imported" in res["families"]["model"]["reason"]
    assert "unavailable" in (tmp_path / "run.md").read_text()


def test_time_budget_skips_with_the_reason(tmp_path):
    # a budget of 0, not "a little": where the kernel probes are fast (no interpreter, e.g. a GPU
    # machine) a tiny budget could leave the first case inside it, and its CUDA-only flex record
    # would then be skipped for that reason instead of the budget
    rc = _run(tmp_path, "--only", "attention,varlen,moe", "--time-budget", "0", "--no-plots")
    assert rc == 0
    res = _load(tmp_path)
    assert res["complete"] is True
    timed = [r for r in res["records"] if r["method"] in ("ours", "loop", "flex", "sdpa_dense_mask", "ours_varlen",
                                                          "ours_padded", "flex_document")]
    assert timed and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in timed)
    assert {r["family"] for r in timed} == {"attention", "varlen", "moe"}


def test_unknown_family_is_a_usage_error():
    with pytest.raises(SystemExit):
        runner.parse_args(["--only", "nope"])


# ----------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("t,left,g,summ", [(64, 15, 16, True), (100, 7, 8, True), (64, -1, None, False),
                                           (50, 0, 4, True), (33, 40, 8, True)])
def test_attention_pairs_count_the_reference_mask(t, left, g, summ):
    from dasg_kernels.reference import local_mask, summary_mask

    n = int(local_mask(t, t, (left, 0), True).sum())
    if summ:
        n += int(summary_mask(t, t, (left, 0), True, g).sum())
    assert common.attention_pairs(t, left, group_size=g, summaries=summ) == n


@pytest.mark.parametrize("w,summ", [(-1, False), (64, False), (64, True), (200, True), (1, False)])
def test_flex_block_mask_matches_the_dense_mask(w, summ):
    from torch.nn.attention.flex_attention import create_block_mask

    t = 384
    c = bench_attention.AttnCase(t, w, 32, summ, 1, dtype=torch.float32)
    slots = bench_attention.summary_slots(t, c.group_size) if summ else 0
    tk = t + slots
    ng = -(-t // c.group_size) if summ else 0
    g = c.group_size or 1
    dense = bench_attention.dense_mask(c, tk, "cpu")
    mm = bench_attention.flex_mask_mod(t, c.left, g, ng, "cpu")
    qi, ki = torch.arange(t)[:, None], torch.arange(tk)[None, :]
    assert torch.equal(mm(0, 0, qi, ki), dense)
    ours = bench_attention.sliding_block_mask(t, tk, c.left, g, ng, "cpu")
    ref = create_block_mask(mm, None, None, t, tk, device="cpu")
    assert torch.equal(ours.to_dense().bool(), ref.to_dense().bool())
    assert torch.equal(ours.full_kv_num_blocks.flatten(), ref.full_kv_num_blocks.flatten())
    assert torch.equal(ours.kv_num_blocks.flatten(), ref.kv_num_blocks.flatten())


def test_log_uniform_lengths():
    lens = bench_varlen.log_uniform_lengths(*bench_varlen.GPU_LENGTHS)
    assert lens == bench_varlen.log_uniform_lengths(*bench_varlen.GPU_LENGTHS)  # fixed seed
    assert sum(lens) == 65536 and all(256 <= t <= 32768 for t in lens[:-1]) and 1 <= lens[-1] <= 32768
    assert bench_varlen.log_uniform_lengths(*bench_varlen.CPU_LENGTHS) == (31, 27, 14)
    c = bench_varlen.cases(False, torch.device("cuda"))[0]
    assert (c.hq, c.hkv, c.d, c.left, c.group_size, c.dtype) == (32, 8, 128, 2047, 256, torch.bfloat16)
    assert c.pairs() == sum(common.attention_pairs(t, 2047, group_size=256, summaries=True) for t in lens)
    assert c.padded_pairs() > c.pairs()


def _packed_dense_mask(c, slots):
    """Bool ``[total, total + slots]`` from the reference masks, one sequence at a time."""
    from dasg_kernels.reference import local_mask, summary_mask

    m = torch.zeros(c.total, c.total + slots, dtype=torch.bool)
    off = c.total
    for s, t in zip(c.starts, c.lengths):
        m[s:s + t, s:s + t] = local_mask(t, t, (c.left, 0), True)
        if c.summaries:
            sm = summary_mask(t, t, (c.left, 0), True, c.group_size)
            n = t // c.group_size
            assert not sm[:, n:].any()  # a partial group is never seen: it gets no slot
            m[s:s + t, off:off + n] = sm[:, :n]
            off += n
    return m


VARLEN_MASK_CASES = [((31, 27, 14), 16, True, 4), ((31, 27, 14), 16, False, 4), ((40, 3, 17, 1, 35), 5, True, 3),
                     ((70,), 200, True, 8)]


@pytest.mark.parametrize("lengths,w,summ,g", VARLEN_MASK_CASES)
def test_document_block_mask_matches_the_dense_mask(lengths, w, summ, g):
    from torch.nn.attention.flex_attention import create_block_mask

    c = bench_varlen.VarlenCase(lengths, w, 32, summ, 2, 1, g, torch.float32)
    slots = bench_varlen.summary_slots(c)
    dense = _packed_dense_mask(c, slots)
    mm = bench_varlen.document_mask_mod(c, "cpu")
    qi, ki = torch.arange(c.total)[:, None], torch.arange(c.total + slots)[None, :]
    assert torch.equal(mm(0, 0, qi, ki), dense)
    a, b = bench_attention.key_intervals(c.lengths, c.left, c.group_size, slots, "cpu")
    assert torch.equal((qi >= a[None]) & (qi < b[None]), dense)
    for block in (16, 128):
        ours = bench_attention.block_mask_from_intervals(a, b, c.total, mm, block)
        ref = create_block_mask(mm, None, None, c.total, c.total + slots, device="cpu", BLOCK_SIZE=block)
        assert torch.equal(ours.to_dense().bool(), ref.to_dense().bool())
        assert torch.equal(ours.full_kv_num_blocks.flatten(), ref.full_kv_num_blocks.flatten())
        assert torch.equal(ours.kv_num_blocks.flatten(), ref.kv_num_blocks.flatten())


@pytest.mark.parametrize("summ", [True, False])
def test_flex_document_matches_the_reference(summ):
    """The flex baseline's construction (document block mask, pooled summary slots, GQA),
    run eagerly on the CPU (forward only there): the benchmark compiles it on CUDA."""
    c = bench_varlen.VarlenCase((31, 27, 14, 1), 16, 32, summ, 4, 2, 4, torch.float32)
    q, k, v, _ = (x.detach() for x in bench_varlen._inputs(c, torch.device("cpu")))
    fn = bench_varlen.flex_document_fn(c, "cpu", compiled=False)
    out = fn(*(bench_varlen._bhtd(x) for x in (q, k, v)))[0].transpose(0, 1)
    ref = bench_varlen.reference_packed(q, k, v, c)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_expert_baselines_match_the_reference():
    from dasg_kernels.reference import expert_ffn_ref, route_ref

    n, d, f, e = 13, 32, 16, 8
    x = torch.randn(n, d)
    w1, w2 = torch.randn(e, 2 * f, d) / d ** 0.5, torch.randn(e, d, f) / f ** 0.5
    r = route_ref(torch.randn(n, e) * 4, top_p=0.6, k_max=4)
    assert (r.expert_ids < 0).any()  # unused slots are exercised
    ref = expert_ffn_ref(x, w1, w2, r.expert_ids, r.weights)
    torch.testing.assert_close(bench_moe.experts_loop(x, w1, w2, r.expert_ids, r.weights), ref)
    if bench_moe.grouped_mm_available(x.device)[0]:
        torch.testing.assert_close(bench_moe.experts_grouped_mm(x, w1, w2, r.expert_ids, r.weights), ref,
                                   atol=1e-5, rtol=1e-5)


def test_measure_uses_do_bench_for_fast_calls_and_events_for_slow_ones(monkeypatch):
    """The CUDA branch of ``measure`` with CUDA faked: do_bench for fast calls (every raw
    figure kept), a short L2-flushed event loop for slow ones."""
    import time

    import triton.testing

    class FakeEvent:
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    calls = []

    def fake_do_bench(fn, warmup, rep, grad_to_none=None, quantiles=None, return_mode="mean"):
        calls.append((warmup, rep, return_mode))
        fn()
        return [0.5, 0.4, 0.6]

    monkeypatch.setattr(common.Settings, "on_cuda", property(lambda self: True))
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(common, "_l2_flush_buffer", lambda device: torch.empty(16))
    s = common.Settings(device=torch.device("cpu"), slow_call_ms=20.0, max_measure_s=0.2)
    fast = common.measure(lambda: None, s)
    assert fast["timing"] == "triton.testing.do_bench" and fast["ms_all"] == [0.5, 0.4, 0.6] and fast["ms"] == 0.5
    assert calls == [(s.warmup_ms, s.rep_ms, "all")]
    slow = common.measure(lambda: time.sleep(0.03), s)
    assert slow["timing"].startswith("cuda-events") and 2 <= len(slow["ms_all"]) <= s.max_repeats_slow
    assert slow["ms"] >= 25 and slow["meaningful"] is True


def test_tuned_configs_name_what_the_autotuner_ran(monkeypatch):
    """On CUDA each attention kernel is an Autotuner whose ``best_config`` is the config it
    ran last (the forward's carries ``PIPELINE``); under the interpreter there is none."""
    import types

    import triton

    from benchmarks import bench_attention
    from dasg_kernels.attention import bwd, fwd

    assert bench_attention.tuned_configs() == {}  # interpreter: plain jit functions
    cfg = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "PIPELINE": False}, num_warps=4, num_stages=2)
    monkeypatch.setattr(fwd, "_swa_fwd_kernel", types.SimpleNamespace(best_config=cfg))
    monkeypatch.setattr(bwd, "_swa_bwd_dq_kernel", types.SimpleNamespace(best_config=None))
    got = bench_attention.tuned_configs()
    assert got == {"fwd": "BLOCK_M=64, BLOCK_N=64, PIPELINE=False, w4 s2"}
    fwd._swa_fwd_kernel.best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3)
    assert bench_attention.tuned_configs() == {"fwd": "BLOCK_M=64, BLOCK_N=32, PIPELINE=True, w4 s3"}
    bench_attention.forget_tuned_configs()  # before a case: nothing left from the one before
    assert bench_attention.tuned_configs() == {}


def test_flops_and_compare_helpers():
    assert common.attention_flops(10, 1, 2, 4, "fwd+bwd") == 3.5 * 4 * 10 * 4 * 2
    assert common.moe_flops(3, 4, 5, "fwd") == 6 * 3 * 4 * 5
    ref = torch.tensor([1.0, float("-inf")])
    assert common.compare("x", ref.clone(), ref, None, dtype=torch.float32)["passed"]
    assert not common.compare("x", torch.tensor([1.1, float("-inf")]), ref, None, dtype=torch.float32)["passed"]
    assert not common.compare("x", torch.tensor([float("nan"), float("-inf")]), ref, None,
                              dtype=torch.float32)["passed"]


# ----------------------------------------------------------------------------- targets and README snippet


def _fake_gpu_results(flex_ms: float) -> dict:
    env = {"device": "NVIDIA H100 80GB HBM3", "device_kind": "cuda", "device_slug": "nvidia-h100-80gb-hbm3",
           "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8", "date": "2026-11-25T20:00:00Z",
           "git_commit": "abc123", "git_dirty": False, "timings_meaningful": True, "quick": False}
    cid = "T=16384 W=1024 D=128 summaries=0"
    case = {"T": 16384, "W": 1024, "D": 128, "summaries": False}
    recs = []
    for meth, ms in (("ours", 1.0), ("flex", flex_ms)):
        for mode, f in (("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)):
            recs.append({"family": "attention", "case_id": cid, "case": case, "method": meth, "mode": mode,
                         "status": "ok", "ms": ms * f, "tflops": 100.0, "peak_mib": 10.0})
    return {"schema": common.SCHEMA, "env": env, "elapsed_s": 1.0, "settings": {"families": ["attention"]},
            "families": {"attention": {"status": "ok", "kernel_available": True}},
            "correctness": [{"family": "attention", "case_id": cid, "op": "swa_attention", "check": "out",
                             "passed": True, "max_err": 0.0, "tol": 1.0}],
            "records": recs}


def test_targets_pass_and_miss_on_a_gpu_result():
    fast = {t["target"]: t["status"] for t in report.evaluate_targets(_fake_gpu_results(flex_ms=1.5))}
    slow = {t["target"]: t["status"] for t in report.evaluate_targets(_fake_gpu_results(flex_ms=1.1))}
    assert fast["fwd >= 1.3x FlexAttention"] == "PASS" and fast["bwd >= 1.0x FlexAttention"] == "PASS"
    assert slow["fwd >= 1.3x FlexAttention"] == "MISS" and slow["bwd >= 1.0x FlexAttention"] == "PASS"
    res = _fake_gpu_results(flex_ms=1.5)
    res["correctness"][0]["passed"] = False  # a wrong kernel: no speed-ups, no PASS
    assert all(t["status"] == "N/A" for t in report.evaluate_targets(res))
    md = report.markdown(_fake_gpu_results(flex_ms=1.5))
    assert "1.5x" in md and "NOT meaningful" not in md


def test_moe_targets_follow_the_issue_wording():
    # 60% of the dense GEMM is a forward+backward target only; routing + dispatch is judged at
    # N=16384 only (a --quick run stops at 4096 and must not claim it)
    res = _fake_gpu_results(flex_ms=1.5)
    for n in (4096, 16384):
        cid = f"fine N={n}"
        case = {"N": n, "shape": "fine"}
        for meth, mode, ms, tf in (("ours", "fwd", 1.0, 50.0), ("ours", "fwd+bwd", 3.0, 70.0),
                                   ("grouped_mm", "fwd+bwd", 3.9, 50.0), ("dense_gemm", "fwd", 0.5, 100.0),
                                   ("dense_gemm", "fwd+bwd", 1.5, 100.0), ("layer", "fwd", 1.2, None),
                                   ("route", "fwd", 0.05, None), ("dispatch", "fwd", 0.03, None)):
            res["records"].append({"family": "moe", "case_id": cid, "case": case, "method": meth, "mode": mode,
                                   "status": "ok", "ms": ms, "tflops": tf, "peak_mib": 1.0})
    got = [(t["target"], t["case"], t["status"]) for t in report.evaluate_targets(res) if t["family"] == "moe"]
    assert ("fwd+bwd >= 1.2x torch._grouped_mm", "fine N=4096", "PASS") in got
    assert ("fwd+bwd >= 60% of equal-FLOP dense GEMM TFLOP/s", "fine N=16384", "PASS") in got
    assert not any(t.startswith("fwd >= 60%") for t, _, _ in got)
    routing = [(c, st) for t, c, st in got if t.startswith("routing + dispatch")]
    assert routing == [("fine N=16384", "PASS")]


def test_varlen_report_on_a_gpu_result(tmp_path):
    res = _fake_gpu_results(flex_ms=1.5)
    c = bench_varlen.cases(False, torch.device("cuda"))[0]
    res["families"]["varlen"] = {"status": "ok", "kernel_available": True}
    res["correctness"].append({"family": "varlen", "case_id": c.id, "op": "swa_attention_varlen", "check": "out",
                               "passed": True, "max_err": 0.0, "tol": 1.0})
    for meth, ms in (("ours_varlen", 1.0), ("ours_padded", 2.5), ("flex_document", 1.6)):
        for mode, f in (("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)):
            rec = {"family": "varlen", "case_id": c.id, "case": c.params(), "method": meth, "mode": mode,
                   "status": "ok", "ms": ms * f, "tflops": 100.0 / ms, "peak_mib": 10.0, "pairs": c.pairs()}
            if meth == "ours_padded":
                rec["padded_pairs"] = c.padded_pairs()
            res["records"].append(rec)
    md = report.markdown(res)
    assert "## Attention, packed sequences" in md and "2.5x" in md and "1.6x" in md
    assert f"{c.padded_pairs() / c.pairs():.2f}x the useful pairs" in md
    assert not any(t["family"] == "varlen" for t in report.evaluate_targets(res))  # no varlen target
    res["targets"] = report.evaluate_targets(res)
    (tmp_path / "nvidia-h100-2026-11-25.json").write_text(json.dumps(res))
    snippet = report.latest_snippet(str(tmp_path), include_uncommitted=True)
    assert "| varlen fwd+bwd 64k tokens in 11 sequences + summaries |" in snippet
    assert "2.50x vs padded, 1.60x vs flex" in snippet
    paths = report.make_plots(res, str(tmp_path), "gpu")
    if paths:
        assert os.path.join(str(tmp_path), "gpu-varlen.png") in paths


def test_latest_snippet_without_and_with_a_gpu_run(tmp_path):
    assert "No GPU benchmark run has been committed yet" in report.latest_snippet(str(tmp_path))
    res = _fake_gpu_results(flex_ms=1.5)
    res["targets"] = report.evaluate_targets(res)
    (tmp_path / "nvidia-h100-2026-11-25.json").write_text(json.dumps(res))
    cpu = dict(res, env=dict(res["env"], device_kind="cpu", date="2027-01-01T00:00:00Z"))
    (tmp_path / "cpu-2027-01-01.json").write_text(json.dumps(cpu))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nend\n")
    written = report.write_latest(str(tmp_path), readme=str(readme), include_uncommitted=True)
    latest = (tmp_path / "LATEST.md").read_text()
    assert "NVIDIA H100" in latest and "torch 2.11.0" in latest and "triton 3.6.0" in latest
    assert "2026-11-25" in latest and "PASS" in latest  # the GPU run, not the newer CPU one
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    assert "NVIDIA H100" in text and len(written) == 2
    assert not math.isnan(len(latest))
