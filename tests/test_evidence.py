"""Is the difference real? The paired tests against hand-computed and scipy values, the bootstrap intervals'
coverage on synthetic data with a known difference, the false-positive rate of the seed-aware test, Holm,
verdicts, seed-aware selection, and comparison.json from the report step of a tiny real study."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from classlab import evidence
from classlab.evidence import (
    BETTER,
    HIERARCHICAL,
    NO_DIFFERENCE,
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
        "n_seeds_a", "n_seeds_b"}


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


def test_hierarchical_bootstrap_covers_the_known_difference_and_names_itself():
    rng = np.random.default_rng(2)
    covered, trials = 0, 30
    for _ in range(trials):
        runs = _simulated_runs(rng, {"base": 0.75, "better": 0.85}, seeds=3, n=300)
        row = next(r for r in compare_study(runs, n_boot=300) if r["metric"] == "accuracy")
        assert row["test"] == HIERARCHICAL and row["n_seeds_a"] == 3 and row["n_seeds_b"] == 3
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
                                              n_boot=300, seed=i) if r["metric"] == "accuracy")["verdict"]
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
            assert "0" in row["power"]  # the power note says nothing would make a difference of 0 real


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
    assert all(r["verdict"] == BETTER and r["n_seeds_a"] == 1 for r in single)


def test_verdict_needs_both_the_adjusted_p_and_the_interval():
    assert verdict(0.02, (0.01, 0.03), 0.001) == BETTER
    assert verdict(-0.02, (-0.03, -0.01), 0.001) == WORSE
    assert verdict(-0.02, (-0.03, -0.01), 0.001, higher_is_better=False) == BETTER
    assert verdict(0.02, (0.01, 0.03), 0.06) == NO_DIFFERENCE
    assert verdict(0.02, (-0.01, 0.03), 0.001) == NO_DIFFERENCE
    assert verdict(0.02, (0.01, 0.03), 0.01, alpha=0.01) == NO_DIFFERENCE


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


def test_power_note_counts_seeds_and_images():
    # seed variance 1e-4 per variant, image part 1e-4 at 1,000 images, observed 1 point
    note = evidence.power_note(0.01, 0.01, (1e-4, 1e-4), (2, 2), 1000)
    z2 = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) ** 2
    target = (0.01**2) / z2  # the SE that would make 1 point detectable
    assert target < 1e-4  # the test-set part alone is too large: more seeds cannot do it
    assert note["seeds_needed"] is None and note["test_images_needed"] is None
    note = evidence.power_note(0.03, 0.004, (1e-4, 1e-4), (2, 2), 1000)
    target = 0.03**2 / z2
    assert note["seeds_needed"] == int(np.ceil(2e-4 / (target - 0.004**2)))
    assert note["test_images_needed"] == int(np.ceil(0.004**2 * 1000 / (target - 1e-4)))
    assert "seeds per variant" in note["text"] and "test images" in note["text"]
    assert "one seed" in evidence.power_note(0.01, 0.002, None, (1, 1), 1000)["text"]


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


def test_select_lower_bound_prefers_the_stable_cell():
    scores = {"noisy": [0.70, 0.95, 0.90], "stable": [0.80, 0.81, 0.80]}
    assert select_variant(scores, "mean", higher_is_better=True) == "noisy"
    assert select_variant(scores, "lower_bound", higher_is_better=True) == "stable"
    losses = {"noisy": [0.9, 0.2, 0.3], "stable": [0.5, 0.52, 0.5]}
    assert select_variant(losses, "mean", higher_is_better=False) == "noisy"
    assert select_variant(losses, "lower_bound", higher_is_better=False) == "stable"
    assert select_variant({"one": [0.9], "two": [0.8, 0.85]}, "lower_bound") == "one"  # one seed: its value
    with pytest.raises(ValueError, match="lower_bound"):
        select_variant(scores, "median")


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
        assert set(row) >= KEYS and row["test"] == HIERARCHICAL and row["n_seeds_a"] == row["n_seeds_b"] == 2
        assert row["verdict"] in (BETTER, WORSE, NO_DIFFERENCE)
        assert row["ci_low"] <= row["diff"] <= row["ci_high"] and 0 <= row["p_value"] <= row["p_adjusted"] <= 1
    html = (folder / "report.html").read_text()
    for needle in ("Is the difference real?", "Holm correction was applied", HIERARCHICAL, "Variant diff",
                   "mean confusion matrix per variant", "band over seeds"):
        assert needle in html, needle
    md = (folder / "report.md").read_text()
    assert "## Is the difference real?" in md and "| wide vs plain | accuracy | 2 / 2 |" in md
