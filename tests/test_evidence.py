"""Is the difference real? The tests against hand-computed and scipy values, the intervals' coverage on
synthetic data with a known difference, the named question of every verdict, the false-positive rate of the
settings tests (a small, deterministic run of benchmarks/evidence_calibration.py), Holm, honest power,
selection without the winner's curse, and comparison.json from the report step of a tiny real study."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from scipy import stats

from classlab import evidence
from classlab.evidence import (
    BETTER,
    FOLDS,
    MODEL_BETTER,
    MODELS,
    NO_DIFFERENCE,
    PREDICTION,
    SETTINGS,
    WELCH,
    WORSE,
    compare_study,
    holm,
    mcnemar_exact,
    run_predictions,
    select_variant,
    verdict,
)
from tests.conftest import make_idx_folder, tiny_study, write_study

KEYS = {"a", "b", "metric", "diff", "ci_low", "ci_high", "p_value", "p_adjusted", "test", "verdict",
        "n_seeds_a", "n_seeds_b", "question"}


def _predictions(y_true: np.ndarray, correct: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Right where `correct`, else a uniformly drawn wrong class."""
    wrong = (y_true + rng.integers(1, k, size=len(y_true))) % k
    return np.where(correct, y_true, wrong)


def _simulated_runs(rng: np.random.Generator, accuracies: dict[str, float], seeds: int, n: int = 400, k: int = 3,
                    seed_sd: float = 0.15) -> list[dict]:
    """Runs on one shared test set: image difficulty shared by all, a per-seed shift in skill, per-image noise."""
    y_true = rng.integers(0, k, size=n)
    difficulty = rng.normal(size=n)
    runs = []
    for variant, accuracy in accuracies.items():
        for s in range(seeds):
            skill = np.log(accuracy / (1 - accuracy)) * 1.6 + rng.normal(scale=seed_sd)
            correct = skill + 1.5 * difficulty + rng.logistic(size=n) > 0
            runs.append({"name": f"{variant}-seed{s}" if seeds > 1 else variant, "y_true": y_true,
                         "y_pred": _predictions(y_true, correct, k, rng)})
    return runs


# ----------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_against_hand_value_and_scipy():
    # 2 images only a gets right, 8 only b: P(X ≤ 2 | n=10, ½) = (1 + 10 + 45) / 1024, two-sided doubles it
    a = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0] + [1] * 30 + [0] * 5, dtype=bool)
    b = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1] + [1] * 30 + [0] * 5, dtype=bool)
    assert mcnemar_exact(a, b) == pytest.approx(112 / 1024)
    assert mcnemar_exact(a, b) == pytest.approx(stats.binomtest(2, 10, 0.5).pvalue)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)
    assert mcnemar_exact(a, a) == 1.0  # no discordant image
    assert mcnemar_exact(np.array([1, 0], bool), np.array([0, 1], bool)) == 1.0  # one each way
    for only_a, only_b in ((0, 9), (3, 17), (25, 40)):
        x = np.r_[np.ones(only_a), np.zeros(only_b)].astype(bool)
        assert mcnemar_exact(x, ~x) == pytest.approx(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def test_single_seed_comparison_uses_mcnemar_for_accuracy():
    rng = np.random.default_rng(0)
    runs = _simulated_runs(rng, {"base": 0.8, "other": 0.8}, seeds=1)
    rows = {r["metric"]: r for r in compare_study(runs, n_boot=500)}
    correct = [r["y_pred"] == r["y_true"] for r in runs]
    assert rows["accuracy"]["p_value"] == pytest.approx(mcnemar_exact(correct[1], correct[0]))
    assert rows["accuracy"]["test"].startswith("McNemar") and rows["macro_f1"]["test"] == evidence.PAIRED
    assert rows["accuracy"]["question"] == rows["macro_f1"]["question"] == MODELS
    assert rows["accuracy"]["a"] == "other" and rows["accuracy"]["b"] == "base"
    assert rows["accuracy"]["diff"] == pytest.approx(correct[1].mean() - correct[0].mean())
    assert all(set(r) >= KEYS for r in rows.values())


# ----------------------------------------------------------------------------- bootstrap intervals


def test_paired_bootstrap_interval_covers_the_known_difference():
    """a is right with probability 0.85 and b with 0.80 on every image: the true difference is 5 points."""
    rng = np.random.default_rng(1)
    n, k, covered = 600, 4, 0
    trials = 40
    for _ in range(trials):
        y_true = rng.integers(0, k, size=n)
        a = _predictions(y_true, rng.random(n) < 0.85, k, rng)
        b = _predictions(y_true, rng.random(n) < 0.80, k, rng)
        row = compare_study([{"name": "b", "y_true": y_true, "y_pred": b}, {"name": "a", "y_true": y_true,
                                                                            "y_pred": a}], n_boot=400)[0]
        assert row["metric"] == "accuracy" and row["ci_low"] < row["diff"] < row["ci_high"]
        covered += row["ci_low"] <= 0.05 <= row["ci_high"]
    assert covered / trials >= 0.85  # nominal 95%


def test_welch_covers_the_known_difference_and_names_itself():
    rng = np.random.default_rng(2)
    covered, trials = 0, 30
    for _ in range(trials):
        runs = _simulated_runs(rng, {"base": 0.75, "better": 0.85}, seeds=3, n=300)
        row = next(r for r in compare_study(runs, n_boot=300) if r["metric"] == "accuracy")
        assert row["test"] == WELCH and row["question"] == SETTINGS and row["n_seeds_a"] == row["n_seeds_b"] == 3
        # the true difference of expected accuracies, by simulation of the same process without noise
        covered += row["ci_low"] <= _true_gap(0.85, 0.75) <= row["ci_high"]
    assert covered / trials >= 0.85


def _true_gap(acc_a: float, acc_b: float, draws: int = 400_000) -> float:
    rng = np.random.default_rng(99)
    difficulty, noise = rng.normal(size=draws), rng.logistic(size=draws)

    def expected(acc: float) -> float:
        skill = np.log(acc / (1 - acc)) * 1.6 + rng.normal(scale=0.15, size=draws)
        return float(np.mean(skill + 1.5 * difficulty + noise > 0))

    return expected(acc_a) - expected(acc_b)


def test_identical_settings_rarely_called_different():
    """A test of the test: two variants from the same process, 2 seeds each; at α = 0.05 the verdict should
    be 'no detectable difference' in about 95% of repeats or more."""
    rng = np.random.default_rng(3)
    repeats = 60
    false = sum(next(r for r in compare_study(_simulated_runs(rng, {"x": 0.8, "y": 0.8}, seeds=2, n=300),
                                              n_boot=300, seed=i, power_notes=False)
                    if r["metric"] == "accuracy")["verdict"]
                != NO_DIFFERENCE for i in range(repeats))
    assert false / repeats <= 0.08


# ----------------------------------------------------------------------------- verdicts, Holm, power


def test_identical_predictions_are_no_detectable_difference():
    rng = np.random.default_rng(4)
    y_true = rng.integers(0, 3, size=200)
    y_pred = _predictions(y_true, rng.random(200) < 0.7, 3, rng)
    for seeds in (1, 2):
        runs = [{"name": f"{v}-seed{s}" if seeds > 1 else v, "y_true": y_true, "y_pred": y_pred}
                for v in ("a", "b") for s in range(seeds)]
        for row in compare_study(runs, n_boot=200):
            assert row["diff"] == 0 and row["p_value"] == 1.0 and row["p_adjusted"] == 1.0
            assert row["verdict"] == NO_DIFFERENCE and row["ci_low"] <= 0 <= row["ci_high"]
            # the power note is about the design, never "a difference of 0 could never be called real"
            assert "never" not in row["power"] and "smallest difference" in row["power"]


def test_clearly_better_and_worse():
    rng = np.random.default_rng(5)
    runs = _simulated_runs(rng, {"weak": 0.6, "strong": 0.9}, seeds=2, n=800)
    rows = compare_study(runs, n_boot=300)
    assert {r["metric"] for r in rows} == {"accuracy", "macro_f1"}
    for row in rows:
        assert row["a"] == "strong" and row["b"] == "weak" and row["verdict"] == BETTER, row
        assert row["p_adjusted"] < 0.05 and row["ci_low"] > 0 and row["power"] is None
    worse = compare_study(runs, reference="strong", n_boot=300)
    assert all(r["a"] == "weak" and r["verdict"] == WORSE and r["diff"] < 0 for r in worse)
    single = compare_study([r for r in runs if r["name"].endswith("seed0")], n_boot=300)
    # one seed a variant answers only whether these two trained models differ, in its own words
    assert all(r["verdict"] == MODEL_BETTER and r["question"] == MODELS and r["n_seeds_a"] == 1 for r in single)


def test_verdict_needs_both_the_adjusted_p_and_the_interval():
    assert verdict(0.02, (0.01, 0.03), 0.001) == BETTER
    assert verdict(-0.02, (-0.03, -0.01), 0.001) == WORSE
    assert verdict(-0.02, (-0.03, -0.01), 0.001, higher_is_better=False) == BETTER
    assert verdict(0.02, (0.01, 0.03), 0.06) == NO_DIFFERENCE
    assert verdict(0.02, (-0.01, 0.03), 0.001) == NO_DIFFERENCE
    assert verdict(0.02, (0.01, 0.03), 0.01, alpha=0.01) == NO_DIFFERENCE
    assert verdict(0.02, (0.01, 0.03), 0.001, question=MODELS) == MODEL_BETTER
    assert verdict(-0.02, (-0.03, -0.01), 0.001, question=MODELS) == evidence.MODEL_WORSE


def test_holm_against_a_hand_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.01, None, 0.5]) == [pytest.approx(0.02), None, pytest.approx(0.5)]
    assert holm([0.6, 0.7]) == [1.0, 1.0] and holm([]) == []


def test_holm_is_applied_over_a_grid():
    rng = np.random.default_rng(6)
    runs = _simulated_runs(rng, {"ref": 0.8, "c1": 0.8, "c2": 0.82, "c3": 0.78}, seeds=1, n=300)
    rows = [r for r in compare_study(runs, n_boot=200) if r["metric"] == "accuracy"]
    assert [r["a"] for r in rows] == ["c1", "c2", "c3"] and {r["b"] for r in rows} == {"ref"}
    assert [r["p_adjusted"] for r in rows] == pytest.approx(holm([r["p_value"] for r in rows]))
    assert all(r["p_adjusted"] >= r["p_value"] for r in rows)


def test_power_uses_t_and_the_design_not_the_observed_difference():
    # Welch with 3 seeds a variant, per-seed sd 0.5 points: z would claim 0.5·√(2/3)·2.80 = 1.14 points
    var, se = 0.005**2, 0.005 * np.sqrt(2 / 3)
    df = evidence.welch_df(var, 3, var, 3)
    smallest = evidence.detectable(se, df, seed_vars=(var, var), n_seeds=(3, 3))
    assert smallest > evidence.detectable(se, df) > (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * se * 1.2
    assert evidence.welch_power(smallest, var, 3, var, 3) == pytest.approx(0.8, abs=0.01)
    # Welch's power against a direct simulation of Welch's test (scipy), and the noncentral t of a t test
    rng = np.random.default_rng(10)
    a, b = rng.normal(0.01, 0.005, size=(20_000, 3)), rng.normal(0.0, 0.005, size=(20_000, 3))
    p = stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue
    assert evidence.welch_power(0.01, var, 3, var, 3) == pytest.approx(np.mean(p < 0.05), abs=0.02)
    p = stats.ttest_ind(a, b, axis=1, equal_var=True).pvalue
    assert evidence.t_power(0.01, se, 4) == pytest.approx(np.mean(p < 0.05), abs=0.02)
    # seeds for evidence.min_effect: the first n whose power reaches 0.8
    n = evidence.seeds_needed(var, var, 0.005)
    assert evidence.welch_power(0.005, var, n, var, n) >= 0.8 > evidence.welch_power(0.005, var, n - 1, var, n - 1)
    note = evidence.power_note(SETTINGS, WELCH, se, df, (3, 3), 2000, (var, var), min_effect=0.005)
    assert note["seeds_needed"] == n and f"about {n} seeds per variant" in note["text"]
    assert f"{smallest * 100:.2f} points" in note["text"]
    one = evidence.power_note(MODELS, evidence.MCNEMAR, 0.004, np.inf, (1, 1), 1000, min_effect=0.01)
    assert one["test_images_needed"] == int(np.ceil(1000 * ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * 0.4) ** 2))
    assert "run ≥ 2 seeds" in one["text"]


def test_interval_excluding_zero_beside_no_difference_says_why():
    rows = [{"a": f"c{i}", "b": "ref", "metric": "accuracy", "question": SETTINGS, "diff": 0.01, "ci_low": 0.001,
             "ci_high": 0.02, "p_value": p, "p_adjusted": None, "test": WELCH, "verdict": None, "n_seeds_a": 3,
             "n_seeds_b": 3, "n_test": 1000} for i, p in enumerate((0.03, 0.04, 0.5))]
    out = evidence.finish_rows(rows)
    assert out[0]["verdict"] == NO_DIFFERENCE and out[0]["p_adjusted"] == pytest.approx(0.09)
    assert "excludes 0" in out[0]["note"] and "Holm" in out[0]["note"] and "3 comparisons" in out[0]["note"]


def test_welch_prediction_and_fold_tests_against_hand_values():
    a, b = [0.81, 0.83, 0.80], [0.78, 0.79, 0.80, 0.77]
    w = evidence.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w.p == pytest.approx(ref.pvalue) and w.diff == pytest.approx(np.mean(a) - np.mean(b))
    half = stats.t.ppf(0.975, w.df) * np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 4)
    assert (w.low, w.high) == pytest.approx((w.diff - half, w.diff + half))
    pt = evidence.prediction_t(0.85, b)
    t = (0.85 - np.mean(b)) / (np.std(b, ddof=1) * np.sqrt(1 + 1 / 4))
    assert pt.p == pytest.approx(2 * stats.t.sf(abs(t), 3)) and pt.df == 3
    d = np.array([0.01, 0.03, -0.01, 0.02, 0.0])
    f = evidence.corrected_resampled_t(d, 0.25)
    t = d.mean() / np.sqrt((1 / 5 + 0.25) * d.var(ddof=1))
    assert f.p == pytest.approx(2 * stats.t.sf(abs(t), 4)) and f.name == FOLDS
    assert f.p > 2 * stats.t.sf(abs(d.mean() / np.sqrt(d.var(ddof=1) / 5)), 4)  # more careful than the plain t


def test_one_seed_against_several_is_a_settings_prediction_test():
    rng = np.random.default_rng(11)
    runs = _simulated_runs(rng, {"ref": 0.8}, seeds=3) + _simulated_runs(rng, {"one": 0.8}, seeds=1)
    runs[-1]["y_true"] = runs[0]["y_true"]
    rows = compare_study(runs, reference="ref")
    assert all(r["question"] == SETTINGS and r["test"] == PREDICTION and r["n_seeds_a"] == 1 for r in rows)
    flipped = compare_study(runs, reference="one")
    assert [r["diff"] for r in flipped] == pytest.approx([-r["diff"] for r in rows])
    assert [r["p_value"] for r in flipped] == pytest.approx([r["p_value"] for r in rows])


def test_cross_validated_runs_get_the_fold_paired_test():
    rng = np.random.default_rng(12)
    runs = []
    for repeat in (1, 2):
        for fold in (1, 2, 3):
            y_true = rng.integers(0, 3, size=100)
            for variant, acc in (("cnn", 0.9), ("permuted", 0.6)):
                y_pred = _predictions(y_true, rng.random(100) < acc, 3, rng)
                runs.append(run_predictions(f"{variant}-r{repeat}-fold{fold}", y_true, y_pred=y_pred,
                                            fold=(repeat, fold), train_size=200))
    assert {r.variant for r in runs} == {"cnn", "permuted"}
    rows = compare_study(runs, reference="permuted")
    acc = next(r for r in rows if r["metric"] == "accuracy")
    assert acc["test"] == FOLDS and acc["question"] == SETTINGS and acc["n_seeds_a"] == 6 and acc["verdict"] == BETTER
    scores = {}
    for r in runs:
        scores.setdefault(r.variant, {})[r.fold] = float(np.mean(r.y_pred == r.y_true))
    d = [scores["cnn"][k] - scores["permuted"][k] for k in sorted(scores["cnn"])]
    assert acc["p_value"] == pytest.approx(evidence.corrected_resampled_t(d, 100 / 200).p)
    plain = [r for r in runs if r.variant == "cnn"][:1]
    mixed = compare_study([*plain[:0], run_predictions("x", runs[0].y_true, y_pred=runs[0].y_pred), runs[0]])
    assert all(r["verdict"] == "not compared" and "cross-validated" in r["reason"] for r in mixed)


def test_runs_on_different_test_sets_are_skipped_with_a_reason():
    rng = np.random.default_rng(7)
    a = _simulated_runs(rng, {"a": 0.8}, seeds=1)
    b = _simulated_runs(rng, {"b": 0.8}, seeds=1)
    rows = compare_study(a + b, n_boot=100)
    assert len(rows) == 2 and all(r["verdict"] == "not compared" and "same test set" in r["reason"] for r in rows)
    assert all(r["p_value"] is None for r in rows)


def test_deterministic_and_reference_from_retrain():
    rng = np.random.default_rng(8)
    runs = _simulated_runs(rng, {"x": 0.7, "y": 0.75, "retrain-y": 0.76}, seeds=2, n=200)
    first, second = compare_study(runs, n_boot=200), compare_study(runs, n_boot=200)
    assert first == second
    assert {r["b"] for r in first} == {"y"}  # the retrained cell was the selected one
    assert {r["a"] for r in first} == {"x", "retrain-y"}
    assert {r["b"] for r in compare_study(runs, reference="x", n_boot=100)} == {"x"}


# ----------------------------------------------------------------------------- seed-aware selection


def test_select_ranks_on_a_pooled_spread():
    scores = {"noisy": [0.70, 0.95, 0.90], "stable": [0.80, 0.81, 0.80]}
    assert select_variant(scores, "mean") == "noisy" == select_variant(scores, "lower_bound")
    losses = {"noisy": [0.9, 0.2, 0.3], "stable": [0.5, 0.52, 0.5]}
    assert select_variant(losses, "lower_bound", higher_is_better=False) == "noisy"
    # one lucky seed no longer wins: its bound uses the spread pooled over cells, not a zero width
    assert select_variant({"one": [0.88], "two": [0.8, 0.85], "three": [0.86, 0.87]}, "lower_bound") == "three"
    var, df = evidence.pooled_spread({"a": [1.0, 2.0, 3.0], "b": [2.0, 4.0], "c": [5.0]})
    assert df == 3 and var == pytest.approx((2 * 1.0 + 1 * 2.0) / 3)
    with pytest.raises(ValueError, match="lower_bound"):
        select_variant(scores, "median")


def test_a_one_seed_cell_is_not_picked_on_noise():
    """12 equal cells, one with a single seed: today's lower_bound picked it 69% of the time; now it must be
    picked no more often than a fair share (1/12) by either rule."""
    rng = np.random.default_rng(13)
    picked = {"mean": 0, "lower_bound": 0}
    trials = 400
    for _ in range(trials):
        scores = {f"c{i}": list(rng.normal(0.8, 0.01, size=1 if i == 5 else 3)) for i in range(12)}
        for rule in picked:
            picked[rule] += select_variant(scores, rule) == "c5"
    assert picked["mean"] / trials <= 0.12 and picked["lower_bound"] / trials <= 0.12, picked


def test_calibration_small_version():
    """benchmarks/evidence_calibration.py, small and deterministic: settings false-positive rates near α,
    P(p < 0.01) near 1%, the one-seed design answers no settings question, confirmation fixes selection."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "evidence_calibration.py"
    spec = importlib.util.spec_from_file_location("evidence_calibration", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(2026)
    for seeds, sd_ratio, n_images, tails in ((2, 1.0, 2000, "normal"), (3, 5.0, 210, "normal"),
                                             (5, 1.0, 10_000, "t3"), (3, 1.0, 2000, "t3")):
        design = bench.Design(seeds, seeds, seed_sd=0.005, sd_ratio=sd_ratio, n_images=n_images, tails=tails)
        rate, strict = bench.false_positive_rate(design, 300, rng)
        assert rate <= 0.10 and strict <= 0.035, (design, rate, strict)
    family = bench.family_rate(bench.Design(2, 2, seed_sd=0.005, n_images=2000), 150, rng)
    assert family <= 0.11
    one = bench.one_seed_rates(bench.Design(1, 1, seed_sd=0.01, n_images=2000), 100, rng)
    assert one["settings"] == 0 and one["models"] > 0.05  # two seeds' models told apart, no settings claim
    power = bench.power(bench.Design(3, 3, seed_sd=0.005, n_images=2000), 0.02, 200, rng)
    assert power >= 0.5  # Welch on per-seed accuracies: about 0.66 in this design
    folds = bench.fold_false_positive_rate(5, 1, 300, rng)
    assert folds <= 0.10
    reused, confirmed = bench.select_then_compare(bench.Design(2, 2, seed_sd=0.005, n_images=2000), 80, rng)
    assert confirmed <= 0.12


# ----------------------------------------------------------------------------- variant diff


def test_variant_diff_per_class_and_disagreements():
    rng = np.random.default_rng(9)
    n, k = 300, 3
    y_true = rng.integers(0, k, size=n)
    a_pred = y_true.copy()  # a is always right
    b_pred = np.where(y_true == 2, (y_true + 1) % k, y_true)  # b never recalls class 2
    worst = np.flatnonzero(b_pred != y_true)[:5]
    images = np.zeros((len(worst), 1, 4, 4), np.uint8)
    a = [run_predictions("a", y_true, y_pred=a_pred)]
    b = [run_predictions("b", y_true, y_pred=b_pred, worst_index=worst, worst_images=images)]
    diff = evidence.variant_diff(a, b, n_boot=200)
    recall = [c["recall"] for c in diff["per_class"]]
    assert recall[2]["diff"] == pytest.approx(1.0) and recall[2]["ci_low"] > 0.9
    assert recall[0]["diff"] == 0 and recall[0]["ci_low"] == 0 == recall[0]["ci_high"]
    assert diff["confusion_diff"][2, 2] == pytest.approx(1.0) and diff["confusion_diff"][2, 0] == pytest.approx(-1.0)
    assert diff["a_only"]["count"] == int(np.sum(y_true == 2)) and diff["b_only"]["count"] == 0
    assert diff["a_only"]["index"] == sorted(worst.tolist()) and len(diff["a_only"]["images"]) == 5
    assert diff["a_only"]["pred_wrong"] == [0] * 5 and diff["a_only"]["true"] == [2] * 5


# ----------------------------------------------------------------------------- the report step writes comparison.json


def test_report_step_writes_comparison_json(run_cli, tmp_path):
    data = make_idx_folder(tmp_path / "toy", n_train=120, n_test=60)
    study = tiny_study(tmp_path, data, runs=[{"name": "plain"}, {"name": "wide", "train": {"lr": 0.02}}])
    study["seeds"] = [0, 1]
    study["train"]["epochs"] = 1
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    folder = tmp_path / "runs" / "toy"
    saved = json.loads((folder / "comparison.json").read_text())
    assert saved["reference"] == "plain" and "Holm" in saved["correction"]
    assert [(r["a"], r["b"], r["metric"]) for r in saved["rows"]] == [("wide", "plain", "accuracy"),
                                                                       ("wide", "plain", "macro_f1")]
    for row in saved["rows"]:
        assert set(row) >= KEYS and row["test"] == WELCH and row["n_seeds_a"] == row["n_seeds_b"] == 2
        assert row["question"] == SETTINGS
        assert row["verdict"] in (BETTER, WORSE, NO_DIFFERENCE)
        assert row["ci_low"] <= row["diff"] <= row["ci_high"] and 0 <= row["p_value"] <= row["p_adjusted"] <= 1
    html = (folder / "report.html").read_text()
    for needle in ("Is the difference real?", "Holm correction was applied", WELCH, "Variant diff",
                   "mean confusion matrix per variant", "band over seeds"):
        assert needle in html, needle
    md = (folder / "report.md").read_text()
    assert "## Is the difference real?" in md and "| wide vs plain | accuracy | settings | 2 / 2 |" in md


def test_selected_cell_is_confirmed_with_fresh_seeds(run_cli, tmp_path):
    """select with 2 seeds: the chosen cell is trained again on 2 fresh seeds (confirm-<cell>-seed2/3), those
    runs are the comparisons' reference, and the report shows the selection's optimism."""
    data = make_idx_folder(tmp_path / "toy", n_train=120, n_test=60)
    study = tiny_study(tmp_path, data, runs=[{"name": "plain"}, {"name": "fast", "train": {"lr": 0.03}}])
    study["seeds"], study["train"]["epochs"] = [0, 1], 1
    study["select"], study["evidence"] = {"by": "accuracy"}, {"min_effect": 0.05}
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    folder = tmp_path / "runs" / "toy"
    settings = json.loads((folder / evidence.SETTINGS_FILE).read_text())
    chosen = settings["selected"]
    assert chosen in ("plain", "fast") and settings["min_effect"] == 0.05
    assert {p.name for p in folder.glob(f"confirm-{chosen}-seed*")} == {f"confirm-{chosen}-seed2",
                                                                         f"confirm-{chosen}-seed3"}
    saved = json.loads((folder / "comparison.json").read_text())
    assert saved["reference"] == f"confirm-{chosen}" and {r["a"] for r in saved["rows"]} == {"plain", "fast"}
    assert saved["optimism"]["selected"] == chosen and "optimism:" in saved["optimism"]["text"]
    assert "optimism:" in (folder / "report.md").read_text() and "confirmed" in out
    with_power = [r for r in saved["rows"] if r["power"]]
    assert all("evidence.min_effect" in r["power"] for r in with_power)


def test_tied_seeds_do_not_make_p_zero():
    """Scores on n images move in steps of 1/n, so two seeds can tie: a spread of exactly 0 must not make any
    difference 'certain' (p = 0); the floor is the rounding variance 1/(12 n²)."""
    floor = evidence.rounding_variance(2000)
    assert floor == pytest.approx(1 / (12 * 2000**2))
    tied = evidence.prediction_t(0.80, [0.79, 0.79], floor=floor)
    assert 0.01 < tied.p < 0.05 and tied.se > 0
    assert evidence.welch([0.80, 0.80], [0.79, 0.79], floor=floor).p > 0


def test_the_bootstrap_statistics_are_the_registry_metrics():
    """evidence.confusion_stats computes the registry's EVIDENCE metrics in numpy (vectorized over bootstrap
    draws); it must give the registry's own values, classes missing from the predictions included."""
    import torch

    from classlab import metrics

    rng = np.random.default_rng(3)
    cms = rng.integers(0, 20, size=(16, 5, 5)).astype(float)
    cms[0, :, 2] = 0  # a class never predicted
    cms[1, 3, :] = 0  # a class with no images
    stats = evidence.confusion_stats(cms)
    for column, name in enumerate(metrics.EVIDENCE):
        expected = metrics.get(name).of_confusion(torch.as_tensor(cms)).numpy()
        np.testing.assert_allclose(stats[:, column], expected, rtol=1e-12, atol=1e-12)
