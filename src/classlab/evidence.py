"""Is the difference real? Paired tests on one shared test set, verdicts, Holm correction, a power note,
seed-aware selection and the per-class diff of two variants.

Pure functions on plain arrays (labels and predictions as read from run folders), so the report, the
terminal table and a script all reach the same conclusion from the same files. Every random draw comes
from a seeded generator: the same run folders give the same intervals and p-values.

Methods, and why:
- one seed per variant: McNemar's exact test on per-image correctness (the accuracy difference of two
  classifiers on the same images is decided by the images exactly one of them gets right), and a paired
  bootstrap over test images (the same resampled images for both) for the accuracy and macro-F1 intervals;
- several seeds: a hierarchical bootstrap, resampling seeds within each variant and then test images
  (shared by every run), so both the seed-to-seed spread and test-set sampling enter the interval. With
  2-3 seeds the seed spread is itself estimated from 1-2 degrees of freedom, so the interval and p-value use
  the bootstrap standard error with a Student t reference (Welch-Satterthwaite degrees of freedom) instead
  of normal-theory percentiles, which would claim differences 2 seeds cannot support.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from classlab.comparison import variant_of

ALPHA = 0.05
POWER = 0.8
N_BOOT = 1000
METRICS = ("accuracy", "macro_f1")
MCNEMAR = "McNemar exact test (binomial on discordant pairs)"
PAIRED = "paired bootstrap over test images"
HIERARCHICAL = "hierarchical bootstrap over seeds and test images"
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
CORRECTION = "Holm over the comparisons of each metric"
_CHUNK = 2_000_000  # resampled image indices held at once (16 MB)


@dataclass(frozen=True)
class RunPredictions:
    """One run's test-set predictions, as plain arrays read from its predictions.npz."""

    name: str
    variant: str
    y_true: np.ndarray
    y_pred: np.ndarray
    n_classes: int
    worst_index: np.ndarray | None = None  # test-image indices whose pixels the run folder keeps
    worst_images: np.ndarray | None = None
    fold: tuple[int, int] | None = None  # (repeat, fold) of a cross-validation run: its test set is that fold
    train_size: int | None = None  # training images of that fold (the corrected resampled t test needs it)


def run_predictions(name: str, y_true: np.ndarray, probs: np.ndarray | None = None, y_pred: np.ndarray | None = None,
                    variant: str | None = None, worst_index: np.ndarray | None = None,
                    worst_images: np.ndarray | None = None, fold: tuple[int, int] | None = None,
                    train_size: int | None = None) -> RunPredictions:
    """Build a RunPredictions from predictions.npz's arrays (`y_pred` wins over argmax of `probs`)."""
    y_true = np.asarray(y_true).astype(np.int64)
    if y_pred is None:
        if probs is None:
            raise ValueError(f"{name}: neither y_pred nor probs")
        y_pred = np.asarray(probs).argmax(1)
    y_pred = np.asarray(y_pred).astype(np.int64)
    k = max(int(y_true.max(initial=0)), int(y_pred.max(initial=0))) + 1
    if probs is not None:
        k = max(k, int(np.asarray(probs).shape[1]))
    return RunPredictions(name, variant or variant_of(name), y_true, y_pred, k, worst_index, worst_images,
                          None if fold is None else (int(fold[0]), int(fold[1])),
                          None if train_size is None else int(train_size))


# ----------------------------------------------------------------------------- tests of one pair


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: under 'equally accurate', each discordant image is a fair coin."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(only_a, only_b), n, 0.5)))


def confusions(y_true: np.ndarray, y_pred: np.ndarray, k: int, index: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrix (K×K), or one per row of resampled image indices (R×K×K), by one bincount."""
    codes = y_true * k + y_pred
    if index is None:
        return np.bincount(codes, minlength=k * k).reshape(k, k)
    rows = index.shape[0]
    flat = (codes[index] + (np.arange(rows) * k * k)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * k * k).reshape(rows, k, k)


def confusion_stats(cm: np.ndarray) -> np.ndarray:
    """[accuracy, macro F1, recall per class…, F1 per class…] of one or many confusion matrices (last axis).

    Undefined ratios are 0, as in evaluate.metrics_from_confusion (sklearn's zero_division=0)."""
    cm = np.asarray(cm, dtype=float)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)
    total = support.sum(-1)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    accuracy = np.divide(tp.sum(-1), total, out=np.zeros_like(total), where=total > 0)
    return np.concatenate([accuracy[..., None], f1.mean(-1)[..., None], recall, f1], axis=-1)


def replicate_stats(y_true: np.ndarray, preds: Sequence[np.ndarray], k: int, n_boot: int = N_BOOT,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every run's statistics on the whole test set (R×S) and on `n_boot` resamples of the test images
    (R×B×S). The resampled indices are shared by every run: that pairing is what makes the test sharp."""
    n = len(y_true)
    rng = np.random.default_rng(seed)
    point = np.stack([confusion_stats(confusions(y_true, p, k)) for p in preds])
    draws = np.empty((len(preds), n_boot, point.shape[1]))
    step = max(1, _CHUNK // max(n, 1))
    for start in range(0, n_boot, step):
        index = rng.integers(0, n, size=(min(step, n_boot - start), n))
        for r, p in enumerate(preds):
            draws[r, start:start + len(index)] = confusion_stats(confusions(y_true, p, k, index))
    return point, draws


@dataclass(frozen=True)
class Difference:
    """The difference a − b of every statistic, with its bootstrap draws and the seed-variance parts."""

    point: np.ndarray  # S
    draws: np.ndarray  # B×S
    seed_var: np.ndarray  # S: variance of (mean of a) − (mean of b) due to seeds; 0 when unknown
    seed_df: np.ndarray  # S: Welch-Satterthwaite degrees of freedom of seed_var (inf: no seed part)
    seed_var_runs: tuple[np.ndarray, np.ndarray]  # S each: the per-seed variance of a and of b
    hierarchical: bool


def _seed_draws(draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resample seeds within a variant, per bootstrap draw; deviations scaled by sqrt(m/(m−1)) so the
    resampled mean's variance is s²/m rather than the plug-in's (m−1)/m · s²/m (half of it for 2 seeds)."""
    m, b = draws.shape[:2]
    mean = draws.mean(0)
    pick = rng.integers(0, m, size=(b, m))
    resampled = draws[pick, np.arange(b)[:, None]].mean(1)
    return mean + math.sqrt(m / (m - 1)) * (resampled - mean)


def _borrowed_seed(draws_one: np.ndarray, draws_other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A one-seed variant's draws plus one seed deviation of the other variant: its seed noise is unknown,
    so it is assumed to be as large as the other's."""
    m, b = draws_other.shape[:2]
    pick = rng.integers(0, m, size=b)
    deviation = draws_other[pick, np.arange(b)] - draws_other.mean(0)
    return draws_one[0] + math.sqrt(m / (m - 1)) * deviation


def difference(point_a: np.ndarray, draws_a: np.ndarray, point_b: np.ndarray, draws_b: np.ndarray,
               seed: int = 0) -> Difference:
    """a − b from per-run statistics (runs×S and runs×B×S on shared image resamples): a paired bootstrap with
    one seed each, the hierarchical bootstrap (seeds, then images) when either side has ≥ 2 seeds."""
    rng = np.random.default_rng(seed)
    m, k = len(point_a), len(point_b)
    var_a = point_a.var(0, ddof=1) if m > 1 else None
    var_b = point_b.var(0, ddof=1) if k > 1 else None
    if m == 1 and k == 1:
        zero = np.zeros(point_a.shape[1])
        return Difference(point_a[0] - point_b[0], draws_a[0] - draws_b[0], zero, np.full_like(zero, np.inf),
                          (zero, zero), False)
    star_a = _seed_draws(draws_a, rng) if m > 1 else _borrowed_seed(draws_a, draws_b, rng)
    star_b = _seed_draws(draws_b, rng) if k > 1 else _borrowed_seed(draws_b, draws_a, rng)
    # a one-seed side borrows the other's seed variance (and its degrees of freedom)
    va, dfa = (var_a / m, m - 1) if var_a is not None else (var_b, k - 1)
    vb, dfb = (var_b / k, k - 1) if var_b is not None else (var_a, m - 1)
    seed_var = va + vb
    denominator = va**2 / dfa + vb**2 / dfb
    seed_df = np.divide(seed_var**2, denominator, out=np.full_like(seed_var, np.inf), where=denominator > 0)
    per_run = (var_a if var_a is not None else var_b, var_b if var_b is not None else var_a)
    return Difference(point_a.mean(0) - point_b.mean(0), star_a - star_b, seed_var, seed_df, per_run, True)


def _t_quantile(df: float, q: float = 0.975) -> float:
    return float(stats.norm.ppf(q)) if not math.isfinite(df) or df > 1e6 else float(stats.t.ppf(q, df))


def interval_and_p(point: float, draws: np.ndarray, seed_var: float, seed_df: float,
                   hierarchical: bool) -> tuple[float, float, float]:
    """(low, high, two-sided p) of one statistic's difference.

    Paired bootstrap: percentile interval, p from the null-shifted draws. Hierarchical: point ± t·SE with the
    bootstrap SE and Welch-Satterthwaite degrees of freedom (image noise counts as infinitely many)."""
    if not hierarchical:
        low, high = np.quantile(draws, [0.025, 0.975])
        p = (1 + np.sum(np.abs(draws - point) >= abs(point) - 1e-12)) / (len(draws) + 1)
        return float(low), float(high), float(min(p, 1.0))
    var = float(draws.var(ddof=1))
    se = math.sqrt(var)
    if se == 0:
        return point, point, 1.0 if point == 0 else 0.0
    # Welch-Satterthwaite: total variance² over the seed parts' variance²/df (the image part has df ≈ ∞)
    df = var**2 * seed_df / seed_var**2 if seed_var > 0 and math.isfinite(seed_df) else math.inf
    df = max(df, 1.0)
    half = _t_quantile(df) * se
    p = 2 * (stats.t.sf(abs(point) / se, df) if math.isfinite(df) else stats.norm.sf(abs(point) / se))
    return point - half, point + half, float(min(p, 1.0))


# ----------------------------------------------------------------------------- a study's family of comparisons


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None): controls the chance of any false 'better/worse'
    among the study's comparisons at α, without assuming they are independent."""
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    out: list[float | None] = [None] * len(p_values)
    m = len(present)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(diff: float, ci: tuple[float, float], p_adjusted: float | None, alpha: float = ALPHA,
            higher_is_better: bool = True) -> str:
    """'better' / 'worse' (a against b) only when the adjusted p is below α and the interval excludes 0."""
    low, high = ci
    if p_adjusted is None or p_adjusted >= alpha or low <= 0 <= high:
        return NO_DIFFERENCE
    return BETTER if (diff > 0) == higher_is_better else WORSE


def power_note(diff: float, se_images: float, seed_var_runs: tuple[float, float] | None, n_seeds: tuple[int, int],
               n_images: int, alpha: float = ALPHA, power: float = POWER) -> dict:
    """Roughly how many seeds (per variant) or test images would detect `diff` at α with the given power, if it
    were the true difference: needs |diff| ≥ (z₁₋α/₂ + z_power) · SE, with SE² = image part · n/n' + seed part / m.

    `se_images`: the test-set sampling part of the standard error at `n_images`; `seed_var_runs`: the per-seed
    variances of the two variants (None: unknown, one seed each)."""
    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    out: dict = {"seeds_needed": None, "test_images_needed": None}
    if diff == 0 or not math.isfinite(diff):
        out["text"] = "the observed difference is 0: no number of seeds or test images would call it real"
        return out
    target = (abs(diff) / z) ** 2
    image_var = se_images**2
    seed_part = 0.0
    if seed_var_runs is not None:
        per_seed = seed_var_runs[0] + seed_var_runs[1]
        seed_part = seed_var_runs[0] / n_seeds[0] + seed_var_runs[1] / n_seeds[1]
        if target > image_var and per_seed > 0:
            out["seeds_needed"] = max(2, math.ceil(per_seed / (target - image_var)))
        elif per_seed == 0 and target > image_var:
            out["seeds_needed"] = max(n_seeds)
    if image_var > 0 and target > seed_part:
        out["test_images_needed"] = math.ceil(image_var * n_images / (target - seed_part))
    shown = f"{abs(diff) * 100:.2f} points"
    parts = []
    if out["seeds_needed"] is not None:
        parts.append(f"about {out['seeds_needed']} seeds per variant (same test set)")
    if out["test_images_needed"] is not None:
        kept = "one seed each" if seed_var_runs is None else f"{n_seeds[0]} and {n_seeds[1]} seeds"
        parts.append(f"about {out['test_images_needed']:,} test images ({kept}; now {n_images:,})")
    if parts:
        text = f"to detect a difference of {shown} at α = {alpha:g} with power {power:g}: " + " or ".join(parts)
    else:
        text = f"a difference of {shown} needs both more seeds and more test images to be detected"
    if seed_var_runs is None:
        text += "; the seed-to-seed spread is unknown with one seed per variant: run ≥ 2 seeds to measure it"
    out["text"] = text
    return out


def reference_variant(variants: Sequence[str], selected: str | None = None) -> str:
    """What every variant is compared against: the selected cell when known (given, or the one a `retrain-`
    variant retrained), else the first variant."""
    if selected is not None and selected in variants:
        return selected
    retrained = [v.removeprefix("retrain-") for v in variants if v.startswith("retrain-")]
    if retrained and retrained[0] in variants:
        return retrained[0]
    return variants[0]


def _group(runs: Sequence[RunPredictions]) -> dict[str, list[RunPredictions]]:
    groups: dict[str, list[RunPredictions]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    return groups


def _same_test_set(runs: Sequence[RunPredictions]) -> bool:
    first = runs[0].y_true
    return all(r.y_true.shape == first.shape and np.array_equal(r.y_true, first) for r in runs[1:])


def _pair_rows(a: str, b: str, diff: Difference, runs_a: list, runs_b: list, n_images: int) -> list[dict]:
    rows = []
    for s, metric in enumerate(METRICS):
        point = float(diff.point[s])
        low, high, p = interval_and_p(point, diff.draws[:, s], float(diff.seed_var[s]), float(diff.seed_df[s]),
                                      diff.hierarchical)
        if diff.hierarchical:
            test = HIERARCHICAL
        elif metric == "accuracy":
            correct_a, correct_b = runs_a[0].y_pred == runs_a[0].y_true, runs_b[0].y_pred == runs_b[0].y_true
            p, test = mcnemar_exact(correct_a, correct_b), MCNEMAR + f" · interval: {PAIRED}"
        else:
            test = PAIRED
        image_var = max(float(diff.draws[:, s].var(ddof=1)) - float(diff.seed_var[s]), 0.0)
        seed_runs = (float(diff.seed_var_runs[0][s]), float(diff.seed_var_runs[1][s])) if diff.hierarchical else None
        rows.append({"a": a, "b": b, "metric": metric, "diff": point, "ci_low": low, "ci_high": high,
                     "p_value": p, "p_adjusted": None, "test": test, "verdict": None,
                     "n_seeds_a": len(runs_a), "n_seeds_b": len(runs_b), "n_test": n_images,
                     "_power": (math.sqrt(image_var), seed_runs)})
    return rows


def compare_study(runs: Sequence[RunPredictions | dict], reference: str | None = None, n_boot: int = N_BOOT,
                  seed: int = 0, alpha: float = ALPHA) -> list[dict]:
    """Every variant against the reference variant, for accuracy and macro-F1: difference (a − b, a = the
    variant, b = the reference) with its 95% interval, p, Holm-adjusted p, the test's name and the verdict.

    `runs`: RunPredictions, or dicts with `name`, `y_true` and `probs` or `y_pred` (and optionally `variant`).
    A pair whose runs do not share one test set is kept as rows with verdict 'not compared' and a `reason`."""
    preds = [r if isinstance(r, RunPredictions) else run_predictions(**r) for r in runs]
    groups = _group(preds)
    if len(groups) < 2:
        return []
    ref = reference_variant(list(groups), reference)
    k = max(r.n_classes for r in preds)
    rows: list[dict] = []
    cache: dict[bytes, tuple[dict[str, int], np.ndarray, np.ndarray]] = {}
    for index, (variant, members) in enumerate(groups.items()):
        if variant == ref:
            continue
        both = groups[variant] + groups[ref]
        if not _same_test_set(both):
            rows += [{"a": variant, "b": ref, "metric": metric, "diff": None, "ci_low": None, "ci_high": None,
                      "p_value": None, "p_adjusted": None, "test": None, "verdict": "not compared",
                      "n_seeds_a": len(members), "n_seeds_b": len(groups[ref]),
                      "reason": "the runs were not evaluated on the same test set (their test labels differ)"}
                     for metric in METRICS]
            continue
        y_true = both[0].y_true
        key = y_true.tobytes()
        if key not in cache:  # one set of image resamples per test set, shared by every run on it
            on_it = [r for r in preds if r.y_true.shape == y_true.shape and np.array_equal(r.y_true, y_true)]
            point, draws = replicate_stats(y_true, [r.y_pred for r in on_it], k, n_boot, seed)
            cache[key] = ({r.name: i for i, r in enumerate(on_it)}, point, draws)
        where, point, draws = cache[key]
        ia, ib = [where[r.name] for r in members], [where[r.name] for r in groups[ref]]
        diff = difference(point[ia], draws[ia], point[ib], draws[ib], seed=seed + index)
        rows += _pair_rows(variant, ref, diff, members, groups[ref], len(y_true))
    return finish_rows(rows, alpha)


def finish_rows(rows: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Holm within each metric, then the verdict, and the power note where nothing was detected."""
    for metric in METRICS:
        family = [r for r in rows if r["metric"] == metric]
        for row, adjusted in zip(family, holm([r["p_value"] for r in family]), strict=True):
            row["p_adjusted"] = adjusted
    for row in rows:
        power = row.pop("_power", None)
        if row["p_value"] is None:
            row.setdefault("power", None)
            continue
        row["verdict"] = verdict(row["diff"], (row["ci_low"], row["ci_high"]), row["p_adjusted"], alpha)
        row["power"] = None
        if row["verdict"] == NO_DIFFERENCE and power is not None:
            note = power_note(row["diff"], power[0], power[1], (row["n_seeds_a"], row["n_seeds_b"]), row["n_test"],
                              alpha)
            row["power"] = note["text"]
            row["seeds_needed"], row["test_images_needed"] = note["seeds_needed"], note["test_images_needed"]
    return rows


# ----------------------------------------------------------------------------- seed-aware selection


def select_variant(scores: dict[str, list[float]], rule: str = "mean", higher_is_better: bool = True) -> str:
    """The best variant by its mean over seeds, or (`lower_bound`) by its worst plausible score: the 95%
    t-interval bound on the bad side (the value itself with one seed), so a stable cell beats a noisy one
    whose higher mean rests on one lucky seed."""
    if rule not in ("mean", "lower_bound"):
        raise ValueError(f"select rule '{rule}': choose mean or lower_bound")
    if not scores:
        raise ValueError("select: no variants")
    sign = 1.0 if higher_is_better else -1.0

    def score(values: list[float]) -> float:
        arr = np.asarray(values, dtype=float)
        if rule == "mean" or len(arr) < 2:
            return sign * float(arr.mean())
        half = float(stats.t.ppf(0.975, len(arr) - 1)) * float(arr.std(ddof=1)) / math.sqrt(len(arr))
        return sign * float(arr.mean()) - half

    return max(scores, key=lambda v: score(scores[v]))


# ----------------------------------------------------------------------------- two variants side by side


def variant_diff(runs_a: Sequence[RunPredictions], runs_b: Sequence[RunPredictions], n_boot: int = N_BOOT,
                 seed: int = 0, gallery: int = 8) -> dict | None:
    """Per-class recall (per-class accuracy) and F1 differences a − b with 95% intervals, the difference of
    the row-normalized mean confusion matrices, and the test images one variant gets right (every seed) and
    the other wrong (every seed), both directions, from the images the run folders keep. None when the two
    do not share a test set."""
    both = [*runs_a, *runs_b]
    if not runs_a or not runs_b or not _same_test_set(both):
        return None
    y_true = both[0].y_true
    k = max(r.n_classes for r in both)
    point, draws = replicate_stats(y_true, [r.y_pred for r in both], k, n_boot, seed)
    m = len(runs_a)
    diff = difference(point[:m], draws[:m], point[m:], draws[m:], seed=seed)
    per_class = []
    for c in range(k):
        row = {"class": c}
        for name, s in (("recall", 2 + c), ("f1", 2 + k + c)):
            low, high, _ = interval_and_p(float(diff.point[s]), diff.draws[:, s], float(diff.seed_var[s]),
                                          float(diff.seed_df[s]), diff.hierarchical)
            row[name] = {"a": float(point[:m, s].mean()), "b": float(point[m:, s].mean()),
                         "diff": float(diff.point[s]), "ci_low": low, "ci_high": high}
        per_class.append(row)
    return {"per_class": per_class, "confusion_diff": mean_confusion(runs_a, k) - mean_confusion(runs_b, k),
            "test": HIERARCHICAL if diff.hierarchical else PAIRED,
            "a_only": disagreements(runs_a, runs_b, gallery), "b_only": disagreements(runs_b, runs_a, gallery)}


def mean_confusion(runs: Sequence[RunPredictions], k: int, normalize: bool = True) -> np.ndarray:
    """The confusion matrix averaged over seeds (row-normalized: recall per true class, when asked)."""
    cm = np.mean([confusions(r.y_true, r.y_pred, k) for r in runs], axis=0)
    if not normalize:
        return cm
    rows = cm.sum(1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def disagreements(right: Sequence[RunPredictions], wrong: Sequence[RunPredictions], limit: int = 8) -> dict:
    """Test images every run of `right` classifies correctly and every run of `wrong` does not: how many in
    all, and up to `limit` of them whose pixels a run folder kept (the worst-mistake images), with labels."""
    y_true = right[0].y_true
    ok = np.all([r.y_pred == y_true for r in right], axis=0)
    bad = np.all([r.y_pred != y_true for r in wrong], axis=0)
    index = np.flatnonzero(ok & bad)
    pixels: dict[int, np.ndarray] = {}
    for run in (*wrong, *right):
        if run.worst_index is None or run.worst_images is None:
            continue
        for i, image in zip(run.worst_index.tolist(), run.worst_images, strict=False):
            pixels.setdefault(int(i), image)
    shown = [int(i) for i in index if int(i) in pixels][:limit]
    return {"count": int(len(index)), "index": shown, "images": [pixels[i] for i in shown],
            "true": [int(y_true[i]) for i in shown], "pred_right": [int(right[0].y_pred[i]) for i in shown],
            "pred_wrong": [int(wrong[0].y_pred[i]) for i in shown]}
