"""Is the difference real? The study's statistics in one module: the comparison table (mean ± sd over seeds),
the tests behind every verdict, Holm, an honest power note, selection without the winner's curse, and the
per-class diff of two variants.

Pure functions on plain arrays (labels and predictions as read from run folders), so the report, the
terminal table and a script all reach the same conclusion from the same files. Every random draw comes
from a seeded generator: the same run folders give the same intervals and p-values.

Every verdict answers a named question (docs/decisions.md, "Verdicts you can bet on"):
- `settings`: would the difference hold on other seeds? Needs seeds on both sides. ≥ 2 seeds each: Welch's
  t test on the per-seed metrics (each run's accuracy / macro F1 on the shared test set), which holds α for
  2-5 seeds, unequal seed spreads, any test-set size and heavy-tailed seed effects
  (benchmarks/evidence_calibration.py). One seed against k ≥ 2: a prediction-interval t test (is the one run
  where the other variant's next seed would land?) on the k seeds, df = k − 1. Cross-validation folds: the
  corrected resampled t test of Nadeau & Bengio, paired by (repeat, fold).
- `models`: do these two trained models differ on this test set? One seed per variant can only answer this:
  McNemar's exact test for accuracy, a paired bootstrap over test images for macro F1 and the intervals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from classlab import metrics
from classlab.results import summary_from

ALPHA = 0.05
POWER = 0.8
N_BOOT = 1000
METRICS = metrics.EVIDENCE  # the registry's metrics a comparison tests (confusion_stats computes them)
SETTINGS, MODELS = "settings", "models"  # the question a verdict answers
QUESTIONS = {SETTINGS: "would the difference hold on other seeds?",
             MODELS: "do these two trained models differ on this test set?"}
MCNEMAR = "McNemar exact test (binomial on discordant pairs)"
PAIRED = "paired bootstrap over test images"
WELCH = "Welch t test on per-seed metrics"
PREDICTION = "prediction-interval t test (one run against the other variant's seeds)"
FOLDS = "corrected resampled t test over folds (Nadeau & Bengio)"
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
MODEL_BETTER, MODEL_WORSE = "better model (1 seed)", "worse model (1 seed)"  # a `models` verdict's own words
DETECTED = (BETTER, WORSE, MODEL_BETTER, MODEL_WORSE)
CORRECTION = "Holm over the comparisons of each metric"
SETTINGS_FILE = "evidence.json"  # beside the run folders: the selected variant, select.by, evidence.min_effect
MAX_SEEDS_NEEDED = 200  # beyond this, "seeds needed" is reported as more than this
WELCH_DRAWS = 10_000  # simulated designs behind Welch's power
_CHUNK = 2_000_000  # resampled image indices held at once (16 MB)

# ----------------------------------------------------------------------------- the comparison table

SEED_SUFFIX = re.compile(r"(?:-seed\d+)?(?:-r\d+-fold\d+|-fold\d+)?$")  # seeds and data.cv folds of one variant

# Fewest seeds for an interval over seeds: with 2, Student's t is 12.7 and the 95% interval of the mean spans
# nearly any accuracy ([0, 100] once clipped), so it is not shown and seed noise counts as not estimated.
MIN_SEEDS_FOR_INTERVAL = 3


def variant_of(run_name: str) -> str:
    return SEED_SUFFIX.sub("", run_name)


def t_quantile(q: float, df: float) -> float:
    """Student's t quantile (the normal's for infinite df)."""
    return float(special.ndtri(q)) if not math.isfinite(df) else float(special.stdtrit(df, q))


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
        return t_quantile(0.975, self.n - 1) * self.std / math.sqrt(self.n)

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def stat(values: list[float]) -> Stat:
    arr = np.asarray(values, dtype=float)
    return Stat(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr))


@dataclass(frozen=True)
class VariantRow:
    """One variant's line of the comparison table: the registry's table metrics (metrics.TABLE) on the test
    split as mean ± sd over its runs, read as attributes (row.accuracy) by the terminal and the report."""

    variant: str
    runs: list[str]
    values: dict[str, Stat]
    parameters: int
    epochs: Stat
    seconds: Stat
    val_accuracy: Stat | None

    def __getattr__(self, name: str) -> Stat:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)


def compare_runs(summaries: list[dict]) -> list[VariantRow]:
    groups: dict[str, list] = {}
    for s in summaries:
        s = summary_from(s)
        groups.setdefault(variant_of(s.name), []).append(s)
    rows = []
    for variant, runs in groups.items():
        vals = [r["best_val"]["accuracy"] for r in runs if r.get("best_val")]
        rows.append(VariantRow(
            variant=variant,
            runs=[r.name for r in runs],
            values={name: stat([r.test_value(name) for r in runs]) for name in metrics.TABLE},
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
    the comparison table, from compare_study's rows; ('reference', 'reference') for the reference."""
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


# ----------------------------------------------------------------------------- predictions


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


# ----------------------------------------------------------------------------- confusion matrices and image resamples


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


# ----------------------------------------------------------------------------- the tests of one pair


@dataclass(frozen=True)
class Test:
    """One statistic's difference a − b with its 95% interval, p, the test's name and degrees of freedom."""

    diff: float
    low: float
    high: float
    p: float
    se: float
    df: float
    name: str


def _t_result(diff: float, se: float, df: float, name: str, alpha: float = ALPHA) -> Test:
    """diff ± t·se and the two-sided t p-value; se = 0 says 'exactly' (p 1 for a zero difference, else 0)."""
    if not se > 0:
        return Test(diff, diff, diff, 1.0 if diff == 0 else 0.0, 0.0, df, name)
    half = t_quantile(1 - alpha / 2, df) * se
    t = abs(diff) / se
    p = 2 * float(special.stdtr(df, -t) if math.isfinite(df) else special.ndtr(-t))
    return Test(diff, diff - half, diff + half, min(p, 1.0), se, df, name)


def welch_df(var_a: float, m: int, var_b: float, k: int) -> float:
    """Welch-Satterthwaite degrees of freedom of var_a/m + var_b/k (m, k ≥ 2)."""
    va, vb = var_a / m, var_b / k
    denominator = va**2 / (m - 1) + vb**2 / (k - 1)
    return float((va + vb) ** 2 / denominator) if denominator > 0 else float(m + k - 2)


def welch(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA, floor: float = 0.0) -> Test:
    """Welch's t test of mean(a) − mean(b) over per-seed metrics (≥ 2 seeds each): the settings question.
    Each run's metric already holds its own test-set noise, so seeds are the only unit resampled. `floor`: the
    smallest per-seed variance the metric can show (rounding_variance: seeds tied on a grid of 1/n)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = max(float(a.var(ddof=1)), floor), max(float(b.var(ddof=1)), floor)
    se = math.sqrt(va / len(a) + vb / len(b))
    return _t_result(float(a.mean() - b.mean()), se, welch_df(va, len(a), vb, len(b)), WELCH, alpha)


def prediction_t(one: float, others: Sequence[float], alpha: float = ALPHA, floor: float = 0.0) -> Test:
    """One run against k ≥ 2 seeds of the other variant: would the other's next seed land this far away?
    t = (x − ȳ) / (s·√(1 + 1/k)), df = k − 1. Valid when the one-seed variant varies across seeds no more than
    the other (its spread cannot be measured from one seed)."""
    y = np.asarray(others, float)
    se = math.sqrt(max(float(y.var(ddof=1)), floor) * (1 + 1 / len(y)))
    return _t_result(float(one - y.mean()), se, len(y) - 1, PREDICTION, alpha)


def rounding_variance(n_images: int) -> float:
    """The variance of rounding a score to a grid of 1/n (Sheppard): a score on n test images moves in steps
    of 1/n, so two seeds can tie and show a spread of 0 that a continuous metric would not; without this
    floor a tie made p = 0 (one run against 2 tied seeds: P(p < 0.01) was 1.7%)."""
    return 1 / (12 * n_images**2) if n_images > 0 else 0.0


def settings_test(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA, floor: float = 0.0) -> Test:
    """The settings question from per-seed values: Welch with ≥ 2 seeds each, the prediction t with 1 against k."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) >= 2 and len(b) >= 2:
        return welch(a, b, alpha, floor)
    if len(a) == 1 and len(b) >= 2:
        return prediction_t(float(a[0]), b, alpha, floor)
    if len(b) == 1 and len(a) >= 2:
        t = prediction_t(float(b[0]), a, alpha, floor)
        return Test(-t.diff, -t.high, -t.low, t.p, t.se, t.df, t.name)
    raise ValueError("the settings question needs ≥ 2 seeds on at least one side")


def corrected_resampled_t(diffs: Sequence[float], test_train_ratio: float, alpha: float = ALPHA) -> Test:
    """Nadeau & Bengio's corrected resampled t test of paired per-fold differences (with repeats: the
    corrected repeated k-fold t test of Bouckaert & Frank): var = (1/J + n_test/n_train)·s², df = J − 1.
    Folds share training data, so their differences are correlated and the plain 1/J would be too liberal."""
    d = np.asarray(diffs, float)
    if len(d) < 2:
        raise ValueError("the corrected resampled t test needs at least 2 folds")
    se = math.sqrt((1 / len(d) + test_train_ratio) * float(d.var(ddof=1)))
    return _t_result(float(d.mean()), se, len(d) - 1, FOLDS, alpha)


def fold_test(scores_a: Mapping[tuple[int, int], float], scores_b: Mapping[tuple[int, int], float],
              n_train: Mapping[tuple[int, int], int] | None, n_test: Mapping[tuple[int, int], int],
              alpha: float = ALPHA) -> Test:
    """The fold-paired settings test from per-fold scores keyed by (repeat, fold) (averaged over seeds by the
    caller), each fold's training and held-out sizes. Without training sizes, k folds give n_test/n_train
    = 1/(k − 1)."""
    keys = sorted(set(scores_a) & set(scores_b))
    if n_train and all(n_train.get(key) for key in keys):
        ratio = float(np.mean([n_test[key] / n_train[key] for key in keys]))
    else:
        folds = len({f for _, f in keys})
        ratio = 1 / max(folds - 1, 1)
    return corrected_resampled_t([scores_a[key] - scores_b[key] for key in keys], ratio, alpha)


# ----------------------------------------------------------------------------- one-seed `models` questions


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: under 'equally accurate', each discordant image is a fair coin."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(only_a, only_b), n, 0.5)))


def bootstrap_test(point: float, draws: np.ndarray, alpha: float = ALPHA) -> Test:
    """A paired image bootstrap's percentile interval and p from the null-shifted draws."""
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    p = (1 + np.sum(np.abs(draws - point) >= abs(point) - 1e-12)) / (len(draws) + 1)
    return Test(point, float(low), float(high), float(min(p, 1.0)), float(draws.std(ddof=1)), math.inf, PAIRED)


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
            higher_is_better: bool = True, question: str = SETTINGS) -> str:
    """'better' / 'worse' (a against b) only when the adjusted p is below α and the interval excludes 0; a
    `models` question says so in its own words ('better model (1 seed)')."""
    low, high = ci
    if p_adjusted is None or p_adjusted >= alpha or low <= 0 <= high:
        return NO_DIFFERENCE
    better = (diff > 0) == higher_is_better
    if question == MODELS:
        return MODEL_BETTER if better else MODEL_WORSE
    return BETTER if better else WORSE


# ----------------------------------------------------------------------------- honest power


def t_power(effect: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided t test at α to detect a true difference `effect` with standard error `se`
    (noncentral t; the normal for infinite df)."""
    if not se > 0:
        return 1.0 if effect != 0 else alpha
    delta = abs(effect) / se
    if not math.isfinite(df) or df > 1e6:
        z = float(stats.norm.ppf(1 - alpha / 2))
        return float(stats.norm.sf(z - delta) + stats.norm.cdf(-z - delta))
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    value = float(stats.nct.sf(crit, df, delta) + stats.nct.cdf(-crit, df, delta))
    return value if math.isfinite(value) else float(delta > crit)  # far in the tail: nct's series gives up


def welch_power(effect: float, var_a: float, m: int, var_b: float, k: int, alpha: float = ALPHA,
                draws: int = WELCH_DRAWS) -> float:
    """Power of Welch's test with m and k seeds of per-seed variances var_a, var_b. Welch's degrees of freedom
    are estimated from the same few seeds, which costs power the noncentral t with the true df does not show
    (3 + 3 seeds: 36% where it says 46%), so it is computed from `draws` simulated designs (a fixed seed:
    the same answer every time)."""
    if var_a + var_b <= 0:
        return 1.0 if effect != 0 else alpha
    rng = np.random.default_rng(0)
    z = rng.standard_normal(draws)
    va = var_a / m * rng.chisquare(m - 1, draws) / (m - 1)
    vb = var_b / k * rng.chisquare(k - 1, draws) / (k - 1)
    total = va + vb
    df = total**2 / np.maximum(va**2 / (m - 1) + vb**2 / (k - 1), 1e-300)
    t = (abs(effect) + z * math.sqrt(var_a / m + var_b / k)) / np.sqrt(np.maximum(total, 1e-300))
    return float(np.mean(2 * stats.t.sf(np.abs(t), df) < alpha))


def detectable(se: float, df: float, alpha: float = ALPHA, power: float = POWER,
               seed_vars: tuple[float, float] | None = None, n_seeds: tuple[int, int] | None = None) -> float:
    """The smallest true difference the design detects with `power` at α: t quantiles (noncentral t), or for
    Welch (`seed_vars` and `n_seeds` given) its simulated power; from the design's standard error, never from
    the observed difference (no post-hoc power)."""
    if not se > 0:
        return 0.0
    if seed_vars is not None and n_seeds is not None:
        (va, vb), (m, k) = seed_vars, n_seeds

        def gap(e: float) -> float:
            return welch_power(e, va, m, vb, k, alpha) - power
    else:

        def gap(e: float) -> float:
            return t_power(e, se, df, alpha) - power
    high = (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * se * 2
    while gap(high) < 0 and high < 1e3 * se:
        high *= 2
    return float(optimize.brentq(gap, 0.0, high, xtol=se * 1e-3))


def seeds_needed(var_a: float, var_b: float, effect: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Seeds per variant for Welch's test to detect `effect` with `power` given the per-seed variances (None:
    more than MAX_SEEDS_NEEDED)."""
    for n in range(2, MAX_SEEDS_NEEDED + 1):
        if welch_power(effect, var_a, n, var_b, n, alpha) >= power:
            return n
    return None


def power_note(question: str, test: str, se: float, df: float, n_seeds: tuple[int, int], n_images: int,
               seed_vars: tuple[float, float] | None = None, min_effect: float | None = None,
               alpha: float = ALPHA, power: float = POWER) -> dict:
    """What the current design can detect: the smallest difference found with `power` at α (per comparison,
    before Holm), and, for a difference the user names (`evidence.min_effect`), the seeds per variant (settings)
    or test images (models) that would detect it. Built from the design's standard error, never from the
    observed difference."""
    welch_design = test == WELCH and seed_vars is not None
    smallest = detectable(se, df, alpha, power, seed_vars if welch_design else None,
                          n_seeds if welch_design else None)
    out: dict = {"detectable": smallest, "seeds_needed": None, "test_images_needed": None}
    text = (f"the smallest difference this design detects with power {power:g} at α = {alpha:g} is "
            f"{smallest * 100:.2f} points")
    if question == MODELS:
        text += f" (these two models, {n_images:,} test images)"
        if min_effect and se > 0:
            z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
            out["test_images_needed"] = math.ceil(n_images * (z * se / min_effect) ** 2)
            text += (f"; {min_effect * 100:.2f} points (evidence.min_effect) needs about "
                     f"{out['test_images_needed']:,} test images")
        text += "; one seed per variant says nothing about the settings: run ≥ 2 seeds to compare those"
    elif test == PREDICTION:
        text += f" ({n_seeds[0]} against {n_seeds[1]} seeds); run ≥ 2 seeds of both variants for a sharper test"
    elif test == FOLDS:
        text += f" ({n_seeds[0]} folds)"
    else:
        text += f" ({n_seeds[0]} and {n_seeds[1]} seeds)"
        if min_effect and seed_vars is not None:
            out["seeds_needed"] = seeds_needed(seed_vars[0], seed_vars[1], min_effect, alpha, power)
            need = (f"about {out['seeds_needed']} seeds per variant" if out["seeds_needed"] is not None
                    else f"more than {MAX_SEEDS_NEEDED} seeds per variant")
            text += f"; {min_effect * 100:.2f} points (evidence.min_effect) needs {need}"
    out["text"] = text
    return out


# ----------------------------------------------------------------------------- a study's comparisons


def reference_variant(variants: Sequence[str], selected: str | None = None) -> str:
    """What every variant is compared against: the selected cell when known (given; its `confirm-` runs, fresh
    seeds, when they exist), else the cell a `confirm-` or `retrain-` variant confirmed or retrained, else the
    first variant."""
    if selected is not None and f"confirm-{selected}" in variants:
        return f"confirm-{selected}"
    if selected is not None and selected in variants:
        return selected
    for prefix in ("confirm-", "retrain-"):
        for v in variants:
            if v.startswith(prefix) and v.removeprefix(prefix) in variants:
                return v if prefix == "confirm-" else v.removeprefix(prefix)
    return variants[0]


def _group(runs: Sequence[RunPredictions]) -> dict[str, list[RunPredictions]]:
    groups: dict[str, list[RunPredictions]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    return groups


def _same_test_set(runs: Sequence[RunPredictions]) -> bool:
    first = runs[0].y_true
    return all(r.y_true.shape == first.shape and np.array_equal(r.y_true, first) for r in runs[1:])


def run_stats(run: RunPredictions, k: int) -> np.ndarray:
    """[accuracy, macro F1, per-class recall…, per-class F1…] of one run on its whole test set."""
    return confusion_stats(confusions(run.y_true, run.y_pred, k))


def runs_stats(runs: Sequence[RunPredictions], k: int) -> np.ndarray:
    """run_stats of runs on one test set (runs × S), by one bincount."""
    codes = np.stack([r.y_true * k + r.y_pred for r in runs]) + (np.arange(len(runs)) * k * k)[:, None]
    cm = np.bincount(codes.ravel(), minlength=len(runs) * k * k).reshape(len(runs), k, k)
    return confusion_stats(cm)


def _row(a: str, b: str, metric: str, question: str, test: Test, n_a: int, n_b: int, n_test: int,
         power: tuple | None) -> dict:
    return {"a": a, "b": b, "metric": metric, "question": question, "diff": test.diff, "ci_low": test.low,
            "ci_high": test.high, "p_value": test.p, "p_adjusted": None, "test": test.name, "verdict": None,
            "n_seeds_a": n_a, "n_seeds_b": n_b, "n_test": n_test, "_power": power}


def _not_compared(a: str, b: str, n_a: int, n_b: int, reason: str) -> list[dict]:
    return [{"a": a, "b": b, "metric": metric, "question": None, "diff": None, "ci_low": None, "ci_high": None,
             "p_value": None, "p_adjusted": None, "test": None, "verdict": "not compared", "n_seeds_a": n_a,
             "n_seeds_b": n_b, "reason": reason} for metric in METRICS]


def _seed_rows(a: str, b: str, runs_a: list[RunPredictions], runs_b: list[RunPredictions], k: int,
               alpha: float) -> list[dict]:
    """The settings question on one shared test set: Welch (≥ 2 seeds each) or the prediction t (1 against k)."""
    both = runs_stats([*runs_a, *runs_b], k)
    m, n = len(runs_a), len(runs_b)
    sa, sb = both[:m], both[m:]
    rows = []
    for s, metric in enumerate(METRICS):
        floor = rounding_variance(len(runs_a[0].y_true))
        test = settings_test(sa[:, s], sb[:, s], alpha, floor)
        var = (max(float(sa[:, s].var(ddof=1)), floor), max(float(sb[:, s].var(ddof=1)), floor)) \
            if m >= 2 and n >= 2 else None
        rows.append(_row(a, b, metric, SETTINGS, test, m, n, len(runs_a[0].y_true), (test.se, test.df, var)))
    return rows


def _model_rows(a: str, b: str, run_a: RunPredictions, run_b: RunPredictions, k: int, n_boot: int, seed: int,
                alpha: float) -> list[dict]:
    """The models question (one seed each): McNemar for accuracy, the paired image bootstrap for macro F1 and
    both intervals."""
    point, draws = replicate_stats(run_a.y_true, [run_a.y_pred, run_b.y_pred], k, n_boot, seed)
    rows = []
    for s, metric in enumerate(METRICS):
        test = bootstrap_test(float(point[0, s] - point[1, s]), draws[0, :, s] - draws[1, :, s], alpha)
        if metric == "accuracy":
            correct_a, correct_b = run_a.y_pred == run_a.y_true, run_b.y_pred == run_b.y_true
            d = correct_a.astype(float) - correct_b.astype(float)
            se = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
            test = Test(test.diff, test.low, test.high, mcnemar_exact(correct_a, correct_b), se, math.inf,
                        MCNEMAR + f" · interval: {PAIRED}")
        rows.append(_row(a, b, metric, MODELS, test, 1, 1, len(run_a.y_true), (test.se, math.inf, None)))
    return rows


def _fold_rows(a: str, b: str, runs_a: list[RunPredictions], runs_b: list[RunPredictions], k: int,
               alpha: float) -> list[dict]:
    """The settings question across cross-validation folds, paired by (repeat, fold), seeds averaged."""

    def per_fold(runs: list[RunPredictions]) -> dict:
        by: dict[tuple[int, int], list[RunPredictions]] = {}
        for r in runs:
            by.setdefault(r.fold, []).append(r)
        return by

    fa, fb = per_fold(runs_a), per_fold(runs_b)
    if set(fa) != set(fb):
        return _not_compared(a, b, len(runs_a), len(runs_b), "the two variants were not run on the same folds")
    if any(not _same_test_set(fa[key] + fb[key]) for key in fa):
        return _not_compared(a, b, len(runs_a), len(runs_b), "a fold's held-out images differ between the variants")
    if len(fa) < 2:
        return _not_compared(a, b, len(runs_a), len(runs_b), "fewer than 2 folds")
    sa = {key: np.mean([run_stats(r, k) for r in fa[key]], axis=0) for key in fa}
    sb = {key: np.mean([run_stats(r, k) for r in fb[key]], axis=0) for key in fb}
    n_test = {key: len(fa[key][0].y_true) for key in fa}
    sizes = [r.train_size for key in fa for r in fa[key] + fb[key]]
    n_train = {key: fa[key][0].train_size for key in fa} if all(sizes) else None
    rows = []
    for s, metric in enumerate(METRICS):
        test = fold_test({key: float(v[s]) for key, v in sa.items()}, {key: float(v[s]) for key, v in sb.items()},
                         n_train, n_test, alpha)
        rows.append(_row(a, b, metric, SETTINGS, test, len(fa), len(fb), int(np.mean(list(n_test.values()))),
                         (test.se, test.df, None)))
    return rows


def compare_study(runs: Sequence[RunPredictions | dict], reference: str | None = None, n_boot: int = N_BOOT,
                  seed: int = 0, alpha: float = ALPHA, min_effect: float | None = None,
                  power_notes: bool = True) -> list[dict]:
    """Every variant against the reference variant, for accuracy and macro-F1: the question it answers
    (`settings` or `models`), difference (a − b, a = the variant, b = the reference) with its 95% interval, p,
    Holm-adjusted p, the test's name and the verdict.

    `runs`: RunPredictions, or dicts with `name`, `y_true` and `probs` or `y_pred` (and optionally `variant`,
    `fold`, `train_size`). A pair whose runs do not share one test set is kept as rows with verdict
    'not compared' and a `reason`. `min_effect`: a difference worth detecting (fraction), for the power note
    (`power_notes=False` leaves the notes out: a simulation judging thousands of studies needs only verdicts)."""
    preds = [r if isinstance(r, RunPredictions) else run_predictions(**r) for r in runs]
    groups = _group(preds)
    if len(groups) < 2:
        return []
    ref = reference_variant(list(groups), reference)
    k = max(r.n_classes for r in preds)
    rows: list[dict] = []
    for index, (variant, members) in enumerate(groups.items()):
        if variant == ref:
            continue
        others = groups[ref]
        folded = [r.fold is not None for r in members + others]
        if any(folded):
            if not all(folded):
                rows += _not_compared(variant, ref, len(members), len(others),
                                      "one variant was cross-validated and the other was not")
            else:
                rows += _fold_rows(variant, ref, members, others, k, alpha)
        elif not _same_test_set(members + others):
            rows += _not_compared(variant, ref, len(members), len(others),
                                  "the runs were not evaluated on the same test set (their test labels differ)")
        elif len(members) == 1 and len(others) == 1:
            rows += _model_rows(variant, ref, members[0], others[0], k, n_boot, seed + index, alpha)
        else:
            rows += _seed_rows(variant, ref, members, others, k, alpha)
    return finish_rows(rows, alpha, min_effect, power_notes)


def finish_rows(rows: list[dict], alpha: float = ALPHA, min_effect: float | None = None,
                power_notes: bool = True) -> list[dict]:
    """Holm within each metric, then the verdict; the power note where nothing was detected, and the reason
    when a 95% interval excludes 0 beside 'no detectable difference'."""
    for metric in METRICS:
        family = [r for r in rows if r["metric"] == metric]
        for row, adjusted in zip(family, holm([r["p_value"] for r in family]), strict=True):
            row["p_adjusted"] = adjusted
    for metric in METRICS:
        family = [r for r in rows if r["metric"] == metric and r["p_value"] is not None]
        for row in family:
            power = row.pop("_power", None)
            row["verdict"] = verdict(row["diff"], (row["ci_low"], row["ci_high"]), row["p_adjusted"], alpha,
                                     question=row["question"])
            row["power"] = None
            if row["verdict"] == NO_DIFFERENCE and (row["ci_low"] > 0 or row["ci_high"] < 0):
                row["note"] = (f"its 95% interval excludes 0 (p = {row['p_value']:.3g} for this comparison alone), "
                               f"but over the {len(family)} comparisons of {metric} Holm's adjusted p is "
                               f"{row['p_adjusted']:.3g} ≥ α = {alpha:g}")
            if row["verdict"] == NO_DIFFERENCE and power is not None and power_notes:
                se, df, seed_vars = power
                note = power_note(row["question"], row["test"], se, df, (row["n_seeds_a"], row["n_seeds_b"]),
                                  row["n_test"], seed_vars, min_effect, alpha)
                row["power"] = note["text"]
                row["detectable"] = note["detectable"]
                row["seeds_needed"], row["test_images_needed"] = note["seeds_needed"], note["test_images_needed"]
    for row in rows:
        row.pop("_power", None)
        row.setdefault("power", None)
    return rows


# ----------------------------------------------------------------------------- selection without the winner's curse


def pooled_spread(scores: Mapping[str, Sequence[float]]) -> tuple[float, int]:
    """The seed variance pooled over cells, Σ(m−1)s² / Σ(m−1), and its degrees of freedom Σ(m−1): with 2-3
    seeds a cell's own spread is too noisy to rank on, the pooled one is not."""
    df = sum(len(v) - 1 for v in scores.values())
    if df == 0:
        return 0.0, 0
    ss = sum(float(np.var(v, ddof=1)) * (len(v) - 1) for v in scores.values() if len(v) > 1)
    return ss / df, df


def rank_variants(scores: Mapping[str, Sequence[float]], rule: str = "mean",
                  higher_is_better: bool = True) -> list[tuple[str, float]]:
    """Cells best first, each with its ranking score (on the 'higher is better' scale).

    `mean`: the mean over seeds; where cells have different seed counts, shrunk towards the mean of all cells
    by how much of its spread is seed noise (empirical Bayes: between-cell variance τ² over τ² + s²/m), so a
    cell with fewer seeds is not ranked above the others on noise. `lower_bound`: the 95% lower bound of the
    mean with the pooled spread, mean − t·s/√m. Ties go to the cell with more seeds."""
    if rule not in ("mean", "lower_bound"):
        raise ValueError(f"select rule '{rule}': choose mean or lower_bound")
    if not scores:
        raise ValueError("select: no variants")
    sign = 1.0 if higher_is_better else -1.0
    names = list(scores)
    means = np.array([sign * float(np.mean(scores[v])) for v in names])
    counts = np.array([len(scores[v]) for v in names])
    var, df = pooled_spread(scores)
    if df == 0:
        ranked = means
    elif rule == "lower_bound":
        ranked = means - t_quantile(0.975, df) * math.sqrt(var) / np.sqrt(counts)
    elif len(set(counts.tolist())) == 1 or len(names) < 3:
        ranked = means if len(set(counts.tolist())) == 1 else means - math.sqrt(var) / np.sqrt(counts)
    else:
        noise = var / counts
        tau2 = max(float(means.var(ddof=1)) - float(noise.mean()), 0.0)
        weight = tau2 / (tau2 + noise) if tau2 > 0 else np.zeros_like(noise)
        grand = float(means.mean())
        ranked = grand + weight * (means - grand)
    order = sorted(range(len(names)), key=lambda i: (-round(float(ranked[i]), 12), -counts[i], -means[i]))
    return [(names[i], float(ranked[i])) for i in order]


def select_variant(scores: Mapping[str, Sequence[float]], rule: str = "mean", higher_is_better: bool = True) -> str:
    """The best cell by `rank_variants` (seed spread pooled over cells)."""
    return rank_variants(scores, rule, higher_is_better)[0][0]


def validation_scores(summaries: Sequence[dict], metric: str) -> dict[str, list[float]]:
    """Each variant's per-seed validation score (at the epoch each run kept) from run summaries, for selection."""
    scores: dict[str, list[float]] = {}
    key = metric.removeprefix("val_")
    for s in summaries:
        val = s.get("kept_val", s.get("best_val"))
        if val is None:
            raise ValueError(f"select: run '{s['name']}' has no validation metrics; set data.val_fraction")
        if key not in val:
            raise ValueError(f"select.by {metric}: run '{s['name']}' has no validation {key} (trained by an older "
                             "classlab); retrain it or select by val_accuracy / val_loss")
        scores.setdefault(variant_of(s["name"]), []).append(float(val[key]))
    return scores


def optimism(selection: Sequence[float], fresh: Sequence[float], higher_is_better: bool = True) -> float:
    """Fresh seeds' mean validation score minus the selection seeds' (negative: selection was optimistic)."""
    gap = float(np.mean(fresh) - np.mean(selection))
    return gap if higher_is_better else -gap


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
    m = len(runs_a)
    one_seed = m == 1 and len(runs_b) == 1
    if one_seed:
        point, draws = replicate_stats(y_true, [r.y_pred for r in both], k, n_boot, seed)
    else:
        point, draws = np.stack([run_stats(r, k) for r in both]), None
    per_class = []
    for c in range(k):
        row = {"class": c}
        for name, s in (("recall", 2 + c), ("f1", 2 + k + c)):
            if draws is not None:
                test = bootstrap_test(float(point[0, s] - point[1, s]), draws[0, :, s] - draws[1, :, s])
            else:
                test = settings_test(point[:m, s], point[m:, s])
            row[name] = {"a": float(point[:m, s].mean()), "b": float(point[m:, s].mean()),
                         "diff": test.diff, "ci_low": test.low, "ci_high": test.high}
        per_class.append(row)
    return {"per_class": per_class, "confusion_diff": mean_confusion(runs_a, k) - mean_confusion(runs_b, k),
            "test": PAIRED if one_seed else settings_test(point[:m, 0], point[m:, 0]).name,
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
