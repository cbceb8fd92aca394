"""Lookups and number formatting shared by the report's tables, plots and README snippet."""
from __future__ import annotations

import os
from typing import Any

#: benchmarks/results
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
#: the varlen family's methods (record ``method``, short label); the first is ours
VARLEN_METHODS = (("ours_varlen", "varlen"), ("ours_padded", "padded"), ("flex_document", "flex"))


class Index:
    """Records by (family, case_id, method, mode)."""

    def __init__(self, results: dict[str, Any]):
        self.results = results
        self.env = results["env"]
        self.by_key: dict[tuple, dict] = {}
        for r in results.get("records", []):
            self.by_key[(r.get("family"), r.get("case_id"), r.get("method"), r.get("mode"))] = r

    def get(self, family, case_id, method, mode) -> dict | None:
        return self.by_key.get((family, case_id, method, mode)) or self.by_key.get((family, case_id, method, "*"))

    def ms(self, family, case_id, method, mode) -> float | None:
        r = self.get(family, case_id, method, mode)
        return r["ms"] if r and r.get("status") == "ok" and r.get("ms") else None

    def bwd_ms(self, case_id, method) -> tuple[float | None, str]:
        """Backward time: measured, or fwd+bwd minus fwd when the direct figure is missing."""
        ms = self.ms("attention", case_id, method, "bwd")
        if ms:
            return ms, ""
        fb, f = self.ms("attention", case_id, method, "fwd+bwd"), self.ms("attention", case_id, method, "fwd")
        if fb and f and fb > f:
            return fb - f, " (bwd derived as fwd+bwd - fwd)"
        return None, ""

    def kernel_ok(self, family: str) -> bool:
        """Whether every correctness check of our kernels in ``family`` passed."""
        return all(c.get("passed") for c in self.results.get("correctness", [])
                   if c.get("family") == family and not c.get("baseline"))

    def speedups_meaningful(self, family: str) -> tuple[bool, str]:
        if not self.env.get("timings_meaningful"):
            return False, "CPU run: timings are not meaningful"
        fam = self.results.get("families", {}).get(family, {})
        if fam.get("kernel_available") is False:
            return False, f"kernel not available ({fam.get('kernel_reason')})"
        if not self.kernel_ok(family):
            return False, "our kernel failed a correctness check"
        return True, ""

    def records(self, family: str, **match) -> list[dict]:
        out = []
        for r in self.results.get("records", []):
            if r.get("family") != family:
                continue
            if all(r.get(k) == v for k, v in match.items()):
                out.append(r)
        return out


def ratio(base: float | None, ours: float | None) -> float | None:
    """``base / ours`` (a speed-up when both are times), None when either is missing."""
    return base / ours if base and ours else None


def fmt(x: float | None, nd: int = 3) -> str:
    """A table cell: "—" for None, ``nd`` significant digits, thousands separators from 100."""
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}g}" if abs(x) < 1 else f"{x:.{nd}f}".rstrip("0").rstrip(".") if nd else f"{x:.0f}"


def t_label(t: int) -> str:
    """A sequence length as the tables print it: ``16384`` -> ``"16k"``."""
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)
