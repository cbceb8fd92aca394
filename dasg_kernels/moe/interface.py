"""Public routed-expert ops: validation, backend dispatch, autograd.

The Triton path runs through the ``torch.library`` custom ops of :mod:`.ops`
(``torch.ops.dasg_kernels.moe_*``), which carry the autograd formula and fake
implementations for ``torch.compile``. This is the top layer of the package: it
composes the ops (the differentiable softmax / gather around the routing kernel, the
plan around the dispatch op); below it :mod:`.ops`, and below that the kernels and
their launchers (:mod:`.routing`, :mod:`.dispatch`, :mod:`.grouped_gemm`,
:mod:`.combine`), none of which imports upwards.

``route`` -> ``dispatch`` -> ``expert_ffn`` (grouped SwiGLU GEMMs + combine), chained by
``moe_ffn``. Every argument is checked here, in Python, before any launch; the
messages name the argument. ``backend="torch"`` runs the torch backend modules
(:mod:`.routing_torch`, :mod:`.dispatch_torch`, :mod:`.experts_torch`: static shapes, no
host read, so ``torch.compile`` traces them without a graph break); the tests hold both
backends to :mod:`dasg_kernels.reference`, which no package module imports.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from dasg_kernels.backend import bf16_via_fp32, interpreted_bf16, resolve_backend
from dasg_kernels.moe import ops as _ops
from dasg_kernels.moe.configs import choose_block_m
from dasg_kernels.moe.dispatch_torch import build_plan_torch
from dasg_kernels.moe.experts_torch import expert_ffn_torch
from dasg_kernels.moe.routing_torch import route_torch
from dasg_kernels.moe.types import DispatchPlan, Routing, plan_from_tensors
from dasg_kernels.validation import check_int, check_same, check_tensor

K_MAX_LIMIT = 8
# the dispatch kernels hold a [16, next_pow2(E)] one-hot tile per step: beyond this many
# experts it outgrows the registers (and Triton's tensor-size limit); use backend="torch"
E_TRITON_LIMIT = 4096
INT_DTYPES = (torch.int32, torch.int64)

# --------------------------------------------------------------------------- validation


def _check_route_args(op, logits, top_p, k_max, min_k, n_group, topk_group, renormalize) -> int:
    check_tensor("logits", logits, ndim=2, op=op)
    e = logits.shape[1]
    if e < 1:
        raise ValueError(f"{op}: logits must have at least one expert column, got shape {tuple(logits.shape)}")
    check_int(op, "k_max", k_max, low=1, high=K_MAX_LIMIT)
    if k_max > e:
        raise ValueError(f"{op}: k_max={k_max} exceeds the number of experts E={e} (logits.shape[1])")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"{op}: top_p must be a float, got {type(top_p).__name__}")
    if not (0.0 < float(top_p) <= 1.0) or math.isnan(float(top_p)):
        raise ValueError(f"{op}: top_p must be in (0, 1], got {top_p}")
    check_int(op, "min_k", min_k, low=1, high=k_max)
    check_int(op, "n_group", n_group, low=1)
    if e % n_group != 0:
        raise ValueError(f"{op}: n_group={n_group} must divide the number of experts E={e}")
    if topk_group is None:
        topk_group = n_group
    check_int(op, "topk_group", topk_group, low=1, high=n_group)
    if not isinstance(renormalize, bool):
        raise TypeError(f"{op}: renormalize must be a bool, got {type(renormalize).__name__}")
    return topk_group


def _check_expert_ids(op, expert_ids, num_experts, n=None):
    check_tensor("expert_ids", expert_ids, ndim=2, dtypes=INT_DTYPES, op=op)
    if n is not None and expert_ids.shape[0] != n:
        raise ValueError(f"{op}: expert_ids must have {n} rows (x.shape[0]), got shape {tuple(expert_ids.shape)}")
    # The range check reads the ids back, so it runs only where that is free (not on CUDA,
    # where it would synchronise, nor while torch.compile traces, where it is a
    # data-dependent guard). There, ids outside [-1, E) count as unused slots.
    if expert_ids.device.type != "cuda" and expert_ids.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(
                f"{op}: expert_ids must lie in [-1, {num_experts - 1}] (-1 = unused slot), got values in [{lo}, {hi}]"
            )


def _check_ffn_args(op, x, gate_up_proj, down_proj, expert_ids, weights, activation, triton_path):
    _check_expert_weights(op, x, gate_up_proj, down_proj, activation, triton_path)
    _check_expert_ids(op, expert_ids, gate_up_proj.shape[0], x.shape[0])
    check_tensor("weights", weights, ndim=2, op=op)
    if weights.shape != expert_ids.shape:
        raise ValueError(
            f"{op}: weights must have the shape of expert_ids {tuple(expert_ids.shape)}, got {tuple(weights.shape)}"
        )


def _check_expert_weights(op, x, gate_up_proj, down_proj, activation, triton_path):
    check_tensor("x", x, ndim=2, op=op)
    check_tensor("gate_up_proj", gate_up_proj, ndim=3, op=op)
    check_tensor("down_proj", down_proj, ndim=3, op=op)
    check_same(op, "dtype", x=x, gate_up_proj=gate_up_proj, down_proj=down_proj)
    n, d = x.shape
    e, f2, d1 = gate_up_proj.shape
    if d1 != d or f2 % 2 != 0:
        raise ValueError(
            f"{op}: gate_up_proj must have shape [E, 2F, D] = [E, 2F, {d}] (transformers layout, gate rows "
            f"first), got {tuple(gate_up_proj.shape)}"
        )
    f = f2 // 2
    if tuple(down_proj.shape) != (e, d, f):
        raise ValueError(
            f"{op}: down_proj must have shape [E, D, F] = {(e, d, f)} to match gate_up_proj {tuple(gate_up_proj.shape)}"
            f" and x {tuple(x.shape)}, got {tuple(down_proj.shape)}"
        )
    if activation != "swiglu":
        raise ValueError(f"{op}: activation must be 'swiglu', got {activation!r}")
    if triton_path:
        reason = _triton_expert_limit(op, d, f, e)
        if reason is not None:
            raise ValueError(reason[1])


def _triton_expert_limit(op, d, f, e) -> tuple[str, str] | None:
    """``(kind, message)`` when the Triton expert kernels cannot take these sizes, else ``None``."""
    if e > E_TRITON_LIMIT:
        return "num_experts", _num_experts_message(op, "gate_up_proj.shape[0]", e)
    if d % 16 != 0:
        return "D", f"{op}: the Triton kernels need the hidden size D (x.shape[1]) to be a multiple of 16, got {d}"
    if f % 16 != 0:
        return "F", (f"{op}: the Triton kernels need the expert size F (gate_up_proj.shape[1] // 2) to be a "
                     f"multiple of 16, got {f}")
    return None


def _num_experts_message(op, what, e):
    return (f"{op}: the Triton kernels support up to {E_TRITON_LIMIT} experts, got {what}={e}; "
            f"use backend='torch'")


_FALLBACK_WARNED: set[tuple[str, str]] = set()


def _auto_fallback(op, kind, message, stacklevel=3) -> str:
    """``backend="auto"`` on sizes the kernels lack: warn once per ``(op, kind)`` and
    return ``"torch"`` (``backend="triton"`` raises ``message`` instead)."""
    if (op, kind) not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add((op, kind))
        warnings.warn(f"{message.split('; use backend=')[0]}; backend='auto' runs the torch path instead "
                      f"(backend='triton' raises)", RuntimeWarning, stacklevel=stacklevel)
    return "torch"


def _pick_expert_backend(op, backend, be, x, gate_up_proj, down_proj, activation) -> str:
    """``be`` from ``resolve_backend``; with ``backend="auto"``, ``"torch"`` where the
    Triton expert kernels lack the sizes (D or F not a multiple of 16, E > 4096)."""
    if be != "triton" or backend != "auto":
        return be
    _check_expert_weights(op, x, gate_up_proj, down_proj, activation, False)  # the layout first
    e, f2, d = gate_up_proj.shape
    reason = _triton_expert_limit(op, d, f2 // 2, e)
    return be if reason is None else _auto_fallback(op, *reason, stacklevel=4)


def _unpack_routing(op, routing):
    if isinstance(routing, Routing):
        return routing.expert_ids, routing.weights
    if isinstance(routing, (tuple, list)) and len(routing) >= 2:
        return routing[0], routing[1]
    raise TypeError(f"{op}: routing must be a Routing or an (expert_ids, weights) tuple, got {type(routing).__name__}")


# --------------------------------------------------------------------------- route


def _route_triton(logits: torch.Tensor, *, top_p: float, k_max: int, min_k: int, n_group: int, topk_group: int,
                  renormalize: bool) -> Routing:
    """Softmax, the routing kernel (as the ``moe_route_select`` custom op), then the
    differentiable weights. Arguments are validated by the caller."""
    n, e = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    eligible = topk_group * (e // n_group) if n_group > 1 else e
    k_cap = min(k_max, eligible)
    ids, num, counts = _ops.moe_route_select(probs.detach(), float(top_p), k_max, k_cap, min_k, n_group, topk_group)
    used = ids >= 0
    w = probs.gather(1, ids.clamp(min=0).long()) * used
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return Routing(ids, w, num, counts)


def route(
    logits: torch.Tensor,
    *,
    top_p: float = 1.0,
    k_max: int = 2,
    min_k: int = 1,
    n_group: int = 1,
    topk_group: int | None = None,
    renormalize: bool = True,
    backend: str = "auto",
) -> Routing:
    """Dynamic top-p routing of router ``logits [N, E]`` (ADR).

    ``probs = softmax(logits.float())``. With ``n_group > 1`` the experts form
    ``n_group`` equal groups, each scored by its best expert, and a token may only use
    experts of its best ``topk_group`` groups (default: all). Eligible experts are
    taken by descending probability (ties to the lower index) while the mass before
    the next one is ``< top_p``; at least ``min_k``, at most ``k_max`` (and at most the
    number of eligible experts). ``top_p=1.0`` is plain top-``k_max``. A row whose
    probabilities are NaN (its logits hold NaN or ``+inf``, or are all ``-inf``) is
    routed to its lowest-index eligible experts, as ``torch.sort`` ranks NaN, and its
    weights are NaN: the bad input shows in the output, never out of bounds.

    Returns:
        :class:`Routing`: ``expert_ids [N, k_max]`` int32 (``-1`` = unused slot),
        ``weights [N, k_max]`` fp32 (the chosen probabilities, renormalised to sum 1
        when ``renormalize``; 0 in unused slots; differentiable w.r.t. ``logits``),
        ``num_selected [N]`` int32, ``tokens_per_expert [E]`` int32.
    Raises:
        TypeError / ValueError naming the argument: ``k_max`` outside ``1..8`` or above
        ``E``, ``top_p`` outside ``(0, 1]``, ``min_k`` outside ``1..k_max``, ``n_group``
        not dividing ``E``, ``topk_group`` outside ``1..n_group``.
    """
    op = "route"
    topk_group = _check_route_args(op, logits, top_p, k_max, min_k, n_group, topk_group, renormalize)
    be = resolve_backend(backend, logits, op=op)
    if be == "torch":
        return route_torch(
            logits, top_p=float(top_p), k_max=k_max, min_k=min_k, n_group=n_group,
            topk_group=topk_group, renormalize=renormalize,
        )
    return _route_triton(
        logits, top_p=float(top_p), k_max=k_max, min_k=min_k, n_group=n_group,
        topk_group=topk_group, renormalize=renormalize,
    )


# --------------------------------------------------------------------------- dispatch


def _plan_triton(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> DispatchPlan:
    """The plan from the ``dasg_kernels::moe_dispatch`` custom op (the five-launch counting
    sort; opaque to ``torch.compile``). It counts the pairs itself."""
    row_pair, pair_row, offsets, tile_expert, counts = _ops.moe_dispatch(expert_ids, num_experts, block_m)
    return plan_from_tensors(row_pair, pair_row, offsets, tile_expert, num_experts, expert_ids.shape[1], block_m,
                             tokens_per_expert=counts)


def dispatch(
    expert_ids: torch.Tensor,
    num_experts: int,
    *,
    block_m: int,
    tokens_per_expert: torch.Tensor | None = None,
    backend: str = "auto",
) -> DispatchPlan:
    """Expert-sorted plan of the (token, slot) pairs for the grouped GEMMs; no host sync.

    Args:
        expert_ids: ``[N, k]`` int32/int64, ``-1`` for unused slots.
        num_experts: ``E``.
        block_m: rows per GEMM tile (a power of two); each expert's rows are padded to
            a multiple of it.
        tokens_per_expert: optional ``[E]`` histogram (e.g. from :func:`route`); the
            torch path uses it instead of recounting, the Triton path counts in passing.
        backend: ``"triton"``: a counting sort in five small Triton launches; ``"torch"``:
            stable sort, cumsum and searchsorted. Both give the same plan, bit for bit.
    Returns:
        :class:`DispatchPlan` with ``row_pair [num_tiles*block_m]`` (pair ``token*k+slot``
        held by each sorted row, ``-1`` = padding), ``pair_row [N*k]`` (its inverse,
        ``-1`` = unused slot), ``expert_offsets [E+1]`` (block-aligned starts),
        ``tile_expert [num_tiles]`` (``-1`` = unused tile), ``tokens_per_expert [E]``;
        ``num_tiles = cdiv(N*k, block_m) + min(E, N*k)``, the worst case.
    """
    op = "dispatch"
    check_int(op, "num_experts", num_experts, low=1)
    check_int(op, "block_m", block_m, low=1)
    if block_m & (block_m - 1):
        raise ValueError(f"{op}: block_m must be a power of two, got {block_m}")
    _check_expert_ids(op, expert_ids, num_experts)
    if tokens_per_expert is not None:
        check_tensor("tokens_per_expert", tokens_per_expert, ndim=1, dtypes=INT_DTYPES, op=op)
        if tokens_per_expert.shape[0] != num_experts:
            raise ValueError(f"{op}: tokens_per_expert must have shape [{num_experts}], got {tuple(tokens_per_expert.shape)}")
        check_same(op, "device", expert_ids=expert_ids, tokens_per_expert=tokens_per_expert)
    be = resolve_backend(backend, expert_ids, op=op)
    if be == "triton" and num_experts > E_TRITON_LIMIT:
        message = _num_experts_message(op, "num_experts", num_experts)
        if backend != "auto":
            raise ValueError(message)
        be = _auto_fallback(op, "num_experts", message)
    if be == "triton":
        return _plan_triton(expert_ids, num_experts, block_m)
    return build_plan_torch(expert_ids, num_experts, block_m, tokens_per_expert)


# --------------------------------------------------------------------------- expert FFN


def _expert_ffn_apply(x, gate_up_proj, down_proj, weights, plan: DispatchPlan, save: bool, recompute: bool):
    """Grouped SwiGLU experts over a :class:`DispatchPlan`, through the custom op
    ``dasg_kernels::moe_expert_ffn_fwd`` (its autograd formula runs ``moe_expert_ffn_bwd``;
    see :mod:`dasg_kernels.moe.ops`). Deterministic forward and backward.

    Saves ``x``, the expert weights, the routing weights, the plan and (when ``save`` and
    not ``recompute``) the gate/up pre-activations ``gu [rows, 2F]`` in ``x.dtype``
    (``rows ~ N*k``). The backward recomputes ``h = silu(gate) * up`` from ``gu`` where
    it needs it (``d down_proj``, the routing-weight gradient) instead of also keeping
    ``h [rows, F]``, and gets the routing-weight gradient as ``<h, dy W_d>`` inside the
    ``dh`` kernel instead of keeping the per-slot outputs ``[rows, D]``. With
    ``recompute`` the backward first reruns the gate/up GEMM to rebuild ``gu``: one
    more ``2 * rows * D * 2F`` FLOPs for ``rows * 2F`` fewer saved elements.
    """
    y, _ = _ops.moe_expert_ffn_fwd(x, gate_up_proj, down_proj, weights, plan.row_pair, plan.pair_row,
                                   plan.expert_offsets, plan.tile_expert, plan.block_m, save and not recompute)
    return y


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if (t.shape[-1] <= 1 or t.stride(-1) == 1) else t.contiguous()


def expert_ffn(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: Routing | tuple[torch.Tensor, torch.Tensor],
    *,
    activation: str = "swiglu",
    backend: str = "auto",
    block_m: int | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """Routed SwiGLU experts: ``y[t] = sum_s w[t,s] * down_e(silu(gate_e(x[t])) * up_e(x[t]))``.

    Args:
        x: ``[N, D]`` fp16 / bf16 / fp32.
        gate_up_proj: ``[E, 2F, D]`` in ``x.dtype`` (transformers layout: gate rows
            ``[0, F)``, then up rows ``[F, 2F)``).
        down_proj: ``[E, D, F]`` in ``x.dtype``.
        routing: a :class:`Routing` or ``(expert_ids [N, k] int, weights [N, k] float)``;
            ``expert_ids == -1`` marks an unused slot.
        activation: only ``"swiglu"``.
        block_m: rows per GEMM tile (default: chosen from the rows per expert).
        recompute: keep nothing of size ``[N*k, 2F]`` for the backward and rerun the
            gate/up GEMM there instead (saves ``2 * N*k * 2F`` bytes in 16 bit per layer
            for about +22% of the layer's training FLOPs). Results are bitwise the same.
    Returns:
        ``y [N, D]`` in ``x.dtype``; differentiable w.r.t. ``x``, both weights and the
        routing ``weights``. Deterministic: two calls are bitwise equal.
    Raises:
        TypeError / ValueError naming the argument: weight layout or dtype mismatch,
        D or F not a multiple of 16 (Triton path), ids outside ``[-1, E)`` (checked off
        CUDA only: reading them back would synchronise; on CUDA such slots are unused).
    """
    op = "expert_ffn"
    expert_ids, weights = _unpack_routing(op, routing)
    for name, t in (("x", x), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj),
                    ("expert_ids", expert_ids), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_same(op, "device", x=x, gate_up_proj=gate_up_proj, down_proj=down_proj, expert_ids=expert_ids,
               weights=weights)
    be = resolve_backend(backend, x, gate_up_proj, down_proj, expert_ids, weights, op=op)
    be = _pick_expert_backend(op, backend, be, x, gate_up_proj, down_proj, activation)
    _check_ffn_args(op, x, gate_up_proj, down_proj, expert_ids, weights, activation, be == "triton")
    if not isinstance(recompute, bool):
        raise TypeError(f"{op}: recompute must be a bool, got {type(recompute).__name__}")
    n, k = expert_ids.shape
    if be == "torch" or n == 0 or k == 0:
        return expert_ffn_torch(x, gate_up_proj, down_proj, expert_ids, weights)
    e = gate_up_proj.shape[0]
    if block_m is None:
        block_m = choose_block_m(n * k, e)
    elif block_m not in (16, 32, 64, 128, 256):
        raise ValueError(f"{op}: block_m must be one of 16, 32, 64, 128, 256 (tl.dot needs >= 16), got {block_m!r}")
    plan = dispatch(expert_ids, e, block_m=block_m, backend="triton")
    return _expert_ffn_planned(x, gate_up_proj, down_proj, weights, plan, recompute)


def _expert_ffn_planned(x, gate_up_proj, down_proj, weights, plan: DispatchPlan, recompute: bool) -> torch.Tensor:
    if interpreted_bf16(x):  # the interpreter's bf16 tl.dot is wrong: fp32 kernels, result rounded
        return bf16_via_fp32(lambda *w: _expert_ffn_planned(*w, weights, plan, recompute), x, gate_up_proj, down_proj)
    x = _last_dim_contiguous(x)
    gate_up_proj = _last_dim_contiguous(gate_up_proj)
    down_proj = _last_dim_contiguous(down_proj)
    weights = weights.contiguous()
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gate_up_proj, down_proj, weights))
    return _expert_ffn_apply(x, gate_up_proj, down_proj, weights, plan, save, recompute)


# --------------------------------------------------------------------------- layer


def moe_ffn(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    top_p: float = 1.0,
    k_max: int = 2,
    min_k: int = 1,
    n_group: int = 1,
    topk_group: int | None = None,
    renormalize: bool = True,
    backend: str = "auto",
    recompute: bool = False,
) -> tuple[torch.Tensor, Routing]:
    """Router + routed experts: ``logits = x @ router_weight^T``, :func:`route`, :func:`dispatch`,
    :func:`expert_ffn`.

    Args:
        x: ``[N, D]``; router_weight: ``[E, D]`` (``nn.Linear`` layout) in ``x.dtype``;
        gate_up_proj ``[E, 2F, D]``, down_proj ``[E, D, F]``; routing options as :func:`route`;
        ``recompute`` as :func:`expert_ffn`.
    Returns:
        ``(y [N, D], routing)``: the routing result feeds the auxiliary losses (load
        balance, z-loss); its weights carry the gradient back to ``router_weight``.
    """
    op = "moe_ffn"
    check_tensor("x", x, ndim=2, op=op)
    check_tensor("router_weight", router_weight, ndim=2, op=op)
    check_tensor("gate_up_proj", gate_up_proj, ndim=3, op=op)
    check_tensor("down_proj", down_proj, ndim=3, op=op)
    check_same(op, "dtype", x=x, router_weight=router_weight)
    check_same(op, "device", x=x, router_weight=router_weight, gate_up_proj=gate_up_proj, down_proj=down_proj)
    if not isinstance(recompute, bool):
        raise TypeError(f"{op}: recompute must be a bool, got {type(recompute).__name__}")
    if router_weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: router_weight must have shape [E, D] with D={x.shape[1]} (x.shape[1]), got {tuple(router_weight.shape)}"
        )
    if router_weight.shape[0] != gate_up_proj.shape[0]:
        raise ValueError(
            f"{op}: router_weight has E={router_weight.shape[0]} experts but gate_up_proj has "
            f"E={gate_up_proj.shape[0]}"
        )
    be = resolve_backend(backend, x, router_weight, gate_up_proj, down_proj, op=op)
    be = _pick_expert_backend(op, backend, be, x, gate_up_proj, down_proj, "swiglu")
    _check_expert_weights(op, x, gate_up_proj, down_proj, "swiglu", be == "triton")
    _check_route_args(op, x.new_empty(0, router_weight.shape[0]), top_p, k_max, min_k, n_group, topk_group,
                      renormalize)
    logits = F.linear(x, router_weight)
    routing = route(logits, top_p=top_p, k_max=k_max, min_k=min_k, n_group=n_group,
                    topk_group=topk_group, renormalize=renormalize, backend=be)
    n = x.shape[0]
    if be == "torch" or n == 0:
        return expert_ffn(x, gate_up_proj, down_proj, routing, backend=be, recompute=recompute), routing
    e = gate_up_proj.shape[0]
    plan = _plan_triton(routing.expert_ids, e, choose_block_m(n * k_max, e))
    y = _expert_ffn_planned(x, gate_up_proj, down_proj, routing.weights, plan, recompute)
    return y, routing
