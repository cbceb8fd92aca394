"""Tile sizes of the MoE grouped GEMMs (host code: no Triton kernel here)."""
from __future__ import annotations

from dasg_kernels.backend import interpreter_enabled


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: small when experts get few rows (decode), 128 when they get many."""
    if interpreter_enabled():
        return 16
    avg = num_pairs / max(num_experts, 1)
    for bm in (16, 32, 64):
        if avg <= bm:
            return bm
    return 128
