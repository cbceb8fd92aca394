"""ADR: the adaptive dynamic router (complexity gate + per-level dynamic top-p routing)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dasg_kernels import Routing, route
from dasg_model.config import DASGConfig

LEVELS: tuple[str, str] = ("shallow", "deep")


@dataclass
class LevelRouting:
    """The routing of one expert level for ``N`` tokens.

    Attributes:
        routing: :class:`dasg_kernels.Routing`; rows that do not run this level have
            ``expert_ids == -1`` and ``weights == 0`` in every slot, and
            ``tokens_per_expert`` counts only the rows that do.
        logits: ``[N, E]`` router logits (fp32).
        active: ``[N]`` bool, the rows that run this level (all rows for the shallow level).
    """

    routing: Routing
    logits: torch.Tensor
    active: torch.Tensor


@dataclass
class RouterOutput:
    """What :class:`AdaptiveDynamicRouter` returns.

    Attributes:
        gate: ``[N]`` fp32, the complexity gate ``c = sigmoid(w_c . x + b)`` (differentiable).
        deep_mask: ``[N]`` bool, ``c >= tau``: the rows that run the deep level.
        levels: ``{"shallow": LevelRouting, "deep": LevelRouting}``.
        aux_losses: scalars ``load_balance``, ``z_loss``, ``entropy`` (sums over the levels)
            and the per-level terms ``"<level>/<name>"``; all differentiable, unweighted.
        stats: detached tensors to log (no host sync): ``"<level>/tokens_per_expert" [E]``,
            ``"<level>/mean_experts_per_token"``, ``"<level>/num_tokens"``, ``"deep_fraction"``.
    """

    gate: torch.Tensor
    deep_mask: torch.Tensor
    levels: dict[str, LevelRouting]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def level_aux_losses(
    logits: torch.Tensor, routing: Routing, active: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Auxiliary losses and statistics of one level over its ``active`` rows.

    - ``load_balance``: Switch-style ``E * sum_e f_e * P_e``, with ``f_e`` the fraction of
      the level's (token, slot) assignments that went to expert ``e`` and ``P_e`` the mean
      router probability of ``e`` (1.0 when perfectly balanced).
    - ``z_loss``: mean of ``logsumexp(logits)^2`` (ST-MoE router z-loss).
    - ``entropy``: mean entropy of the router distribution; minimising it concentrates the
      probability mass so that top-p routing selects fewer experts (dynamic-routing loss).

    Means are over the active rows (0 when there are none); no host synchronisation.
    """
    e = logits.shape[-1]
    m = active.to(torch.float32)
    n = m.sum().clamp(min=1.0)
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    counts = routing.tokens_per_expert.to(torch.float32)
    f = counts / counts.sum().clamp(min=1.0)
    p_mean = (probs * m[:, None]).sum(0) / n
    losses = {
        "load_balance": e * (f * p_mean).sum(),
        "z_loss": (torch.logsumexp(logits, dim=-1).square() * m).sum() / n,
        "entropy": (-(probs * logp).sum(-1) * m).sum() / n,
    }
    stats = {
        "tokens_per_expert": routing.tokens_per_expert.detach(),
        "mean_experts_per_token": (routing.num_selected.to(torch.float32) * m).sum().detach() / n.detach(),
        "num_tokens": m.sum().detach(),
    }
    return losses, stats


def mask_routing(r: Routing, active: torch.Tensor) -> Routing:
    """Drop the rows not in ``active`` (ids -1, weights 0) and recount ``tokens_per_expert``."""
    e = r.tokens_per_expert.shape[0]
    keep = active[:, None] & (r.expert_ids >= 0)
    ids = torch.where(keep, r.expert_ids, torch.full_like(r.expert_ids, -1))
    w = r.weights * keep
    counts = torch.zeros(e, dtype=torch.int32, device=ids.device).index_add_(
        0, ids.clamp(min=0).flatten().long(), keep.flatten().to(torch.int32)
    )
    return Routing(ids, w, r.num_selected * active.to(r.num_selected.dtype), counts)


class AdaptiveDynamicRouter(nn.Module):
    """ADR: the complexity gate and one dynamic top-p router per expert level.

    For tokens ``x [N, hidden]``:

    1. ``c = sigmoid(w_c . x + b)``; the token runs the deep level when ``c >= tau``
       (``config.complexity_threshold``). The choice is a hard threshold; gradients reach
       ``w_c, b`` through ``c``, which weights the deep level's output (see :class:`DASGMoE`).
    2. Per level, ``route(logits, top_p, k_max, min_k, n_group, topk_group)``: a dynamic number
       of experts per token (at least ``min_k``, at most ``k_max``), within the token's best
       ``topk_group`` expert groups. The deep level's routing keeps only deep rows.

    The deep level is routed for all rows and then masked (routing is ``N x E``, cheap):
    selecting the deep rows never needs their count on the host.
    """

    def __init__(self, config: DASGConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.complexity_gate = nn.Linear(d, 1, bias=True)
        self.shallow_router = nn.Linear(d, config.shallow_num_experts, bias=False)
        self.deep_router = nn.Linear(d, config.deep_num_experts, bias=False)

    def _route(self, logits: torch.Tensor) -> Routing:
        cfg = self.config
        return route(
            logits, top_p=cfg.router_top_p, k_max=cfg.k_max, min_k=cfg.min_k, n_group=cfg.n_group,
            topk_group=cfg.topk_group, renormalize=True, backend=cfg.backend,
        )

    def forward(self, x: torch.Tensor) -> RouterOutput:
        if x.dim() != 2:
            raise ValueError(f"AdaptiveDynamicRouter: x must be [N, hidden], got shape {tuple(x.shape)}")
        gate = torch.sigmoid(self.complexity_gate(x).float().squeeze(-1))
        deep_mask = gate.detach() >= self.config.complexity_threshold
        everyone = torch.ones_like(deep_mask)
        levels: dict[str, LevelRouting] = {}
        aux: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        for name, router, active in (
            ("shallow", self.shallow_router, everyone),
            ("deep", self.deep_router, deep_mask),
        ):
            logits = F.linear(x, router.weight).float()
            r = self._route(logits)
            if name == "deep":
                r = mask_routing(r, active)
            levels[name] = LevelRouting(r, logits, active)
            level_losses, level_stats = level_aux_losses(logits, r, active)
            for k, v in level_losses.items():
                aux[f"{name}/{k}"] = v
                aux[k] = aux[k] + v if k in aux else v
            for k, v in level_stats.items():
                stats[f"{name}/{k}"] = v
        stats["deep_fraction"] = deep_mask.float().mean().detach()
        stats["mean_gate"] = gate.mean().detach()
        return RouterOutput(gate, deep_mask, levels, aux, stats)
