"""Small result types shared by the routing ops and their references."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """The result of :func:`dasg_kernels.moe.route` for ``N`` tokens and ``E`` experts.

    Attributes:
        expert_ids: ``[N, k_max]`` int32, the chosen experts by descending probability,
            ``-1`` in the slots a token does not use.
        weights: ``[N, k_max]`` float32, the combine weights (0 in unused slots);
            differentiable with respect to the router logits.
        num_selected: ``[N]`` int32, how many slots each token uses (``1..k_max``).
        tokens_per_expert: ``[E]`` int32, how many (token, slot) pairs chose each expert.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    num_selected: torch.Tensor
    tokens_per_expert: torch.Tensor
