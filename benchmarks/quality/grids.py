"""The task defaults and the three grids of the quality benchmark.

Per-task defaults (:data:`TASK_DEFAULTS`) are settings at which dense attention learns the
task within the default steps on a CPU (measured; see the results files), with the answer
beyond the window ``W`` for a good share of the targets.

Grids, as lists of :class:`~benchmarks.quality.train.RunSpec`:

- ``quick``: MQAR and passkey at shorter lengths, ``dense``, ``swa`` and ``dasg``, one
  seed (under 10 minutes on 2 CPU cores);
- ``cpu`` (the default): every task with ``dense``, ``swa`` and ``dasg`` (dense FFN); the
  group-size sweep on MQAR (``G = 4, 8, 16, 32`` and ``sumonly``); the expert variants
  (``dense``, ``topk``, ``adr``, ``dsse`` at matched active parameters) with ``dasg``
  attention on the byte-level LM; three seeds each;
- ``gpu``: MQAR at 4k and 16k tokens, the G sweep at 4k, the byte-level LM at 4k with
  the attention and expert variants: a wider model (``d = 256``, 4 layers) on the
  project's Triton kernels (``backend="auto"``); one seed by default.
"""
from __future__ import annotations

from dataclasses import replace

from benchmarks.quality.train import RunSpec

ATTN3 = ("dense", "swa", "dasg")

TASK_DEFAULTS: dict[str, RunSpec] = {
    "mqar": RunSpec(task="mqar", seq_len=512, window=32, group_size=16, steps=400, batch_size=16, lr=3e-3,
                    task_options={"num_pairs": 8}),
    "listops": RunSpec(task="listops", seq_len=256, window=16, group_size=8, steps=400, batch_size=16, lr=3e-3,
                       task_options={"max_depth": 3, "max_args": 5, "min_len": 8, "max_len": 64}),
    "copy": RunSpec(task="copy", seq_len=256, window=16, group_size=8, steps=400, batch_size=16, lr=3e-3,
                    task_options={"num_tokens": 8}),
    "passkey": RunSpec(task="passkey", seq_len=256, window=16, group_size=8, steps=400, batch_size=16, lr=3e-3,
                       task_options={"num_digits": 5}),
    "lm": RunSpec(task="lm", seq_len=512, window=32, group_size=16, steps=400, batch_size=16, lr=3e-3,
                  eval_size=64),
}


def task_defaults(task: str) -> RunSpec:
    """The default :class:`RunSpec` of ``task`` (a copy)."""
    if task not in TASK_DEFAULTS:
        raise ValueError(f"task_defaults: task must be one of {sorted(TASK_DEFAULTS)}, got {task!r}")
    base = TASK_DEFAULTS[task]
    return replace(base, task_options=dict(base.task_options))


def _seeded(specs: list[RunSpec], seeds: int) -> list[RunSpec]:
    return [replace(s, seed=k) for k in range(seeds) for s in specs]


def grid(kind: str, *, device: str = "cpu", backend: str = "torch", seeds: int | None = None) -> list[RunSpec]:
    """The runs of grid ``kind`` (``quick | cpu | gpu``), ordered so that every variant's
    first seed comes before any second seed (an interrupted grid has whole comparisons)."""
    if kind == "quick":
        specs = [replace(task_defaults("mqar"), attention=a, seq_len=256, window=16, group_size=8, steps=300)
                 for a in ATTN3]
        specs += [replace(task_defaults("passkey"), attention=a, steps=300) for a in ATTN3]
        n = 1
    elif kind == "cpu":
        specs = []
        for task in ("mqar", "lm", "passkey", "copy", "listops"):
            specs += [replace(task_defaults(task), attention=a) for a in ATTN3]
        mq = task_defaults("mqar")
        specs += [replace(mq, attention="dasg", group_size=g) for g in (4, 8, 32)]
        specs.append(replace(mq, attention="sumonly"))
        specs += [replace(task_defaults("lm"), attention="dasg", experts=e) for e in ("topk", "adr", "dsse")]
        n = 3
    elif kind == "gpu":
        wide = dict(hidden_size=256, num_layers=4, num_heads=4, ffn_size=768, batch_size=8, lr=1e-3,
                    steps=1000, eval_size=64)
        mq = replace(task_defaults("mqar"), seq_len=4096, window=256, group_size=64,
                     task_options={"num_pairs": 32, "num_keys": 256, "num_values": 256}, **wide)
        specs = [replace(mq, attention=a) for a in ATTN3]
        specs += [replace(mq, attention="dasg", group_size=g) for g in (16, 32, 128)]
        specs += [replace(mq, seq_len=16384, batch_size=2, attention=a) for a in ATTN3]
        lm = replace(task_defaults("lm"), seq_len=4096, window=256, group_size=64, **wide)
        specs += [replace(lm, attention=a) for a in ATTN3]
        specs += [replace(lm, attention="dasg", experts=e) for e in ("topk", "adr", "dsse")]
        n = 1
    else:
        raise ValueError(f"grid: kind must be 'quick', 'cpu' or 'gpu', got {kind!r}")
    specs = [replace(s, device=device, backend=backend) for s in specs]
    return _seeded(specs, n if seeds is None else seeds)
