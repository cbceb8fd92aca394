"""``DASGConfig``: every size and switch of a DASG-MoE decoder, validated in one place."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from dasg_kernels.backend import BACKENDS


@dataclass
class DASGConfig:
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
        top_p, k_max, min_k, n_group, topk_group: the dynamic top-p routing of each level
            (see :func:`dasg_kernels.route`).
        complexity_threshold: ``tau``; a token runs the deep level when its complexity
            gate ``c = sigmoid(w_c . x + b) >= tau``.

    Losses: ``load_balance_coef`` (Switch load balance, per level), ``z_loss_coef``
    (router z-loss) and ``entropy_coef`` (dynamic-routing entropy, pushes top-p towards
    fewer experts) weight the auxiliary losses added to the LM loss.

    ``backend`` (``"auto" | "triton" | "torch"``) is passed to every kernel op. The Triton
    kernels need a head dim in ``dasg_kernels.attention.SUPPORTED_HEAD_DIMS`` (``"auto"`` uses
    the PyTorch reference for others) and a hidden size and expert sizes that are multiples of 16.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    attention_window: int = 64
    group_size: int = 16
    use_summaries: bool = True

    shallow_shared_size: int = 32
    deep_shared_size: int = 128
    shallow_num_experts: int = 4
    shallow_expert_size: int = 32
    deep_num_experts: int = 4
    deep_expert_size: int = 64
    top_p: float = 0.7
    k_max: int = 2
    min_k: int = 1
    n_group: int = 1
    topk_group: int | None = None
    complexity_threshold: float = 0.5

    load_balance_coef: float = 0.01
    z_loss_coef: float = 1e-3
    entropy_coef: float = 1e-3

    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

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

        positive("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
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
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"DASGConfig: top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.complexity_threshold <= 1.0:
            raise ValueError(f"DASGConfig: complexity_threshold must be in [0, 1], got {self.complexity_threshold}")
        for n in ("load_balance_coef", "z_loss_coef", "entropy_coef", "rms_norm_eps", "initializer_range"):
            if getattr(self, n) < 0:
                raise ValueError(f"DASGConfig: {n} must be >= 0, got {getattr(self, n)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"DASGConfig: backend must be one of {BACKENDS}, got {self.backend!r}")

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DASGConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DASGConfig.from_dict: unknown fields {unknown}")
        return cls(**d)

    def to_json(self, path: str | None = None, **kwargs: Any) -> str:
        """The config as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, **kwargs)
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
        return dataclasses.replace(self, **changes)
