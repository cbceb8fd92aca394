"""The compile report's split of a loop body at its masking branch, and the boundary tiles.

The attention kernels run one loop per source of key (or query) tiles; inside it a
conditional forward branch jumps over the masking code on the tiles every row of the
block sees whole. :func:`offline_compile.skipped_regions` finds that region in the SASS,
:func:`offline_compile.loop_stats` counts the path without it, and
:func:`speed_model.predict` charges the region to the masked iterations only, which the
work model counts from the kernels' loop bounds (checked here against a brute-force count
from the visibility rule). No compiler needed: synthetic SASS and small shapes.
"""
from __future__ import annotations

import pytest

from benchmarks.offline.offline_compile import Compiled, analyse, loop_stats, parse_sass, skipped_regions
from benchmarks.offline.speed_model import predict
from benchmarks.offline.work_model import (AttnShape, Work, attn_kv_iters, attn_q_iters,
                                          attn_summary_kv_iters)

# One loop (0x0000-0x00d0): the scores' wgmma and its wait, a conditional forward branch
# over the masking code (0x0040-0x0080: 5 instructions, one MUFU, scores set to -inf), the softmax, the second
# wgmma, a jump out to an mbarrier-wait stub (not a region: its target is outside the loop)
# and the back edge.
LOOP = [
    "/*0000*/ WARPGROUP.ARRIVE ;",
    "/*0010*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;",
    "/*0020*/ WARPGROUP.DEPBAR.LE gsb0, 0x0 ;",
    "/*0030*/ @!P6 BRA P5, 0x90 ;",
    "/*0040*/ ISETP.GT.U32.AND P5, PT, R13, R136, PT ;",
    "/*0050*/ FSEL R117, R117, -INF , !P5 ;",
    "/*0060*/ MUFU.RCP R168, R168 ;",
    "/*0070*/ ISETP.GT.U32.AND P5, PT, R10, R23, PT ;",
    "/*0080*/ FSEL R119, R119, -INF , !P5 ;",
    "/*0090*/ MUFU.EX2 R3, R117 ;",
    "/*00a0*/ FADD R5, R3, R119 ;",
    "/*00b0*/ HGMMA.64x64x16.F32.BF16 R40, R8, gdesc[UR8], R40, gsb0 ;",
    "/*00c0*/ @!P4 BRA 0x100 ;",
    "/*00d0*/ @P0 BRA 0x0 ;",
    "/*00e0*/ EXIT ;",
    "/*00f0*/ BRA 0xf0 ;",
    "/*0100*/ SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [UR10+0x10000], R10 ;",
]


def _body(lines=LOOP):
    return parse_sass("\n".join(lines))[:14]  # the loop: 0x0000-0x00d0


def test_masking_region_split():
    """The region a conditional forward branch skips is counted apart from the path around it."""
    body = _body()
    assert skipped_regions(body) == [(4, 8)]
    st = loop_stats(body, num_warps=4)
    assert st["instrs"] == 14 and st["mufu"] == 2
    assert st["unmasked_instrs"] == 9 and st["unmasked_mufu"] == 1
    assert st["skipped_regions"] == [[0x40, 0x80]]
    # in flight: the branches and WARPGROUP.ARRIVE while the PV group is pending across the
    # back edge; the masking code runs after the full wait: exposed, on both paths
    assert st["inflight_instrs"] == st["unmasked_inflight_instrs"] == 3
    assert st["inflight_mufu"] == st["unmasked_inflight_mufu"] == 0


@pytest.mark.parametrize("line", [
    "/*0030*/ BRA 0x90 ;",                  # unconditional: no path runs the region
    "/*0030*/ @!P6 BRA P5, 0x120 ;",        # target outside the loop
    "/*0030*/ @P6 BRA 0x20 ;",              # backward: an inner loop, not a region
    "/*0060*/ LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;",  # a guarded prefetch, not masking
    "/*0060*/ SYNCS.ARRIVE.TRANS64 RZ, [UR33+0x10100], R20 ;",
])
def test_not_a_masking_region(line):
    body = _body([line if ln[:8] == line[:8] else ln for ln in LOOP])
    assert skipped_regions(body) == []
    st = loop_stats(body, num_warps=4)
    assert st["unmasked_instrs"] == st["instrs"] and st["unmasked_mufu"] == st["mufu"]


def test_region_without_minus_inf_is_kept():
    """Guarded code that masks no score (e.g. a rescale skipped while the row max holds) runs
    on iterations the loop bounds do not count: every iteration is charged for it."""
    body = _body([ln.replace("-INF", "RZ") for ln in LOOP])
    assert skipped_regions(body) == []


def test_region_with_tensor_work_is_kept():
    """A branch over tensor-core work is not masking code: every iteration is charged for it."""
    lines = list(LOOP)
    lines[4] = "/*0040*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;"
    assert skipped_regions(_body(lines)) == []


def test_analyse_and_predict_charge_region_to_masked_tiles():
    """``analyse`` reports both paths; ``predict`` charges unmasked iterations the short one."""
    c = Compiled("k", "sm_90a", 4, 2, 1024, "\n".join(LOOP), "", "", "REG:128 STACK:0")
    rec = analyse(c)
    assert (rec["instrs_per_iter"], rec["unmasked_instrs_per_iter"], rec["masking_instrs_per_iter"]) == (14, 9, 5)
    assert (rec["mufu_per_iter"], rec["unmasked_mufu_per_iter"], rec["masking_mufu_per_iter"]) == (2, 1, 1)
    assert rec["masking_regions"] == ["0x40-0x80"]

    def ms(full, masked, r=rec):
        return predict(r, Work("s", full, masked, 1e12, 0.0))["compute_ms"]

    no_region = analyse(Compiled("k", "sm_90a", 4, 2, 1024, "\n".join(LOOP[:4] + LOOP[9:]), "", "", "REG:128"))
    assert ms(10 ** 6, 0) == pytest.approx(ms(10 ** 6, 0, no_region))  # interior tiles skip the mask
    assert ms(0, 10 ** 6) > ms(10 ** 6, 0)                             # boundary tiles run it
    whole = dict(rec, **{f"unmasked_{k}_per_iter": rec[f"{k}_per_iter"]
                         for k in ("instrs", "mufu", "inflight_instrs", "inflight_mufu")})
    assert ms(0, 10 ** 6) == pytest.approx(ms(10 ** 6, 0, whole))
    # a record from before the split (no unmasked_* fields) is charged the whole body
    old = {k: v for k, v in rec.items() if not k.startswith(("unmasked_", "masking_"))}
    assert ms(10 ** 6, 0, old) == pytest.approx(ms(10 ** 6, 0, whole))


# --------------------------------------------------------------------------- boundary tiles


def _brute(n_rows: int, n_cols: int, row_block: int, col_block: int, sees) -> tuple[int, int]:
    """(unmasked, masked) column tiles over all row blocks: a tile with some visible pair is
    visited; unmasked when every (real row, column) pair of it is visible (a column past
    ``n_cols`` is never visible)."""
    full = masked = 0
    for r0 in range(0, n_rows, row_block):
        rows = range(r0, min(r0 + row_block, n_rows))
        for c0 in range(0, n_cols, col_block):
            vis = [sees(i, j) and j < n_cols for i in rows for j in range(c0, c0 + col_block)]
            if all(vis):
                full += 1
            elif any(vis):
                masked += 1
    return full, masked


SHAPES = [(100, 19, 16, 8), (128, 31, 16, 16), (97, 40, 8, 16), (64, 63, 32, 16), (50, 5, 8, 8), (72, 0, 16, 8)]


@pytest.mark.parametrize("t,left,bm,bn", SHAPES)
def test_query_block_boundary_tiles(t, left, bm, bn):
    """fwd / dq: per query block, the key tiles with a partially visible window are the
    masked ones (ceil((full_lo - lo)/BN) + ceil((hi - full_hi)/BN)), the rest unmasked."""
    s = AttnShape(b=1, t=t, hq=1, hkv=1, left=left, summaries=False)
    assert attn_q_iters(s, bm, bn) == _brute(t, t, bm, bn, lambda i, j: i - left <= j <= i)


@pytest.mark.parametrize("t,left,bm,bn", SHAPES)
def test_key_block_boundary_tiles(t, left, bm, bn):
    """dk/dv: per key block, the query tiles (rows past T never visible) likewise."""
    s = AttnShape(b=1, t=t, hq=1, hkv=1, left=left, summaries=False)
    assert attn_kv_iters(s, bm, bn) == _brute(t, t, bn, bm, lambda j, i: i - left <= j <= i and i < t)


@pytest.mark.parametrize("t,left,g,bm,bn", [(100, 19, 8, 16, 8), (128, 15, 4, 16, 16), (97, 7, 5, 8, 16)])
def test_summary_boundary_tiles(t, left, g, bm, bn):
    """Summary keys: query ``i`` sees group ``s`` iff ``s < (i - left) // G`` (causal): the fwd /
    dq summary tiles add to the local ones; the summary dk/dv loop's query tiles."""
    ng = -(-t // g)
    sees = lambda i, s: s < max(i - left, 0) // g  # noqa: E731
    s = AttnShape(b=1, t=t, hq=1, hkv=1, left=left, g=g, summaries=True)
    local = _brute(t, t, bm, bn, lambda i, j: i - left <= j <= i)
    summ = _brute(t, ng, bm, bn, sees)
    assert attn_q_iters(s, bm, bn) == (local[0] + summ[0], local[1] + summ[1])
    assert attn_summary_kv_iters(s, bm, bn) == _brute(ng, t, bn, bm, lambda gi, i: sees(i, gi) and i < t)
