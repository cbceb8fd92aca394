"""The next-token targets of a context-parallel batch: :func:`shift_labels_cp`.

Each rank holds a shard of the labels in the CP layout (:func:`dasg_kernels.context_parallel.cp_shard`);
the target of a chunk's last position is the next chunk's first label, held by another rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dasg_kernels.context_parallel import CPGeometry, check_cp_layout, resolve_group

__all__ = ["shift_labels_cp"]


def shift_labels_cp(labels: torch.Tensor, *, group: object, ignore_index: int = -100,
                    layout: str = "contiguous") -> torch.Tensor:
    """Next-token targets of a sequence-sharded batch: ``targets[:, t] = labels[:, t + 1]`` in
    global positions.

    ``labels [B, T_local]`` is this rank's shard (sliced like ``input_ids``, in ``layout``);
    the target of a chunk's last position is the next chunk's first label (one all-gather
    of the chunks' first labels, ``B`` ints per chunk), and is ``ignore_index`` for the
    sequence's last position. Not differentiable (labels are integers).
    """
    group = resolve_group(group, op="shift_labels_cp")
    zig = check_cp_layout("shift_labels_cp", layout)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"shift_labels_cp: labels must be a [B, T_local] tensor, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if labels.shape[1] == 0 or (zig and labels.shape[1] % 2):
        raise ValueError(f"shift_labels_cp: labels must hold at least one position (an even number with "
                         f"layout='zigzag'), got {labels.shape[1]}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    geo = CPGeometry(world, labels.shape[1], 0, None, zig)
    firsts = labels[:, :: geo.tc].contiguous()  # [B, chunks per rank]
    bufs = [torch.empty_like(firsts) for _ in range(world)]
    dist.all_gather(bufs, firsts, group=group)
    out = []
    for c in geo.chunks(rank):
        o = geo.owner(c)[1]
        if c + 1 < geo.n_chunks:
            r, o2 = geo.owner(c + 1)
            nxt = bufs[r][:, o2 // geo.tc: o2 // geo.tc + 1]
        else:
            nxt = torch.full_like(firsts[:, :1], ignore_index)
        out += [labels[:, o + 1:o + geo.tc], nxt]
    return torch.cat(out, dim=1)
