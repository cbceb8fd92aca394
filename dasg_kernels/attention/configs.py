"""Tile sizes: one pinned config under the interpreter, a small autotune space on CUDA.

The choice is made once, when this module is imported, because Triton itself reads
``TRITON_INTERPRET`` when a kernel is decorated. Under the interpreter
``@triton.autotune`` with several configs fails ("0 active drivers"), so every kernel
runs with the pinned block sizes below and the launcher passes them explicitly.
On CUDA the kernels are wrapped in ``triton.autotune`` keyed on the head dim, a
bucket of the window width, the summary flags and (implicitly, Triton adds it) the
dtype of every tensor argument. Nothing here touches ``triton.runtime.driver``.

The CUDA config lists are chosen for Hopper (H100/H200) from offline compiles (register
and spill counts); no GPU timing backs them.
"""
from __future__ import annotations


import triton

from dasg_kernels.backend import autotune_enabled, interpreter_enabled

INTERPRET: bool = interpreter_enabled()


# Pinned block sizes under the interpreter (small tiles keep numpy work per program low).
PINNED: dict[str, dict[str, int]] = {
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 32},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 32},
    "dq": {"BLOCK_M": 32, "BLOCK_N": 32},
}

# Fixed (not tuned) sizes of the small memory-bound kernels.
PREPROCESS_BLOCK_M = 32 if INTERPRET else 64
POOL_BLOCK_G = 16 if INTERPRET else 32

# Backward of the summaries: query rows per program of the summary dk/dv kernel (a
# multiple of every BLOCK_M), and a cap on splits * num_groups (the fp32 partial sums
# take splits * B * num_groups * Hkv * D * 4 bytes each for dk and dv).
SUMMARY_SPLIT_ROWS = 512
SUMMARY_SPLIT_BUDGET = 8192


#: q heads the dk/dv kernel unrolls in its loop over a GQA group: the whole group when
#: it has at most this many heads, else none (a runtime loop over the heads).
#: Offline sm_90 compiles (Triton 3.9, bf16, D=128, 32x64 tiles, 8 warps; stack bytes
#: spilled / compile seconds) for group size G unrolled fully vs looped:
#:   G=2: 8 / 4.2 s vs 48 / 1.7 s      G=3: 56 / 5.4 s vs 48 / 1.7 s
#:   G=4: 48 / 17.6 s vs 48 / 2.3 s    G=8: 88 / 31.4 s vs 48 / 2.0 s
#:   G=16: unrolled did not finish in 295 CPU-seconds;  G=32 looped: 48 / 1.8 s
#: (partial unrolls of 2 or 4 heads per step spilled as much or more). Run time is not
#: measured.
MAX_HEADS_UNROLLED = 2


def heads_unrolled(kv_group: int) -> int:
    """How many of the ``kv_group`` q heads of a kv head the dk/dv kernel unrolls per loop step."""
    return kv_group if kv_group <= MAX_HEADS_UNROLLED else 1


#: Largest head dim whose dk and dv fp32 accumulators the dk/dv kernel keeps together.
#: A wgmma dot of M = BLOCK_N rows on W warps needs BLOCK_N >= 16 * W (else warps duplicate
#: the tile), so the two [BLOCK_N, D] fp32 accumulators take at least 2 * 16 * D * 4 / 32
#: = 4 * D bytes per thread: 1 KB (all 255 registers) at D = 256. Above this dim dv and dk
#: are computed in two passes (``DKDV_PASS`` 1, then 2), each with one accumulator: one
#: more Q K^T per tile (5 matmuls instead of 4) instead of spills in the main loop.
MAX_FUSED_DKDV_DIM = 128


def dkdv_passes(d: int, dv: int) -> tuple[int, ...]:
    """The dk/dv kernel's passes for head dims ``d`` (q/k) and ``dv``: ``(0,)`` = both
    gradients in one pass, ``(1, 2)`` = dv, then dk."""
    return (0,) if max(d, dv) <= MAX_FUSED_DKDV_DIM else (1, 2)


def _cfg(bm: int, bn: int, warps: int, stages: int, pipeline: bool | None = None) -> triton.Config:
    """A launch config; ``pipeline`` (forward only) sets its ``PIPELINE`` meta-parameter."""
    kw = {"BLOCK_M": bm, "BLOCK_N": bn}
    if pipeline is not None:
        kw["PIPELINE"] = pipeline
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# (config, head-dim class it is meant for: 64 = D <= 64, 128 = D in {96, 128}, 256).
# Chosen from offline sm_90a compiles (Triton 3.9, checked with 3.6; `python -m
# benchmarks.offline.fwd_overlap_experiment`, benchmarks/results/fwd-overlap.md): every kept
# config issues wgmma with no warp computing another's tile and no spill inside the main
# loop. The rule behind "no duplicated work": a dot of M rows on W warps needs M >= 16 * W
# (a 64-row tile on 8 warps is laid out [8, 1]: both warpgroups compute the same tile).
# The M of a dot is BLOCK_M in the forward and dq, BLOCK_N (the keys) in dk/dv. Each list
# is ordered by the compile report's calibrated prediction (unmasked tiles on the path
# that skips the mask); their speed is not measured on a GPU. Comments: calibrated /
# serialised / overlapped TFLOP/s (bf16, T=32k W=2048 causal with summaries) and CTAs per
# SM; "U": the softmax runs while a wgmma is in flight, an overlap no calibration point
# covers (the forward's pipelined loop: all its configs), so only the bounds hold.
# Forward, dropped: 128x128 w8 s2 and 64x128 w4 s2 at D=128 (17 spill instructions per
# iteration in the masked branch with Triton 3.9; clean with 3.6), 128x64 w8 s2 at D=256
# (256 KB of shared memory), 64x64 w4 s2 at D=256 (13 spill instructions).
# Second in each class, the best config whose loop is not software-pipelined
# (``PIPELINE=False``: the softmax waits for its scores): the schedule the calibration
# covers, so that on a GPU the autotuner measures the pipelined one against it and keeps
# the faster; the first config (what ``DASG_AUTOTUNE=0`` runs) stays the pipelined one.
_FWD_SPACE = [
    (_cfg(64, 64, 4, 2), 64),    # 456 / 279 / 579, 3 CTAs
    (_cfg(64, 64, 4, 2, pipeline=False), 64),  # 341 / 286 / 594, 4 (calibrated: no U)
    (_cfg(64, 64, 4, 3), 64),    # 454 / 278 / 578, 3
    (_cfg(128, 32, 4, 3), 64),   # 444 / 262 / 558, 2
    (_cfg(64, 128, 4, 2), 64),   # 441 / 283 / 538, 2
    (_cfg(128, 64, 8, 2), 64),   # 431 / 275 / 431, 1
    (_cfg(64, 64, 4, 2), 128),   # 511 / 371 / 595, 2 (114.7 KB of shared memory: 2 CTAs just fit)
    (_cfg(64, 64, 4, 2, pipeline=False), 128),  # 429 / 377 / 597, 2 (calibrated: no U)
    (_cfg(64, 64, 4, 3), 128),   # 492 / 370 / 492, 1
    (_cfg(128, 64, 8, 2), 128),  # 488 / 364 / 488, 1
    (_cfg(64, 32, 4, 2), 128),   # 487 / 332 / 613, 3
    (_cfg(128, 64, 8, 3), 128),  # 486 / 365 / 486, 1
    (_cfg(64, 32, 4, 2), 256),   # 493 / 385 / 493, 1
    (_cfg(64, 32, 4, 2, pipeline=False), 256),  # 465 / 397 / 618, 2 (calibrated: no U)
    (_cfg(64, 32, 4, 3), 256),   # 493 / 384 / 493, 1
    (_cfg(128, 32, 8, 2), 256),  # 483 / 377 / 483, 1
]
# dk/dv and dq (one loop per key/query source, TMA loads; see bwd.py), same columns. dk/dv
# spills to the stack outside its main loop, in the GQA head loop (up to 316 bytes, D=256).
_DKDV_SPACE = [  # also the summary dk/dv launch; GQA heads looped (configs.heads_unrolled)
    (_cfg(64, 64, 4, 2), 64),    # 484 / 399 / 634, 2
    (_cfg(32, 64, 4, 2), 64),    # 468 / 357 / 637, 3
    (_cfg(64, 128, 8, 2), 64),   # 438 / 382 / 438, 1
    (_cfg(32, 128, 8, 2), 64),   # 422 / 346 / 422, 1
    (_cfg(32, 64, 4, 2), 128),   # 537 / 441 / 638, 2 (summary launch: 264; 32x128 w8 s2's summary launch: 186)
    (_cfg(32, 64, 4, 3), 128),   # 536 / 439 / 637, 2
    (_cfg(16, 64, 4, 2), 128),   # 514 / 383 / 638, 2
    (_cfg(32, 128, 8, 2), 128),  # 498 / 425 / 498, 1
    # (64x128 w8 s2: 512, but its summary launch spills 2 instructions per iteration; 64x64 w4 s2:
    # 549, but its summary launch spills too)
    # D > 128 runs two passes (dkdv_passes: dv, then dk; fused, every D=256 config spilled in
    # its main loop). Pass 1 ; pass 2:
    (_cfg(32, 64, 4, 2), 256),   # 556 / 468 / 637, 2 ; 567 / 461 / 567 U, 1
    (_cfg(16, 64, 4, 2), 256),   # 532 / 412 / 637, 2 ; 554 / 395 / 638 U, 2
    (_cfg(32, 128, 8, 2), 256),  # 520 / 451 / 520, 1 ; 551 / 446 / 551 U, 1 (197 KB shared memory)
]
_DQ_SPACE = [
    (_cfg(64, 64, 4, 2), 64),    # 423 / 365 / 604, 3
    (_cfg(64, 32, 4, 2), 64),    # 415 / 335 / 621, 5
    (_cfg(64, 128, 4, 2), 64),   # 409 / 361 / 563, 2
    (_cfg(128, 64, 8, 2), 64),   # 387 / 356 / 387, 1
    (_cfg(64, 64, 4, 2), 128),   # 503 / 451 / 609, 2
    (_cfg(64, 32, 4, 2), 128),   # 495 / 417 / 622, 3
    (_cfg(64, 32, 4, 3), 128),   # 492 / 417 / 614, 2
    (_cfg(64, 64, 4, 3), 128),   # 479 / 448 / 479, 1
    (_cfg(128, 64, 8, 2), 128),  # 471 / 440 / 471, 1
    (_cfg(128, 32, 8, 2), 128),  # 461 / 408 / 461, 1
    (_cfg(64, 32, 4, 2), 256),   # 531 / 467 / 531, 1
    (_cfg(128, 32, 8, 2), 256),  # 519 / 454 / 519, 1
    # (64x64 w4 s2: 540, clean with 3.9; with 3.6 its summary loop spills 8 instructions)
]
SPACES = {"fwd": _FWD_SPACE, "dkdv": _DKDV_SPACE, "dq": _DQ_SPACE}

# fp32 inputs use exact ("ieee") FMA dots, not tensor cores (a test / reference dtype, not a
# fast path): small tiles, per head-dim class, for all three kernels. Offline sm_90 compiles
# (Triton 3.9; bytes of stack spilled per thread, compile time of one variant):
#   D=128  64x32 4 warps: fwd 8208 B 29 s, dq 11776 B 23 s, dk/dv 15816 B 73 s
#          32x32 8 warps: fwd  384 B  5 s, dq   352 B  4 s, dk/dv   616 B 19 s
#          16x32 8 warps: fwd    0 B  3 s, dq     8 B  3 s, dk/dv    40 B  7 s
#   D=256  64x32 4 warps: fwd 10864 B 60 s, dq 12728 B 60 s (200 KB of shared memory)
#          16x32 8 warps: fwd    0 B  4 s, dq     0 B  5 s, dk/dv   144 B 15 s
# (D=64: 32x32 with 4 warps spills nothing.)
_FP32_CONFIGS = {
    64: [_cfg(32, 32, 4, 2)],
    128: [_cfg(16, 32, 8, 2), _cfg(32, 32, 8, 2)],
    256: [_cfg(16, 32, 8, 2)],
}

# Autotune key: the kernels take these as (otherwise unused or constexpr) arguments.
# Triton 3.9 rejects key names that are not arguments of the kernel, so it is per kernel.
TUNE_KEY = ["HEAD_DIM", "HEAD_DV", "WIN_KEY", "SUM_BEFORE", "SUM_AFTER"]


def tune_key(name: str) -> list[str]:
    """The autotune key of kernel ``name`` (``"fwd"``, ``"dkdv"``, ``"dq"``).

    dk/dv: the summary launch and the local launch of the same kernel differ only by
    ``IS_SUMMARY``; without it in the key (fp32 inputs, where every pointer argument has
    the same dtype in both launches) the local launch would reuse the config tuned for
    the summary one.
    """
    return TUNE_KEY + {"fwd": ["PACK_GQA"], "dkdv": ["IS_SUMMARY", "DKDV_PASS"]}.get(name, [])


def _pruner(space):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d = max(args.get("HEAD_DIM", 128), args.get("HEAD_DV", 0))
        # Keep the configs meant for this head dim's size class (64 / 128 / 256; MLA's
        # 192 / 128 takes the larger one's).
        cls = 64 if d <= 64 else (128 if d <= 128 else 256)
        keep = [c for c, dclass in space if dclass == cls]
        q = args.get("Q")
        if getattr(q, "dtype", None) is not None and q.dtype.itemsize == 4:
            keep = list(_FP32_CONFIGS[cls])
        # DASG_AUTOTUNE=0 (see dasg_kernels.backend.autotune_enabled): the first config only
        return keep if autotune_enabled() else keep[:1]

    return prune


def tuned(name: str):
    """Decorator: autotune the kernel on CUDA; leave it alone under the interpreter."""

    def wrap(fn):
        return fn if INTERPRET else autotuner(name, fn)

    return wrap


def autotuner(name: str, fn):
    """Wrap ``fn`` in ``triton.autotune`` with the config space of kernel ``name``."""
    space = SPACES[name]
    return triton.autotune(
        configs=[c for c, _ in space],
        key=tune_key(name),
        prune_configs_by={"early_config_prune": _pruner(space)},
    )(fn)


def untuned(kernel):
    """The plain ``JITFunction`` under an autotuner (to launch it with an explicit config)."""
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def decode_config(rows: int, head_dim: int) -> dict[str, int]:
    """Fixed launch config for decode (``rows <= 64`` packed query rows): no autotuning
    inside a generation loop. Sized for a memory-bound launch (small M, 4 warps); not
    measured on a GPU."""
    return {"BLOCK_M": min(64, max(16, triton.next_power_of_2(rows))), "BLOCK_N": 64 if head_dim <= 128 else 32,
            "num_warps": 4, "num_stages": 2}


def launch_meta(name: str) -> dict[str, int]:
    """Keyword arguments the launcher passes: the pinned block sizes, or none when tuned."""
    return dict(PINNED[name]) if INTERPRET else {}


def win_key(left: int, right: int, t_k: int) -> int:
    """Autotune bucket of the window width (power of two, capped)."""
    w = min(left + right + 1, t_k)
    return min(triton.next_power_of_2(max(w, 1)), 1 << 16)
