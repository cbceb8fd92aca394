"""Task generators of the quality benchmark: synthetic long-range tasks and byte-level LM.

Every task draws its batches from a ``numpy.random.Generator`` (so a seed fixes them on
every platform) and returns a :class:`Batch`:

- ``ids [B, T]`` int64 input tokens,
- ``targets [B, T]`` int64: the token position ``t`` must predict, ``-100`` where nothing
  is scored (the targets are *not* shifted: ``targets[:, t]`` is scored on ``logits[:, t]``),
- ``distance [B, T]`` int64: for every scored position, how far back the token that holds
  the answer lies (``-1`` elsewhere). A query at position ``i`` sees the keys
  ``i - W .. i`` through the window, so a target is *in the window* when ``distance <= W``
  and has to come through the group summaries (or a dense layer) otherwise.

Tasks (vocabulary layouts in each class):

- :class:`MQAR`: multi-query associative recall (Zoology): key/value pairs scattered over
  random filler; each key comes back once as a query and the model must output its value.
  The distance between a pair and its query is drawn log-uniformly, so every octave from
  adjacent to the whole sequence is equally represented.
- :class:`ListOps`: the Long Range Arena generator's trees (``MIN MAX MED SM``, digits
  0-9, LRA's value probability and ``int(np.median)`` / ``sum % 10``), depth and length
  controlled, without LRA's binary-tree parentheses; several expressions are packed per
  sequence, each followed by ``=`` and its answer.
- :class:`SelectiveCopy`: data tokens scattered among blanks, a marker, then the data
  tokens in order (Mamba's selective copying), with log-uniform distances to the marker.
- :class:`Passkey`: a marked run of digits in random filler, recalled at the end.
- :class:`ByteLM`: next-byte prediction on the standard library's ``.py`` sources, with a
  deterministic train / held-out split by file; distance is the position in the context.
"""
from __future__ import annotations

import functools
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np

IGNORE = -100


@dataclass
class Batch:
    """One batch: ``ids``, ``targets``, ``distance``, all ``[B, T]`` int64 numpy arrays."""

    ids: np.ndarray
    targets: np.ndarray
    distance: np.ndarray


class Task:
    """A task: ``vocab_size``, ``seq_len``, ``sample(batch, rng, split) -> Batch``.

    ``split`` (``"train"`` or ``"heldout"``) matters only for :class:`ByteLM` (its files);
    the synthetic tasks' held-out sets are drawn from their own generator stream.
    """

    name: str = ""
    vocab_size: int = 0
    #: accuracy of always answering the most frequent target (for the report)
    chance: float = 0.0

    def __init__(self, seq_len: int):
        if not isinstance(seq_len, int) or seq_len < 8:
            raise ValueError(f"{type(self).__name__}: seq_len must be an int >= 8, got {seq_len!r}")
        self.seq_len = seq_len

    def sample(self, batch: int, rng: np.random.Generator, split: str = "train") -> Batch:
        raise NotImplementedError

    def describe(self) -> dict:
        """The task's settings, for the results file."""
        return {"task": self.name, "seq_len": self.seq_len, "vocab_size": self.vocab_size, "chance": self.chance}

    def _empty(self, batch: int, fill: int = 0) -> Batch:
        t = self.seq_len
        return Batch(np.full((batch, t), fill, np.int64), np.full((batch, t), IGNORE, np.int64),
                     np.full((batch, t), -1, np.int64))


def log_uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An int in ``[lo, hi]`` whose log is uniform (each octave equally likely)."""
    if lo > hi:
        raise ValueError(f"log_uniform_int: empty range [{lo}, {hi}]")
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


# ----------------------------------------------------------------------------- MQAR


class MQAR(Task):
    """Multi-query associative recall with controlled pair-to-query distances.

    Vocabulary: filler ``[0, num_fill)``, keys ``[num_fill, num_fill + num_keys)``, values
    after them. A sequence holds ``num_pairs`` pairs (key at ``p``, value at ``p + 1``; the
    keys of a sequence distinct) and for each pair a query: the key again at
    ``q = p + 1 + d`` followed by its value at ``q + 1`` (teacher forcing). The target of
    position ``q`` is the value; ``distance = d = q - (p + 1)``, the distance from the query
    to the value token, drawn log-uniformly from ``[min_distance, max_distance]`` (default
    ``[1, seq_len - 3]``). Everything else is
    random filler. A key occurs exactly twice, so the query is unambiguous.
    """

    name = "mqar"

    def __init__(self, seq_len: int, num_pairs: int = 8, num_keys: int = 64, num_values: int = 64,
                 num_fill: int = 16, min_distance: int = 1, max_distance: int | None = None):
        super().__init__(seq_len)
        max_distance = seq_len - 3 if max_distance is None else max_distance
        if not 1 <= min_distance <= max_distance <= seq_len - 3:
            raise ValueError(f"MQAR: need 1 <= min_distance ({min_distance}) <= max_distance ({max_distance}) "
                             f"<= seq_len - 3 ({seq_len - 3})")
        self.min_distance, self.max_distance = min_distance, max_distance
        if not 1 <= num_pairs <= num_keys:
            raise ValueError(f"MQAR: num_pairs must be in [1, num_keys={num_keys}], got {num_pairs}")
        if 4 * num_pairs > seq_len // 2:
            raise ValueError(f"MQAR: {num_pairs} pairs and queries need 4 tokens each; seq_len={seq_len} "
                             f"must be at least {8 * num_pairs}")
        self.num_pairs, self.num_keys, self.num_values, self.num_fill = num_pairs, num_keys, num_values, num_fill
        self.key0, self.val0 = num_fill, num_fill + num_keys
        self.vocab_size = num_fill + num_keys + num_values
        self.chance = 1.0 / num_values

    def describe(self) -> dict:
        return {**super().describe(), "num_pairs": self.num_pairs, "num_keys": self.num_keys,
                "num_values": self.num_values, "min_distance": self.min_distance, "max_distance": self.max_distance}

    def sample(self, batch: int, rng: np.random.Generator, split: str = "train") -> Batch:
        t = self.seq_len
        out = self._empty(batch)
        out.ids[:] = rng.integers(0, self.num_fill, size=(batch, t))
        for b in range(batch):
            free = np.ones(t, bool)
            keys = rng.choice(self.num_keys, self.num_pairs, replace=False) + self.key0
            vals = rng.integers(0, self.num_values, self.num_pairs) + self.val0
            for key, val in zip(keys, vals):
                for _ in range(1000):
                    d = log_uniform_int(rng, self.min_distance, self.max_distance)
                    p = int(rng.integers(0, t - 3 - d + 1))
                    q = p + 1 + d
                    if free[p] and free[p + 1] and free[q] and free[q + 1]:
                        break
                else:  # pragma: no cover - needs a sequence crowded far beyond the check above
                    raise RuntimeError("MQAR: could not place a pair")
                free[[p, p + 1, q, q + 1]] = False
                out.ids[b, [p, q]] = key
                out.ids[b, [p + 1, q + 1]] = val
                out.targets[b, q] = val
                out.distance[b, q] = d
        return out


# ----------------------------------------------------------------------------- ListOps

LISTOPS_OPS = ("MIN", "MAX", "MED", "SM")
#: LRA's probability that a node above the maximum depth is an operator (``r <= VALUE_P``)
LISTOPS_VALUE_P = 0.25


def listops_apply(op: str, args: list[int]) -> int:
    """One LRA ListOps operator on digit arguments: MIN, MAX, MED (``int(np.median)``,
    so the mean of the two middle values, truncated), SM (sum mod 10)."""
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "MED":
        s = sorted(args)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    if op == "SM":
        return sum(args) % 10
    raise ValueError(f"listops_apply: unknown operator {op!r}")


class ListOps(Task):
    """ListOps with the LRA generator's semantics, packed several expressions per sequence.

    Tree generation follows ``lra_benchmarks/data/listops.py``: a node at depth ``< max_depth``
    is an operator with probability ``0.25`` (else a digit), an operator takes
    ``randint(2, max_args)`` children; the root is redrawn until the expression's length
    (operators and ``]`` count one token each, digits one) lies in ``[min_len, max_len]``
    and the root is an operator. Tokens: digits ``0-9`` are ids ``0-9``, then
    ``MIN MAX MED SM`` (10-13), ``]`` (14), ``=`` (15), padding (16). A sequence is
    ``expr = a expr = a ...`` padded at the end; the target of each ``=`` is the
    expression's value and its distance the expression's length (the query sees the whole
    expression through the window when ``length <= W``).
    """

    name = "listops"
    OP0, END, EQ, PAD = 10, 14, 15, 16

    def __init__(self, seq_len: int, max_depth: int = 3, max_args: int = 5, min_len: int = 8,
                 max_len: int | None = None):
        super().__init__(seq_len)
        max_len = seq_len - 2 if max_len is None else max_len
        if max_depth < 2:
            raise ValueError(f"ListOps: max_depth must be >= 2 (the root is an operator), got {max_depth}")
        if max_args < 2:
            raise ValueError(f"ListOps: max_args must be >= 2, got {max_args}")
        if not 4 <= min_len <= max_len <= seq_len - 2:
            raise ValueError(f"ListOps: need 4 <= min_len ({min_len}) <= max_len ({max_len}) <= seq_len - 2")
        self.max_depth, self.max_args, self.min_len, self.max_len = max_depth, max_args, min_len, max_len
        self.vocab_size = 17
        self.chance = 0.1

    def describe(self) -> dict:
        return {**super().describe(), "max_depth": self.max_depth, "max_args": self.max_args,
                "min_len": self.min_len, "max_len": self.max_len}

    def _tree(self, depth: int, rng: np.random.Generator):
        r = rng.random() if depth < self.max_depth else 1.0
        if r > LISTOPS_VALUE_P:
            return int(rng.integers(0, 10))
        n = int(rng.integers(2, self.max_args + 1))
        children = [self._tree(depth + 1, rng) for _ in range(n)]
        return (LISTOPS_OPS[int(rng.integers(0, len(LISTOPS_OPS)))], children)

    @staticmethod
    def tokens(tree) -> list[int]:
        """The token ids of a tree (``(op, children)`` or a digit)."""
        if isinstance(tree, int):
            return [tree]
        op, children = tree
        out = [ListOps.OP0 + LISTOPS_OPS.index(op)]
        for c in children:
            out += ListOps.tokens(c)
        return out + [ListOps.END]

    @staticmethod
    def value(tree) -> int:
        """The value of a tree (recursive, as the LRA generator's ``to_value``)."""
        if isinstance(tree, int):
            return tree
        op, children = tree
        return listops_apply(op, [ListOps.value(c) for c in children])

    def expression(self, rng: np.random.Generator) -> tuple[list[int], int]:
        """``(tokens, value)`` of one expression of the allowed length."""
        while True:
            # the root is an operator (LRA draws a digit root 75% of the time and its length
            # filter then drops it), its children are drawn at depth 2
            n = int(rng.integers(2, self.max_args + 1))
            tree = (LISTOPS_OPS[int(rng.integers(0, len(LISTOPS_OPS)))],
                    [self._tree(2, rng) for _ in range(n)])
            toks = self.tokens(tree)
            if self.min_len <= len(toks) <= self.max_len:
                return toks, self.value(tree)

    def sample(self, batch: int, rng: np.random.Generator, split: str = "train") -> Batch:
        out = self._empty(batch, self.PAD)
        for b in range(batch):
            pos = 0
            while True:
                toks, val = self.expression(rng)
                if pos + len(toks) + 2 > self.seq_len:
                    break
                out.ids[b, pos:pos + len(toks)] = toks
                q = pos + len(toks)
                out.ids[b, q], out.ids[b, q + 1] = self.EQ, val
                out.targets[b, q] = val
                out.distance[b, q] = len(toks)
                pos = q + 2
        return out


# ----------------------------------------------------------------------------- selective copying


class SelectiveCopy(Task):
    """Selective copying (Mamba, Gu & Dao 2023): remember scattered tokens, output them in order.

    Vocabulary: blank ``0``, marker ``1``, data ``[2, 2 + num_data)``. The first
    ``L = seq_len - num_tokens`` positions are blanks with ``num_tokens`` data tokens at
    distinct positions ``L - u`` (``u`` log-uniform in ``[1, L]``); position ``L`` is the
    marker and positions ``L + 1 ..`` repeat the data tokens in order (teacher forcing).
    Position ``L + i`` targets data token ``i`` (of the ``num_tokens``, in order) and its
    distance is ``L + i - (position of data token i)``.
    """

    name = "copy"
    BLANK, MARK, DATA0 = 0, 1, 2

    def __init__(self, seq_len: int, num_tokens: int = 8, num_data: int = 16):
        super().__init__(seq_len)
        if not 1 <= num_tokens <= (seq_len - num_tokens) // 2:
            raise ValueError(f"SelectiveCopy: num_tokens must be in [1, (seq_len - num_tokens) / 2], got {num_tokens}")
        self.num_tokens, self.num_data = num_tokens, num_data
        self.vocab_size = 2 + num_data
        self.chance = 1.0 / num_data

    def describe(self) -> dict:
        return {**super().describe(), "num_tokens": self.num_tokens, "num_data": self.num_data}

    def sample(self, batch: int, rng: np.random.Generator, split: str = "train") -> Batch:
        n, L = self.num_tokens, self.seq_len - self.num_tokens
        out = self._empty(batch, self.BLANK)
        for b in range(batch):
            pos: set[int] = set()
            while len(pos) < n:
                pos.add(L - log_uniform_int(rng, 1, L))
            where = np.array(sorted(pos))
            data = rng.integers(0, self.num_data, n) + self.DATA0
            out.ids[b, where] = data
            out.ids[b, L] = self.MARK
            out.ids[b, L + 1:L + n] = data[:-1]
            out.targets[b, L:L + n] = data
            out.distance[b, L:L + n] = np.arange(L, L + n) - where
        return out


# ----------------------------------------------------------------------------- passkey


class Passkey(Task):
    """Passkey retrieval: ``KEY d1 .. dn`` somewhere in random filler, ``QUERY`` at the end.

    Vocabulary: digits ``0-9``, filler ``[10, 10 + num_fill)``, then ``KEY`` and ``QUERY``.
    ``QUERY`` sits at ``q = seq_len - num_digits``, followed by the digits (teacher forcing);
    positions ``q .. seq_len - 1`` target the digits. The passkey starts at
    ``p = q - 1 - d`` with ``d`` log-uniform in ``[num_digits, q - 1]``; every target's
    distance is ``d`` (digit ``i`` is at ``p + 1 + i``, its target position ``q + i``).
    """

    name = "passkey"

    def __init__(self, seq_len: int, num_digits: int = 5, num_fill: int = 16):
        super().__init__(seq_len)
        if not 1 <= num_digits <= seq_len // 4:
            raise ValueError(f"Passkey: num_digits must be in [1, seq_len / 4], got {num_digits}")
        self.num_digits, self.num_fill = num_digits, num_fill
        self.KEY, self.QUERY = 10 + num_fill, 11 + num_fill
        self.vocab_size = 12 + num_fill
        self.chance = 0.1

    def describe(self) -> dict:
        return {**super().describe(), "num_digits": self.num_digits}

    def sample(self, batch: int, rng: np.random.Generator, split: str = "train") -> Batch:
        n, t = self.num_digits, self.seq_len
        q = t - n
        out = self._empty(batch)
        out.ids[:] = rng.integers(10, 10 + self.num_fill, size=(batch, t))
        for b in range(batch):
            d = log_uniform_int(rng, n, q - 1)
            p = q - 1 - d
            digits = rng.integers(0, 10, n)
            out.ids[b, p] = self.KEY
            out.ids[b, p + 1:p + 1 + n] = digits
            out.ids[b, q] = self.QUERY
            out.ids[b, q + 1:] = digits[:-1]
            out.targets[b, q:] = digits
            out.distance[b, q:] = d
        return out


# ----------------------------------------------------------------------------- byte-level LM


def stdlib_dir() -> str:
    """The standard library's directory (``sysconfig``'s ``stdlib`` path)."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """The ``.py`` files of the standard library, relative to its directory, sorted
    (``site-packages`` and ``dist-packages`` excluded)."""
    root = stdlib_dir() if root is None else root
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in filenames:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def is_heldout(relpath: str, every: int = 10) -> bool:
    """The file split: a file is held out when ``crc32(path) % every == 0`` (about 10%)."""
    return zlib.crc32(relpath.replace(os.sep, "/").encode()) % every == 0


@functools.lru_cache(maxsize=4)
def stdlib_corpus(split: str, root: str | None = None) -> np.ndarray:
    """The bytes of the ``split`` (``"train"`` or ``"heldout"``) files, concatenated in path
    order with a ``0`` byte between files, as a ``uint8`` array."""
    if split not in ("train", "heldout"):
        raise ValueError(f"stdlib_corpus: split must be 'train' or 'heldout', got {split!r}")
    root = stdlib_dir() if root is None else root
    parts = []
    for rel in stdlib_files(root):
        if is_heldout(rel) == (split == "heldout"):
            with open(os.path.join(root, rel), "rb") as f:
                parts.append(f.read())
    if not parts:
        raise ValueError(f"stdlib_corpus: no .py files for split {split!r} under {root}")
    return np.frombuffer(b"\0".join(parts), dtype=np.uint8)


class ByteLM(Task):
    """Next-byte prediction on the standard library's ``.py`` sources (vocabulary 256).

    Training batches are windows of ``seq_len + 1`` bytes at random offsets of the train
    files; :meth:`sample` with ``split="heldout"`` draws from the held-out files (the split
    is by file: :func:`is_heldout`). Every position is scored; its ``distance`` is its
    position (the context it has), so "in the window" means ``t <= W``.
    """

    name = "lm"

    def __init__(self, seq_len: int, root: str | None = None):
        super().__init__(seq_len)
        self.root = root
        self.vocab_size = 256
        self.chance = 0.0

    def describe(self) -> dict:
        train, held = stdlib_corpus("train", self.root), stdlib_corpus("heldout", self.root)
        return {**super().describe(), "train_bytes": int(train.size), "heldout_bytes": int(held.size),
                "corpus_crc32": zlib.crc32(held.tobytes()) ^ zlib.crc32(train[:1 << 20].tobytes())}

    def sample(self, batch: int, rng: np.random.Generator, split: str = "train") -> Batch:
        data = stdlib_corpus(split, self.root)
        t = self.seq_len
        if data.size < t + 2:
            raise ValueError(f"ByteLM: the {split} corpus ({data.size} bytes) is shorter than seq_len + 1")
        starts = rng.integers(0, data.size - t - 1, batch)
        win = np.stack([data[s:s + t + 1] for s in starts]).astype(np.int64)
        dist = np.broadcast_to(np.arange(t, dtype=np.int64), (batch, t)).copy()
        return Batch(win[:, :-1].copy(), win[:, 1:].copy(), dist)


TASKS = {"mqar": MQAR, "listops": ListOps, "copy": SelectiveCopy, "passkey": Passkey, "lm": ByteLM}


def make_task(name: str, seq_len: int, **options) -> Task:
    """The task ``name`` (``mqar | listops | copy | passkey | lm``) with ``options``
    (the constructor's keywords; ``None`` values take the defaults)."""
    if name not in TASKS:
        raise ValueError(f"make_task: task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](seq_len, **{k: v for k, v in options.items() if v is not None})
