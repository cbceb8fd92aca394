"""``DASGConfig``: every size and switch of a DASG-MoE decoder, validated in one place."""
from __future__ import annotations

import copy
import json
from typing import Any

from transformers import PretrainedConfig

from dasg_kernels.backend import BACKENDS

#: Every DASG field and its default (the keywords of :class:`DASGConfig`).
FIELDS: dict[str, Any] = {
    "vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
    "head_dim": None, "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "initializer_range": 0.02,
    "attention_window": 64, "group_size": 16, "use_summaries": True,
    "shallow_shared_size": 32, "deep_shared_size": 128, "shallow_num_experts": 4, "shallow_expert_size": 32,
    "deep_num_experts": 4, "deep_expert_size": 64, "router_top_p": 0.7, "k_max": 2, "min_k": 1, "n_group": 1,
    "topk_group": None, "complexity_threshold": 0.5,
    "load_balance_coef": 0.01, "z_loss_coef": 1e-3, "entropy_coef": 1e-3,
    "prefill_chunk_size": 256, "use_cache": True,
    "backend": "auto",
}


#: Constructor keywords kept for compatibility: ``top_p`` is ``router_top_p`` (a config
#: attribute named ``top_p`` would be read by transformers as a *sampling* parameter).
KEYWORD_ALIASES: dict[str, str] = {"top_p": "router_top_p"}


class DASGConfig(PretrainedConfig):
    """Configuration of a DASG-MoE decoder (GMHA attention + DSSE/ADR MoE).

    Attention (GMHA):
        attention_window: query ``i`` sees the local keys ``i - attention_window .. i``
            (flash-attn's ``window_size[0]``); ``-1`` is full causal attention.
        group_size: ``G``, the size of the summary groups.
        use_summaries: add one summary key/value (the group mean) per earlier group that
            lies wholly before the window (needs ``attention_window >= 0``).

    Experts (DSSE + ADR), two levels ``shallow`` and ``deep``:
        shallow_shared_size / deep_shared_size: hidden sizes of the two shared SwiGLU experts
            (the shallow one runs on every token, the deep one on deep-level tokens only).
        shallow_num_experts / shallow_expert_size, deep_num_experts / deep_expert_size:
            the routed expert bank of each level (each with its own hidden size).
        router_top_p (keyword ``top_p`` too), k_max, min_k, n_group, topk_group: the dynamic
            top-p routing of each level
            (see :func:`dasg_kernels.route`).
        complexity_threshold: ``tau``; a token runs the deep level when its complexity
            gate ``c = sigmoid(w_c . x + b) >= tau``.

    Losses: ``load_balance_coef`` (Switch load balance, per level), ``z_loss_coef``
    (router z-loss) and ``entropy_coef`` (dynamic-routing entropy, pushes top-p towards
    fewer experts) weight the auxiliary losses added to the LM loss.

    Generation: ``prefill_chunk_size`` positions per prefill step against the bounded
    cache (:class:`dasg_model.DASGCache`), so a long prompt's peak activation memory is
    ``O(chunk * (W + T/G))``; the cache's ring holds ``attention_window + prefill_chunk_size``.
    ``use_cache`` (default ``True``): whether ``generate`` keeps a cache (``False``: every step
    reruns the whole sequence); it is written to ``config.json`` and ``to_json``.

    A ``transformers.PretrainedConfig`` (``model_type = "dasg"``): ``save_pretrained`` /
    ``from_pretrained``, ``AutoConfig``; ``num_hidden_layers`` / ``num_attention_heads`` /
    ``num_key_value_heads`` are aliases of ``num_layers`` / ``num_heads`` / ``num_kv_heads``.
    Every keyword is validated on construction (``ValueError`` naming the field).

    ``backend`` (``"auto" | "triton" | "torch"``) is passed to every kernel op. The Triton
    kernels need a head dim in ``dasg_kernels.attention.SUPPORTED_HEAD_DIMS`` (``"auto"`` uses
    the PyTorch reference for others) and a hidden size and expert sizes that are multiples of 16.
    """

    model_type = "dasg"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "num_key_value_heads": "num_kv_heads"}

    def __init__(self, **kwargs: Any) -> None:
        own = {name: kwargs.pop(name, default) for name, default in FIELDS.items()}
        for alias, name in {**self.attribute_map, **KEYWORD_ALIASES}.items():
            if alias in kwargs:
                own[name] = kwargs.pop(alias)
        super().__init__(tie_word_embeddings=own["tie_word_embeddings"], **kwargs)
        for name, value in own.items():
            setattr(self, name, value)
        self.validate()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DASGConfig) and self.dasg_dict() == other.dasg_dict()

    __hash__ = None

    # ----------------------------------------------------------------- derived sizes
    @property
    def resolved_head_dim(self) -> int:
        """``head_dim``, or ``hidden_size // num_heads`` when not given."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def window(self) -> tuple[int, int]:
        """The ``window`` argument of :func:`dasg_kernels.swa_attention`."""
        return (self.attention_window, 0)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any inconsistent setting."""

        def positive(*names: str) -> None:
            for n in names:
                v = getattr(self, n)
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"DASGConfig: {n} must be a positive int, got {v!r}")

        positive("prefill_chunk_size", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings", "group_size", "shallow_shared_size", "deep_shared_size",
                 "shallow_num_experts", "shallow_expert_size", "deep_num_experts", "deep_expert_size",
                 "k_max", "min_k", "n_group")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"DASGConfig: num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}) "
                "when head_dim is not given"
            )
        if self.head_dim is not None:
            positive("head_dim")
        if self.resolved_head_dim % 2:
            raise ValueError(f"DASGConfig: head_dim must be even for RoPE, got {self.resolved_head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DASGConfig: num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if self.attention_window < -1:
            raise ValueError(f"DASGConfig: attention_window must be >= -1 (-1 = full), got {self.attention_window}")
        if self.use_summaries and self.attention_window < 0:
            raise ValueError(
                "DASGConfig: use_summaries=True needs a finite attention_window >= 0 "
                "(summaries cover only the groups before the window)"
            )
        for level in ("shallow", "deep"):
            e = getattr(self, f"{level}_num_experts")
            if self.k_max > e:
                raise ValueError(f"DASGConfig: k_max ({self.k_max}) must be <= {level}_num_experts ({e})")
            if e % self.n_group:
                raise ValueError(f"DASGConfig: n_group ({self.n_group}) must divide {level}_num_experts ({e})")
            if self.topk_group is not None and self.k_max > self.topk_group * (e // self.n_group):
                raise ValueError(
                    f"DASGConfig: k_max ({self.k_max}) exceeds the experts in topk_group={self.topk_group} "
                    f"groups of the {level} level ({self.topk_group * (e // self.n_group)})"
                )
        if self.min_k > self.k_max:
            raise ValueError(f"DASGConfig: min_k ({self.min_k}) must be <= k_max ({self.k_max})")
        if self.topk_group is not None and not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"DASGConfig: topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        if not 0.0 < self.router_top_p <= 1.0:
            raise ValueError(f"DASGConfig: router_top_p (keyword top_p) must be in (0, 1], got {self.router_top_p}")
        if not 0.0 <= self.complexity_threshold <= 1.0:
            raise ValueError(f"DASGConfig: complexity_threshold must be in [0, 1], got {self.complexity_threshold}")
        for n in ("load_balance_coef", "z_loss_coef", "entropy_coef", "rms_norm_eps", "initializer_range"):
            if getattr(self, n) < 0:
                raise ValueError(f"DASGConfig: {n} must be >= 0, got {getattr(self, n)}")
        if not isinstance(self.use_cache, bool):
            raise ValueError(f"DASGConfig: use_cache must be a bool, got {self.use_cache!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"DASGConfig: backend must be one of {BACKENDS}, got {self.backend!r}")

    # ----------------------------------------------------------------- serialisation
    def dasg_dict(self) -> dict[str, Any]:
        """Only the DASG fields (what :meth:`to_json` writes)."""
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """A config from ``config_dict`` (a :meth:`to_dict` / ``config.json`` dict); a key
        that is neither a DASG field nor a ``PretrainedConfig`` one is a ``ValueError``."""
        known = set(FIELDS) | set(cls.attribute_map) | set(KEYWORD_ALIASES) | set(PretrainedConfig().to_dict()) | {
            "model_type", "transformers_version", "architectures", "auto_map", "_name_or_path", "dtype", "torch_dtype",
            "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id"}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"DASGConfig.from_dict: unknown fields {unknown}")
        return super().from_dict(config_dict, **kwargs)

    def to_json(self, path: str | None = None, **kwargs: Any) -> str:
        """The DASG fields as JSON; also written to ``path`` when given."""
        text = json.dumps(self.dasg_dict(), indent=2, sort_keys=True, **kwargs)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> DASGConfig:
        """Read a config from a JSON string or a path to a JSON file."""
        s = text_or_path.lstrip()
        if not s.startswith("{"):
            with open(text_or_path) as f:
                s = f.read()
        return cls.from_dict(json.loads(s))

    def replace(self, **changes: Any) -> DASGConfig:
        """A validated copy with ``changes`` applied."""
        changes = {KEYWORD_ALIASES.get(k, k): v for k, v in changes.items()}
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ValueError(f"DASGConfig.replace: unknown fields {unknown}")
        out = copy.deepcopy(self)
        for name, value in changes.items():
            setattr(out, name, value)
        out.validate()
        return out
