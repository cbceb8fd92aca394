"""benchmarks.bench_configs without a GPU: the predictions it reads from the compile report,
the measured-vs-predicted rows and the reading of the pipelined forward's overlap
(synthetic timings; the timing functions themselves need CUDA)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import bench_configs as bc

LABEL = "B=1 T=32768 Hq=32 Hkv=8 left=2047 causal G=256 summaries"


def _rec(config: str, cal: float, ser: float, ovl: float, unc: bool) -> dict:
    return {"kernel": "attn_fwd", "target": "sm_90a", "dtype": "bfloat16", "head_dim": 128, "shape": LABEL,
            "config": config, "useful_tflop": 1.1, "predicted_tflops": cal, "serialised_tflops": ser,
            "overlapped_tflops": ovl, "uncalibrated_overlap": unc}


REPORT = {"meta": {"commit": "abc", "triton": "3.9.0",
                   "targets": [{"id": "attn_bwd", "calibrated_tflops": 359.0, "serialised_tflops": 307.0,
                                "overlapped_tflops": 430.0}]},
          "records": [_rec("64x64 w4 s2", 511.0, 370.0, 595.0, True),
                      _rec("64x64 w4 s2 unpipelined", 429.0, 377.0, 597.0, False),
                      dict(_rec("64x64 w4 s2", 1.0, 1.0, 1.0, False), dtype="float16")]}


def test_schedules_are_the_spaces_configs():
    """The two forward schedules it pins exist in the forward's D=128 space, with the labels
    the compile report gives them."""
    from dasg_kernels.attention import configs

    space = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs.get("PIPELINE", True))
             for c, cls in configs.SPACES["fwd"] if cls == 128]
    for _, cfg in bc.FWD_SCHEDULES:
        assert cfg in space
    assert bc.FWD_SCHEDULES[0][1] == space[0]  # the pipelined one is what DASG_AUTOTUNE=0 runs
    assert [bc.config_text(c) for _, c in bc.FWD_SCHEDULES] == ["64x64 w4 s2", "64x64 w4 s2 unpipelined"]


def test_predictions_read_the_main_shape_bf16_records():
    pred = bc.predictions(REPORT)
    assert set(pred["fwd"]) == {"64x64 w4 s2", "64x64 w4 s2 unpipelined"}
    assert pred["fwd"]["64x64 w4 s2"]["predicted_tflops"] == 511.0  # not the fp16 record
    assert pred["bwd"]["calibrated_tflops"] == 359.0


def test_compare_and_the_overlap_reading():
    pred = bc.predictions(REPORT)
    # 1.1 TFLOP: 2.2 ms = 500 TFLOP/s pipelined, 2.75 ms = 400 unpipelined
    measured = [{"kernel": "attn_fwd", "which": "pipelined", "config": "64x64 w4 s2", "ms": 2.2},
                {"kernel": "attn_fwd", "which": "unpipelined", "config": "64x64 w4 s2 unpipelined", "ms": 2.75},
                {"kernel": "attn_bwd", "which": "first configs", "config": "", "ms": 11.0}]
    rows = bc.compare(measured, pred)
    pipe, base, bwd = rows
    assert pipe["measured_tflops"] == pytest.approx(500.0)
    assert pipe["measured_over_predicted"] == pytest.approx(500.0 / 511.0)
    assert base["measured_tflops"] == pytest.approx(400.0)
    assert bwd["measured_tflops"] == pytest.approx(2.5 * 1.1e3 / 11.0)  # 2.5x the forward's FLOPs
    assert bwd["measured_over_predicted"] == pytest.approx(250.0 / 359.0)
    ov = pipe["overlap"]
    # in time per TFLOP: serialised 1/370, overlapped 1/595, measured 1/500
    assert ov["position"] == pytest.approx((1 / 370 - 1 / 500) / (1 / 370 - 1 / 595))
    # saved 1/400 - 1/500 of the 1/429 - 1/595 the ideal overlap would save
    assert ov["realised_share"] == pytest.approx((1 / 400 - 1 / 500) / (1 / 429 - 1 / 595))
    page = bc.markdown("NVIDIA H100", rows, [{"which": "fwd", "ms": 1.0, "tflops": 600.0}], pred)
    assert bc.markdown("NVIDIA H100", rows, [], pred).endswith("|---|---|---|\n")  # attention only: written first
    assert "| attn_fwd | pipelined 64x64 w4 s2 | 2.200 | 500 | 511 (370 / 595) U | 0.98 |" in page
    assert "realised over the unpipelined schedule: 0.77" in page.replace("\n", " ")


def test_committed_report_has_both_schedules():
    """The committed compile report predicts both schedules the GPU run will measure."""
    path = os.path.join(os.path.dirname(bc.__file__), "results", "compile-sm90a.json")
    with open(path) as f:
        pred = bc.predictions(json.load(f))
    for _, cfg in bc.FWD_SCHEDULES:
        assert bc.config_text(cfg) in pred["fwd"], bc.config_text(cfg)
    assert pred["bwd"]["calibrated_tflops"] > 0  # the backward target's figure
    assert not pred["fwd"]["64x64 w4 s2 unpipelined"]["uncalibrated_overlap"]
    assert pred["fwd"]["64x64 w4 s2"]["uncalibrated_overlap"]


@pytest.mark.parametrize("which", [0, 1])
def test_pin_makes_the_schedule_what_the_pruner_runs(which, monkeypatch):
    """After pinning, the forward's pruner with autotuning off keeps exactly that schedule
    for D=128 (the same tile shape exists in the D=64 class too: it must not be moved)."""
    from dasg_kernels.attention import configs

    space = configs.SPACES["fwd"]
    saved = list(space)
    monkeypatch.setattr(configs, "autotune_enabled", lambda: False)
    try:
        cfg = bc.FWD_SCHEDULES[which][1]
        bc._pin_fwd(cfg)
        kept = configs._pruner(space)([c for c, _ in space], {}, HEAD_DIM=128)
        assert len(kept) == 1
        c = kept[0]
        assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                c.kwargs.get("PIPELINE", True)) == cfg
        assert sorted(map(id, space)) == sorted(map(id, saved))  # reordered, nothing lost
    finally:
        space[:] = saved


def test_default_report_follows_the_triton_version():
    """Predictions come from the report compiled by the Triton that runs (the GPU machines'
    3.6 has its own quick report); importing the module leaves autotuning alone."""
    assert bc.default_report("3.6.0").endswith("compile-sm90a-triton3.6-quick.json")
    assert bc.default_report("3.9.0").endswith("compile-sm90a.json")
    with open(bc.default_report("3.6.0")) as f:
        pred = bc.predictions(json.load(f))
    assert {bc.config_text(c) for _, c in bc.FWD_SCHEDULES} <= set(pred["fwd"]) and pred["bwd"]



def test_import_leaves_autotuning_alone():
    """Importing the module (pytest collects it) must not switch autotuning off for the
    tests after it: only main() pins configs."""
    env = {k: v for k, v in os.environ.items() if k != "DASG_AUTOTUNE"}
    code = "import os, benchmarks.bench_configs; print(os.environ.get('DASG_AUTOTUNE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(bc.__file__)))
    assert out.stdout.strip() == "None"


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="not in the forward's config space"):
        bc._pin_fwd((64, 16, 4, 2, True))
