"""``DASGCache``: the bounded generation cache of a GMHA model, a ``transformers.Cache``.

Per layer it keeps what :func:`dasg_kernels.swa_attention_with_kvcache` needs and nothing more:

- a ring of the last ``C = attention_window + n`` keys / values ``[B, C, Hkv, D]`` for a
  call appending ``n`` positions (a query sees ``attention_window`` keys back): ``W + chunk``
  while a prompt is prefilled ``prefill_chunk_size`` at a time, ``W + 1`` while decoding
  (the ring is re-laid out, keeping the last positions, when ``n`` changes);
- the means of the finished groups ``[B, NG, Hkv, D]`` (grown as the sequence grows,
  ``NG = T // G + 1`` plus :data:`SPARE_GROUPS` spare rows) and the running sums of the
  unfinished ones ``[B, Hkv, D]`` fp32 (``use_summaries``).

So a sequence of ``T`` positions costs ``O(W + T/G)`` entries per layer, not ``O(T)``.
``bounded=False`` keeps every position instead (a full KV cache, for comparison): the same
attention, ``O(T)`` memory.

Rows of a batch share the number of columns fed (``get_seq_length()``, which is what
``generate`` slices ``input_ids`` by) but not their length: ``seqlens [B]`` int32 counts
each row's real positions; a left-padded prompt starts its row at ``-pads`` so padding is
never cached, attended or averaged (see :mod:`dasg_kernels.attention.kvcache`).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from dasg_model.config import DASGConfig

#: Summary rows allocated beyond the ones needed when the summary tensors grow.
SPARE_GROUPS: int = 16


def cache_signature(config: DASGConfig) -> tuple:
    """What a cache must agree on with the model that fills it."""
    return (config.num_layers, config.num_kv_heads, config.resolved_head_dim, config.attention_window,
            config.group_size, config.use_summaries)


class DASGCache(Cache):
    """Bounded KV + group-summary cache for :class:`dasg_model.DASGForCausalLM` (see the module doc).

    Args:
        config: the model's :class:`DASGConfig`.
        bounded: ``False`` keeps every position (a full KV cache of the same model).

    Tensors are allocated on the first forward (batch size, dtype and device from it).
    """

    def __init__(self, config: DASGConfig, *, bounded: bool = True) -> None:
        try:
            super().__init__(layers=[])
        except TypeError:  # older transformers: no layer list
            super().__init__()
        self.signature = cache_signature(config)
        self.num_layers = config.num_layers
        self.window = config.attention_window
        self.group_size = config.group_size
        self.summaries = config.use_summaries
        self.chunk = config.prefill_chunk_size
        self.bounded = bounded and config.attention_window >= 0
        self.max_position_embeddings = config.max_position_embeddings
        self.layer_tensors: list[dict[str, torch.Tensor] | None] = [None] * config.num_layers
        self.seqlens: torch.Tensor | None = None
        self.seen = 0  # columns fed so far (left padding included)
        self.capacity = 0  # ring slots C
        self.n_groups = 0  # summary rows NG

    # ----------------------------------------------------------------- transformers' Cache API
    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int | None:
        return None

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def has_previous_state(self, *args, **kwargs) -> bool:
        return self.seen > 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seqlens is not None

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [self.bounded] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def batch_size(self) -> int:
        return -1 if self.seqlens is None else self.seqlens.shape[0]

    def reset(self) -> None:
        self.layer_tensors = [None] * self.num_layers
        self.seqlens, self.seen, self.capacity, self.n_groups = None, 0, 0, 0

    def _map_batch(self, fn) -> None:
        if self.seqlens is None:
            return
        self.seqlens = fn(self.seqlens)
        self.layer_tensors = [None if t is None else {n: fn(x) for n, x in t.items()} for t in self.layer_tensors]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes row ``beam_idx[i]`` (every tensor, and the lengths)."""
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x: x[indices.to(x.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("DASGCache cannot be cropped: the ring and the group sums keep no "
                                  "history to roll back to (assisted / speculative decoding is not supported)")

    def update(self, *args, **kwargs):
        raise NotImplementedError("DASGCache is filled by DASGForCausalLM's attention "
                                  "(dasg_kernels.swa_attention_with_kvcache), not by Cache.update")

    # ----------------------------------------------------------------- what the model calls
    def check_compatible(self, config: DASGConfig) -> None:
        """A ``ValueError`` when this cache was built for a different model layout."""
        if cache_signature(config) != self.signature:
            raise ValueError(
                "DASGCache: this cache was built for another config (num_layers, num_kv_heads, head_dim, "
                f"attention_window, group_size, use_summaries) = {self.signature}, the model has "
                f"{cache_signature(config)}")

    def begin(self, batch: int, n_new: int, pads: torch.Tensor | None, device: torch.device) -> None:
        """Before ``n_new`` columns go through the layers: set up the lengths and make room
        (a host decision, from Python ints only).

        ``pads [B]``: each row's left padding over all the columns fed so far and these
        (``None``: no mask, the lengths just go on); a row's next position is then
        ``seen - pads`` (negative while its padding lasts)."""
        if self.seqlens is None:
            self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        elif self.seqlens.shape[0] != batch:
            raise ValueError(f"DASGCache: holds a batch of {self.seqlens.shape[0]} rows, got {batch}")
        if pads is not None:
            self.seqlens = (self.seen - pads).to(device=device, dtype=torch.int32)
        total = self.seen + n_new
        if total > self.max_position_embeddings:
            raise ValueError(f"DASGForCausalLM: {total} positions exceed max_position_embeddings "
                             f"({self.max_position_embeddings})")
        if self.bounded:  # exactly what this call needs: W + n_new slots (decode: W + 1)
            if self.window + n_new != self.capacity:
                self._relayout(self.window + n_new)
        elif max(total, self.window + n_new) > self.capacity:  # the full ring never wraps
            need = -(-max(total, self.window + n_new) // self.chunk) * self.chunk  # grow a chunk at a time
            self._grow("k_cache", "v_cache", need - self.capacity)
            self.capacity = need
        if self.summaries and total // self.group_size + 1 > self.n_groups:
            need = total // self.group_size + 1 + SPARE_GROUPS
            self._grow("k_means", "v_means", need - self.n_groups)
            self.n_groups = need

    def _relayout(self, new_c: int) -> None:
        """Resize the rings to ``new_c`` slots, keeping each row's last ``min(C, new_c)``
        positions (slot ``p % C`` -> ``p % new_c``); static shapes, no host sync."""
        old_c, self.capacity = self.capacity, new_c
        keep = min(old_c, new_c)
        if keep == 0 or self.seqlens is None:
            self._grow("k_cache", "v_cache", 0, new_size=new_c)
            return
        pos = self.seqlens.long()[:, None] - 1 - torch.arange(keep, device=self.seqlens.device)
        for t in self.layer_tensors:
            if t is None:
                continue
            for n in ("k_cache", "v_cache"):
                x = t[n]
                shape = (x.shape[0], keep, *x.shape[2:])
                src = (pos % old_c)[:, :, None, None].expand(shape)
                dst = (pos % new_c)[:, :, None, None].expand(shape)
                t[n] = x.new_zeros((x.shape[0], new_c, *x.shape[2:])).scatter_(1, dst, x.gather(1, src))

    def _grow(self, k_name: str, v_name: str, extra: int, new_size: int | None = None) -> None:
        for t in self.layer_tensors:
            if t is not None:
                for n in (k_name, v_name):
                    x = t[n]
                    if new_size is not None:
                        extra = new_size - x.shape[1]
                    t[n] = torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], dim=1)

    def layer(self, idx: int, k: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer ``idx``'s tensors as keywords of ``swa_attention_with_kvcache`` (allocated from ``k``'s
        batch, heads, dtype and device on first use)."""
        t = self.layer_tensors[idx]
        if t is None:
            b, _, h, d = k.shape
            kw = dict(dtype=k.dtype, device=k.device)
            t = {"k_cache": torch.zeros((b, self.capacity, h, d), **kw),
                 "v_cache": torch.zeros((b, self.capacity, h, d), **kw)}
            if self.summaries:
                t["k_means"] = torch.zeros((b, self.n_groups, h, d), **kw)
                t["v_means"] = torch.zeros((b, self.n_groups, h, d), **kw)
                t["k_sum"] = torch.zeros((b, h, d), dtype=torch.float32, device=k.device)
                t["v_sum"] = torch.zeros((b, h, d), dtype=torch.float32, device=k.device)
            self.layer_tensors[idx] = t
        return t

    def end(self, n_new: int) -> None:
        """After ``n_new`` columns went through every layer."""
        self.seqlens += n_new
        self.seen += n_new

    def positions(self, n_new: int) -> torch.Tensor:
        """``[B, n_new]`` positions of the next columns (negative for left padding)."""
        return self.seqlens.long()[:, None] + torch.arange(n_new, device=self.seqlens.device)

    def memory_bytes(self) -> int:
        """Bytes of every tensor this cache holds (all layers)."""
        n = 0 if self.seqlens is None else self.seqlens.numel() * self.seqlens.element_size()
        for t in self.layer_tensors:
            if t is not None:
                n += sum(x.numel() * x.element_size() for x in t.values())
        return n

    def entries_per_layer(self) -> int:
        """Key rows a layer holds per sequence and kv head: ring slots + summary rows."""
        return self.capacity + (self.n_groups if self.summaries else 0)
