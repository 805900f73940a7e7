"""Do classlab's verdicts hold the error rate they state? Synthetic studies with a known truth, judged by
`evidence.compare_study` (the function behind the terminal table, the report and comparison.json).

    python benchmarks/evidence_calibration.py                 # 2,000 repeats per design (a few minutes, 1 core)
    python benchmarks/evidence_calibration.py --repeats 500   # quicker, wider intervals

Each run is a trained model simulated on one shared test set: every test image has its own chance of being
classified right (image difficulty, shared by every run), each seed shifts the run's accuracy by a seed effect
(normal, or Student t with 3 df scaled to the same sd: heavy tails), and whether a run gets an image right is
drawn per image (the model × image noise one run's test score holds). Wrong answers are a random wrong
class (10 classes). Identical settings have the same base accuracy; their verdicts other than
"no detectable difference" are false positives. Printed: for each design the rate of false `settings`
verdicts at α = 0.05 with its 95% binomial (Clopper-Pearson) interval and P(p < 0.01); the family-wise rate
over 5 comparisons (6 variants, Holm); the one-seed design (a `models` question now, no settings verdict);
one seed against k; power for true differences of 0.5 / 1 / 2 points beside Welch's t on per-seed
accuracies (scipy); cross-validation folds (the corrected resampled t test); selection then comparison,
with the selection seeds as the test reference (before) and with fresh confirmation seeds (now); and how
often a one-seed cell is selected among 12 equal cells. Nothing is asserted here: tests/test_evidence.py
runs a small version with bounds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from scipy import stats

from classlab import evidence

K = 10  # classes
BASE = 0.85  # expected accuracy of identical settings
AGREE = 0.8  # share of a run's per-image draws it has in common with every other run on the test set


@dataclass(frozen=True)
class Design:
    seeds_a: int
    seeds_b: int
    seed_sd: float = 0.005  # seed-to-seed sd of a run's accuracy (fraction: 0.005 = 0.5 points)
    sd_ratio: float = 1.0  # variant b's seed sd over a's
    n_images: int = 2000
    tails: str = "normal"  # or "t3": Student t with 3 df, scaled to the same sd

    def label(self) -> str:
        spread = "equal" if self.sd_ratio == 1 else f"b {self.sd_ratio:g}× a"
        return (f"{self.seeds_a} vs {self.seeds_b} seeds, sd {self.seed_sd * 100:.1f} pt ({spread}), "
                f"{self.n_images:,} images, {self.tails}")


def seed_effects(rng: np.random.Generator, size: int, sd: float, tails: str) -> np.ndarray:
    if tails == "t3":
        return rng.standard_t(3, size=size) * sd / np.sqrt(3.0)  # var of t3 is 3
    return rng.normal(0.0, sd, size=size)


def test_set(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, each image's chance of being right (mean BASE, images differ in difficulty) and the image's own
    uniform draw, which runs share (AGREE)."""
    y_true = rng.integers(0, K, size=n)
    chance = 1 / (1 + np.exp(-(np.log(BASE / (1 - BASE)) * 1.3 + 1.5 * rng.normal(size=n))))
    return y_true, chance - chance.mean() + BASE, rng.random(n)


def runs_of(rng: np.random.Generator, name: str, images: tuple[np.ndarray, np.ndarray, np.ndarray],
            shifts: np.ndarray, fresh: int = 0) -> list[evidence.RunPredictions]:
    """One run per seed effect: right where a uniform draw falls under the image's chance, then shifted by the
    seed. The draw is the test set's own (`shared`, one per image) with probability AGREE, else the run's:
    models of one setting agree on most images (two seeds of a Fashion-MNIST MLP on ~95%), not only on their
    accuracy."""
    y_true, chance, shared = images
    draws = rng.random((len(shifts), len(y_true)))
    draws = np.where(rng.random(draws.shape) < AGREE, shared[None, :], draws)
    correct = draws < chance[None, :]
    # the seed's shift: wrong answers turned right with chance δ / (1 − BASE), or right ones wrong with |δ| / BASE,
    # so every run's expected accuracy is BASE + δ exactly (adding δ to each image's chance and clipping at 1
    # would make a wide spread of seeds lower the mean: identical settings would differ)
    up = shifts[:, None] > 0
    flip = rng.random(draws.shape) < np.where(up, shifts[:, None] / (1 - BASE), -shifts[:, None] / BASE)
    correct = np.where(up, correct | flip, correct & ~flip)
    wrong = (y_true[None, :] + rng.integers(1, K, size=correct.shape)) % K
    pred = np.where(correct, y_true[None, :], wrong)
    return [evidence.RunPredictions(f"{name}-seed{fresh + s}", name, y_true, pred[s], K) for s in range(len(shifts))]


def pair(design: Design, rng: np.random.Generator, diff: float = 0.0) -> list[evidence.RunPredictions]:
    images = test_set(rng, design.n_images)
    a = seed_effects(rng, design.seeds_a, design.seed_sd, design.tails) + diff
    b = seed_effects(rng, design.seeds_b, design.seed_sd * design.sd_ratio, design.tails)
    return runs_of(rng, "a", images, a) + runs_of(rng, "b", images, b)


def accuracy_row(rows: list[dict]) -> dict:
    return next(r for r in rows if r["metric"] == "accuracy")


def false_positive_rate(design: Design, repeats: int, rng: np.random.Generator) -> tuple[float, float]:
    """(rate of settings verdicts other than 'no detectable difference', P(p < 0.01)) on identical settings."""
    found = strict = 0
    for _ in range(repeats):
        row = accuracy_row(evidence.compare_study(pair(design, rng), reference="b", power_notes=False))
        found += row["verdict"] != evidence.NO_DIFFERENCE
        strict += row["p_value"] < 0.01
    return found / repeats, strict / repeats


def family_rate(design: Design, repeats: int, rng: np.random.Generator, variants: int = 6) -> float:
    """Any false verdict among the 5 comparisons of 6 identical variants (Holm over the family)."""
    hits = 0
    for _ in range(repeats):
        images = test_set(rng, design.n_images)
        runs = [r for v in range(variants)
                for r in runs_of(rng, f"v{v}", images,
                                 seed_effects(rng, design.seeds_a, design.seed_sd, design.tails))]
        rows = evidence.compare_study(runs, reference="v0", power_notes=False)
        hits += any(r["verdict"] != evidence.NO_DIFFERENCE for r in rows if r["metric"] == "accuracy")
    return hits / repeats


def one_seed_rates(design: Design, repeats: int, rng: np.random.Generator) -> dict[str, float]:
    """One seed each: how often a settings verdict is given (never, now) and how often the `models` question
    tells the two seeds' models apart (McNemar; what 'better' used to claim about the settings)."""
    settings = models = 0
    for _ in range(repeats):
        row = accuracy_row(evidence.compare_study(pair(design, rng), reference="b", n_boot=100, power_notes=False))
        settings += row["question"] == evidence.SETTINGS and row["verdict"] != evidence.NO_DIFFERENCE
        models += row["verdict"] in (evidence.MODEL_BETTER, evidence.MODEL_WORSE)
    return {"settings": settings / repeats, "models": models / repeats}


def power(design: Design, diff: float, repeats: int, rng: np.random.Generator) -> float:
    return power_and_welch(design, diff, repeats, rng)[0]


def power_and_welch(design: Design, diff: float, repeats: int, rng: np.random.Generator) -> tuple[float, float]:
    """(classlab's detection rate of a true difference, scipy Welch's on the per-seed accuracies, same data)."""
    found = welch = 0
    for _ in range(repeats):
        runs = pair(design, rng, diff)
        row = accuracy_row(evidence.compare_study(runs, reference="b", power_notes=False))
        found += row["verdict"] == evidence.BETTER
        acc = {v: [float(np.mean(r.y_pred == r.y_true)) for r in runs if r.variant == v] for v in "ab"}
        result = stats.ttest_ind(acc["a"], acc["b"], equal_var=False)
        welch += result.pvalue < 0.05 and result.statistic > 0
    return found / repeats, welch / repeats


def fold_false_positive_rate(folds: int, repeats_cv: int, repeats: int, rng: np.random.Generator,
                             n_images: int = 1000, seed_sd: float = 0.01) -> float:
    """Identical settings cross-validated on the same folds (k folds × r repeats of n images, one run per
    fold and variant, each its own seed): the corrected resampled t test's false-positive rate."""
    hits = 0
    for _ in range(repeats):
        y_all, chance_all, shared_all = test_set(rng, n_images)
        runs = []
        for r in range(1, repeats_cv + 1):
            parts = np.array_split(rng.permutation(n_images), folds)
            for f, held in enumerate(parts, start=1):
                for v in ("a", "b"):
                    (run,) = runs_of(rng, v, (y_all[held], chance_all[held], shared_all[held]),
                                     seed_effects(rng, 1, seed_sd, "normal"))
                    runs.append(evidence.RunPredictions(f"{v}-r{r}-fold{f}", v, run.y_true, run.y_pred, K,
                                                        fold=(r, f), train_size=n_images - len(held)))
        row = accuracy_row(evidence.compare_study(runs, reference="b", power_notes=False))
        hits += row["verdict"] != evidence.NO_DIFFERENCE
    return hits / repeats


def select_then_compare(design: Design, repeats: int, rng: np.random.Generator, cells: int = 6,
                        n_val: int = 1000) -> tuple[float, float]:
    """6 equal grid cells: select one on validation (a run's seed effect is the same on its validation and test
    images: one trained model), then compare every cell with it on test. (any false verdict with the selection
    seeds as the reference, the same with fresh confirmation seeds as the reference)."""
    reused = confirmed = 0
    for _ in range(repeats):
        images, val = test_set(rng, design.n_images), test_set(rng, n_val)
        runs, scores = [], {}
        for c in range(cells):
            shifts = seed_effects(rng, design.seeds_a, design.seed_sd, design.tails)
            runs += runs_of(rng, f"c{c}", images, shifts)
            scores[f"c{c}"] = [float(np.mean(r.y_pred == r.y_true)) for r in runs_of(rng, f"c{c}", val, shifts)]
        best = evidence.select_variant(scores)
        rows = evidence.compare_study(runs, reference=best, power_notes=False)
        reused += any(r["verdict"] != evidence.NO_DIFFERENCE for r in rows if r["metric"] == "accuracy")
        fresh = runs_of(rng, f"confirm-{best}", images,
                        seed_effects(rng, design.seeds_a, design.seed_sd, design.tails), fresh=100)
        # reference_variant picks confirm-<best>, the fresh seeds
        rows = evidence.compare_study(runs + fresh, reference=best, power_notes=False)
        confirmed += any(r["verdict"] != evidence.NO_DIFFERENCE for r in rows if r["metric"] == "accuracy")
    return reused / repeats, confirmed / repeats


def one_seed_cell_picked(repeats: int, rng: np.random.Generator, rule: str) -> float:
    """12 equal cells, 3 seeds each but one with a single seed: how often is that one selected?"""
    picked = 0
    for _ in range(repeats):
        scores = {f"c{i}": list(rng.normal(BASE, 0.005, size=1 if i == 0 else 3)) for i in range(12)}
        picked += evidence.select_variant(scores, rule) == "c0"
    return picked / repeats


def interval(k: float, n: int) -> str:
    """The rate with its 95% Clopper-Pearson interval, in percent."""
    hits = round(k * n)
    low = stats.beta.ppf(0.025, hits, n - hits + 1) if hits > 0 else 0.0
    high = stats.beta.ppf(0.975, hits + 1, n - hits) if hits < n else 1.0
    return f"{k * 100:5.1f}% [{low * 100:.1f}, {high * 100:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--part", choices=("all", "settings", "rest"), default="all",
                        help="the settings designs alone, or the rest (to run the two in parallel)")
    args = parser.parse_args()
    n, rng, started = args.repeats, np.random.default_rng(args.seed), time.perf_counter()

    if args.part != "rest":
        settings_designs(n, rng)
    if args.part != "settings":
        the_rest(n, rng)
    print(f"\n{time.perf_counter() - started:.0f} s")


def settings_designs(n: int, rng: np.random.Generator) -> None:
    print(f"## settings verdicts on identical settings (α = 0.05), {n} repeats each: rate [95% CI], P(p < 0.01)")
    designs = [Design(m, m, 0.005, ratio, images) for m in (2, 3, 5) for ratio in (1.0, 5.0)
               for images in (210, 2000, 10_000)]
    designs += [Design(m, m, 0.005, 1.0, 2000, "t3") for m in (2, 3, 5)]
    designs += [Design(m, m, 0.01, 5.0, 2000, "t3") for m in (2, 3)]
    for d in designs:
        rate, strict = false_positive_rate(d, n, rng)
        print(f"| {d.label()} | {interval(rate, n)} | {interval(strict, n)} |")


def the_rest(n: int, rng: np.random.Generator) -> None:
    print("\n## one seed against k (prediction-interval t test), equal spreads")
    for sd in (0.005, 0.01):
        for k in (2, 3):
            rate, strict = false_positive_rate(Design(1, k, sd), n, rng)
            print(f"| 1 vs {k} seeds, sd {sd * 100:.1f} pt | {interval(rate, n)} | {interval(strict, n)} |")
    print("\n## family-wise: any false verdict among 5 comparisons (6 identical variants, Holm)")
    for m in (2, 3, 5):
        print(f"| {m} seeds, sd 0.5 pt, 2,000 images | {interval(family_rate(Design(m, m), n, rng), n)} |")
    print("\n## one seed per variant: settings verdicts given / the two models told apart (models question)")
    for sd in (0.002, 0.005, 0.01):
        rates = one_seed_rates(Design(1, 1, sd), n, rng)
        print(f"| sd {sd * 100:.1f} pt | {interval(rates['settings'], n)} | {interval(rates['models'], n)} |")
    print("\n## power: 3 seeds a variant, seed sd 0.5 pt, 2,000 images (classlab / Welch on per-seed accuracies)")
    for diff in (0.005, 0.01, 0.02):
        ours, welch = power_and_welch(Design(3, 3), diff, n, rng)
        print(f"| true difference {diff * 100:.1f} pt | {interval(ours, n)} | {interval(welch, n)} |")
    for m in (2, 5):
        ours, welch = power_and_welch(Design(m, m), 0.02, n, rng)
        print(f"| {m} seeds, true difference 2.0 pt | {interval(ours, n)} | {interval(welch, n)} |")
    print("\n## cross-validation folds, identical settings (corrected resampled t test), 1,000 images")
    for folds, reps in ((5, 1), (5, 2), (10, 1)):
        print(f"| {folds} folds × {reps} repeat(s) | {interval(fold_false_positive_rate(folds, reps, n, rng), n)} |")
    print("\n## select a cell on validation, then compare on test (6 equal cells, sd 0.5 pt): "
          "selection seeds as reference / fresh confirmation seeds")
    for m in (2, 3):
        reused, confirmed = select_then_compare(Design(m, m), n, rng)
        print(f"| {m} seeds | {interval(reused, n)} | {interval(confirmed, n)} |")
    print("\n## a one-seed cell among 12 equal cells (3 seeds each otherwise): how often selected (fair: 8.3%)")
    for rule in ("mean", "lower_bound"):
        print(f"| {rule} | {interval(one_seed_cell_picked(n, rng, rule), n)} |")


if __name__ == "__main__":
    main()
