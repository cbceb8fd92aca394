"""DASGBlock, DASGModel and DASGForCausalLM: a small decoder LM over GMHA + DASG-MoE."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dasg_kernels.distributed import shift_labels_cp
from dasg_model.attention import GroupedMultiHeadAttention, RotaryEmbedding
from dasg_model.config import DASGConfig
from dasg_model.moe import DASGMoE, MoEOutput

AUX_LOSS_NAMES: tuple[str, str, str] = ("load_balance", "z_loss", "entropy")


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DASGBlock(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + moe(norm(x))``."""

    def __init__(self, config: DASGConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = GroupedMultiHeadAttention(config)
        self.moe_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = DASGMoE(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, MoEOutput]:
        x = x + self.attn(self.attn_norm(x), rope)
        y, aux = self.moe(self.moe_norm(x))
        return x + y, aux


class DASGModel(nn.Module):
    """Embeddings, ``num_layers`` :class:`DASGBlock` s and a final RMSNorm.

    ``forward(input_ids [B, T]) -> (hidden [B, T, hidden], [MoEOutput per layer])``.

    With ``cp_group`` set (:func:`dasg_model.parallel.apply_context_parallel`) ``input_ids``
    is this rank's sequence shard and the positions start at ``rank * T``.
    """

    cp_group: object | None = None

    def __init__(self, config: DASGConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DASGBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.resolved_head_dim, config.rope_theta)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[MoEOutput]]:
        t = input_ids.shape[1]
        start, total = 0, t
        if self.cp_group is not None:
            start, total = dist.get_rank(self.cp_group) * t, dist.get_world_size(self.cp_group) * t
        if total > self.config.max_position_embeddings:
            raise ValueError(f"DASGModel: sequence length {total} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        x = self.embed_tokens(input_ids)
        rope = self.rotary(torch.arange(start, start + t, device=input_ids.device))
        outs = []
        for layer in self.layers:
            x, aux = layer(x, rope)
            outs.append(aux)
        return self.norm(x), outs


@dataclass
class DASGCausalLMOutput:
    """What :meth:`DASGForCausalLM.forward` returns.

    Attributes:
        logits: ``[B, T, vocab]``.
        loss: ``lm_loss + aux_loss`` (``None`` without labels).
        lm_loss: the next-token cross-entropy (``None`` without labels).
        aux_loss: the weighted auxiliary loss
            ``load_balance_coef * LB + z_loss_coef * Z + entropy_coef * H`` (each term the mean
            over layers of the per-layer sums over levels).
        aux_losses: the unweighted means over layers, by name.
        moe: one :class:`MoEOutput` per layer (per-level statistics in ``.stats``).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    moe: list[MoEOutput] = field(default_factory=list)


class DASGForCausalLM(nn.Module):
    """A decoder LM: :class:`DASGModel` + an LM head (tied to the embeddings by default)."""

    def __init__(self, config: DASGConfig):
        super().__init__()
        self.config = config
        self.model = DASGModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)) and mod is not getattr(self.model, "embed_tokens", None):
                nn.init.normal_(mod.weight, std=std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        nn.init.normal_(self.model.embed_tokens.weight, std=std)
        for layer in self.model.layers:
            layer.moe.reset_parameters()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> DASGCausalLMOutput:
        """``input_ids [B, T]``; ``labels [B, T]`` (usually ``input_ids``; ``-100`` is ignored)
        are shifted inside: position ``t`` predicts ``labels[:, t + 1]``.

        Context parallel (``apply_context_parallel``): ``input_ids`` and ``labels`` are this
        rank's shards, sliced alike; the last position's target is the next rank's first
        label (``shift_labels_cp``) and ``lm_loss`` is ``cp_size * (this shard's summed
        cross-entropy) / (targets counted over the CP group)``, so its mean over the CP
        ranks is the whole sequence's ``lm_loss``, and gradients averaged over the CP ranks
        (as DDP / FSDP do over a dp x cp mesh) are the whole sequence's. The aux losses are
        this shard's (load balance over its tokens)."""
        hidden, moe_outs = self.model(input_ids)
        logits = self.lm_head(hidden)
        aux_losses = {
            name: torch.stack([o.aux_losses[name] for o in moe_outs]).mean() for name in AUX_LOSS_NAMES
        }
        cfg = self.config
        aux_loss = (cfg.load_balance_coef * aux_losses["load_balance"] + cfg.z_loss_coef * aux_losses["z_loss"]
                    + cfg.entropy_coef * aux_losses["entropy"])
        out = DASGCausalLMOutput(logits=logits, aux_loss=aux_loss, aux_losses=aux_losses, moe=moe_outs)
        if labels is not None:
            group = self.model.cp_group
            if group is None:
                targets, pred = labels[:, 1:].reshape(-1), logits[:, :-1]
            else:
                targets, pred = shift_labels_cp(labels, group=group).reshape(-1), logits
            # mean over the targets that count; 0 (not NaN) when none does (T=1, all -100)
            denom = (targets != -100).sum()
            if group is not None:  # the global count, over cp_size: the CP mean of lm_loss is the global one
                dist.all_reduce(denom, group=group)
                denom = denom.clamp(min=1) / dist.get_world_size(group)
            else:
                denom = denom.clamp(min=1)
            lm_loss = F.cross_entropy(
                pred.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100, reduction="sum"
            ) / denom
            out.lm_loss = lm_loss
            out.loss = lm_loss + aux_loss
        return out

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int = 16, eos_token_id: int | None = None
    ) -> torch.Tensor:
        """Greedy decoding: append ``max_new_tokens`` argmax tokens to ``input_ids [B, T]``.

        Each step re-runs the full sequence (no KV cache); rows that produced ``eos_token_id``
        keep emitting it.
        """
        was_training = self.training
        self.eval()
        ids = input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            nxt = self(ids).logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        self.train(was_training)
        return ids

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def routing_summary(moe_outs: list[MoEOutput]) -> dict[str, float]:
    """Per-level statistics as Python numbers for logging (synchronises with the device).

    Keys: ``layer{i}/<level>/mean_experts_per_token``, ``layer{i}/<level>/tokens_per_expert``
    (a list), ``layer{i}/deep_fraction``, ``layer{i}/mean_gate``.
    """
    out: dict = {}
    for i, o in enumerate(moe_outs):
        for k, v in o.stats.items():
            if k.endswith("num_tokens"):
                continue
            out[f"layer{i}/{k}"] = v.tolist() if v.dim() else float(v)
    return out


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Switch every DASG module inside ``module`` to ``backend`` (``"auto" | "triton" | "torch"``)."""
    from dasg_kernels.backend import BACKENDS

    from dasg_model.experts import SwiGLUExperts

    if backend not in BACKENDS:
        raise ValueError(f"set_backend: backend must be one of {BACKENDS}, got {backend!r}")
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, DASGConfig):
            cfg.backend = backend
        if isinstance(m, SwiGLUExperts):
            m.backend = backend
    return module
