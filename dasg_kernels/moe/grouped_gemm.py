"""Grouped SwiGLU expert GEMMs over the expert-sorted rows of a :class:`DispatchPlan`.

Rows are the (token, slot) pairs sorted by expert and padded per expert to a
multiple of ``BLOCK_M`` (see :mod:`dasg_kernels.moe.dispatch`); one tile of
``BLOCK_M`` rows belongs to one expert. Token rows of ``x`` / ``dy`` are gathered by
index as they are loaded (no permuted copy); tiles past the last expert run
(``tile_expert == -1``) exit at once, and experts with no rows own no tile.

Forward
    ``_gate_up_fwd_kernel``  h = silu(x W_g^T) * (x W_u^T)  (SwiGLU fused; optionally
                             also writes the pre-activation ``gu = [gate | up]`` for
                             the backward; with ``recompute`` the backward reruns it
                             to get ``gu`` back instead of keeping it)
    ``_down_fwd_kernel``     y_slot = h W_d^T, per row (sorted order), or, with one
                             slot per token, the weighted result straight into
                             ``y[token]`` (fused combine)
Backward
    ``_down_bwd_kernel``     dh = (w * dy[token]) W_d, fused with the SwiGLU backward
                             -> dgu = [dgate | dup] (recomputes silu from ``gu``), the
                             routing-weight gradient <h, dy[token] W_d> per F block, and
                             (for d down_proj) ``hw = w * silu(gate) * up`` per row
    ``_gate_up_bwd_dx_kernel`` dx_slot = dgu W_gu (per row, or straight into
                             ``dx[token]`` with one slot per token)
    ``_dw_down_kernel``      dW_d[e] = sum over e's rows of dy^T (w h): a plain GEMM of the
                             gathered dy rows with ``hw = w * h``, which the down backward
                             writes once (not recomputed per output tile)
    ``_dw_gate_up_kernel``   dW_gu[e] = sum over e's rows of dgu^T x[token]
The weight gradients run one program per (expert, output tile) that walks all of
the expert's row tiles in order: deterministic, no atomics.

Program order: the row-tile kernels run a 1-D grid over ``num_tiles x column blocks``
in grouped order (:func:`_swizzle`, ``GROUP_M`` row tiles per group, the row tile
fastest inside a group), so the programs resident at once share a few A row tiles
instead of all sharing one column and each column re-reading all of A from HBM. The
weight-gradient kernels order their output tiles within an expert the same way (grid
axis 0; the expert is axis 1). The order never changes a result: every output tile is
computed the same way whichever program runs it.

Accumulation is fp32; fp32 inputs use IEEE dots (no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dasg_kernels.backend import autotune_enabled, interpreter_enabled
from dasg_kernels.moe import configs
from dasg_kernels.moe.types import DispatchPlan

# --------------------------------------------------------------------------- helpers


@triton.jit
def _load_rows(row_pair, r0, K_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The ``BLOCK_M`` rows from ``r0``: their indices, the pair they hold, a mask and the token.
    (``K_SLOTS``, the slots per token, 1..8, is a constexpr: ``pair // K_SLOTS`` divides by a
    constant, a shift or a multiply, not a runtime integer division in the weight-gradient loops.)"""
    o_r = r0 + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair + o_r)
    m_r = pair >= 0
    tok = tl.where(m_r, pair // K_SLOTS, 0).to(tl.int64)
    return o_r.to(tl.int64), pair, m_r, tok


@triton.jit
def _swizzle(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Program ``pid`` of a 1-D grid over ``n_m x n_n`` tiles -> ``(i_m, i_n)`` in grouped
    order (Triton's matmul tutorial): groups of ``GROUP_M`` consecutive row tiles; inside a
    group the row tile varies fastest, then the column. The programs resident at once then
    cover a few row tiles x many columns (each A row tile is read by neighbours, from L2)
    instead of every row tile x one column (every column re-reading all of A from HBM)."""
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    i_m = first_m + (pid % width) % size_m
    i_n = (pid % width) // size_m
    return i_m, i_n


@triton.jit
def _rows_dot_weight(
    acc, p_a, m_r, p_w, m_n, stride_wk, K, acc2, p_w2,
    K_CONTIG: tl.constexpr, DUAL: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``acc += A[rows, :K] @ W[:K, cols]`` over masked ``BLOCK_K`` steps, in order.

    ``p_a`` points at each row's start (``[BLOCK_M, 1]``, rows masked by ``m_r``), ``p_w``
    at each column's start (``[1, BLOCK_N]``, masked by ``m_n``); W steps along K by
    ``stride_wk``, or by 1 with ``K_CONTIG``. With ``DUAL`` a second weight ``p_w2`` shares
    each A tile and accumulates into ``acc2`` (else ``acc2`` comes back as given).
    """
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_a = tl.load(p_a + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        m_w = m_k[:, None] & m_n[None, :]
        if K_CONTIG:
            o_w = o_k[:, None]
        else:
            o_w = o_k[:, None].to(tl.int64) * stride_wk
        b_w = tl.load(p_w + o_w, mask=m_w, other=0.0)
        if DUAL:
            b_w2 = tl.load(p_w2 + o_w, mask=m_w, other=0.0)
        acc = tl.dot(b_a, b_w, acc, input_precision=DOT_PREC)
        if DUAL:
            acc2 = tl.dot(b_a, b_w2, acc2, input_precision=DOT_PREC)
    return acc, acc2


@triton.jit
def _row_tile(tile_expert, NUM_TILES, N_COLS, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """A row-tile kernel's program: its row tile ``i_t`` and column block ``i_n`` of the
    ``NUM_TILES x cdiv(N_COLS, BLOCK_N)`` grid in grouped order (:func:`_swizzle`), and the
    tile's expert ``e`` (``-1``: an unused tile, whose program returns at once)."""
    i_t, i_n = _swizzle(tl.program_id(0), NUM_TILES, tl.cdiv(N_COLS, BLOCK_N), GROUP_M)
    e = tl.load(tile_expert + i_t)
    return i_t, i_n, e


@triton.jit
def _dw_out_tile(i_p, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Weight-gradient output tile ``i_p`` of the ``cdiv(N, BLOCK_N) x cdiv(K, BLOCK_K)`` tiles of
    one expert, in grouped order (:func:`_swizzle`): consecutive programs share operand blocks."""
    i_n, i_k = _swizzle(i_p, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    return o_n, o_k, o_n < N, o_k < K


@triton.jit
def _store_dw(dw, acc, e, o_n, o_k, m_n, m_k, stride_we, stride_wn):
    """``dw[e, o_n, o_k] = acc`` (K contiguous), in ``dw``'s dtype."""
    p_dw = dw + e.to(tl.int64) * stride_we + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :]
    tl.store(p_dw, acc.to(dw.dtype.element_ty), mask=m_n[:, None] & m_k[None, :])


# --------------------------------------------------------------------------- forward


@triton.jit
def _gate_up_fwd_kernel(
    x, w, h, gu, row_pair, tile_expert,
    D, F, K_SLOTS: tl.constexpr, NUM_TILES,
    stride_xn, stride_we, stride_wf, stride_hr, stride_gr,
    SAVE_GU: tl.constexpr, WRITE_H: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    i_t, i_n, e = _row_tile(tile_expert, NUM_TILES, F, BLOCK_N, GROUP_M)
    if e < 0:
        return
    o_r, pair, m_r, tok = _load_rows(row_pair, i_t * BLOCK_M, K_SLOTS, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < F
    p_x = x + tok[:, None] * stride_xn
    p_g = w + e.to(tl.int64) * stride_we + o_n[None, :].to(tl.int64) * stride_wf
    p_u = p_g + F.to(tl.int64) * stride_wf
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g, acc_u = _rows_dot_weight(acc_g, p_x, m_r, p_g, m_n, 1, D, acc_u, p_u,
                                    K_CONTIG=True, DUAL=True, DOT_PREC=DOT_PREC, BLOCK_K=BLOCK_K)
    m_o = m_r[:, None] & m_n[None, :]
    # gate and up are rounded to the input dtype first, whether or not they are saved:
    # the backward recomputes h from exactly these values, and the forward's result does
    # not depend on what is saved
    b_g = acc_g.to(x.dtype.element_ty)
    b_u = acc_u.to(x.dtype.element_ty)
    if SAVE_GU:
        p_gu = gu + o_r[:, None] * stride_gr + o_n[None, :]
        tl.store(p_gu, b_g.to(gu.dtype.element_ty), mask=m_o)
        tl.store(p_gu + F, b_u.to(gu.dtype.element_ty), mask=m_o)
    if WRITE_H:
        acc_g = b_g.to(tl.float32)
        b_h = acc_g * tl.sigmoid(acc_g) * b_u.to(tl.float32)
        tl.store(h + o_r[:, None] * stride_hr + o_n[None, :], b_h.to(h.dtype.element_ty), mask=m_o)


@triton.jit
def _down_fwd_kernel(
    h, w, y_slot, y, weights, row_pair, tile_expert,
    D, F, K_SLOTS: tl.constexpr, NUM_TILES,
    stride_hr, stride_we, stride_wd, stride_sr, stride_yn,
    FUSE_COMBINE: tl.constexpr, SAVE_SLOT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    i_t, i_n, e = _row_tile(tile_expert, NUM_TILES, D, BLOCK_N, GROUP_M)
    if e < 0:
        return
    o_r, pair, m_r, tok = _load_rows(row_pair, i_t * BLOCK_M, K_SLOTS, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < D
    p_h = h + o_r[:, None] * stride_hr
    p_w = w + e.to(tl.int64) * stride_we + o_n[None, :].to(tl.int64) * stride_wd
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc, _ = _rows_dot_weight(acc, p_h, m_r, p_w, m_n, 1, F, acc, p_w,
                              K_CONTIG=True, DUAL=False, DOT_PREC=DOT_PREC, BLOCK_K=BLOCK_K)
    m_o = m_r[:, None] & m_n[None, :]
    if SAVE_SLOT:
        tl.store(y_slot + o_r[:, None] * stride_sr + o_n[None, :], acc.to(y_slot.dtype.element_ty), mask=m_o)
    if FUSE_COMBINE:
        # one slot per token: pair == token, so the weighted row goes straight to y
        b_w8 = tl.load(weights + pair, mask=m_r, other=0.0).to(tl.float32)
        acc = acc * b_w8[:, None]
        tl.store(y + tok[:, None] * stride_yn + o_n[None, :], acc.to(y.dtype.element_ty), mask=m_o)


# --------------------------------------------------------------------------- backward


@triton.jit
def _down_bwd_kernel(
    dy, w, gu, dgu, weights, dwp, hw, row_pair, tile_expert,
    D, F, K_SLOTS: tl.constexpr, NUM_TILES,
    stride_dyn, stride_we, stride_wd, stride_gr, stride_dgr, stride_pr, stride_hwr, DW_COLS,
    HAS_DW: tl.constexpr, WRITE_HW: tl.constexpr, MIN_BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    i_t, i_n, e = _row_tile(tile_expert, NUM_TILES, F, BLOCK_N, GROUP_M)
    if e < 0:
        return
    o_r, pair, m_r, tok = _load_rows(row_pair, i_t * BLOCK_M, K_SLOTS, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # over F
    m_n = o_n < F
    p_dy = dy + tok[:, None] * stride_dyn
    p_w = w + e.to(tl.int64) * stride_we + o_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc, _ = _rows_dot_weight(acc, p_dy, m_r, p_w, m_n, stride_wd, D, acc, p_w,
                              K_CONTIG=False, DUAL=False, DOT_PREC=DOT_PREC, BLOCK_K=BLOCK_K)
    m_o = m_r[:, None] & m_n[None, :]
    p_gu = gu + o_r[:, None] * stride_gr + o_n[None, :]
    b_g = tl.load(p_gu, mask=m_o, other=0.0).to(tl.float32)
    b_u = tl.load(p_gu + F, mask=m_o, other=0.0).to(tl.float32)
    sig = tl.sigmoid(b_g)
    silu = b_g * sig
    if HAS_DW:
        # d weight = <y_slot, dy> = <h, dy W_d>: this F block's part (h as the forward rounded it)
        b_h = (silu * b_u).to(dgu.dtype.element_ty).to(tl.float32)
        # dwp has DW_COLS = cdiv(F, MIN_BLOCK_N) columns; this program owns the
        # BLOCK_N // MIN_BLOCK_N of them under its F block: its sum goes in the first, zeros in
        # the others, so every launch writes every column whatever BLOCK_N is. (The autotuner
        # runs each config on this same buffer; a narrower config's sums must not survive
        # into the columns a wider one leaves alone.)
        o_c = tl.arange(0, BLOCK_N // MIN_BLOCK_N)
        col = i_n * (BLOCK_N // MIN_BLOCK_N) + o_c
        b_dw = tl.where(o_c[None, :] == 0, tl.sum(acc * b_h, axis=1)[:, None], 0.0)
        tl.store(dwp + o_r[:, None] * stride_pr + col[None, :], b_dw, mask=m_r[:, None] & (col < DW_COLS)[None, :])
    b_w8 = tl.load(weights + pair, mask=m_r, other=0.0).to(tl.float32)
    if WRITE_HW:
        # the B operand of d down_proj, w * silu(g) * u in fp32 rounded to dy's dtype: written
        # once here instead of recomputed by each of the cdiv(D, BLOCK_N) output tiles
        b_hw = silu * b_u * b_w8[:, None]
        tl.store(hw + o_r[:, None] * stride_hwr + o_n[None, :], b_hw.to(hw.dtype.element_ty), mask=m_o)
    acc = acc * b_w8[:, None]  # dh = w * (dy W_d)
    d_g = acc * b_u * sig * (1.0 + b_g * (1.0 - sig))
    d_u = acc * silu
    p_dgu = dgu + o_r[:, None] * stride_dgr + o_n[None, :]
    tl.store(p_dgu, d_g.to(dgu.dtype.element_ty), mask=m_o)
    tl.store(p_dgu + F, d_u.to(dgu.dtype.element_ty), mask=m_o)


@triton.jit
def _gate_up_bwd_dx_kernel(
    dgu, w, dx_slot, row_pair, tile_expert,
    D, F, K_SLOTS: tl.constexpr, NUM_TILES,
    stride_dgr, stride_we, stride_wf, stride_or,
    FUSE_COMBINE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    i_t, i_n, e = _row_tile(tile_expert, NUM_TILES, D, BLOCK_N, GROUP_M)
    if e < 0:
        return
    o_r, pair, m_r, tok = _load_rows(row_pair, i_t * BLOCK_M, K_SLOTS, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # over D
    m_n = o_n < D
    p_a = dgu + o_r[:, None] * stride_dgr
    p_w = w + e.to(tl.int64) * stride_we + o_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc, _ = _rows_dot_weight(acc, p_a, m_r, p_w, m_n, stride_wf, 2 * F, acc, p_w,
                              K_CONTIG=False, DUAL=False, DOT_PREC=DOT_PREC, BLOCK_K=BLOCK_K)
    m_o = m_r[:, None] & m_n[None, :]
    if FUSE_COMBINE:
        o_out = tok  # one slot per token: the row is the token's dx
    else:
        o_out = o_r
    tl.store(dx_slot + o_out[:, None] * stride_or + o_n[None, :], acc.to(dx_slot.dtype.element_ty), mask=m_o)


@triton.jit
def _dw_down_kernel(
    dy, hw, row_pair, expert_offsets, dw,
    D, F, K_SLOTS: tl.constexpr,
    stride_dyn, stride_hwr, stride_we, stride_wd,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dW_d[e, d, f] = sum_r dy[tok_r, d] hw[r, f] (``hw = w_r h_r`` from the down backward);
    BLOCK_N over D, BLOCK_K over F."""
    i_p = tl.program_id(0)  # the output tile: grid axis 0, since cdiv(D, BN) * cdiv(F, BK) can pass 65535
    e = tl.program_id(1)
    o_d, o_f, m_d, m_f = _dw_out_tile(i_p, D, F, BLOCK_N, BLOCK_K, GROUP_M)
    start = tl.load(expert_offsets + e)
    end = tl.load(expert_offsets + e + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        o_r, pair, m_r, tok = _load_rows(row_pair, r0, K_SLOTS, BLOCK_M)
        b_dy = tl.load(dy + tok[None, :] * stride_dyn + o_d[:, None], mask=m_d[:, None] & m_r[None, :], other=0.0)
        b_h = tl.load(hw + o_r[:, None] * stride_hwr + o_f[None, :], mask=m_r[:, None] & m_f[None, :], other=0.0)
        acc = tl.dot(b_dy, b_h, acc, input_precision=DOT_PREC)
    _store_dw(dw, acc, e, o_d, o_f, m_d, m_f, stride_we, stride_wd)


@triton.jit
def _dw_gate_up_kernel(
    dgu, x, row_pair, expert_offsets, dw,
    D, F, K_SLOTS: tl.constexpr,
    stride_dgr, stride_xn, stride_we, stride_wf,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dW_gu[e, j, d] = sum_r dgu[r, j] x[tok_r, d]; BLOCK_N over 2F, BLOCK_K over D."""
    i_p = tl.program_id(0)  # the output tile: grid axis 0, since cdiv(2F, BN) * cdiv(D, BK) can pass 65535
    e = tl.program_id(1)
    o_j, o_d, m_j, m_d = _dw_out_tile(i_p, 2 * F, D, BLOCK_N, BLOCK_K, GROUP_M)
    start = tl.load(expert_offsets + e)
    end = tl.load(expert_offsets + e + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        o_r, pair, m_r, tok = _load_rows(row_pair, r0, K_SLOTS, BLOCK_M)
        p_a = dgu + o_r[None, :] * stride_dgr + o_j[:, None]
        b_a = tl.load(p_a, mask=m_j[:, None] & m_r[None, :], other=0.0)
        b_x = tl.load(x + tok[:, None] * stride_xn + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
        acc = tl.dot(b_a, b_x, acc, input_precision=DOT_PREC)
    _store_dw(dw, acc, e, o_j, o_d, m_j, m_d, stride_we, stride_wf)


# --------------------------------------------------------------------------- launch

# CUDA grid limits: axis 0 (the swizzled tiles) and axis 1 (the expert of the weight gradients)
_GRID_X_MAX = 2 ** 31 - 1
_GRID_Y_MAX = 65535

#: the main-loop kind of each kernel (what its configs are pruned for; :mod:`.configs`)
KERNEL_KIND = {
    _gate_up_fwd_kernel: configs.DUAL, _down_fwd_kernel: configs.ROW, _down_bwd_kernel: configs.SWIGLU_BWD,
    _gate_up_bwd_dx_kernel: configs.ROW, _dw_down_kernel: configs.DW, _dw_gate_up_kernel: configs.DW,
}


def _checked_grid(grid):
    """``grid`` that raises, instead of a launch failure, past CUDA's grid limits."""
    def checked(meta):
        g = grid(meta)
        if g[0] > _GRID_X_MAX or (len(g) > 1 and g[1] > _GRID_Y_MAX):
            raise ValueError(f"grouped GEMM grid {g} exceeds CUDA's limits ({_GRID_X_MAX}, {_GRID_Y_MAX})")
        return g
    return checked


def _launch(kernel, grid, *args, a_cols: int | None = None, **kwargs):
    """Launch ``kernel`` with the configs of :mod:`.configs`: the pinned one under the
    interpreter, the first that fits with ``DASG_AUTOTUNE=0``, else autotuned.

    ``a_cols`` is the K extent of the A row panel (for :func:`.configs.group_m_for`).
    """
    elsize = configs.operand_elsize(args)
    kwargs["GROUP_M"] = configs.group_m_for(kwargs["BLOCK_M"], a_cols, elsize)
    grid = _checked_grid(grid)
    if interpreter_enabled():
        kernel[grid(configs.INTERPRET_CONFIG)](*args, **kwargs, **configs.INTERPRET_CONFIG)
        return
    kind = KERNEL_KIND[kernel]
    if not autotune_enabled():
        cfg = configs.fixed_gpu_config(kind, kwargs["BLOCK_M"], elsize)
        kernel[grid(cfg)](*args, **kwargs, **cfg)
        return
    configs.autotuned(kernel, kind)[grid](*args, **kwargs)


# --------------------------------------------------------------------------- launchers


def gate_up_fwd(x: torch.Tensor, w: torch.Tensor, plan: DispatchPlan, save_gu: bool, write_h: bool = True):
    """``h [rows, F]`` (when ``write_h``) and ``gu [rows, 2F]`` (when ``save_gu``) in ``x.dtype``."""
    _, D = x.shape
    F = w.shape[1] // 2
    rows = plan.num_rows
    h = torch.empty((rows, F), dtype=x.dtype, device=x.device) if write_h else None
    gu = torch.empty((rows, 2 * F), dtype=x.dtype, device=x.device) if save_gu else None
    _launch(
        _gate_up_fwd_kernel, lambda META: (plan.num_tiles * triton.cdiv(F, META["BLOCK_N"]),),
        x, w, h if write_h else gu, gu if save_gu else h, plan.row_pair, plan.tile_expert,
        D, F, plan.num_slots, plan.num_tiles,
        x.stride(0), w.stride(0), w.stride(1), h.stride(0) if write_h else 0, gu.stride(0) if save_gu else 0,
        SAVE_GU=save_gu, WRITE_H=write_h, DOT_PREC=configs.dot_precision(x.dtype), BLOCK_M=plan.block_m, a_cols=D,
    )
    return h, gu


def down_fwd(h: torch.Tensor, w: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor, n: int,
             *, fuse_combine: bool, save_slot: bool):
    """Per-row outputs ``y_slot [rows, D]`` (when ``save_slot``) and, fused, ``y [n, D]``."""
    D, F = w.shape[1], w.shape[2]
    y_slot = torch.empty((plan.num_rows, D), dtype=h.dtype, device=h.device) if save_slot else None
    y = torch.zeros((n, D), dtype=h.dtype, device=h.device) if fuse_combine else None
    dummy = h
    _launch(
        _down_fwd_kernel, lambda META: (plan.num_tiles * triton.cdiv(D, META["BLOCK_N"]),),
        h, w, y_slot if save_slot else dummy, y if fuse_combine else dummy, weights,
        plan.row_pair, plan.tile_expert,
        D, F, plan.num_slots, plan.num_tiles,
        h.stride(0), w.stride(0), w.stride(1),
        y_slot.stride(0) if save_slot else 0, y.stride(0) if fuse_combine else 0,
        FUSE_COMBINE=fuse_combine, SAVE_SLOT=save_slot, DOT_PREC=configs.dot_precision(h.dtype), BLOCK_M=plan.block_m,
        a_cols=F,
    )
    return y, y_slot


def down_bwd(dy: torch.Tensor, w: torch.Tensor, gu: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan,
             *, need_dw: bool, need_hw: bool = False):
    """``dgu [rows, 2F]`` (the gradient of the gate/up pre-activations); when ``need_dw``,
    ``dw_row [rows]`` fp32, the routing-weight gradient of each row (else None); when
    ``need_hw``, ``hw [rows, F]`` = ``w_row * silu(gate) * up`` in ``dy.dtype``, the operand
    of :func:`dw_down` (else None).

    The per-row weight gradient is summed over the F blocks in a second, fixed-order
    pass (``dwp.sum(1)``): deterministic without atomics, and no ``[rows, D]`` per-slot
    output has to be kept from the forward.
    """
    D, F = w.shape[1], w.shape[2]
    dgu = torch.empty((plan.num_rows, 2 * F), dtype=dy.dtype, device=dy.device)
    # one column per F block of the smallest BLOCK_N any config uses; the kernel writes every
    # column of every used row (zeros past its own F block's column), so no zero fill is needed
    min_bn = configs.min_block_n()
    dwp = torch.empty((plan.num_rows, triton.cdiv(F, min_bn)) if need_dw else (1, 1),
                      dtype=torch.float32, device=dy.device)
    hw = torch.empty((plan.num_rows, F), dtype=dy.dtype, device=dy.device) if need_hw else None
    _launch(
        _down_bwd_kernel, lambda META: (plan.num_tiles * triton.cdiv(F, META["BLOCK_N"]),),
        dy, w, gu, dgu, weights, dwp, hw if need_hw else dgu, plan.row_pair, plan.tile_expert,
        D, F, plan.num_slots, plan.num_tiles,
        dy.stride(0), w.stride(0), w.stride(1), gu.stride(0), dgu.stride(0), dwp.stride(0),
        hw.stride(0) if need_hw else 0, dwp.shape[1],
        HAS_DW=need_dw, WRITE_HW=need_hw, MIN_BLOCK_N=min_bn, DOT_PREC=configs.dot_precision(dy.dtype),
        BLOCK_M=plan.block_m,
        a_cols=D,
    )
    return dgu, (dwp.sum(1) if need_dw else None), hw


def gate_up_bwd_dx(dgu: torch.Tensor, w: torch.Tensor, plan: DispatchPlan, n: int, *, fuse_combine: bool):
    """``dx [n, D]`` when ``fuse_combine`` (one slot per token), else ``dx_slot [rows, D]``."""
    F, D = w.shape[1] // 2, w.shape[2]
    if fuse_combine:
        out = torch.zeros((n, D), dtype=dgu.dtype, device=dgu.device)
    else:
        out = torch.empty((plan.num_rows, D), dtype=dgu.dtype, device=dgu.device)
    _launch(
        _gate_up_bwd_dx_kernel, lambda META: (plan.num_tiles * triton.cdiv(D, META["BLOCK_N"]),),
        dgu, w, out, plan.row_pair, plan.tile_expert,
        D, F, plan.num_slots, plan.num_tiles,
        dgu.stride(0), w.stride(0), w.stride(1), out.stride(0),
        FUSE_COMBINE=fuse_combine, DOT_PREC=configs.dot_precision(dgu.dtype), BLOCK_M=plan.block_m, a_cols=2 * F,
    )
    return out


def dw_down(dy: torch.Tensor, hw: torch.Tensor, plan: DispatchPlan, like: torch.Tensor) -> torch.Tensor:
    """``d down_proj [E, D, F]`` in ``like.dtype``, from ``hw [rows, F]`` of :func:`down_bwd`."""
    E, D, F = like.shape
    dw = torch.empty((E, D, F), dtype=like.dtype, device=like.device)
    _launch(
        _dw_down_kernel,
        lambda META: (triton.cdiv(D, META["BLOCK_N"]) * triton.cdiv(F, META["BLOCK_K"]), E),
        dy, hw, plan.row_pair, plan.expert_offsets, dw,
        D, F, plan.num_slots,
        dy.stride(0), hw.stride(0), dw.stride(0), dw.stride(1),
        DOT_PREC=configs.dot_precision(dy.dtype), BLOCK_M=plan.block_m,
    )
    return dw


def dw_gate_up(dgu: torch.Tensor, x: torch.Tensor, plan: DispatchPlan, like: torch.Tensor) -> torch.Tensor:
    """``d gate_up_proj [E, 2F, D]`` in ``like.dtype``."""
    E, F2, D = like.shape
    F = F2 // 2
    dw = torch.empty((E, F2, D), dtype=like.dtype, device=like.device)
    _launch(
        _dw_gate_up_kernel,
        lambda META: (triton.cdiv(F2, META["BLOCK_N"]) * triton.cdiv(D, META["BLOCK_K"]), E),
        dgu, x, plan.row_pair, plan.expert_offsets, dw,
        D, F, plan.num_slots,
        dgu.stride(0), x.stride(0), dw.stride(0), dw.stride(1),
        DOT_PREC=configs.dot_precision(x.dtype), BLOCK_M=plan.block_m,
    )
    return dw
