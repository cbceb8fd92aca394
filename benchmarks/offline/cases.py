"""What the compile report compiles: the launches of each launcher call on ``meta`` tensors
of the benchmark shapes (:func:`build_cases`), with the labels of the kernels they launch.

``DASG_AUTOTUNE=1`` must be set before ``dasg_kernels`` is imported (so every config the
pruners keep is recorded); :mod:`benchmarks.offline.compile_report` does so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.offline.offline_compile import Launch, capture_launches, meta
from benchmarks.offline.work_model import (ATTN_LONG, ATTN_MAIN, ATTN_NOSUM, ATTN_PEER, ATTN_VARLEN, MOE_SHAPES,
                                          AttnShape, MoEShape)


@dataclass
class Case:
    """Launches recorded from one launcher call (``record``), the label of each launch's kernel
    (``label``: None for launches the report skips), and the shape they run at."""

    family: str
    label: Callable[[Launch], str | None]
    record: Callable[[], list[Launch]]
    dtype: str
    head_dim: int | None = None
    shape: object = None


def attn_label(launch: Launch) -> str | None:
    kw = launch.kwargs
    if launch.name == "_swa_fwd_kernel":
        return "attn_decode" if kw.get("PACK_GQA") else "attn_fwd"
    if launch.name == "_swa_bwd_dq_kernel":
        return "attn_dq"
    if launch.name == "_swa_bwd_dkdv_kernel":  # D > 128: two passes (dv, then dk), labelled apart
        p = kw.get("DKDV_PASS", 0)
        return ("attn_dkdv_summary" if kw.get("IS_SUMMARY") else "attn_dkdv") + (f"_pass{p}" if p else "")
    return {"_group_mean_kernel": "attn_pool", "_bwd_preprocess_kernel": "attn_bwd_preprocess",
            "_bounded_cache_fwd_kernel": "attn_bounded_cache_decode"}.get(launch.name)


def attn_record(s: AttnShape, d: int, dt: torch.dtype, decode: bool = False,
                varlen: bool = False) -> Callable[[], list[Launch]]:
    def record():
        from dasg_kernels.attention.bounded_cache import bounded_cache_attention_fwd
        from dasg_kernels.attention.bwd import swa_bwd
        from dasg_kernels.attention.decode import swa_decode_fwd
        from dasg_kernels.attention.fwd import swa_fwd
        from dasg_kernels.attention.host import Varlen

        q, k, v = meta((s.b, s.t, s.hq, d), dt), meta((s.b, s.t, s.hkv, d), dt), meta((s.b, s.t, s.hkv, d), dt)
        kw = dict(left=s.left, right=0, causal=True, group_size=s.g if s.summaries else None,
                  summaries=s.summaries, scale=d ** -0.5)
        if varlen:  # the same tokens packed: B sequences of T in flash-attn's [total, H, D] layout
            q, k, v = (x.reshape(s.b * s.t, *x.shape[2:]) for x in (q, k, v))
            cu = meta((s.b + 1,), torch.int32)
            kw["varlen"] = Varlen(cu, cu, s.t, s.t)
        with capture_launches() as launches:
            if decode:
                swa_decode_fwd(meta((s.b, 1, s.hq, d), dt), k, v, **kw)
                # the bounded cache of generation: a ring of left + 1 slots and the group means
                ring = meta((s.b, s.left + 1, s.hkv, d), dt)
                means = meta((s.b, s.t // s.g + 1, s.hkv, d), dt) if s.summaries else None
                bounded_cache_attention_fwd(meta((s.b, 1, s.hq, d), dt), ring, ring,
                                            None if means is None else (means, means), meta((s.b,), torch.int32),
                                            seq_offset=0, left=s.left, group_size=s.g, scale=d ** -0.5)
            else:
                out, lse, ks, vs = swa_fwd(q, k, v, **kw)
                swa_bwd(out, q, k, v, out, lse, ks, vs, **kw)
        return launches

    return record


def long_label(launch: Launch) -> str | None:
    """The local dk/dv launches only (the summary-gradient epilogue target)."""
    label = attn_label(launch) or ""
    return label if label.startswith("attn_dkdv") and "summary" not in label else None


def nosum_label(launch: Launch) -> str | None:
    label = attn_label(launch) or ""
    if label == "attn_fwd" or label.startswith("attn_dkdv"):
        return label.replace("attn_fwd", "attn_fwd_nosum").replace("attn_dkdv", "attn_dkdv_nosum")
    return None


def varlen_label(launch: Launch) -> str | None:
    label = attn_label(launch)
    return f"{label}_varlen" if label in ("attn_fwd", "attn_dq", "attn_dkdv", "attn_pool") else None


def attn_kind(label: str) -> str | None:
    return {"attn_fwd": "fwd", "attn_dq": "dq", "attn_dkdv": "dkdv", "attn_dkdv_summary": "dkdv_summary"}.get(label)


_MOE_LABELS = {
    "_route_kernel": "moe_route", "_gate_up_fwd_kernel": "moe_gate_up_fwd", "_down_fwd_kernel": "moe_down_fwd",
    "_down_bwd_kernel": "moe_down_bwd", "_gate_up_bwd_dx_kernel": "moe_dx", "_dw_down_kernel": "moe_dw_down",
    "_dw_gate_up_kernel": "moe_dw_gate_up", "_combine_kernel": "moe_combine",
}


def moe_label(launch: Launch) -> str | None:
    if launch.name.startswith("_plan_"):
        return "moe_dispatch" + launch.name[len("_plan"):-len("_kernel")]
    return _MOE_LABELS.get(launch.name)


def moe_block_m(s: MoEShape) -> int:
    from dasg_kernels.moe.configs import choose_block_m

    return choose_block_m(s.n * s.k, s.e)


def moe_record(s: MoEShape, dt: torch.dtype) -> Callable[[], list[Launch]]:
    def record():
        import importlib

        # (dasg_kernels.moe exports a function named dispatch: import the modules by path)
        dispatch, ops, routing = (importlib.import_module(f"dasg_kernels.moe.{m}") for m in ("dispatch", "ops", "routing"))

        bm = moe_block_m(s)
        x = meta((s.n, s.d), dt)
        w1, w2 = meta((s.e, 2 * s.f, s.d), dt), meta((s.e, s.d, s.f), dt)
        weights = meta((s.n, s.k), torch.float32)
        with capture_launches() as launches:
            routing.route_select_triton(meta((s.n, s.e), torch.float32), top_p=1.0, k_max=s.k, k_cap=s.k,
                                        min_k=1, n_group=1, topk_group=1)
            ids = meta((s.n, s.k), torch.int32)
            plan = dispatch.build_plan_triton(ids, s.e, bm)
            pl = (plan.row_pair, plan.pair_row, plan.expert_offsets, plan.tile_expert)
            _, gu = ops.moe_expert_ffn_fwd._init_fn(x, w1, w2, weights, *pl, bm, True)
            ops.moe_expert_ffn_bwd._init_fn(x, x, w1, w2, weights, gu, *pl, bm, True, True, True, True)
        return launches

    return record


def fla_record(s: AttnShape, d: int, dt: torch.dtype) -> Callable[[], list[Launch]]:
    """flash-linear-attention's forward launcher (``parallel_attn_fwd``, fla-core 0.6.0) on
    meta tensors, as on an H100 (its Hopper branch: ``check_shared_mem('hopper')`` true)."""
    def record():
        from unittest import mock

        from fla.ops.attn import parallel as fla_parallel

        q, k, v = meta((s.b, s.t, s.hq, d), dt), meta((s.b, s.t, s.hkv, d), dt), meta((s.b, s.t, s.hkv, d), dt)
        with mock.patch.object(fla_parallel, "check_shared_mem", lambda arch="none", idx=0: arch == "hopper"), \
                capture_launches() as launches:
            fla_parallel.parallel_attn_fwd(q, k, v, None, None, d ** -0.5, window_size=s.left + 1)
        return launches

    return record


def peer_label(launch: Launch) -> str | None:
    if launch.name == "parallel_attn_fwd_kernel":
        return "fla_parallel_attn_fwd"
    return "attn_fwd" if attn_label(launch) == "attn_fwd" else None


def fla_available() -> str | None:
    """Why flash-linear-attention's parallel_attn cannot be recorded here, or None."""
    import warnings

    try:
        with warnings.catch_warnings():  # fla warns that it found no GPU: the kernels only compile here
            warnings.simplefilter("ignore", UserWarning)
            from fla.ops.attn import parallel  # noqa: F401
    except Exception as e:  # not installed, or an import error of its own
        return f"fla-core not importable ({type(e).__name__}: {str(e)[:120]}); pip install -e '.[bench]'"
    return None


def build_cases(quick: bool) -> list[Case]:
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    dims = [128] if quick else [64, 128, 256]
    cases = []
    for dt in dtypes:
        dn = str(dt).replace("torch.", "")
        for d in dims:
            cases.append(Case("attention", attn_label, attn_record(ATTN_MAIN, d, dt), dn, d, ATTN_MAIN))
            cases.append(Case("attention-long", long_label, attn_record(ATTN_LONG, d, dt), dn, d, ATTN_LONG))
            if not quick or d == 128:
                cases.append(Case("attention-nosum", nosum_label, attn_record(ATTN_NOSUM, d, dt), dn, d, ATTN_NOSUM))
                cases.append(Case("decode", attn_label, attn_record(ATTN_MAIN, d, dt, decode=True), dn, d, ATTN_MAIN))
                cases.append(Case("attention-varlen", varlen_label, attn_record(ATTN_VARLEN, d, dt, varlen=True),
                                  dn, d, ATTN_VARLEN))
        for s in (MOE_SHAPES[:1] if quick else MOE_SHAPES):
            cases.append(Case("moe", moe_label, moe_record(s, dt), dn, None, s))
    if fla_available() is None:  # the peer at the forward target's shape (bf16, D=128) only
        ours, fla = attn_record(ATTN_PEER, 128, torch.bfloat16), fla_record(ATTN_PEER, 128, torch.bfloat16)
        cases.append(Case("attention-peer", peer_label, lambda: ours() + fla(), "bfloat16", 128, ATTN_PEER))
    return cases
