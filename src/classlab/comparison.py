"""The study comparison: one row per variant (runs that differ only by seed), mean ± std over seeds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

SEED_SUFFIX = re.compile(r"-seed\d+$")
# two-sided 95% Student t quantiles for n-1 degrees of freedom (n = 2..30); normal beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045]


# Fewest seeds for an interval over seeds: with 2, Student's t is 12.7 and the 95% interval of the mean spans
# nearly any accuracy ([0, 100] once clipped), so it is not shown and seed noise counts as not estimated.
MIN_SEEDS_FOR_INTERVAL = 3


def variant_of(run_name: str) -> str:
    return SEED_SUFFIX.sub("", run_name)


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample std (ddof=1); 0 for one seed
    n: int

    @property
    def has_interval(self) -> bool:
        """Enough seeds for a 95% interval over seeds that says something (MIN_SEEDS_FOR_INTERVAL)."""
        return self.n >= MIN_SEEDS_FOR_INTERVAL

    @property
    def ci95(self) -> float:
        """Half-width of the 95% confidence interval of the mean (t distribution)."""
        if self.n < 2:
            return 0.0
        t = _T95[self.n - 2] if self.n - 2 < len(_T95) else 1.96
        return t * self.std / math.sqrt(self.n)

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def stat(values: list[float]) -> Stat:
    arr = np.asarray(values, dtype=float)
    return Stat(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr))


@dataclass(frozen=True)
class VariantRow:
    variant: str
    runs: list[str]
    accuracy: Stat
    loss: Stat
    macro_f1: Stat
    parameters: int
    epochs: Stat
    seconds: Stat
    val_accuracy: Stat | None


def compare_runs(summaries: list[dict]) -> list[VariantRow]:
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(variant_of(s["name"]), []).append(s)
    rows = []
    for variant, runs in groups.items():
        vals = [r["best_val"]["accuracy"] for r in runs if r.get("best_val")]
        rows.append(VariantRow(
            variant=variant,
            runs=[r["name"] for r in runs],
            accuracy=stat([r["test"]["accuracy"] for r in runs]),
            loss=stat([r["test"]["loss"] for r in runs]),
            macro_f1=stat([r["test"]["macro"]["f1"] for r in runs]),
            parameters=int(runs[0]["parameters"]["total"]),
            epochs=stat([r["epochs_run"] for r in runs]),
            seconds=stat([r["seconds"] for r in runs]),
            val_accuracy=stat(vals) if len(vals) == len(runs) else None,
        ))
    return rows


def within_noise(a: Stat, b: Stat) -> bool:
    """True when two variants' means differ by less than their combined seed noise (needs ≥ 3 seeds each)."""
    if not (a.has_interval and b.has_interval):
        return False
    return abs(a.mean - b.mean) < math.sqrt(a.ci95**2 + b.ci95**2)


def against_reference(variant: str, tests: list[dict], metric: str = "accuracy") -> tuple[str, str]:
    """(difference against the reference in points with its 95% interval, verdict) for one variant's row of
    the comparison table, from evidence.compare_study's rows; ('reference', 'reference') for the reference."""
    if not tests:
        return "—", "—"
    if variant == tests[0]["b"]:
        return "reference", "reference"
    row = next((t for t in tests if t["a"] == variant and t["metric"] == metric), None)
    if row is None:
        return "—", "—"
    if row["diff"] is None:
        return "—", str(row["verdict"])
    return (f"{row['diff'] * 100:+.2f} [{row['ci_low'] * 100:+.2f}, {row['ci_high'] * 100:+.2f}]",
            str(row["verdict"]))
