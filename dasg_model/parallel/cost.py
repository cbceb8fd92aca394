"""A cost model (a PREDICTION, not a measurement) for expert and context parallelism at scale.

Bytes per layer and GPU follow the exchanges the code runs (:mod:`dasg_model.parallel.expert`
for EP, :func:`dasg_kernels.context_parallel.swa_attention_cp`'s halo / summary geometry for CP);
times divide them by a link's bandwidth and add an assumed latency per collective. Compute
times are the useful FLOPs divided by the Triton kernels' predicted TFLOP/s from the offline
compile report (``benchmarks/results/compile-sm90a.json``: SASS-level ceilings for an H100
SXM, not measured rates; real kernels run slower, which makes communication relatively
cheaper than shown). Nothing here ran on a GPU.

Assumptions, all in the constants below:

- Links per GPU and direction: NVLink 4 on an H100 SXM 450 GB/s, InfiniBand NDR 400 Gb/s
  = 50 GB/s (one NIC per GPU); an all-to-all is bandwidth-bound on the bytes a GPU sends
  (as much is received under uniform routing), plus a fixed latency per collective call
  (10 us on NVLink, 20 us on InfiniBand: rough NCCL figures).
- ``"hybrid"``: nodes of 8 GPUs, NVLink inside, InfiniBand across; uniform destinations, so
  the share ``(ep - 8) / (ep - 1)`` of the remote rows crosses nodes, and the two links run
  at the same time (the slower one sets the time).
- EP routing is uniform over the experts (each level's ``k`` experts a uniform random
  subset; the deep level on ``deep_fraction`` of the tokens); with ``topk_group`` (ADR's
  groups on EP ranks) a level's experts lie on ``min(topk_group, k)`` uniform random ranks.
- Compute per layer: routed experts ``6 * D * F`` FLOPs per (token, expert) forward and
  twice that backward (the six grouped-GEMM kernels of the report at their predicted rates),
  shared experts the same on every token (shallow) and the deep tokens (deep); CP attention
  ``4 * D * Hq`` FLOPs per visible (query, key) pair forward, the backward's dq and dk/dv
  kernels at the report's ratios of useful FLOPs to the forward.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

__all__ = [
    "CPWorkload",
    "EPWorkload",
    "REFERENCE_CP",
    "REFERENCE_EP",
    "IB_400G",
    "Link",
    "NVLINK_H100",
    "cp_layer_cost",
    "cp_rank_work",
    "ep_bytes_per_row",
    "ep_layer_cost",
    "kernel_rates",
    "scaleout_markdown",
    "scaleout_rows",
]

GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Link:
    """A GPU's link: ``bytes_per_s`` per direction, ``latency_s`` per collective call."""

    name: str
    bytes_per_s: float
    latency_s: float


NVLINK_H100 = Link("NVLink (H100 SXM, 450 GB/s)", 450e9, 10e-6)
IB_400G = Link("InfiniBand 400 Gb/s (50 GB/s)", 50e9, 20e-6)

_REPORT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "compile-sm90a.json")
_MOE_KERNELS = ("moe_gate_up_fwd", "moe_down_fwd", "moe_down_bwd", "moe_dw_down", "moe_dx", "moe_dw_gate_up")
# FLOPs of each grouped-GEMM kernel per (row, D, F): gate/up 2 * D * 2F, down 2 * F * D, and
# the backward's four (dh through down, d down, dx through gate/up, d gate/up)
_MOE_FLOPS = {"moe_gate_up_fwd": 4, "moe_down_fwd": 2, "moe_down_bwd": 2, "moe_dw_down": 2, "moe_dx": 4,
              "moe_dw_gate_up": 4}
_MOE_FWD = ("moe_gate_up_fwd", "moe_down_fwd")


def kernel_rates(path: str | None = None, *, moe_shape: str = "deepseek", head_dim: int = 128) -> dict[str, float]:
    """Predicted TFLOP/s (bf16, the best kept config) of the kernels the model needs, read from
    the offline compile report, plus the attention backward's useful FLOPs per forward FLOP
    (``"attn_dq/fwd"``, ``"attn_dkdv/fwd"``). Attention at the smallest reported head dim
    ``>= head_dim`` (64, 128, 256; the largest above that)."""
    with open(path or _REPORT) as f:
        records = json.load(f)["records"]
    dims = sorted({r["head_dim"] for r in records if r.get("family") == "attention" and r.get("head_dim")})
    if dims:
        head_dim = next((h for h in dims if h >= head_dim), dims[-1])
    rates: dict[str, float] = {}
    useful: dict[str, float] = {}
    for r in records:
        if r.get("dtype") != "bfloat16" or r.get("config_rank") != 0 or not r.get("predicted_tflops"):
            continue
        k = r["kernel"]
        if k in _MOE_KERNELS and r["shape"].startswith(moe_shape):
            rates[k] = r["predicted_tflops"]
        elif r["family"] == "attention" and r.get("head_dim") == head_dim and k in ("attn_fwd", "attn_dq", "attn_dkdv"):
            rates[k] = r["predicted_tflops"]
            useful[k] = r["useful_tflop"]
    missing = [k for k in _MOE_KERNELS + ("attn_fwd", "attn_dq", "attn_dkdv") if k not in rates]
    if missing:
        raise ValueError(f"kernel_rates: the compile report lacks bf16 predictions for {missing} "
                         f"(moe_shape={moe_shape!r}, head_dim={head_dim})")
    rates["attn_dq/fwd"] = useful["attn_dq"] / useful["attn_fwd"]
    rates["attn_dkdv/fwd"] = useful["attn_dkdv"] / useful["attn_fwd"]
    return rates


# --------------------------------------------------------------------------- links


def _comm_time(sent_bytes: float, n_calls: int, world: int, topology: str) -> float:
    """Seconds to send ``sent_bytes`` per GPU spread uniformly over the ``world - 1`` peers."""
    if world <= 1 or sent_bytes <= 0:
        return 0.0
    if topology == "nvlink":
        return sent_bytes / NVLINK_H100.bytes_per_s + n_calls * NVLINK_H100.latency_s
    if topology == "ib":
        return sent_bytes / IB_400G.bytes_per_s + n_calls * IB_400G.latency_s
    if topology != "hybrid":
        raise ValueError(f"topology must be 'nvlink', 'ib' or 'hybrid', got {topology!r}")
    if world <= GPUS_PER_NODE:
        return _comm_time(sent_bytes, n_calls, world, "nvlink")
    inter = sent_bytes * (world - GPUS_PER_NODE) / (world - 1)
    return max((sent_bytes - inter) / NVLINK_H100.bytes_per_s, inter / IB_400G.bytes_per_s) \
        + n_calls * IB_400G.latency_s


TOPOLOGIES = ("nvlink", "ib", "hybrid")


# --------------------------------------------------------------------------- expert parallel


@dataclass(frozen=True)
class EPWorkload:
    """One DASG-MoE layer's routed work per GPU: ``tokens`` per GPU (each EP rank feeds its
    own), ``hidden`` D, per level the experts ``E``, expert size ``F`` and experts per token
    ``k`` (the mean; fractions interpolate), the share of tokens on the deep level, the
    shared experts' sizes, ADR's ``topk_group`` (groups = EP ranks; ``None`` = no limit) and
    the activation bytes per element."""

    tokens: int
    hidden: int
    shallow_experts: int
    shallow_ffn: int
    shallow_k: float
    deep_experts: int
    deep_ffn: int
    deep_k: float
    deep_fraction: float = 0.5
    shallow_shared_ffn: int = 0
    deep_shared_ffn: int = 0
    topk_group: int | None = None
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, config, tokens: int, **changes) -> EPWorkload:
        """The workload of a :class:`dasg_model.DASGConfig` with ``k = k_max`` per level."""
        base = dict(tokens=tokens, hidden=config.hidden_size, shallow_experts=config.shallow_num_experts,
                    shallow_ffn=config.shallow_expert_size, shallow_k=config.k_max,
                    deep_experts=config.deep_num_experts, deep_ffn=config.deep_expert_size, deep_k=config.k_max,
                    shallow_shared_ffn=config.shallow_shared_size, deep_shared_ffn=config.deep_shared_size,
                    topk_group=config.topk_group)
        base.update(changes)
        return cls(**base)


def _miss(e: int, k: float, ep: int, topk_group: int | None) -> float:
    """Probability that a level's ``k`` experts of one token (a uniform random subset of the
    ``E`` experts, or of the experts of ``topk_group`` uniform random EP ranks) avoid a given
    EP rank; a fractional ``k`` interpolates."""
    if ep <= 1:
        return 0.0 if k > 0 else 1.0
    per_rank = e // ep
    g = ep if topk_group is None else min(topk_group, ep)

    def exact(kk: int) -> float:
        pool = g * per_rank
        kk = min(kk, pool)
        unused = math.comb(pool - per_rank, kk) / math.comb(pool, kk)  # an allowed rank unused
        return 1.0 - g * (1.0 - unused) / ep

    lo = math.floor(k)
    return exact(lo) + (k - lo) * (exact(lo + 1) - exact(lo)) if k > lo else exact(lo)


def ep_bytes_per_row(hidden: int, dtype_bytes: int, slots: int, id_bytes: int = 1, *,
                     bitwise: bool = False) -> tuple[int, int]:
    """``(forward, backward)`` bytes one dispatched row costs its sender and receiver
    together, as :func:`dasg_model.parallel.expert.ep_routed_experts` sends them: the token
    row out and the partial sum back (``D * dtype_bytes`` each way, forward and backward),
    and forward the row's ``slots`` fp32 weights and int ids (``id_bytes``: 1 up to 127
    local experts, else 4), backward the weight gradients. ``bitwise``: the per-slot exchange
    (rows only)."""
    row = hidden * dtype_bytes
    if bitwise:
        return 2 * row, 2 * row
    return 2 * row + slots * (4 + id_bytes), 2 * row + slots * 4


def ep_layer_cost(w: EPWorkload, ep: int, *, bitwise: bool = False, rates: dict[str, float] | None = None,
                  topology: str = "hybrid") -> dict[str, float]:
    """Predicted EP cost of one layer per GPU at ``ep`` ranks (see the module docstring).

    Returns a dict: remote rows per GPU (``rows_token_rank``, ``rows_token_rank_level``,
    ``rows_token_slot``, ``rows_sent``), ``bytes_fwd`` / ``bytes_bwd`` (sent per GPU, the
    all-to-alls), ``comm_s`` (forward + backward on ``topology``), ``compute_s`` (routed and
    shared experts, forward + backward, at the kernels' predicted rates) and ``comm/compute``.
    """
    if ep < 1 or w.shallow_experts % ep or w.deep_experts % ep:
        raise ValueError(f"ep_layer_cost: ep={ep} must divide both levels' experts "
                         f"({w.shallow_experts}, {w.deep_experts})")
    rates = rates or kernel_rates()
    n, f_d = w.tokens, w.deep_fraction
    m_sh = _miss(w.shallow_experts, w.shallow_k, ep, w.topk_group)
    m_dp = _miss(w.deep_experts, w.deep_k, ep, w.topk_group)
    others = ep - 1
    visit = 1.0 - m_sh * (1.0 - f_d + f_d * m_dp)
    rows_tr = n * others * visit
    rows_trl = n * others * ((1.0 - m_sh) + f_d * (1.0 - m_dp))
    rows_ts = n * (w.shallow_k + f_d * w.deep_k) * others / ep
    slots = math.ceil(w.shallow_k) + math.ceil(w.deep_k)
    n_cols = w.shallow_experts // ep + w.deep_experts // ep
    per_fwd, per_bwd = ep_bytes_per_row(w.hidden, w.dtype_bytes, slots, 1 if n_cols <= 127 else 4,
                                        bitwise=bitwise)
    rows = rows_ts if bitwise else rows_tr
    counts = others * 8 * (n_cols if bitwise else 1)
    bytes_fwd, bytes_bwd = rows * per_fwd + counts, rows * per_bwd
    # collectives: counts, dispatch (+ weights, ids), combine; backward the reverse ones
    calls_fwd, calls_bwd = (3, 2) if bitwise else (5, 3)
    comm = _comm_time(bytes_fwd, calls_fwd, ep, topology) + _comm_time(bytes_bwd, calls_bwd, ep, topology)
    d = w.hidden
    routed_rows_dfs = n * (w.shallow_k * w.shallow_ffn + f_d * w.deep_k * w.deep_ffn) * d
    shared_rows_dfs = n * (w.shallow_shared_ffn + f_d * w.deep_shared_ffn) * d
    compute = sum(_MOE_FLOPS[k] * (routed_rows_dfs + shared_rows_dfs) / (rates[k] * 1e12) for k in _MOE_KERNELS)
    compute_fwd = sum(_MOE_FLOPS[k] * (routed_rows_dfs + shared_rows_dfs) / (rates[k] * 1e12) for k in _MOE_FWD)
    return {"rows_token_rank": rows_tr, "rows_token_rank_level": rows_trl, "rows_token_slot": rows_ts,
            "rows_sent": rows, "bytes_fwd": bytes_fwd, "bytes_bwd": bytes_bwd, "comm_s": comm,
            "compute_s": compute, "compute_fwd_s": compute_fwd, "comm/compute": comm / compute if compute else math.inf}


# --------------------------------------------------------------------------- context parallel


@dataclass(frozen=True)
class CPWorkload:
    """One GMHA layer's attention over a sequence of ``seq`` positions sharded over the CP
    ranks: causal sliding window ``window`` (keys ``[i - window, i]``), summaries of groups
    of ``group_size``, ``heads_q`` / ``heads_kv``, ``head_dim`` (= value head dim),
    ``batch`` sequences, ``dtype_bytes`` per element, shard ``layout`` (``"contiguous"`` or
    ``"zigzag"``, as in :func:`dasg_kernels.context_parallel.swa_attention_cp`)."""

    seq: int
    window: int
    group_size: int
    heads_q: int
    heads_kv: int
    head_dim: int
    batch: int = 1
    dtype_bytes: int = 2
    layout: str = "contiguous"


def cp_rank_work(w: CPWorkload, cp: int, *, block_m: int = 128, block_n: int = 64) -> list[dict[str, int]]:
    """Attention work of each CP rank (a list over ranks), from the geometry of
    :func:`dasg_kernels.context_parallel.swa_attention_cp`: ``"pairs"``, the visible (query, key)
    pairs (local window + summaries; useful FLOPs are ``4 * head_dim * heads_q * batch`` per
    pair forward), ``"tiles"``, the ``block_m x block_n`` tiles the forward kernel visits
    for one (batch, head) (per query block: the key tiles of its window in the chunk's
    ``[halo; chunk]`` keys, then the summary tiles up to its last query's groups), and
    ``"rows"``, the query rows launched (``T_local``: no padded rows)."""
    import torch

    from dasg_kernels.context_parallel import CPGeometry, check_cp_layout

    if w.seq % cp or (w.layout == "zigzag" and w.seq % (2 * cp)):
        raise ValueError(f"cp_rank_work: seq={w.seq} must be divisible by cp={cp} (2 * cp for zigzag)")
    geo = CPGeometry(cp, w.seq // cp, w.window, w.group_size, check_cp_layout("cp_rank_work", w.layout))
    left, g = w.window, w.group_size
    out = []
    for r in range(cp):
        pairs = tiles = 0
        for c in geo.chunks(r):
            s, h, ng = geo.start(c), geo.halo(c), geo.n_groups(c)
            i = torch.arange(s, s + geo.tc, dtype=torch.int64)
            local = i + 1 if left < 0 else torch.clamp(i, max=left) + 1
            summ = torch.clamp((i - left) // g, min=0) if ng else torch.zeros_like(i)
            pairs += int((local + summ).sum())
            first = torch.arange(0, geo.tc, block_m, dtype=torch.int64)  # query blocks, key-index positions - h
            last = torch.clamp(first + block_m, max=geo.tc) - 1
            lo = torch.zeros_like(first) if left < 0 else torch.clamp(first + h - left, min=0) // block_n * block_n
            tiles += int(((last + h + 1 - lo + block_n - 1) // block_n).sum())
            if ng:
                b_hi = torch.clamp(torch.clamp(s + last - left, min=0) // g, max=ng)
                tiles += int(((b_hi + block_n - 1) // block_n).sum())
        out.append({"pairs": pairs, "tiles": tiles, "rows": geo.t_local})
    return out


def cp_layer_cost(w: CPWorkload, cp: int, *, rates: dict[str, float] | None = None,
                  topology: str = "hybrid") -> dict[str, float]:
    """Predicted CP cost of one layer at ``cp`` ranks, for the busiest rank.

    Bytes follow :func:`dasg_kernels.context_parallel.swa_attention_cp`'s one all-to-all per
    direction (:func:`dasg_kernels.context_parallel.cp_exchange_rows`: the halo rows and the
    group-mean contributions each rank sends to the ranks that read them; the backward
    sends the same rows back): ``bytes_fwd`` / ``bytes_bwd`` are the most any rank sends or
    receives, ``halo_bytes`` and ``summary_bytes`` their parts (forward + backward). Also
    ``comm_s``, ``compute_s`` (forward + backward attention of the rank with the most
    visible pairs, :func:`cp_rank_work`), ``comm/compute`` and ``balance`` (the most over
    the fewest visible pairs of a rank). Some rank's halo crosses a node boundary once
    ``cp > 8``, so ``"hybrid"`` puts the halo on InfiniBand there.
    """
    from dasg_kernels.context_parallel import cp_exchange_rows

    if w.seq % cp:
        raise ValueError(f"cp_layer_cost: seq={w.seq} must be divisible by cp={cp}")
    rates = rates or kernel_rates(head_dim=w.head_dim)
    tl = w.seq // cp
    row = w.batch * w.heads_kv * 2 * w.head_dim * w.dtype_bytes  # one position's k | v
    ex = cp_exchange_rows(cp, tl, w.window, w.group_size, layout=w.layout)
    halo = max(max(e["halo_send"], e["halo_recv"]) for e in ex) * row
    summ = max(max(e["summary_send"], e["summary_recv"]) for e in ex) * row
    both = max(max(e["halo_send"] + e["summary_send"], e["halo_recv"] + e["summary_recv"]) for e in ex) * row
    if topology == "hybrid" and cp > GPUS_PER_NODE:
        comm = 2 * max(_comm_time(halo, 1, 2, "ib"), _comm_time(summ, 1, cp, topology))
    else:
        comm = 2 * _comm_time(both, 1, cp, topology)
    work = cp_rank_work(w, cp)
    pairs = [x["pairs"] for x in work]
    fwd = 4.0 * w.head_dim * w.heads_q * max(pairs) * w.batch
    compute = (fwd / rates["attn_fwd"] + rates["attn_dq/fwd"] * fwd / rates["attn_dq"]
               + rates["attn_dkdv/fwd"] * fwd / rates["attn_dkdv"]) / 1e12
    return {"bytes_fwd": float(both), "bytes_bwd": float(both), "halo_bytes": 2.0 * halo,
            "summary_bytes": 2.0 * summ, "comm_s": comm, "compute_s": compute,
            "comm/compute": comm / compute if compute else math.inf, "balance": max(pairs) / min(pairs)}


# --------------------------------------------------------------------------- tables

# A production-sized DASG-MoE layer (both levels 256 fine-grained experts, k_max=4, half the
# tokens deep, 8192 tokens per GPU, bf16) and a long-context GMHA layer (T=128k, W=2048,
# G=256, 64 query / 8 kv heads of 128, bf16): the workloads of benchmarks/results/scaleout-cost.md.
REFERENCE_EP = EPWorkload(tokens=8192, hidden=4096, shallow_experts=256, shallow_ffn=1024, shallow_k=4,
                          deep_experts=256, deep_ffn=2048, deep_k=4, deep_fraction=0.5, shallow_shared_ffn=2048,
                          deep_shared_ffn=4096)
REFERENCE_CP = CPWorkload(seq=131072, window=2048, group_size=256, heads_q=64, heads_kv=8, head_dim=128)


def scaleout_rows(ep_work: EPWorkload, cp_work: CPWorkload | None = None, gpus=(8, 64, 256), *,
                  cp_weak_local: int | None = None) -> list[dict]:
    """One dict per (kind, GPUs) with bytes and the times on every topology (see
    :func:`ep_layer_cost`, :func:`cp_layer_cost`). EP rows: the per-rank exchange, the
    per-slot one (``bitwise=True``) and, when ``ep_work.topk_group`` is unset, the per-rank
    exchange with ``topk_group=2`` (ADR's groups on EP ranks, a token's experts of a level on
    at most 2 ranks). CP rows: ``cp_work`` at its sequence (strong scaling; also in the
    zigzag layout when ``cp_work``'s is contiguous) and, with ``cp_weak_local``, at
    ``seq = cp_weak_local * GPUs`` (weak scaling)."""
    rates = kernel_rates()
    out = []
    variants = [("EP per-rank", ep_work, False), ("EP per-slot (bitwise)", ep_work, True)]
    if ep_work.topk_group is None:
        variants.append(("EP per-rank, topk_group=2", replace(ep_work, topk_group=2), False))
    for g in gpus:
        for name, wk, bw in variants:
            row = {"kind": name, "gpus": g}
            for topo in TOPOLOGIES:
                c = ep_layer_cost(wk, g, bitwise=bw, rates=rates, topology=topo)
                row[f"comm_s/{topo}"] = c["comm_s"]
            row.update({k: c[k] for k in ("rows_sent", "bytes_fwd", "bytes_bwd", "compute_s")})
            row["rows_per_token"] = c["rows_sent"] / wk.tokens
            out.append(row)
    if cp_work is not None:
        cp_rates = kernel_rates(head_dim=cp_work.head_dim)
        cases = [(f"CP, T={_positions(cp_work.seq)}", lambda g: cp_work)]
        if cp_work.layout == "contiguous":
            cases.append((f"CP zigzag, T={_positions(cp_work.seq)}", lambda g: replace(cp_work, layout="zigzag")))
        if cp_weak_local:
            cases.append((f"CP, T_local={_positions(cp_weak_local)}", lambda g: replace(cp_work, seq=cp_weak_local * g)))
        for g in gpus:
            for name, make in cases:
                wk = make(g)
                row = {"kind": name, "gpus": g, "seq": wk.seq}
                for topo in TOPOLOGIES:
                    c = cp_layer_cost(wk, g, rates=cp_rates, topology=topo)
                    row[f"comm_s/{topo}"] = c["comm_s"]
                row.update({k: c[k] for k in ("bytes_fwd", "bytes_bwd", "compute_s")})
                out.append(row)
    return out


def _positions(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _ms(seconds: float) -> str:
    v = 1e3 * seconds
    return f"{v:.3f}" if v >= 0.01 else f"{v:.2g}"


def scaleout_markdown(rows: list[dict]) -> str:
    """The rows of :func:`scaleout_rows` as a markdown table (times in ms per layer, forward +
    backward; the ratio is communication over compute on the hybrid topology)."""
    head = ("| kind | GPUs | rows sent / token | MB sent fwd + bwd | comm ms NVLink | comm ms IB | "
            "comm ms hybrid | compute ms (predicted) | comm / compute (hybrid) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        rpt = f"{r['rows_per_token']:.2f}" if "rows_per_token" in r else "-"
        mb = (r["bytes_fwd"] + r["bytes_bwd"]) / 1e6
        ratio = r["comm_s/hybrid"] / r["compute_s"]
        flag = " **comm-bound**" if ratio > 1 else ""
        ms = [_ms(r[k]) for k in ("comm_s/nvlink", "comm_s/ib", "comm_s/hybrid", "compute_s")]
        lines.append(f"| {r['kind']} | {r['gpus']} | {rpt} | {mb:,.3g} | {' | '.join(ms)} | {ratio:.3g}{flag} |")
    return "\n".join(lines)
