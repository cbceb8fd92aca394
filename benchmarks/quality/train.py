"""One training run of the quality benchmark: train a variant on a task, evaluate, measure.

:func:`run` trains the :mod:`~benchmarks.quality.variants` model described by a
:class:`RunSpec` on batches drawn on the fly from its :mod:`~benchmarks.quality.tasks` task
(the training stream seeded by ``seed``), then scores a held-out set that depends only on
the task's settings (the same for every variant and seed), and returns one JSON-ready dict.

Training: AdamW (``betas=(0.9, 0.98)``, weight decay 0.01 on matrices), linear warm-up over
the first 10% of the steps then cosine decay to 10% of ``lr``, gradient clipping at 1.0,
loss = cross-entropy on the scored positions + the model's weighted auxiliary MoE losses.

Measured: accuracy overall, in the window (``distance <= W``), beyond it, and beyond the
reach of the stacked windows (``distance > num_layers * W``), accuracy and
loss by distance bucket (octaves ``(2^(j-1), 2^j]`` with ``W`` as an edge), the training
loss curve, tokens per second, the median step time and the CPU time per step (process
time: on a shared machine it moves less than the wall clock), peak memory (CUDA: the allocator's
peak; CPU: the peak resident set above the one before training, Linux ``VmHWM`` reset through
``/proc/self/clear_refs``), and for the routed variants the mean experts and active FFN
parameters per token.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.quality.tasks import IGNORE, Task, make_task
from benchmarks.quality.variants import ModelSpec, active_experts, build_model, count_params

#: the generator streams of the training batches (with the seed) and of the held-out set
TRAIN_STREAM, EVAL_STREAM = 1, 0x5EED

#: the keys every run's result holds (the issue's list; the CLI's ``--json`` prints them)
RESULT_KEYS: tuple[str, ...] = (
    "task", "attention", "experts", "seq_len", "window", "group_size", "steps", "seed", "accuracy",
    "accuracy_in_window", "accuracy_beyond_window", "final_loss", "tokens_per_s", "peak_mem_bytes",
)


@dataclass
class RunSpec:
    """Everything that defines one run (its :meth:`key` names it in a resumable grid).

    ``task_options`` are the task constructor's keywords (``num_pairs`` for MQAR is the
    CLI's ``--num-pairs``); the model fields are :class:`~benchmarks.quality.variants.ModelSpec`'s.
    """

    task: str = "mqar"
    attention: str = "dasg"
    experts: str = "dense"
    seq_len: int = 512
    window: int = 32
    group_size: int = 16
    task_options: dict[str, Any] = field(default_factory=dict)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_size: int = 192
    rope_theta: float = 10000.0
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    eval_size: int = 256
    device: str = "cpu"
    backend: str = "torch"

    def key(self) -> str:
        """A stable name of the run (its settings, not the device)."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.task_options.items()) if v is not None)
        return (f"{self.task}[{opts}]/T{self.seq_len}/W{self.window}/G{self.group_size}/{self.attention}/"
                f"{self.experts}/d{self.hidden_size}L{self.num_layers}H{self.num_heads}F{self.ffn_size}"
                f"{'' if self.rope_theta == 10000.0 else f'R{self.rope_theta:g}'}/"
                f"s{self.steps}b{self.batch_size}lr{self.lr}/e{self.eval_size}/seed{self.seed}")

    def model_spec(self, vocab_size: int) -> ModelSpec:
        return ModelSpec(vocab_size=vocab_size, seq_len=self.seq_len, attention=self.attention,
                         experts=self.experts, window=self.window, group_size=self.group_size,
                         hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                         ffn_size=self.ffn_size, rope_theta=self.rope_theta, backend=self.backend)

    def make_task(self) -> Task:
        return make_task(self.task, self.seq_len, **self.task_options)

    def cost(self) -> float:
        """Relative cost (for ETAs): tokens trained, times a factor for the routed layers."""
        moe = {"dense": 1.0, "topk": 2.5, "adr": 2.5, "dsse": 4.0}.get(self.experts, 1.0)
        return self.steps * self.batch_size * self.seq_len * moe


# ----------------------------------------------------------------------------- memory


def _vm_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a stretch of work: CUDA allocator peak, or the CPU resident-set peak
    above the resident set at :meth:`start` (``None`` where neither can be read)."""

    def __init__(self, device: torch.device):
        self.device, self.base, self.kind = device, 0, None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.base = _vm_kib("VmRSS") or 0
            self.kind = "cpu peak RSS above the RSS before training (VmHWM)"
        except OSError:
            self.kind = None

    def peak(self) -> int | None:
        if self.kind is None:
            return None
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _vm_kib("VmHWM")
        return None if hwm is None else max(0, hwm - self.base) * 1024


# ----------------------------------------------------------------------------- evaluation


def distance_edges(seq_len: int, window: int) -> list[int]:
    """Bucket edges ``0, 1, 2, 4, ..`` up to ``seq_len``, with ``window`` added: bucket ``j``
    is ``(edges[j-1], edges[j]]`` (the first is ``[0, 1]``)."""
    edges, e = [0, 1], 2
    while e < seq_len:
        edges.append(e)
        e *= 2
    edges.append(seq_len)
    return sorted(set(edges) | ({window} if 0 < window < seq_len else set()))


def summarize_targets(distance: np.ndarray, correct: np.ndarray, nll: np.ndarray, *, seq_len: int,
                      window: int, num_layers: int = 1) -> dict[str, Any]:
    """Accuracy and loss overall, in / beyond the window, beyond the stack's reach
    (``distance > num_layers * window``: no chain of windows gets there, only dense
    attention or the summaries) and by distance bucket."""

    def acc(m):
        return float(correct[m].mean()) if m.any() else None

    inside = distance <= window
    far = distance > num_layers * window
    edges = distance_edges(seq_len, window)
    buckets = []
    for lo, hi in zip([-1] + edges[1:-1], edges[1:]):
        m = (distance > lo) & (distance <= hi)
        if m.any():
            buckets.append({"lo": max(lo + 1, 0), "hi": hi, "n": int(m.sum()), "accuracy": acc(m),
                            "loss": float(nll[m].mean())})
    return {"accuracy": acc(np.ones_like(correct, bool)), "accuracy_in_window": acc(inside),
            "accuracy_beyond_window": acc(~inside), "accuracy_beyond_reach": acc(far),
            "n_in_window": int(inside.sum()), "n_beyond_reach": int(far.sum()),
            "n_beyond_window": int((~inside).sum()), "eval_loss": float(nll.mean()),
            "eval_loss_in_window": float(nll[inside].mean()) if inside.any() else None,
            "eval_loss_beyond_window": float(nll[~inside].mean()) if (~inside).any() else None,
            "by_distance": buckets}


@torch.no_grad()
def evaluate(model, task: Task, spec: RunSpec, mspec: ModelSpec, device: torch.device) -> dict[str, Any]:
    """Score the held-out set (``spec.eval_size`` sequences from :data:`EVAL_STREAM`)."""
    model.eval()
    rng = np.random.default_rng(EVAL_STREAM)
    dist, corr, nll, stats = [], [], [], []
    left = spec.eval_size
    while left > 0:
        n = min(spec.batch_size, left)
        left -= n
        batch = task.sample(n, rng, split="heldout")
        ids = torch.from_numpy(batch.ids).to(device)
        tgt = torch.from_numpy(batch.targets).to(device)
        out = model(ids)
        mask = tgt != IGNORE
        logits = out.logits[mask].float()
        t = tgt[mask]
        nll.append(F.cross_entropy(logits, t, reduction="none").cpu().numpy())
        corr.append((logits.argmax(-1) == t).cpu().numpy())
        dist.append(batch.distance[batch.targets != IGNORE])
        if out.moe is not None:
            stats.append([{k: float(v) for k, v in o.stats.items() if v.dim() == 0} for o in out.moe])
    model.train()
    res = summarize_targets(np.concatenate(dist), np.concatenate(corr), np.concatenate(nll),
                            seq_len=spec.seq_len, window=spec.window, num_layers=spec.num_layers)
    layers = [{k: statistics.fmean(b[i][k] for b in stats) for k in stats[0][i]} for i in range(len(stats[0]))] \
        if stats else []
    res.update(active_experts(mspec, layers))
    if task.name == "lm":
        ln2 = math.log(2)
        res["bits_per_byte"] = res["eval_loss"] / ln2
        for b in res["by_distance"]:
            b["bits_per_byte"] = b["loss"] / ln2
    return res


# ----------------------------------------------------------------------------- training


def _lr_factor(step: int, steps: int) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def _optimizer(model, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    seen: dict[int, torch.nn.Parameter] = {}
    decay = [seen.setdefault(id(p), p) for p in decay if id(p) not in seen]
    other = [seen.setdefault(id(p), p) for p in other if id(p) not in seen]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(spec: RunSpec, *, log: Callable[[str], None] | None = None, log_every: int | None = None) -> dict[str, Any]:
    """Train and evaluate one variant; returns the result dict (:data:`RESULT_KEYS` and more).

    ``log`` (e.g. ``print`` to stderr) gets a progress line every ``log_every`` steps
    (default: a tenth of the run) with the loss and an ETA.
    """
    device = torch.device(spec.device)
    task = spec.make_task()
    mspec = spec.model_spec(task.vocab_size)
    model = build_model(mspec, seed=spec.seed).to(device)
    opt = _optimizer(model, spec.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec.steps))
    rng = np.random.default_rng([spec.seed, TRAIN_STREAM])
    log_every = log_every or max(1, spec.steps // 10)
    curve_every = max(1, spec.steps // 50)
    losses: list[float] = []
    step_s: list[float] = []
    curve: list[list[float]] = []
    mem = PeakMemory(device)
    mem.start()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(spec.steps):
        batch = task.sample(spec.batch_size, rng)
        ids = torch.from_numpy(batch.ids).to(device)
        tgt = torch.from_numpy(batch.targets).to(device)
        t0 = time.perf_counter()
        out = model(ids)
        mask = tgt != IGNORE
        task_loss = F.cross_entropy(out.logits[mask].float(), tgt[mask])
        loss = task_loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(task_loss.detach())  # synchronises
        step_s.append(time.perf_counter() - t0)
        losses.append(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"quality run {spec.key()}: loss is {value} at step {step}")
        if (step + 1) % curve_every == 0 or step + 1 == spec.steps:
            curve.append([step + 1, statistics.fmean(losses[-curve_every:])])
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == spec.steps):
            el = time.perf_counter() - t_start
            eta = el / (step + 1) * (spec.steps - step - 1)
            log(f"  [{spec.task} {spec.attention}/{spec.experts} seed {spec.seed}] step {step + 1}/{spec.steps} "
                f"loss {statistics.fmean(losses[-log_every:]):.3f}  {1000 * el / (step + 1):.0f} ms/step  "
                f"ETA {eta:.0f}s")
    _sync(device)
    train_s = time.perf_counter() - t_start
    cpu_s = time.process_time() - cpu_start
    peak = mem.peak()
    t_eval = time.perf_counter()
    ev = evaluate(model, task, spec, mspec, device)
    eval_s = time.perf_counter() - t_eval
    tail = max(1, spec.steps // 20)
    timed = step_s[min(3, len(step_s) - 1):]
    claimed = mspec.claimed_params()
    result: dict[str, Any] = {
        "task": spec.task, "attention": spec.attention, "experts": spec.experts, "seq_len": spec.seq_len,
        "window": spec.window, "group_size": spec.group_size, "steps": spec.steps, "seed": spec.seed,
        "accuracy": ev.pop("accuracy"), "accuracy_in_window": ev.pop("accuracy_in_window"),
        "accuracy_beyond_window": ev.pop("accuracy_beyond_window"),
        "final_loss": statistics.fmean(losses[-tail:]),
        "tokens_per_s": spec.steps * spec.batch_size * spec.seq_len / train_s,
        "peak_mem_bytes": peak, "peak_mem_kind": mem.kind,
        "step_ms": 1000 * statistics.median(timed), "cpu_step_ms": 1000 * cpu_s / spec.steps,
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **ev,
        "loss_curve": curve,
        "chance": task.chance,
        "params_total": count_params(model), "params_claimed": claimed,
        "task_info": task.describe(), "model": mspec.to_dict(), "spec": asdict(spec), "key": spec.key(),
        "train_s": round(train_s, 2), "train_cpu_s": round(cpu_s, 2), "eval_s": round(eval_s, 2), "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    return result


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
