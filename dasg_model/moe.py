"""DASGMoE: DSSE + ADR + one routed expert bank per level, and pre-training transfer."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dasg_model.config import DASGConfig
from dasg_model.experts import DualScaleSharedExperts, SwiGLUExperts, is_silu
from dasg_model.router import AdaptiveDynamicRouter, RouterOutput


@dataclass
class MoEOutput:
    """The auxiliary results of one :class:`DASGMoE` call.

    Attributes:
        aux_losses: unweighted scalars ``load_balance``, ``z_loss``, ``entropy`` (summed over
            the two levels) and the per-level terms ``"<level>/<name>"``.
        stats: detached tensors to log (see :class:`dasg_model.router.RouterOutput`).
        router: the full :class:`RouterOutput` (gate, deep mask, routings, logits).
    """

    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    router: RouterOutput | None = None


class DASGMoE(nn.Module):
    """The DASG-MoE feed-forward layer.

    For ``x [..., hidden]`` (flattened to ``N`` tokens), with ``c`` and ``deep = c >= tau``
    from the router::

        y = shallow_scale * shared_shallow(x)
          + routed_scale[0] * sum_{e in R_shallow(x)} w_e * shallow_expert_e(x)
          + deep * c * ( shared_deep(x)
                         + routed_scale[1] * sum_{e in R_deep(x)} w_e * deep_expert_e(x) )

    where ``R_level`` is the dynamic top-p routing of the level and ``w`` its renormalised
    weights. Every expert runs through :func:`dasg_kernels.expert_ffn`; the deep terms are
    computed only on the deep rows. ``routed_scale [2]`` is learnable (1 by default,
    0 after :meth:`from_dense`).

    ``forward`` returns ``(y, MoEOutput)`` with the auxiliary losses and statistics.
    """

    def __init__(self, config: DASGConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.router = AdaptiveDynamicRouter(config)
        self.shared = DualScaleSharedExperts(config)
        self.shallow_experts = SwiGLUExperts(
            config.shallow_num_experts, d, config.shallow_expert_size, backend=config.backend
        )
        self.deep_experts = SwiGLUExperts(config.deep_num_experts, d, config.deep_expert_size, backend=config.backend)
        self.routed_scale = nn.Parameter(torch.ones(2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for p in (self.router.shallow_router.weight, self.router.deep_router.weight,
                  self.router.complexity_gate.weight):
            nn.init.normal_(p, std=std)
        nn.init.zeros_(self.router.complexity_gate.bias)
        for bank in (self.shared.shallow, self.shared.deep, self.shallow_experts, self.deep_experts):
            nn.init.normal_(bank.gate_up_proj, std=std)
            nn.init.normal_(bank.down_proj, std=std)
        with torch.no_grad():
            self.routed_scale.fill_(1.0)
            self.shared.shallow_scale.fill_(1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEOutput]:
        """``x [..., hidden]`` -> ``(y [..., hidden], MoEOutput)``."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = self.router(flat)
        y = self.mix_experts(flat, r)
        return y.reshape(shape), MoEOutput(r.aux_losses, r.stats, r)

    def routed_levels(self, r: RouterOutput) -> list[tuple[SwiGLUExperts, torch.Tensor, torch.Tensor]]:
        """``(bank, expert_ids [N, k], weights [N, k])`` per level, shallow then deep, with the
        weights of the layer formula: ``routed_scale[0] * w`` and ``c * routed_scale[1] * w``."""
        sh = r.levels["shallow"].routing
        dp = r.levels["deep"].routing
        return [
            (self.shallow_experts, sh.expert_ids, sh.weights * self.routed_scale[0]),
            (self.deep_experts, dp.expert_ids, dp.weights * (r.gate * self.routed_scale[1])[:, None]),
        ]

    def mix_experts(self, flat: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        """``y [N, hidden]`` of the tokens ``flat [N, hidden]`` routed by ``r``: the shared
        experts, then the shallow and deep routed banks (the expert-parallel layer overrides
        this, and may replace ``r.aux_losses`` / ``r.stats``)."""
        y = self.shared(flat, r.gate, r.deep_mask)
        for bank, ids, w in self.routed_levels(r):
            y = y + bank(flat, ids, w)
        return y

    # ------------------------------------------------------------------ pre-training transfer
    @classmethod
    def from_dense(
        cls,
        mlp: nn.Module,
        config: DASGConfig | None = None,
        *,
        gate_bias: float = 3.0,
        routed_scale: float = 0.0,
        shallow_scale: float = 0.0,
        **config_changes,
    ) -> DASGMoE:
        """Build the layer from a pretrained dense SwiGLU MLP ("pre-training transfer").

        ``mlp`` has ``gate_proj [I, D]``, ``up_proj [I, D]``, ``down_proj [D, I]`` linear layers
        without bias and a SiLU activation (``MistralMLP``, ``LlamaMLP``, ``Qwen2MLP``, ...).

        - The deep shared expert takes the dense weights exactly (its size becomes ``I``); the
          complexity gate starts with ``w_c = 0`` and ``b = gate_bias``, so every token has
          ``c0 = sigmoid(gate_bias) >= tau`` and runs the deep level, and the deep down
          projection is stored divided by ``c0`` so that ``c0 * deep(x) = mlp(x)``.
        - The routed experts (and the shallow shared expert) are upcycled: expert ``e`` of a
          level with hidden size ``F`` takes the dense hidden units ``(e*F + j) mod I``,
          ``j < F`` (slices, or copies where ``F > I``).
        - ``routed_scale`` and ``shallow_scale`` (both learnable) start at the given values;
          with the defaults (0) the layer equals the dense MLP at initialisation.

        ``config`` (default: a ``DASGConfig`` with the MLP's sizes) is updated with
        ``hidden_size = D``, ``deep_shared_size = I`` and ``config_changes``.
        """
        gate_w, up_w, down_w = _dense_swiglu_weights(mlp)
        inter, d = gate_w.shape
        config = config if config is not None else DASGConfig(hidden_size=d)
        config = config.replace(hidden_size=d, deep_shared_size=inter, **config_changes)
        c0 = 1.0 / (1.0 + math.exp(-gate_bias))
        if c0 < config.complexity_threshold:
            raise ValueError(
                f"DASGMoE.from_dense: sigmoid(gate_bias={gate_bias}) = {c0:.4f} is below "
                f"complexity_threshold={config.complexity_threshold}; raise gate_bias so every token starts deep"
            )
        layer = cls(config).to(device=gate_w.device, dtype=gate_w.dtype)
        with torch.no_grad():
            layer.shared.deep.gate_up_proj[0].copy_(torch.cat([gate_w, up_w], dim=0))
            layer.shared.deep.down_proj[0].copy_(down_w / c0)
            layer.router.complexity_gate.weight.zero_()
            layer.router.complexity_gate.bias.fill_(gate_bias)
            for bank in (layer.shared.shallow, layer.shallow_experts, layer.deep_experts):
                f_size = bank.ffn_size
                for e in range(bank.num_experts):
                    idx = (torch.arange(f_size, device=gate_w.device) + e * f_size) % inter
                    bank.gate_up_proj[e].copy_(torch.cat([gate_w[idx], up_w[idx]], dim=0))
                    bank.down_proj[e].copy_(down_w[:, idx])
            layer.routed_scale.fill_(routed_scale)
            layer.shared.shallow_scale.fill_(shallow_scale)
        return layer


def _dense_swiglu_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate [I, D], up [I, D], down [D, I])`` of a bias-free SiLU-gated MLP, or ``ValueError``."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"from_dense: mlp must have an nn.Linear {name} (a SwiGLU MLP), got {type(lin).__name__}")
        if lin.bias is not None:
            raise ValueError(f"from_dense: mlp.{name} has a bias; DASG experts are bias-free")
    act = getattr(mlp, "act_fn", None)
    if act is not None and not is_silu(act):
        raise ValueError(f"from_dense: mlp.act_fn must be SiLU, got {act!r}")
    gate_w, up_w, down_w = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    if up_w.shape != gate_w.shape or down_w.shape != gate_w.shape[::-1]:
        raise ValueError(
            f"from_dense: inconsistent shapes gate {tuple(gate_w.shape)}, up {tuple(up_w.shape)}, "
            f"down {tuple(down_w.shape)}"
        )
    return gate_w.detach(), up_w.detach(), down_w.detach()
