"""DASGBlock, DASGModel and DASGForCausalLM: a decoder LM over GMHA + DASG-MoE, as a transformers model.

``DASGForCausalLM`` is a ``transformers.PreTrainedModel`` with ``GenerationMixin``:
``save_pretrained`` / ``from_pretrained`` (safetensors, tied embeddings), ``AutoModelForCausalLM``
(registered by ``import dasg_model``), and ``generate`` with everything transformers offers
(greedy, sampling, beam search, streamers, ``return_dict_in_generate``) on top of the bounded
:class:`~dasg_model.cache.DASGCache`. Left-padded batches are handled without a ``[T, T]``
mask (:mod:`dasg_model.padding`); a long prompt is prefilled ``config.prefill_chunk_size``
positions at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
import transformers.generation.utils
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from dasg_kernels.distributed import shift_labels_cp
from dasg_model.attention import GroupedMultiHeadAttention, RotaryEmbedding
from dasg_model.cache import DASGCache
from dasg_model.config import DASGConfig
from dasg_model.experts import SwiGLUExperts
from dasg_model.moe import DASGMoE, MoEOutput
from dasg_model.padding import check_one_run, roll_rows, run_start

AUX_LOSS_NAMES: tuple[str, str, str] = ("load_balance", "z_loss", "entropy")
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
#: the names ``generate`` passes the cache under, the current one first ("cache" from 5.2x, else "past_key_values")
_CACHE_KWARGS: tuple[str, ...] = tuple(getattr(transformers.generation.utils, "ALL_CACHE_NAMES", ["past_key_values"]))


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
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: DASGCache | None = None,
        layer_idx: int = 0,
    ) -> tuple[torch.Tensor, MoEOutput]:
        x = x + self.attn(self.attn_norm(x), rope, cache, layer_idx)
        y, aux = self.moe(self.moe_norm(x))
        return x + y, aux


class DASGPreTrainedModel(PreTrainedModel):
    """transformers glue shared by :class:`DASGModel` and :class:`DASGForCausalLM`."""

    config_class = DASGConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DASGBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, SwiGLUExperts):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
        elif isinstance(module, DASGMoE):
            module.reset_parameters()
        elif isinstance(module, RotaryEmbedding):  # a non-persistent buffer: rebuilt, not loaded
            d = module.inv_freq.numel() * 2
            module.inv_freq.copy_(1.0 / (self.config.rope_theta ** (
                torch.arange(0, d, 2, dtype=torch.float32, device=module.inv_freq.device) / d)))


class DASGModel(DASGPreTrainedModel):
    """Embeddings, ``num_layers`` :class:`DASGBlock` s and a final RMSNorm.

    ``forward(input_ids [B, T], attention_mask=None, position_ids=None, cache=None)
    -> (hidden [B, T, hidden], [MoEOutput per layer])``.

    - ``attention_mask [B, T_past + T]`` (1 = token, 0 = padding), one run of tokens per
      row: padding is never attended and never enters a group mean, and each row's positions
      (RoPE, window, groups) start at its first real token.
    - ``position_ids`` override the RoPE positions only (window and groups follow each row's
      token order).
    - ``cache`` (:class:`DASGCache`): the new columns are appended, ``prefill_chunk_size`` at
      a time; the returned MoE outputs are those of the last chunk.

    With ``cp_group`` set (:func:`dasg_model.parallel.apply_context_parallel`) ``input_ids``
    is this rank's sequence shard and the positions start at ``rank * T``.
    """

    cp_group: object | None = None

    def __init__(self, config: DASGConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DASGBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.resolved_head_dim, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _layers(self, x: torch.Tensor, rope, cache: DASGCache | None = None) -> tuple[torch.Tensor, list[MoEOutput]]:
        outs = []
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, rope, cache, i)
            outs.append(aux)
        return x, outs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DASGCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[MoEOutput]]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DASGModel: pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if t == 0:
            raise ValueError("DASGModel: input_ids has no positions; pass at least one token (e.g. a BOS token)")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != b
                                           or attention_mask.shape[1] < t):
            raise ValueError(f"DASGModel: attention_mask must be a 2-D [B, T_past + T] mask with B={b} and at "
                             f"least T={t} columns, got {tuple(attention_mask.shape)}")
        if cache is not None:
            return self._forward_cached(x, attention_mask, position_ids, cache)
        start, total = 0, t
        if self.cp_group is not None:
            start, total = dist.get_rank(self.cp_group) * t, dist.get_world_size(self.cp_group) * t
        if total > self.config.max_position_embeddings:
            raise ValueError(f"DASGModel: sequence length {total} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        shift = None
        if attention_mask is not None:
            if self.cp_group is not None:
                raise ValueError("DASGModel: attention_mask is not supported with context parallelism")
            mask = attention_mask[:, -t:]
            check_one_run(mask)
            shift = run_start(mask)
            x = roll_rows(x, shift)
            position_ids = None if position_ids is None else roll_rows(position_ids, shift)
        pos = torch.arange(start, start + t, device=x.device) if position_ids is None else position_ids
        x, outs = self._layers(x, self.rotary(pos))
        x = self.norm(x)
        if shift is not None:
            x = roll_rows(x, -shift)
        return x, outs

    def _forward_cached(self, x, attention_mask, position_ids, cache: DASGCache):
        cache.check_compatible(self.config)
        if self.cp_group is not None:
            raise ValueError("DASGModel: a generation cache cannot be used with context parallelism")
        b, t = x.shape[:2]
        pads = None
        if attention_mask is not None:
            if attention_mask.shape[1] != cache.seen + t:
                raise ValueError(f"DASGForCausalLM: with a cache, attention_mask must cover the {cache.seen} cached "
                                 f"and the {t} new columns ({cache.seen + t}), got {attention_mask.shape[1]}")
            check_one_run(attention_mask, what="attention_mask with a cache", left_only=True)
            pads = run_start(attention_mask)
        hidden, outs, chunk = [], [], self.config.prefill_chunk_size
        for lo in range(0, t, chunk):
            n = min(chunk, t - lo)
            cache.begin(b, n, pads, x.device)
            pos = cache.positions(n) if position_ids is None else position_ids[:, lo:lo + n]
            h, outs = self._layers(x[:, lo:lo + n], self.rotary(pos), cache)
            hidden.append(self.norm(h))
            cache.end(n)
        return torch.cat(hidden, 1) if len(hidden) > 1 else hidden[0], outs


@dataclass
class DASGCausalLMOutput(ModelOutput):
    """What :meth:`DASGForCausalLM.forward` returns.

    Attributes:
        loss: ``lm_loss + aux_loss`` (``None`` without labels).
        logits: ``[B, T, vocab]`` (the last ``logits_to_keep`` positions when given).
        cache: the :class:`DASGCache` (``past_key_values`` on transformers before the rename).
        lm_loss: the next-token cross-entropy (``None`` without labels).
        aux_loss: the weighted auxiliary loss
            ``load_balance_coef * LB + z_loss_coef * Z + entropy_coef * H`` (each term the mean
            over layers of the per-layer sums over levels).
        aux_losses: the unweighted means over layers, by name.
        moe: one :class:`MoEOutput` per layer (per-level statistics in ``.stats``).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    if _CACHE_KWARGS[0] == "cache":  # transformers' name for it
        cache: DASGCache | None = None
    else:
        past_key_values: DASGCache | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    moe: list[MoEOutput] | None = None


class DASGForCausalLM(DASGPreTrainedModel, GenerationMixin):
    """A decoder LM: :class:`DASGModel` + an LM head (tied to the embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: DASGConfig):
        super().__init__(config)
        self.model = DASGModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if getattr(self, "generation_config", None) is not None:
            # forward chunks the prefill itself (config.prefill_chunk_size); transformers' own
            # chunking (a generation parameter of the same name) would refuse use_cache=False
            self.generation_config.prefill_chunk_size = None
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a DynamicCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any) -> None:
        """``generate`` gets a :class:`DASGCache` (transformers would build a ``DynamicCache``);
        a run that would feed more than ``max_position_embeddings`` columns fails here, before
        the first token, not midway."""
        fed = generation_config.max_length - 1  # prompt + new tokens, the last one never fed
        if fed > self.config.max_position_embeddings:
            raise ValueError(
                f"DASGForCausalLM.generate: the prompt plus max_new_tokens feeds {fed} positions to the model "
                f"(max_length={generation_config.max_length}, minus the last token), more than max_position_embeddings="
                f"{self.config.max_position_embeddings}; shorten the prompt or lower max_new_tokens")
        if generation_config.use_cache is False or any(model_kwargs.get(n) is not None for n in _CACHE_KWARGS):
            return
        model_kwargs[_CACHE_KWARGS[0]] = DASGCache(self.config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def reset_parameters(self) -> None:
        """Re-initialise every weight (as at construction)."""
        for m in self.modules():
            self._init_weights(m)

    def _resolve_cache(self, cache: Any, use_cache: bool | None) -> DASGCache | None:
        if use_cache is None:
            use_cache = cache is not None
        if not use_cache:
            return None
        if cache is None or (isinstance(cache, Cache) and not isinstance(cache, DASGCache)
                             and cache.get_seq_length() == 0):
            return DASGCache(self.config)
        if not isinstance(cache, DASGCache):
            raise ValueError(f"DASGForCausalLM: past_key_values must be a DASGCache (or empty), "
                             f"got a filled {type(cache).__name__}")
        return cache

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DASGCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache: DASGCache | None = None,
        **kwargs: Any,
    ) -> DASGCausalLMOutput:
        """``input_ids [B, T]``; ``labels [B, T]`` (usually ``input_ids``; ``-100`` is ignored)
        are shifted inside: position ``t`` predicts ``labels[:, t + 1]``.

        ``attention_mask``, ``position_ids``: see :class:`DASGModel`. ``past_key_values`` (or
        ``cache``, transformers' newer name): a :class:`DASGCache`, created when ``use_cache``
        and none is given; returned as ``.cache`` / ``.past_key_values``. ``use_cache`` defaults
        to whether a cache was passed. ``logits_to_keep > 0`` computes only the last positions'
        logits. Other keywords transformers passes (``cache_position``, ``return_dict``, ...)
        are accepted and not needed.

        Context parallel (``apply_context_parallel``): ``input_ids`` and ``labels`` are this
        rank's shards, sliced alike; the last position's target is the next rank's first
        label (``shift_labels_cp``) and ``lm_loss`` is ``cp_size * (this shard's summed
        cross-entropy) / (targets counted over the CP group)``, so its mean over the CP
        ranks is the whole sequence's ``lm_loss``, and gradients averaged over the CP ranks
        (as DDP / FSDP do over a dp x cp mesh) are the whole sequence's. The aux losses are
        this shard's (load balance over its tokens)."""
        cache = self._resolve_cache(cache if cache is not None else past_key_values, use_cache)
        hidden, moe_outs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, inputs_embeds=inputs_embeds)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        aux_losses = {
            name: torch.stack([o.aux_losses[name] for o in moe_outs]).mean() for name in AUX_LOSS_NAMES
        }
        cfg = self.config
        aux_loss = (cfg.load_balance_coef * aux_losses["load_balance"] + cfg.z_loss_coef * aux_losses["z_loss"]
                    + cfg.entropy_coef * aux_losses["entropy"])
        out = DASGCausalLMOutput(logits=logits, aux_loss=aux_loss, aux_losses=aux_losses, moe=moe_outs,
                                 **{_CACHE_KWARGS[0]: cache})
        if labels is not None:
            out.lm_loss = self._lm_loss(logits, labels)
            out.loss = out.lm_loss + aux_loss
        return out

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
        return F.cross_entropy(
            pred.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100, reduction="sum"
        ) / denom


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

    if backend not in BACKENDS:
        raise ValueError(f"set_backend: backend must be one of {BACKENDS}, got {backend!r}")
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, DASGConfig):
            cfg.backend = backend
        if isinstance(m, SwiGLUExperts):
            m.backend = backend
    return module
