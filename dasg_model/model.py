"""DASGBlock, DASGModel and DASGForCausalLM: a decoder LM over GMHA + DASG-MoE, as a transformers model.

``DASGForCausalLM`` is a ``transformers.PreTrainedModel`` with ``GenerationMixin``:
``save_pretrained`` / ``from_pretrained`` (safetensors, tied embeddings), ``AutoModelForCausalLM``
(registered by ``import dasg_model``), and ``generate`` with everything transformers offers
(greedy, sampling, beam search, streamers, ``return_dict_in_generate``) on top of the bounded
:class:`~dasg_model.cache.DASGCache`. Left-padded batches are handled without a ``[T, T]``
mask (:mod:`dasg_model.padding`); packed documents (transformers' ``DataCollatorWithFlattening``,
in each of its modes) are kept apart (:mod:`dasg_model.packing`); a long prompt is prefilled
``config.prefill_chunk_size`` positions at a time. The loss follows transformers' contract with
``Trainer`` (``num_items_in_batch``; see :meth:`DASGForCausalLM.forward`).
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

from dasg_kernels.context_parallel import cp_positions, cp_shard
from dasg_model.attention import GroupedMultiHeadAttention, RotaryEmbedding
from dasg_model.cache import DASGCache
from dasg_model.config import DASGConfig
from dasg_model.experts import SwiGLUExperts
from dasg_model.moe import DASGMoE, MoEOutput
from dasg_model.packing import (
    PackedDocuments,
    doc_starts_from_cu_seqlens,
    doc_starts_from_positions,
    doc_starts_from_seq_idx,
    host_int,
    positions_in_documents,
)
from dasg_model.parallel.labels import shift_labels_cp
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
        documents: PackedDocuments | None = None,
    ) -> tuple[torch.Tensor, MoEOutput]:
        x = x + self.attn(self.attn_norm(x), rope, cache, layer_idx, documents)
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

    ``forward(input_ids [B, T], attention_mask=None, position_ids=None, cache=None, ...)
    -> (hidden [B, T, hidden], [MoEOutput per layer])``.

    - ``attention_mask [B, T_past + T]`` (1 = token, 0 = padding), one run of tokens per
      row: padding is never attended and never enters a group mean, and each row's positions
      (RoPE, window, groups) start at its first real token. With a mask, ``position_ids``
      override the RoPE positions only (window and groups follow each row's token order).
    - Packed documents (transformers' ``DataCollatorWithFlattening``), see :meth:`documents`:
      ``position_ids`` that restart inside a row (no ``attention_mask``, no cache), or the
      ``cu_seq_lens_q/k`` + ``max_length_q/k`` keywords, or ``seq_idx``. Each document is
      computed as if alone: attention through :func:`dasg_kernels.swa_attention_varlen`
      (windows, groups and summaries restart per document), RoPE positions from
      ``position_ids`` or, when not given, restarting at 0 per document.
    - ``cache`` (:class:`DASGCache`): the new columns are appended, ``prefill_chunk_size`` at
      a time; the returned MoE outputs are those of the last chunk.

    With ``cp_group`` set (:func:`dasg_model.parallel.apply_context_parallel`) ``input_ids``
    is this rank's sequence shard (in ``cp_layout``) and the positions are its global ones
    (``dasg_kernels.context_parallel.cp_positions``; ``position_ids`` and ``seq_idx`` are refused
    there). Packed documents come as ``cu_seq_lens_q/k`` + ``max_length_q/k``, offsets into the
    whole sequence (before sharding): each document attends to itself across the shards and its
    positions count from its start.
    """

    cp_group: object | None = None
    cp_layout: str = "contiguous"

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

    def _layers(self, x: torch.Tensor, rope, cache: DASGCache | None = None,
                documents: PackedDocuments | None = None) -> tuple[torch.Tensor, list[MoEOutput]]:
        outs = []
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, rope, cache, i, documents)
            outs.append(aux)
        return x, outs

    def documents(
        self,
        batch: int,
        length: int,
        device: torch.device,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DASGCache | None = None,
        seq_idx: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | torch.Tensor | None = None,
        max_length_k: int | torch.Tensor | None = None,
    ) -> PackedDocuments | None:
        """The packed documents of a forward call on ``[batch, length]`` tokens, or ``None``
        (one sequence per row).

        Read in this order (the first given wins, as in transformers' flash-attention path):

        - ``cu_seq_lens_q/k`` ``[N + 1]`` + ``max_length_q/k`` (all four), offsets into the
          ``length`` tokens of a batch of size 1; used as given (no host read but
          ``max_length`` tensors, read once).
        - ``seq_idx [1, length]``, the document index of each token.
        - ``position_ids [B or 1, length]`` without ``attention_mask`` and cache: a document
          starts wherever they do not step by 1 (any batch size). Eager: one host read, and
          ``None`` when no row restarts; under ``torch.compile``: no read, ``cu_seqlens`` with
          a slot per token.

        ``ValueError`` (before any launch) for what cannot be honoured: ``cu_seq_lens`` /
        ``seq_idx`` with a batch size other than 1, with a cache, ``seq_idx`` with context parallelism,
        with an ``attention_mask`` holding zeros (read in eager mode; taken as all ones under
        compile), incomplete ``cu_seq_lens`` keywords, unequal ``cu_seq_lens_q`` / ``_k``
        (read off CUDA, in eager mode), ``seq_idx`` of the wrong shape; ``position_ids`` with
        context parallelism; ``position_ids`` that restart inside a row with a cache (read in
        eager mode).
        """
        flash = {"cu_seq_lens_q": cu_seq_lens_q, "cu_seq_lens_k": cu_seq_lens_k, "max_length_q": max_length_q,
                 "max_length_k": max_length_k}
        given = [name for name, value in flash.items() if value is not None]
        if given and len(given) < len(flash):
            raise ValueError(f"DASGModel: packed documents need all of {', '.join(flash)}; got only {', '.join(given)}")
        tracing = torch.compiler.is_compiling()
        if given or seq_idx is not None:
            what = "cu_seq_lens_q/k" if given else "seq_idx"
            if cache is not None:
                raise ValueError(f"DASGModel: packed documents ({what}) cannot be used with a generation cache; "
                                 "pass one document per row (with an attention_mask for padding) to generate")
            if self.cp_group is not None and not given:
                raise ValueError("DASGModel: with context parallelism, packed documents are given as cu_seq_lens_q/k "
                                 "(+ max_length_q/k): offsets into the whole sequence, before sharding; seq_idx "
                                 "is not supported")
            if batch != 1:
                raise ValueError(f"DASGModel: a packed batch ({what}) must have batch size 1 "
                                 f"(DataCollatorWithFlattening's [1, total_tokens]), got input of batch size {batch}")
            if attention_mask is not None and not tracing and not bool(attention_mask.bool().all()):
                raise ValueError(f"DASGModel: packed documents ({what}) with an attention_mask that holds padding "
                                 "(zeros): the documents mark the sequences; drop the padding or the attention_mask")
            if given:
                cu_q, cu_k = (c.to(device=device, dtype=torch.int32) for c in (cu_seq_lens_q, cu_seq_lens_k))
                if cu_q.dim() != 1 or cu_k.shape != cu_q.shape:
                    raise ValueError(f"DASGModel: cu_seq_lens_q and cu_seq_lens_k must be 1-D [N + 1] and of one "
                                     f"shape, got {tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
                if cu_seq_lens_q is not cu_seq_lens_k and device.type != "cuda" and not tracing \
                        and not torch.equal(cu_q, cu_k):
                    raise ValueError("DASGModel: cu_seq_lens_q and cu_seq_lens_k differ; packed self-attention "
                                     "without a cache needs the same documents for queries and keys")
                if self.cp_group is not None:  # global offsets: this rank's shard of the start mask
                    world = dist.get_world_size(self.cp_group)
                    start = cp_shard(doc_starts_from_cu_seqlens(cu_q, world * length)[None], group=self.cp_group,
                                     layout=self.cp_layout)
                    return PackedDocuments(cu_q, cu_k, host_int(max_length_q, world * length),
                                           host_int(max_length_k, world * length), start)
                start = doc_starts_from_cu_seqlens(cu_q, length)[None]
                return PackedDocuments(cu_q, cu_k, host_int(max_length_q, length), host_int(max_length_k, length),
                                       start)
            if seq_idx.shape != (1, length):
                raise ValueError(f"DASGModel: seq_idx must be [1, T] = [1, {length}] (one document index per "
                                 f"token), got {tuple(seq_idx.shape)}")
            return PackedDocuments.from_starts(doc_starts_from_seq_idx(seq_idx.to(device)))
        if position_ids is None or attention_mask is not None:
            return None  # with a mask: position_ids are RoPE positions (e.g. generate's, left padding)
        if self.cp_group is not None:
            raise ValueError("DASGModel: position_ids are not supported with context parallelism (its positions are "
                             "rank * T + arange(T); packed documents would need varlen attention across ranks)")
        pos = position_ids.view(1, -1) if position_ids.dim() == 1 else position_ids
        if pos.dim() != 2 or pos.shape[0] not in (1, batch) or pos.shape[1] != length:
            raise ValueError(f"DASGModel: position_ids must be [B, T] or [1, T] with B={batch}, T={length}, "
                             f"got {tuple(position_ids.shape)}")
        start = doc_starts_from_positions(pos.to(device), batch)
        if cache is not None:
            if length > 1 and not tracing and bool(start[:, 1:].any()):
                raise ValueError("DASGModel: position_ids restart inside a row (packed documents), which a "
                                 "generation cache cannot hold; run packed documents without a cache")
            return None
        docs = PackedDocuments.from_starts(start)
        if not tracing and docs.cu_seqlens_q.numel() == batch + 1:
            return None  # every row one document: the dense path
        return docs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DASGCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        seq_idx: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | torch.Tensor | None = None,
        max_length_k: int | torch.Tensor | None = None,
        documents: PackedDocuments | None | str = "auto",
    ) -> tuple[torch.Tensor, list[MoEOutput]]:
        """See the class docstring. ``documents``: ``"auto"`` reads the packed documents from
        the keywords (:meth:`documents`); a caller that already did passes its result
        (``None``: one sequence per row) and the keywords are not read again."""
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
        if isinstance(documents, str):
            if documents != "auto":
                raise ValueError(f"DASGModel: documents must be 'auto', None or a PackedDocuments, got {documents!r}")
            documents = self.documents(b, t, x.device, attention_mask=attention_mask, position_ids=position_ids,
                                       cache=cache, seq_idx=seq_idx, cu_seq_lens_q=cu_seq_lens_q,
                                       cu_seq_lens_k=cu_seq_lens_k, max_length_q=max_length_q,
                                       max_length_k=max_length_k)
        if cache is not None:
            return self._forward_cached(x, attention_mask, position_ids, cache)
        rank, world = 0, 1
        if self.cp_group is not None:
            rank, world = dist.get_rank(self.cp_group), dist.get_world_size(self.cp_group)
        total = world * t
        if total > self.config.max_position_embeddings:
            raise ValueError(f"DASGModel: sequence length {total} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if documents is not None:
            if position_ids is not None:
                pos = position_ids
            elif self.cp_group is not None:  # the shard's global positions, from their documents' starts
                glob = cp_positions(rank, world, t, layout=self.cp_layout, device=x.device)
                cu = documents.cu_seqlens_q.to(x.device, torch.long)
                pos = (glob - cu[torch.searchsorted(cu, glob, right=True) - 1])[None]
            else:
                pos = positions_in_documents(documents.start)
            x, outs = self._layers(x, self.rotary(pos), documents=documents)
            return self.norm(x), outs
        shift = None
        if attention_mask is not None:
            if self.cp_group is not None:
                raise ValueError("DASGModel: attention_mask is not supported with context parallelism")
            mask = attention_mask[:, -t:]
            check_one_run(mask)
            shift = run_start(mask)
            x = roll_rows(x, shift)
            position_ids = None if position_ids is None else roll_rows(position_ids, shift)
        pos = cp_positions(rank, world, t, layout=self.cp_layout, device=x.device) if position_ids is None \
            else position_ids
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
        loss: ``lm_loss + aux_loss``, or ``lm_loss + (n / N) * aux_loss`` with
            ``num_items_in_batch = N`` (``None`` without labels; see :meth:`DASGForCausalLM.forward`).
        logits: ``[B, T, vocab]`` (the last ``logits_to_keep`` positions when given).
        cache: the :class:`DASGCache` (``past_key_values`` on transformers before the rename).
        lm_loss: the next-token cross-entropy, the mean over this call's targets, or their sum
            over ``num_items_in_batch`` (``None`` without labels).
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
    #: ``forward`` honours ``num_items_in_batch``: ``Trainer`` must not divide the loss by the
    #: gradient-accumulation steps (see :meth:`forward`)
    accepts_loss_kwargs = True

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
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | torch.Tensor | None = None,
        max_length_k: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DASGCausalLMOutput:
        """``input_ids [B, T]``; ``labels [B, T]`` (usually ``input_ids``; ``-100`` is ignored)
        are shifted inside: position ``t`` predicts ``labels[:, t + 1]``; or ``shift_labels
        [B, T]``, already shifted (position ``t`` predicts ``shift_labels[:, t]``).

        ``attention_mask``, ``position_ids``: see :class:`DASGModel`. ``past_key_values`` (or
        ``cache``, transformers' newer name): a :class:`DASGCache`, created when ``use_cache``
        and none is given; returned as ``.cache`` / ``.past_key_values``. ``use_cache`` defaults
        to whether a cache was passed. ``logits_to_keep > 0`` computes only the last positions'
        logits. Other keywords transformers passes (``cache_position``, ``return_dict``, ...)
        are accepted and not needed.

        Packed documents (``DataCollatorWithFlattening``: restarting ``position_ids``, or
        ``cu_seq_lens_q/k`` + ``max_length_q/k``, or ``seq_idx``; see
        :meth:`DASGModel.documents`): every document's logits are those of the document
        alone, and no target crosses a document boundary (the target of a document's last
        token, the next document's first, is ignored whatever ``labels`` holds there).

        Loss, transformers' contract with ``Trainer`` (as its own causal LMs; ``Trainer`` then
        does not divide by the gradient-accumulation steps):

        - without ``num_items_in_batch``: ``lm_loss`` is the mean cross-entropy over this
          call's targets, ``loss = lm_loss + aux_loss``;
        - with ``num_items_in_batch = N`` (the targets of all micro-batches of one optimizer
          step, as ``Trainer`` counts them): ``lm_loss`` is this call's *summed* cross-entropy
          over ``N``, and ``loss = lm_loss + (n / N) * aux_loss`` with ``n`` this call's
          targets. Summed over the ``k`` micro-batches of a step, the LM term is the mean over
          the whole step (the same gradient as one batch ``k`` times the size), and the
          auxiliary term is the target-weighted mean of the micro-batches' own aux losses (for
          ``k`` equal micro-batches, their plain mean: what ``Trainer`` gives a model without
          loss keywords). The aux losses are per-batch statistics by definition (load balance
          is a product of two batch means), so each micro-batch keeps its own; per-token terms
          (z-loss and entropy of the shallow level) of equal micro-batches then equal those of
          the single large batch, while load balance and the deep-level terms (over each
          micro-batch's deep rows) differ by that batch statistic only. ``aux_loss`` in the
          output is the micro-batch's, unscaled.

        Context parallel (``apply_context_parallel``): ``input_ids`` and ``labels`` are this
        rank's shards, sliced alike; the last position's target is the next rank's first
        label (``shift_labels_cp``; or pass this shard's ``shift_labels``) and ``lm_loss`` is
        ``cp_size * (this shard's summed cross-entropy) / (targets counted over the CP group,
        or N)``, so its mean over the CP ranks is the whole sequence's ``lm_loss``, and gradients
        averaged over the CP ranks (as DDP / FSDP do over a dp x cp mesh) are the whole
        sequence's. The aux losses are this shard's (load balance over its tokens); ``n`` is
        counted over the CP group."""
        cache = self._resolve_cache(cache if cache is not None else past_key_values, use_cache)
        ref = input_ids if input_ids is not None else inputs_embeds
        documents = None
        if ref is not None and ref.dim() >= 2 and ref.shape[1] > 0:
            documents = self.model.documents(
                ref.shape[0], ref.shape[1], ref.device, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, seq_idx=seq_idx, cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k,
                max_length_q=max_length_q, max_length_k=max_length_k)
        hidden, moe_outs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, inputs_embeds=inputs_embeds, documents=documents)
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
        if labels is not None or shift_labels is not None:
            start = None if documents is None else documents.start
            out.lm_loss, aux_share = self._lm_loss(logits, labels, shift_labels, start, num_items_in_batch)
            out.loss = out.lm_loss + aux_share * aux_loss
        return out

    def _lm_loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        shift_labels: torch.Tensor | None,
        start: torch.Tensor | None,
        num_items_in_batch: int | torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(lm_loss, aux_share)``: see :meth:`forward` (``start [B, T]``: document starts of a
        packed batch, whose targets are ignored)."""
        group = self.model.cp_group
        if shift_labels is not None:
            targets = shift_labels
        elif group is None:  # position t predicts labels[:, t + 1]; the last position nothing
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        else:
            targets = shift_labels_cp(labels, group=group, layout=self.model.cp_layout)
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"DASGForCausalLM: {'shift_labels' if shift_labels is not None else 'labels'} must "
                             f"match the logits' [B, T] = {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
        if start is not None:  # a document's first token is never the target of the previous document
            targets = targets.masked_fill(F.pad(start[:, 1:], (0, 1), value=False), -100)
        targets = targets.reshape(-1)
        summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100,
                                 reduction="sum")
        count = (targets != -100).sum()
        cp_size = 1
        if group is not None:  # the global count, over cp_size: the CP mean of lm_loss is the global one
            dist.all_reduce(count, group=group)
            cp_size = dist.get_world_size(group)
        if num_items_in_batch is None:  # mean over the targets that count; 0 (not NaN) when none does
            return summed * cp_size / count.clamp(min=1), 1.0
        n = torch.as_tensor(num_items_in_batch, device=summed.device).to(torch.float32).clamp(min=1)
        return summed * cp_size / n, count / n


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
