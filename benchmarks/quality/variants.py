"""Model variants of the quality benchmark, all built from ``dasg_model``'s classes.

A variant is a :class:`DASGForCausalLM` at one width and depth whose attention and
feed-forward layers are chosen by name:

Attention (same projections, so exactly the same parameter count):

- ``dense``: full causal attention through ``torch.nn.functional.scaled_dot_product_attention``
  (:class:`SDPAAttention`, a :class:`GroupedMultiHeadAttention` with the same weights);
- ``swa``: the sliding window alone (``attention_window=W``, no summaries);
- ``dasg``: the window plus one mean key/value per earlier group of ``G`` (GMHA);
- ``sumonly``: GMHA with a one-token window (``attention_window=1``): beyond the previous
  token, everything a query sees arrives through the group means. It isolates what the
  summaries carry (the window's full tiles are gone).

Feed-forward, matched at the same *active* expert parameters per token (``3 * d * F``
with ``F = ffn_size``; routers and the complexity gate add under 2%):

- ``dense``: one SwiGLU FFN of hidden size ``F`` (:class:`DenseFFN`);
- ``topk``: ``num_experts`` SwiGLU experts of size ``F / k``, fixed top-``k`` routing
  (:class:`RoutedMoE` with ``top_p = 1``);
- ``adr``: the same expert bank, ADR's dynamic top-p routing (``top_p``, at most
  ``k_max = k`` experts, at least one) with group-limited (local) activation
  (``n_group`` expert groups, a token uses its best ``topk_group``); matched at its
  maximum, so it runs *at most* the dense FFN's active parameters (the measured mean is
  in the results);
- ``dsse``: :class:`dasg_model.DASGMoE`: a shallow shared expert on every token, a deep
  shared expert and a deep routed level on the tokens the complexity gate sends deep,
  each level with ADR routing (four experts in two groups, at most two, from one group).
  Hidden sizes: shallow shared ``F/6``, shallow experts ``F/12`` (two active: ``F/6``),
  deep shared ``F/3``, deep experts ``F/6`` (two active: ``F/3``): ``F`` in all when every
  token goes deep and takes two experts per level.

Every routed variant returns its auxiliary losses (load balance, z-loss, entropy) through
:class:`dasg_model.MoEOutput`, weighted by the config's coefficients in the model's
``aux_loss``, and its routing statistics (``mean_experts_per_token``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dasg_kernels import route
from dasg_model import DASGConfig, DASGForCausalLM, DASGMoE, GroupedMultiHeadAttention, MoEOutput, SwiGLUExperts
from dasg_model.attention import apply_rope
from dasg_model.router import level_aux_losses

ATTENTIONS: tuple[str, ...] = ("dense", "swa", "dasg", "sumonly")
EXPERTS: tuple[str, ...] = ("dense", "topk", "adr", "dsse")
#: stated tolerance of the matched active parameters (router / gate weights on top of the experts')
ACTIVE_PARAM_TOLERANCE = 0.02


@dataclass
class ModelSpec:
    """Width, depth and the variant names of one model (see the module docstring)."""

    vocab_size: int
    seq_len: int
    attention: str = "dasg"
    experts: str = "dense"
    window: int = 32
    group_size: int = 16
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_size: int = 192
    num_experts: int = 8
    k: int = 2
    top_p: float = 0.7
    n_group: int = 4
    topk_group: int = 2
    rope_theta: float = 10000.0
    backend: str = "torch"

    def validate(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"ModelSpec: attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.experts not in EXPERTS:
            raise ValueError(f"ModelSpec: experts must be one of {EXPERTS}, got {self.experts!r}")
        if self.window < 1:
            raise ValueError(f"ModelSpec: window must be >= 1, got {self.window}")
        if self.group_size < 1:
            raise ValueError(f"ModelSpec: group_size must be >= 1, got {self.group_size}")
        if self.ffn_size % 12 and self.experts == "dsse":
            raise ValueError(f"ModelSpec: ffn_size must be a multiple of 12 for the dsse sizes F/12 .. F/3, got "
                             f"{self.ffn_size}")
        if self.ffn_size % self.k:
            raise ValueError(f"ModelSpec: k ({self.k}) must divide ffn_size ({self.ffn_size})")

    # ----------------------------------------------------------------- claimed sizes
    @property
    def expert_size(self) -> int:
        """Hidden size of one routed expert of ``topk`` / ``adr``: ``F / k``."""
        return self.ffn_size // self.k

    @property
    def dsse_sizes(self) -> dict[str, int]:
        """``shallow_shared, shallow_expert, deep_shared, deep_expert`` hidden sizes of ``dsse``."""
        f = self.ffn_size
        return {"shallow_shared": f // 6, "shallow_expert": f // 12, "deep_shared": f // 3, "deep_expert": f // 6}

    def claimed_params(self) -> dict[str, int]:
        """What the variant should hold, from the spec alone (the tests count the modules):

        - ``attention_per_layer``: q, k, v, o projections;
        - ``ffn_per_layer``: every feed-forward weight of one layer (experts, routers, gate);
        - ``ffn_active_max_per_token``: the feed-forward weights one token can use in one
          layer at most (its experts at ``k`` / ``k_max`` slots, routers, gate);
        - ``ffn_active_experts_max_per_token``: the same counting expert weights only
          (equal for every expert variant: ``3 * d * F``);
        - ``total``: the whole model (embeddings tied to the LM head, norms).
        """
        d, f, e = self.hidden_size, self.ffn_size, self.num_experts
        hd = d // self.num_heads
        attn = 4 * d * self.num_heads * hd
        swiglu = 3 * d  # weights per hidden unit of a SwiGLU expert
        if self.experts == "dense":
            per_layer, active, router = swiglu * f, swiglu * f, 0
        elif self.experts in ("topk", "adr"):
            router = d * e
            per_layer, active = swiglu * self.expert_size * e + router, swiglu * self.expert_size * self.k + router
        else:
            s = self.dsse_sizes
            router = 2 * d * 4 + d + 1  # two level routers over 4 experts each, the complexity gate
            scales = 2 + 1  # routed_scale [2], shallow_scale
            per_layer = (swiglu * (s["shallow_shared"] + s["deep_shared"] + 4 * s["shallow_expert"]
                                   + 4 * s["deep_expert"]) + router + scales)
            active = (swiglu * (s["shallow_shared"] + s["deep_shared"] + 2 * s["shallow_expert"]
                                + 2 * s["deep_expert"]) + router + scales)
        norms = 2 * d
        total = self.vocab_size * d + self.num_layers * (attn + per_layer + norms) + d
        return {"attention_per_layer": attn, "ffn_per_layer": per_layer, "ffn_active_max_per_token": active,
                "ffn_active_experts_max_per_token": swiglu * f, "total": total}

    def config(self) -> DASGConfig:
        """The :class:`DASGConfig` (the ``dsse`` expert sizes are set for every variant)."""
        window = {"dense": -1, "swa": self.window, "dasg": self.window, "sumonly": 1}[self.attention]
        s = self.dsse_sizes if self.ffn_size % 12 == 0 else {k: 16 for k in self.dsse_sizes}
        return DASGConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_heads, max_position_embeddings=self.seq_len,
            rope_theta=self.rope_theta,
            attention_window=window, group_size=self.group_size,
            use_summaries=self.attention in ("dasg", "sumonly"),
            shallow_shared_size=s["shallow_shared"], deep_shared_size=s["deep_shared"], shallow_num_experts=4,
            shallow_expert_size=s["shallow_expert"], deep_num_experts=4, deep_expert_size=s["deep_expert"],
            router_top_p=self.top_p, k_max=2, n_group=2, topk_group=1, backend=self.backend,
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- attention


class SDPAAttention(GroupedMultiHeadAttention):
    """Full causal attention through PyTorch's SDPA, with GMHA's projections and RoPE.

    The dense baseline: the same parameters as :class:`GroupedMultiHeadAttention` (it is
    one), ``x [B, T, hidden] -> [B, T, hidden]``; training forward only (no generation
    cache, no packed documents, no context parallelism: a ``ValueError``).
    """

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache=None, layer_idx: int = 0, documents=None, **kwargs) -> torch.Tensor:
        if cache is not None or documents is not None or self.cp_group is not None:
            raise ValueError("SDPAAttention: the dense baseline supports the plain training forward only "
                             "(no cache, packed documents or context parallelism)")
        b, t, _ = x.shape
        cos, sin = rope if rope is not None else self.rotary(torch.arange(t, device=x.device))
        q = apply_rope(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


# ----------------------------------------------------------------------------- feed-forward


def _zero_aux(x: torch.Tensor) -> dict[str, torch.Tensor]:
    z = x.new_zeros((), dtype=torch.float32)
    return {"load_balance": z, "z_loss": z, "entropy": z}


class DenseFFN(nn.Module):
    """One SwiGLU FFN of hidden size ``ffn_size`` in a one-expert :class:`SwiGLUExperts`
    bank's layout; ``forward(x [..., d]) -> (y [..., d], MoEOutput)`` with zero aux losses."""

    def __init__(self, hidden_size: int, ffn_size: int, std: float):
        super().__init__()
        self.bank = SwiGLUExperts(1, hidden_size, ffn_size, backend="torch")
        nn.init.normal_(self.bank.gate_up_proj, std=std)
        nn.init.normal_(self.bank.down_proj, std=std)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, MoEOutput]:
        gate, up = F.linear(x, self.bank.gate_up_proj[0]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.bank.down_proj[0]), MoEOutput(_zero_aux(x), {})


class RoutedMoE(nn.Module):
    """A bank of routed SwiGLU experts behind one router (``topk`` and ``adr``).

    ``route(softmax(x W_r), top_p, k_max, n_group, topk_group)`` from
    :func:`dasg_kernels.route` (``top_p = 1`` is plain top-``k_max``), the experts through
    :class:`SwiGLUExperts` (:func:`dasg_kernels.expert_ffn`). ``forward(x [..., d])`` returns
    ``(y, MoEOutput)`` with the level's aux losses and ``routed/mean_experts_per_token``.
    """

    def __init__(self, hidden_size: int, num_experts: int, expert_size: int, *, top_p: float, k_max: int,
                 n_group: int, topk_group: int | None, std: float, backend: str):
        super().__init__()
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = SwiGLUExperts(num_experts, hidden_size, expert_size, backend=backend)
        self.top_p, self.k_max, self.n_group, self.topk_group, self.backend = top_p, k_max, n_group, topk_group, backend
        for p in (self.router.weight, self.experts.gate_up_proj, self.experts.down_proj):
            nn.init.normal_(p, std=std)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, MoEOutput]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = F.linear(flat, self.router.weight).float()
        r = route(logits, top_p=self.top_p, k_max=self.k_max, n_group=self.n_group, topk_group=self.topk_group,
                  renormalize=True, backend=self.backend)
        y = self.experts(flat, r.expert_ids, r.weights)
        losses, stats = level_aux_losses(logits, r, torch.ones(flat.shape[0], dtype=torch.bool, device=x.device))
        return y.reshape(shape), MoEOutput(losses, {f"routed/{k}": v for k, v in stats.items()})


def build_model(spec: ModelSpec, *, seed: int = 0) -> DASGForCausalLM:
    """The variant ``spec`` as a :class:`DASGForCausalLM`, initialised from ``seed``
    (``torch.manual_seed(seed)``): the attention variants of one seed and expert variant
    start from identical weights."""
    spec.validate()
    cfg = spec.config()
    torch.manual_seed(seed)
    model = DASGForCausalLM(cfg)
    std = cfg.initializer_range
    for layer in model.model.layers:
        if spec.experts == "dense":
            layer.moe = DenseFFN(spec.hidden_size, spec.ffn_size, std)
        elif spec.experts in ("topk", "adr"):
            adr = spec.experts == "adr"
            layer.moe = RoutedMoE(spec.hidden_size, spec.num_experts, spec.expert_size,
                                  top_p=spec.top_p if adr else 1.0, k_max=spec.k,
                                  n_group=spec.n_group if adr else 1, topk_group=spec.topk_group if adr else None,
                                  std=std, backend=spec.backend)
        elif not isinstance(layer.moe, DASGMoE):  # pragma: no cover - guards a changed DASGBlock
            raise TypeError(f"build_model: expected DASGMoE in the block, got {type(layer.moe).__name__}")
    # after the FFNs (whose initialisation draws from the generator), so that every attention
    # variant of a seed starts from the same weights
    if spec.attention == "dense":
        for layer in model.model.layers:
            sdpa = SDPAAttention(cfg)
            sdpa.load_state_dict(layer.attn.state_dict())
            layer.attn = sdpa
    return model


def count_params(module: nn.Module) -> int:
    """Distinct parameters of ``module`` (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def active_experts(spec: ModelSpec, moe_stats: list[dict[str, float]]) -> dict[str, float]:
    """Measured mean routed experts and active FFN parameters per token per layer, from the
    per-layer routing statistics (``MoEOutput.stats`` as floats) of an evaluation batch."""
    d, n = spec.hidden_size, max(1, len(moe_stats))
    swiglu = 3 * d
    if spec.experts == "dense":
        return {"mean_experts_per_token": 0.0, "ffn_active_params_mean": float(swiglu * spec.ffn_size)}
    if spec.experts in ("topk", "adr"):
        k = sum(s["routed/mean_experts_per_token"] for s in moe_stats) / n
        return {"mean_experts_per_token": k, "ffn_active_params_mean": swiglu * spec.expert_size * k + d * spec.num_experts}
    s = spec.dsse_sizes
    sh = sum(st["shallow/mean_experts_per_token"] for st in moe_stats) / n
    deep_frac = sum(st["deep_fraction"] for st in moe_stats) / n
    # the deep level's mean counts deep rows only
    dp = sum(st["deep/mean_experts_per_token"] * st["deep_fraction"] for st in moe_stats) / n
    active = swiglu * (s["shallow_shared"] + sh * s["shallow_expert"] + deep_frac * s["deep_shared"]
                       + dp * s["deep_expert"]) + 2 * d * 4 + d + 1
    return {"mean_experts_per_token": sh + dp, "deep_fraction": deep_frac, "ffn_active_params_mean": active}
