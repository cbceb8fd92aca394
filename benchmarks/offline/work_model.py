"""The compile report's work model: what one kernel launch does at a benchmark shape.

Loop iterations (unmasked and masked, counted with the kernels' own loop bounds,
:mod:`dasg_kernels.attention.loop_bounds`: per program, the tiles in ``[lo, full_lo)`` and
``[full_hi, hi)`` are masked, the speed model charges them the loop's masking branch),
useful FLOPs, and HBM bytes (the operand
re-reads the grid order causes, through an LRU model of the L2) of the attention kernels,
flash-linear-attention's forward, and the MoE grouped GEMMs.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from benchmarks.offline.offline_compile import Launch
from benchmarks.offline.speed_model import L2_BYTES, SMS, occupancy
from dasg_kernels.attention.loop_bounds import local_key_range, local_query_range, summary_key_range, summary_query_range

# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class AttnShape:
    b: int = 1
    t: int = 32768
    hq: int = 32
    hkv: int = 8
    left: int = 2047
    g: int = 256
    summaries: bool = True

    @property
    def label(self) -> str:
        return (f"B={self.b} T={self.t} Hq={self.hq} Hkv={self.hkv} left={self.left} causal "
                + (f"G={self.g} summaries" if self.summaries else "no summaries"))


@dataclass(frozen=True)
class MoEShape:
    name: str
    n: int
    d: int
    f: int
    e: int
    k: int

    @property
    def label(self) -> str:
        return f"{self.name} N={self.n} D={self.d} F={self.f} E={self.e} k={self.k}"


ATTN_MAIN = AttnShape()
ATTN_LONG = AttnShape(t=65536, g=256)  # the summary-epilogue target
ATTN_NOSUM = AttnShape(hkv=32, summaries=False)
ATTN_VARLEN = AttnShape(b=4, t=8192)  # 4 packed sequences of 8k (swa_attention_varlen)
#: the forward target's shape without summaries (GQA 32/8): ours beside flash-linear-attention's
#: parallel_attn (window_size = left + 1 keys, no summary keys)
ATTN_PEER = AttnShape(summaries=False)
MOE_SHAPES = (MoEShape("mixtral", 16384, 4096, 14336, 8, 2), MoEShape("deepseek", 16384, 2048, 1408, 64, 6))


# --------------------------------------------------------------------------- the work model
# Iterations follow the kernels' own loop bounds (dasg_kernels.attention.loop_bounds, the host
# copies of the jit functions in attention/common.py): causal, one sequence, no position shift.


def tiles(a: int, b: int, step: int) -> int:
    """Tiles of ``step`` the loop ``for start in range(a, b, step)`` visits (0 when ``b <= a``)."""
    return max(0, -(-(b - a) // step))


def attn_pairs(s: AttnShape) -> tuple[float, float]:
    """(local, summary) visible query-key pairs per head (causal, window ``left``)."""
    t, left = s.t, s.left
    local = sum(min(i, left) + 1 for i in range(t))
    summ = sum(max(i - left, 0) // s.g for i in range(t)) if s.summaries else 0
    return float(local), float(summ)


def attn_q_iters(s: AttnShape, bm: int, bn: int) -> tuple[int, int]:
    """(unmasked, masked) key-tile iterations of every query-block program (fwd and dq)."""
    ng = -(-s.t // s.g)
    full = masked = 0
    for start in range(0, s.t, bm):
        first, last = start, min(start + bm, s.t) - 1
        lo, flo, fhi, hi = local_key_range(first, last, s.left, 0, s.t, bn)
        full += tiles(flo, fhi, bn)
        masked += tiles(lo, flo, bn) + tiles(fhi, hi, bn)
        if s.summaries:
            s_full, b_hi, a_lo = summary_key_range(first, last, s.left, 0, s.g, ng, bn, True, False)
            full += tiles(0, s_full, bn)
            masked += tiles(s_full, b_hi, bn) + tiles(a_lo, ng, bn)
    heads = s.b * s.hq
    return full * heads, masked * heads


def attn_kv_iters(s: AttnShape, bm: int, bn: int) -> tuple[int, int]:
    """(unmasked, masked) query-tile iterations of the local dk/dv programs (all GQA heads)."""
    full = masked = 0
    for start in range(0, s.t, bn):
        first, last = start, min(start + bn, s.t) - 1
        lo, flo, fhi, hi = local_query_range(first, last, s.left, 0, s.t, bm)
        full += tiles(flo, fhi, bm)
        masked += tiles(lo, flo, bm) + tiles(fhi, hi, bm)
    heads = s.b * s.hq
    return full * heads, masked * heads


def attn_summary_kv_iters(s: AttnShape, bm: int, bn: int) -> tuple[int, int]:
    """(unmasked, masked) query-tile iterations of the summary dk/dv programs."""
    ng = -(-s.t // s.g)
    full = masked = 0
    for g0 in range(0, ng, bn):
        g1 = min(g0 + bn, ng) - 1
        a_hi, b_lo, b_full, b_tail = summary_query_range(g0, g1, s.left, 0, s.g, s.t, bm, True, False)
        masked += tiles(0, a_hi, bm) + tiles(b_lo, b_full, bm) + tiles(b_tail, s.t, bm)
        full += tiles(b_full, b_tail, bm)
    heads = s.b * s.hq
    return full * heads, masked * heads


@dataclass
class Work:
    """What one launch does at a benchmark shape: loop iterations, useful FLOPs, HBM bytes."""

    shape: str
    iters_full: float
    iters_masked: float
    flops: float
    hbm_bytes: float
    notes: dict = field(default_factory=dict)
    programs: int = 0  # programs (tiles) of the launch; 0: unknown (no per-tile term)
    uniform: bool = False  # every program runs the same iterations (then: waves of SMS x k)


def attn_bytes(s: AttnShape, d: int, el: int, n_q_tensors: int, n_kv_tensors: int) -> float:
    ng = -(-s.t // s.g) if s.summaries else 0
    q_side = s.b * s.t * s.hq * d * el * n_q_tensors
    kv_side = s.b * s.hq * (s.t + ng) * d * el * n_kv_tensors  # each q head reads its kv head's window
    return float(q_side + kv_side + s.b * s.hq * s.t * 4 * 2)


#: matmuls per tile of the dk/dv kernel: fused (0), the dv pass (1: Q K^T, P^T dO), the dk
#: pass (2: Q K^T, dO V^T, dS^T Q)
DKDV_PASS_MATMULS = {0: 4, 1: 2, 2: 3}


def attn_work(kind: str, s: AttnShape, d: int, el: int, bm: int, bn: int, dkdv_pass: int = 0) -> Work:
    local, summ = attn_pairs(s)
    heads = s.b * s.hq
    if kind in ("fwd", "dq"):
        full, masked = attn_q_iters(s, bm, bn)
        mm = 2 if kind == "fwd" else 3
        flops = 2.0 * mm * d * (local + summ) * heads
        nbytes = attn_bytes(s, d, el, 2 if kind == "fwd" else 3, 2)
    elif kind == "dkdv":
        full, masked = attn_kv_iters(s, bm, bn)
        flops = DKDV_PASS_MATMULS[dkdv_pass] * 2.0 * d * local * heads
        nbytes = attn_bytes(s, d, el, 2, 4)
    else:  # dkdv_summary
        full, masked = attn_summary_kv_iters(s, bm, bn)
        flops = DKDV_PASS_MATMULS[dkdv_pass] * 2.0 * d * summ * heads
        nbytes = attn_bytes(s, d, el, 2, 0)
    progs = -(-s.t // (bm if kind in ("fwd", "dq") else bn)) * s.b * (s.hq if kind in ("fwd", "dq") else s.hkv)
    return Work(s.label, full, masked, flops, nbytes, programs=progs)


def fla_fwd_work(s: AttnShape, d: int, el: int, bt: int, bs: int) -> Work:
    """flash-linear-attention ``parallel_attn_fwd_kernel`` (fla-core 0.6.0) at ``s``: per
    ``bt``-row query block, its first loop streams the ``bs``-key tiles from
    ``max((start - W + 1) // bs * bs, 0)`` up to the block's first row (window-masked by a
    ``tl.where`` on every tile), its second loop the block's own diagonal tiles (causal mask)."""
    if s.summaries:
        raise ValueError("fla_fwd_work: parallel_attn has no summary keys")
    w = s.left + 1
    full = diag = 0
    for i_t in range(-(-s.t // bt)):
        start = i_t * bt
        first = max((start - w + 1) // bs * bs, 0)
        full += tiles(first, start, bs)
        diag += tiles(start, min(start + bt, s.t), bs)
    heads = s.b * s.hq
    local, _ = attn_pairs(s)
    return Work(s.label, full * heads, diag * heads, 4.0 * d * local * heads, attn_bytes(s, d, el, 2, 2),
                programs=-(-s.t // bt) * heads)


def launch_order(n_m: int, n_n: int, group_m: int | None):
    """(m, n) of every program in launch order: M fastest (a 2-D grid with the M tile on
    axis 0), or grouped by ``group_m`` M tiles (the matmul tutorial's swizzle)."""
    if not group_m:
        for n in range(n_n):
            for m in range(n_m):
                yield m, n
        return
    for base in range(0, n_m, group_m):
        size = min(group_m, n_m - base)
        for n in range(n_n):
            for m in range(base, base + size):
                yield m, n




class L2:
    """L2 at operand-panel granularity. Programs resident at once (a wave) stream their
    K loops side by side, so a panel two of them read comes from HBM once; across waves
    a panel survives in an LRU of ``L2_BYTES`` (an approximation: no set conflicts, no
    partition split)."""

    def __init__(self, capacity: float = L2_BYTES):
        self.capacity, self.used = capacity, 0.0
        self.lru: OrderedDict = OrderedDict()

    def wave(self, panels: dict) -> float:
        """Read one wave's distinct panels (key -> bytes); returns the bytes from HBM."""
        missed = sum(nbytes for key, nbytes in panels.items() if key not in self.lru)
        for key, nbytes in panels.items():
            if key in self.lru:
                self.lru.move_to_end(key)
            else:
                self.lru[key] = nbytes
                self.used += nbytes
        while self.used > self.capacity and self.lru:
            _, old = self.lru.popitem(last=False)
            self.used -= old
        return missed


def hbm_reads(programs, wave: int) -> tuple[float, dict]:
    """HBM bytes of ``programs`` (each a list of ``(operand, key, bytes)`` panels, in
    launch order) ``wave`` at a time, and the bytes read per operand."""
    l2, total, by_op = L2(), 0.0, {}
    programs = list(programs)
    for w0 in range(0, len(programs), wave):
        panels: dict = {}
        for prog in programs[w0:w0 + wave]:
            for op, key, nbytes in prog:
                panels[(op, key)] = nbytes
        for op in dict.fromkeys(op for op, _ in panels):  # first-seen order: a set's would vary per process
            got = l2.wave({k: v for k, v in panels.items() if k[0] == op})
            by_op[op] = by_op.get(op, 0.0) + got
            total += got
    return total, by_op


def rowtile_hbm(tile_expert: list[int], n_cols: int, bm: int, bn: int, k: int, el: int, wave: int,
                group_m: int | None, dual: bool) -> tuple[float, float, float]:
    """Bytes the grouped row-tile GEMMs read from HBM (launch order, :class:`L2`), and how
    many times over the A and B operands are read (1 = once)."""
    a_tile, b_tile = bm * k * el, bn * k * el * (2 if dual else 1)
    progs = ([("a", m, a_tile), ("b", (tile_expert[m], n), b_tile)]
             for m, n in launch_order(len(tile_expert), n_cols, group_m))
    total, by_op = hbm_reads(progs, wave)
    b_once = len(set(tile_expert)) * n_cols * b_tile
    return total, by_op["a"] / (len(tile_expert) * a_tile), by_op["b"] / b_once


def moe_rows(s: MoEShape, bm: int) -> list[int]:
    """``tile_expert`` of a uniform routing (``N*k/E`` rows per expert, padded to ``bm``)."""
    per = s.n * s.k // s.e
    tiles = []
    for e in range(s.e):
        tiles += [e] * -(-per // bm)
    return tiles


#: kernel -> (output columns, K of the GEMM, dual B operand) for a shape (D, F)
_ROWTILE = {
    "_gate_up_fwd_kernel": (lambda d, f: (f, d, True)),
    "_down_fwd_kernel": (lambda d, f: (d, f, False)),
    "_down_bwd_kernel": (lambda d, f: (f, d, False)),
    "_gate_up_bwd_dx_kernel": (lambda d, f: (d, 2 * f, False)),
}
_DW = {"_dw_down_kernel": (lambda d, f: (d, f)), "_dw_gate_up_kernel": (lambda d, f: (2 * f, d))}


def group_m(launch: Launch, config) -> int | None:
    kw = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    for name in ("GROUP_M", "GROUP_SIZE_M"):
        if name in kw:
            return int(kw[name])
    return None


def moe_work(launch: Launch, config, rec: dict, s: MoEShape, el: int, bm: int) -> Work | None:
    name = launch.name
    kw = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    bn, bk = kw.get("BLOCK_N"), kw.get("BLOCK_K")
    if bn is None or bk is None:
        return None
    rows = s.n * s.k
    wave = SMS * occupancy(rec)
    gm = group_m(launch, config)
    if name in _ROWTILE:
        n_out, k, dual = _ROWTILE[name](s.d, s.f)
        tiles = moe_rows(s, bm)
        n_cols = -(-n_out // bn)
        iters = len(tiles) * n_cols * -(-k // bk)
        flops = 2.0 * rows * k * n_out * (2 if dual else 1)
        read, a_reads, b_reads = rowtile_hbm(tiles, n_cols, bm, bn, k, el, wave, gm, dual)
        written = rows * n_out * el * (2 if dual else 1)
        return Work(s.label, iters, 0, flops, read + written,
                    {"a_reads": round(a_reads, 2), "b_reads": round(b_reads, 2), "grid_group_m": gm},
                    programs=len(tiles) * n_cols, uniform=True)
    if name in _DW:
        n_out, k_out = _DW[name](s.d, s.f)
        per = s.n * s.k // s.e
        n_tiles = -(-n_out // bn) * -(-k_out // bk)
        iters = n_tiles * s.e * -(-per // bm)
        flops = 2.0 * rows * n_out * k_out
        # each program streams its expert's rows of both operands for its (n, k) block
        progs = ([("a", (e, m), per * bn * el), ("b", (e, n), per * bk * el)]
                 for e in range(s.e) for m, n in launch_order(-(-n_out // bn), -(-k_out // bk), gm))
        read, _ = hbm_reads(progs, wave)
        a_reads = read / max(1.0, rows * (n_out + k_out) * el)
        return Work(s.label, iters, 0, flops, read + s.e * n_out * k_out * el,
                    {"operand_reads": round(a_reads, 2), "grid_group_m": gm}, programs=n_tiles, uniform=True)
    return None


