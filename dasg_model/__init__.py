"""dasg_model: thin PyTorch modules over the dasg_kernels ops, and the transformers integration.

- :class:`DASGConfig`: every size and switch, validated, to/from dict and JSON.
- :class:`GroupedMultiHeadAttention` (GMHA), :class:`AdaptiveDynamicRouter` (ADR),
  :class:`DualScaleSharedExperts` (DSSE), :class:`DASGMoE` (+ ``from_dense``),
  :class:`DASGBlock`, :class:`DASGModel`, :class:`DASGForCausalLM`.
- :mod:`dasg_model.integrations.transformers`: ``register()`` makes ``"dasg"`` an
  ``attn_implementation`` and an ``experts_implementation`` of Hugging Face transformers.

Importing ``dasg_model`` registers ``"dasg"`` with ``AutoConfig`` and ``AutoModelForCausalLM``.
:class:`DASGCache` is the bounded generation cache (``O(W + T/G)`` per sequence and layer).

Every module passes ``config.backend`` (``"auto" | "triton" | "torch"``) to the kernel ops.
"""
from dasg_model.attention import GroupedMultiHeadAttention, RotaryEmbedding, apply_rope
from transformers import AutoConfig, AutoModelForCausalLM

from dasg_kernels._version import __version__  # noqa: F401

from dasg_model.cache import DASGCache
from dasg_model.config import DASGConfig
from dasg_model.experts import DualScaleSharedExperts, SwiGLUExperts
from dasg_model.model import (
    DASGBlock,
    DASGCausalLMOutput,
    DASGForCausalLM,
    DASGModel,
    DASGPreTrainedModel,
    RMSNorm,
    routing_summary,
    set_backend,
)
from dasg_model.moe import DASGMoE, MoEOutput
from dasg_model.router import AdaptiveDynamicRouter, LevelRouting, RouterOutput

__all__ = [
    "AdaptiveDynamicRouter",
    "DASGBlock",
    "DASGCache",
    "DASGCausalLMOutput",
    "DASGConfig",
    "DASGForCausalLM",
    "DASGMoE",
    "DASGModel",
    "DASGPreTrainedModel",
    "DualScaleSharedExperts",
    "GroupedMultiHeadAttention",
    "LevelRouting",
    "MoEOutput",
    "RMSNorm",
    "RotaryEmbedding",
    "RouterOutput",
    "SwiGLUExperts",
    "apply_rope",
    "routing_summary",
    "set_backend",
]

AutoConfig.register("dasg", DASGConfig, exist_ok=True)
AutoModelForCausalLM.register(DASGConfig, DASGForCausalLM, exist_ok=True)
