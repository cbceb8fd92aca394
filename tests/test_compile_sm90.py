"""Offline Hopper compile of the hottest kernels' first configs (no GPU needed).

``python -m benchmarks.compile_report --smoke`` compiles the first autotune config of the
attention forward, dq and dk/dv kernels (bf16, D=128, summaries, GQA) and of the MoE
gate/up and down forward GEMMs for sm_90a with ``triton.compile`` and reads the SASS.
The first config is what ``DASG_AUTOTUNE=0`` runs, so it must use wgmma, must not have
two warpgroups computing the same tile, and must not spill inside its main loop.

It runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces every
``@triton.jit``). It skips only when the installed Triton lacks the NVIDIA tools.
"""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.offline_compile import tools_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    if not tools_available():
        pytest.skip("this Triton ships no NVIDIA ptxas/cuobjdump (offline compile impossible)")
    out = tmp_path_factory.mktemp("compile")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "compile-smoke.json") as f:
        return {r["kernel"]: r for r in json.load(f)}


KERNELS = ("attn_fwd", "attn_dq", "attn_dkdv", "moe_gate_up_fwd", "moe_down_fwd")


def test_every_kernel_compiled(smoke):
    assert set(smoke) == set(KERNELS)


@pytest.mark.parametrize("kernel", KERNELS)
def test_first_config_is_hopper_clean(smoke, kernel):
    r = smoke[kernel]
    assert r["target"] == "sm_90a" and r["config_rank"] == 0
    assert r["wgmma"] > 0 and r["mma_sync"] == 0, f"{kernel} {r['config']}: not on wgmma"
    assert r["mma_per_iter"] > 0, f"{kernel}: no tensor-core instruction found in the main loop"
    assert not r["duplicated"], f"{kernel} {r['config']}: warps duplicate work (x{r['duplication']})"
    assert r["spill_ops_in_main_loop"] == 0, f"{kernel} {r['config']}: spills in the main loop"
    # issue-bound no worse than 1.25x the tensor work of an iteration
    assert r["issue_cycles_per_iter"] <= 1.25 * r["tensor_cycles_per_iter"], r


@pytest.mark.parametrize("kernel", ("attn_fwd", "attn_dq", "moe_gate_up_fwd", "moe_down_fwd"))
def test_first_config_does_not_spill(smoke, kernel):
    assert smoke[kernel]["spill_bytes"] == 0, smoke[kernel]


def test_duplication_reader():
    """A 64-row wgmma tile on 8 warps laid out [8, 1] is computed twice; [4, 2] is not."""
    from benchmarks.offline_compile import duplication

    ir = ('#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], '
          'instrShape = [16, 32, 16]}>\n'
          '%1 = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x128xbf16> * !ttg.memdesc<128x32xbf16> '
          '-> tensor<64x32xf32, #mma>\n')
    assert duplication(ir) == 2
    assert duplication(ir.replace("[8, 1]", "[4, 2]").replace("64x32xf32", "64x64xf32")) == 1
    assert duplication(ir.replace("64x32xf32", "128x32xf32")) == 1


def test_sass_loop_reader():
    """The main loop is the innermost backward-branch range with the most tensor-core work."""
    from benchmarks.offline_compile import loops, loop_stats, parse_sass

    sass = "\n".join([
        "/*0000*/ MOV R1, c[0x0][0x28] ;",
        "/*0010*/ HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24 ;",
        "/*0020*/ MUFU.EX2 R3, R4 ;",
        "/*0030*/ NOP ;",
        "/*0040*/ @P0 BRA 0x10 ;",
        "/*0050*/ EXIT ;",
    ])
    ins = parse_sass(sass)
    assert [op for _, op, _ in ins] == ["MOV", "HGMMA.64x32x16.F32.BF16", "MUFU.EX2", "BRA", "EXIT"]
    (a, b), = loops(ins)
    st = loop_stats(ins[a:b + 1], num_warps=8)
    assert st["instrs"] == 3 and st["mufu"] == 1 and st["mma"] == 1
    assert st["tensor_cycles"] == 2 * 64 * 32 * 16 / 2048 and st["issue_cycles"] == 3 * 8 / 4


def test_in_flight_reader():
    """Instructions after a full wgmma wait are exposed; the ones while a group is pending
    (across the loop's back edge too) are in flight; QGMMA counts at the fp8 rate."""
    from benchmarks.offline_compile import in_flight, loop_stats, parse_sass

    sass = "\n".join([
        "/*0000*/ WARPGROUP.ARRIVE ;",
        "/*0010*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;",
        "/*0020*/ WARPGROUP.DEPBAR.LE gsb0, 0x0 ;",
        "/*0030*/ MUFU.EX2 R3, R4 ;",
        "/*0040*/ FADD R5, R3, R3 ;",
        "/*0050*/ HGMMA.64x64x16.F32.BF16 R40, R8, gdesc[UR8], R40, gsb0 ;",
        "/*0060*/ IADD3 R1, R1, 0x1, RZ ;",
        "/*0070*/ @P0 BRA 0x0 ;",
    ])
    body = parse_sass(sass)
    # in flight: IADD3, BRA, WARPGROUP.ARRIVE (PV group pending across the back edge); exposed: MUFU, FADD
    assert in_flight(body) == (3, 0)
    st = loop_stats(body, num_warps=4)
    assert st["inflight_instrs"] == 3 and st["mufu"] == 1 and st["inflight_mufu"] == 0
    q = parse_sass(sass.replace("HGMMA.64x64x16.F32.BF16", "QGMMA.64x64x32.F32.E4M3.E4M3"))
    assert loop_stats(q, num_warps=4)["tensor_cycles"] == st["tensor_cycles"]  # 2x the FMAs at 2x the rate
    # a wait that keeps one group pending leaves everything in flight
    assert in_flight(parse_sass(sass.replace("gsb0, 0x0", "gsb0, 0x1")))[0] == 5


def test_calibration_reproduces_stored_points():
    """The committed calibration's records, predicted by today's model, give the stored
    figures, and every point is within +-20% of its published figure or a stated miss."""
    from benchmarks import calibrate, compile_report

    with open(os.path.join(ROOT, "benchmarks", "results", "calibration.json")) as f:
        cal = json.load(f)
    assert cal["meta"]["model"] == compile_report.MODEL, "compile_report.MODEL is not the calibrated one"
    assert len(cal["points"]) >= 4 and any(not p["used_for_fit"] for p in cal["points"])
    for p in cal["points"]:
        pred = calibrate.predict_point(cal["records"][p["id"]])["predicted_tflops"]
        assert abs(pred / p["predicted_tflops"] - 1) < 1e-6, p["id"]
        assert p["within_20pct"] == (abs(pred / p["published_tflops"] - 1) <= 0.20)
        assert p["within_20pct"] or "miss" in p["note"].lower(), f"{p['id']}: a miss without its cause"
