"""Sanity notes computed from the runs, so a suspicious result is flagged in the report rather than missed.

Checks: test accuracy near chance; validation accuracy far above training accuracy; a pixel-permuted run
beating its original by more than the noise (seed noise with ≥ 3 seeds, else test-set sampling noise);
classes with no test images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from classlab.evidence import VariantRow, variant_of
from classlab.report.load import RunData
from classlab.results import RunSummary

VAL_ABOVE_TRAIN = 0.10  # accuracy points (as a fraction) at the last epoch
NOISE_AUTOCORRELATION = 0.3  # below this, a map's neighbouring pixels are nearly independent: it looks like noise
SMOOTH_AUTOCORRELATION = 0.6  # at or above this, a map is smooth (an ordinary CNN's at 28×28: about 0.9)


@dataclass(frozen=True)
class Note:
    kind: str  # near_chance | val_above_train | permuted_beats_original
    subject: str
    text: str


def chance_level(summary: RunSummary) -> float:
    """What always predicting the most common test class scores (1/K on a balanced test set)."""
    support = summary.test.per_class["support"]
    total = sum(support)
    return max(support) / total if total else 0.0


def near_chance(rows: list[VariantRow], runs: list[RunData]) -> list[Note]:
    by_variant = {variant_of(r.name): r for r in runs}
    notes = []
    for row in rows:
        chance = chance_level(by_variant[row.variant].summary)
        if row.accuracy.mean < chance + 0.1 * (1 - chance):
            notes.append(Note("near_chance", row.variant,
                              f"{row.variant}: test accuracy {row.accuracy.mean:.1%} is near chance "
                              f"({chance:.1%}, always predicting the most common class); the model learned "
                              "little: check the learning rate, the epochs and the labels."))
    return notes


def val_above_train(runs: list[RunData]) -> list[Note]:
    notes = []
    for run in runs:
        last = next((m for m in reversed(run.metrics) if m.get("val_accuracy") is not None), None)
        if last is None or last.get("train_accuracy") is None:
            continue
        gap = last["val_accuracy"] - last["train_accuracy"]
        if gap > VAL_ABOVE_TRAIN:
            notes.append(Note("val_above_train", run.name,
                              f"{run.name}: validation accuracy {last['val_accuracy']:.1%} is {gap * 100:.1f} "
                              f"points above training accuracy {last['train_accuracy']:.1%} at epoch "
                              f"{last['epoch']}. Training accuracy is averaged while the weights still change and "
                              "dropout/augmentation act only in training; if it persists, check that the "
                              "validation images are not easier than (or also in) the training set."))
    return notes


def _without_permutation(config: dict) -> dict:
    out = copy.deepcopy(config)
    out.pop("name", None)
    out.pop("seed", None)
    (out.get("data") or {}).pop("permute_pixels", None)
    return out


def is_permuted(run: RunData) -> bool:
    return bool((run.config.get("data") or {}).get("permute_pixels"))


def originals(runs: list[RunData]) -> dict[str, str]:
    """Permuted variant -> the variant with the same config except data.permute_pixels (and name/seed)."""
    plain = [(variant_of(r.name), _without_permutation(r.config)) for r in runs if r.config and not is_permuted(r)]
    out = {}
    for run in runs:
        if not is_permuted(run):
            continue
        stripped = _without_permutation(run.config)
        match = next((variant for variant, cfg in plain if cfg == stripped), None)
        if match is not None:
            out[variant_of(run.name)] = match
    return out


def _noise(a: VariantRow, b: VariantRow, runs: list[RunData]) -> tuple[float, str]:
    """95% half-width of the difference of two accuracies: over seeds when both have ≥ 3, else binomial."""
    if a.accuracy.has_interval and b.accuracy.has_interval:
        return math.hypot(a.accuracy.ci95, b.accuracy.ci95), "95% interval over seeds"
    sizes = {variant_of(r.name): sum(r.summary.test.per_class["support"]) for r in runs}

    def var(row: VariantRow) -> float:
        p = row.accuracy.mean
        return p * (1 - p) / max(sizes.get(row.variant, 1), 1)

    return 1.96 * math.sqrt(var(a) + var(b)), "95% test-set sampling noise; seed noise needs ≥ 3 seeds"


def permuted_beats_original(rows: list[VariantRow], runs: list[RunData]) -> list[Note]:
    by_name = {r.variant: r for r in rows}
    notes = []
    for permuted, original in originals(runs).items():
        p, o = by_name.get(permuted), by_name.get(original)
        if p is None or o is None:
            continue
        diff = p.accuracy.mean - o.accuracy.mean
        noise, how = _noise(p, o, runs)
        if diff > noise:
            notes.append(Note("permuted_beats_original", permuted,
                              f"{permuted} (pixels permuted, {p.accuracy.mean:.1%}) beats its original {original} "
                              f"({o.accuracy.mean:.1%}) by {diff * 100:.1f} points, more than the noise "
                              f"(±{noise * 100:.1f} points, {how}). A fixed permutation removes spatial structure a "
                              "CNN relies on; check both runs' data and configs."))
    return notes


def no_test_images(runs: list[RunData]) -> list[Note]:
    """Classes a run's test split has no image of (only with data.allow_missing_classes: else loading fails)."""
    by_missing: dict[tuple[str, ...], list[str]] = {}
    for run in runs:
        support = run.summary.test.per_class["support"]
        missing = tuple(c for c, n in zip(run.classes, support, strict=False) if n == 0)
        if missing:
            by_missing.setdefault(missing, []).append(run.name)
    return [Note("no_test_images", ", ".join(names),
                 f"{', '.join(names)}: no test images for class(es) {', '.join(missing)} "
                 "(data.allow_missing_classes); their recall and F1 are undefined and count as 0 in the macro "
                 "averages, and the test accuracy says nothing about them.")
            for missing, names in by_missing.items()]


def permuted_cam_noise(runs: list[RunData], cam_autocorrelation: dict[str, float]) -> list[Note]:
    """A pixel-permuted variant whose Grad-CAM maps (brought back through the permutation onto the image)
    look like noise next to its original's: neighbouring map pixels nearly uncorrelated in the permuted run
    (below NOISE_AUTOCORRELATION) while the original's maps are smooth (SMOOTH_AUTOCORRELATION). The
    correlations are the ones each run stored with its maps (cam.spatial_autocorrelation)."""

    def mean(variant: str) -> float | None:
        values = [cam_autocorrelation[r.name] for r in runs
                  if variant_of(r.name) == variant and cam_autocorrelation.get(r.name) is not None]
        return sum(values) / len(values) if values else None

    notes = []
    for permuted, original in originals(runs).items():
        p, o = mean(permuted), mean(original)
        if p is None or o is None or not (p < NOISE_AUTOCORRELATION and o >= SMOOTH_AUTOCORRELATION):
            continue
        notes.append(Note("permuted_cam_noise", permuted,
                          f"{permuted} (pixels permuted): its Grad-CAM maps, mapped back onto the image, look like "
                          f"noise next to {original}'s: neighbouring map pixels correlate {p:.2f} against "
                          f"{o:.2f} (below {NOISE_AUTOCORRELATION} reads as noise). As expected: after a fixed "
                          "permutation the CNN's evidence is not tied to places in the image."))
    return notes


def run_log_warnings(runs: list[RunData]) -> list[Note]:
    """Every warning a run's run.log holds (preprocessing mismatches, ...), once per text with the runs that have
    it: the report never says "No warnings" over a run.log that warns."""
    from classlab.runs import RunFolder

    found: dict[str, list[str]] = {}
    for run in runs:
        for line in RunFolder(run.path).read_run_log():
            if line.strip().lower().startswith("warning"):
                found.setdefault(line.strip().split(":", 1)[-1].strip(), []).append(run.name)
    return [Note("run.log warning", ", ".join(names), text) for text, names in found.items()]


def sanity_notes(rows: list[VariantRow], runs: list[RunData],
                 cam_autocorrelation: dict[str, float] | None = None) -> list[Note]:
    """`cam_autocorrelation`: run name -> spatial autocorrelation of its Grad-CAM maps (report.context)."""
    return (near_chance(rows, runs) + val_above_train(runs) + permuted_beats_original(rows, runs)
            + no_test_images(runs) + permuted_cam_noise(runs, cam_autocorrelation or {}) + run_log_warnings(runs))
