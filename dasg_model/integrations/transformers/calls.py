"""Process-wide state of the transformers integration: the default backend, the call
counters behind :func:`call_counts` and the one-time fallback warnings."""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch

__all__ = [
    "NAME",
    "DASGFallbackWarning",
    "backend_for",
    "call_counts",
    "count_call",
    "fall_back",
    "reset_call_counts",
    "set_default_backend",
    "warn_once",
]

#: The name registered with transformers' attention, mask and experts interfaces.
NAME = "dasg"
_SETTINGS: dict[str, Any] = {"backend": "auto"}


def set_default_backend(backend: str) -> None:
    """The backend of every module :func:`~.registration.enable` did not set one on."""
    _SETTINGS["backend"] = backend


def backend_for(module: torch.nn.Module) -> str:
    """The backend :func:`~.registration.enable` set on this model's modules, else
    :func:`~.registration.register`'s."""
    return module.__dict__.get("_dasg_backend", _SETTINGS["backend"])


_CALLS: Counter = Counter()
_REASONS: dict[str, Counter] = {"attention": Counter(), "experts": Counter()}
_WARNED: set[str] = set()


class DASGFallbackWarning(UserWarning):
    """A call was routed to transformers' own implementation (the message says why)."""


def call_counts() -> dict[str, Any]:
    """Calls so far: ``attention``, ``attention_fallback``, ``experts``, ``experts_fallback``
    (ints), and ``attention_fallback_reasons`` / ``experts_fallback_reasons``: ``{reason: calls}``."""
    out: dict[str, Any] = {k: _CALLS[k] for k in ("attention", "attention_fallback", "experts", "experts_fallback")}
    for kind, reasons in _REASONS.items():
        out[f"{kind}_fallback_reasons"] = dict(reasons)
    return out


def reset_call_counts() -> None:
    """Zero the counters of :func:`call_counts`."""
    _CALLS.clear()
    for reasons in _REASONS.values():
        reasons.clear()


def count_call(kind: str) -> None:
    """Count one call of ``kind`` (``"attention"`` or ``"experts"``) that ran our kernels."""
    _CALLS[kind] += 1


def warn_once(kind: str, reason: str, *, fallback: bool = True) -> None:
    """Warn (:class:`DASGFallbackWarning`) once per ``kind`` and ``reason``; ``fallback``: the
    message says the call runs transformers' own implementation."""
    key = f"{kind}: {reason}"
    if key in _WARNED:
        return
    _WARNED.add(key)
    msg = (f"dasg {kind}: not covered by the DASG kernels: {reason}; this call (and later ones like it) "
           f"runs transformers' own implementation instead") if fallback else f"dasg {kind}: {reason}"
    warnings.warn(msg, DASGFallbackWarning, stacklevel=4)


def fall_back(kind: str, reason: str) -> None:
    """Count a call of ``kind`` sent to transformers' implementation because of ``reason``,
    and warn once."""
    _CALLS[f"{kind}_fallback"] += 1
    _REASONS[kind][reason] += 1
    warn_once(kind, reason)
