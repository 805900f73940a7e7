"""Cross-validation on real data: study A's CNN against the pixel-permuted CNN on notMNIST-small.

    nice -n 5 python benchmarks/cv_notmnist.py                      # 5 folds × 2 repeats, then one split
    python benchmarks/cv_notmnist.py --epochs 3 --folds 3 --repeats 1  # quicker

Trains two classlab studies through `run_study` (the path `classlab run` takes): the two variants with
data.cv {folds, repeats} (each fold a run folder, validated on its held-out part), and the same two on one
split (all 2,000 training images, tested on the 500 test images). Prints per variant the held-out-fold
accuracy (mean ± sd over folds), the test-split accuracy of the fold models, the corrected resampled t
test's verdict (evidence.fold_test, fed by the report's evidence inputs: each fold run's out-of-fold
predictions, fold and training size), the plain paired t test over folds for contrast (too liberal: folds
share training data), the one split's verdict (evidence.compare_study: McNemar on the test set), and the
wall time of each study. This is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from classlab import evidence
from classlab.report.context import evidence_inputs
from classlab.report.load import load_study_runs
from classlab.study import run_study

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "notmnist-small"


def study(name: str, root: str, out: Path, epochs: int, cv: dict | None) -> dict:
    """Study A's CNN (experiments/fashion-3class-permutation.yaml) on notMNIST-small, original and permuted."""
    data = {"dataset": "image-folder", "root": root, "channels": 1, "val_fraction": None}
    if cv is not None:
        data["cv"] = cv
    return {"name": name, "out_dir": str(out), "seeds": [0], "data": data, "model": {"name": "study_a_cnn"},
            "train": {"epochs": epochs, "batch_size": 64, "optimizer": "adam", "lr": 0.001, "threads": 1},
            "runs": [{"name": "original"}, {"name": "permuted", "data": {"permute_pixels": {"seed": 0}}}]}


def train(doc: dict, folder: Path) -> tuple[list, float]:
    path = folder / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    started = time.perf_counter()
    result = run_study(path)
    seconds = time.perf_counter() - started
    runs, _ = load_study_runs(result.folder)
    return runs, seconds


def fold_scores(inputs: list[evidence.RunPredictions], variant: str) -> tuple[dict, dict, dict]:
    """Per (repeat, fold): held-out accuracy, training size, held-out size."""
    acc, n_train, n_test = {}, {}, {}
    for r in inputs:
        if r.variant == variant and r.fold is not None:
            acc[r.fold] = float(np.mean(r.y_true == r.y_pred))
            n_train[r.fold], n_test[r.fold] = r.train_size, len(r.y_true)
    return acc, n_train, n_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="where the study folders go (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="cv-notmnist-"))
    out.mkdir(parents=True, exist_ok=True)
    cv = {"folds": args.folds, "repeats": args.repeats}
    cv_runs, cv_seconds = train(study("notmnist-cv", args.data, out, args.epochs, cv), out)
    one_runs, one_seconds = train(study("notmnist-one-split", args.data, out, args.epochs, None), out)

    inputs = evidence_inputs(cv_runs)
    print(f"\n{args.folds}-fold × {args.repeats} repeats, {args.epochs} epochs, study A's CNN, notMNIST-small")
    scores = {}
    for variant in ("original", "permuted"):
        acc, n_train, n_test = fold_scores(inputs, variant)
        scores[variant] = (acc, n_train, n_test)
        test = [r.summary.get("test", {}).get("accuracy") for r in cv_runs if evidence.variant_of(r.name) == variant]
        vals = np.array(list(acc.values()))
        print(f"  {variant:9s} held-out fold accuracy {vals.mean() * 100:.2f} ± {vals.std(ddof=1) * 100:.2f} "
              f"(n = {len(vals)} folds; per fold {', '.join(f'{v * 100:.1f}' for v in vals)}); "
              f"test split {np.mean(test) * 100:.2f} ± {np.std(test, ddof=1) * 100:.2f}")
    (a, n_train, n_test), (b, _, _) = scores["original"], scores["permuted"]
    corrected = evidence.fold_test(a, b, n_train, n_test)
    keys = sorted(set(a) & set(b))
    plain = stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys])
    ratio = float(np.mean([n_test[k] / n_train[k] for k in keys]))
    print(f"  corrected resampled t (original - permuted): diff {corrected.diff * 100:+.2f} pts, 95% CI "
          f"[{corrected.low * 100:+.2f}, {corrected.high * 100:+.2f}], p = {corrected.p:.4g} "
          f"(n_test/n_train {ratio:.3f}, {len(keys)} folds)")
    print(f"  plain paired t over folds, for contrast: p = {plain.pvalue:.4g}")
    rows = [r for r in evidence.compare_study(inputs, reference="permuted") if r["metric"] == "accuracy"]
    for row in rows:
        print(f"  comparison.json row (fold runs): {row['a']} vs {row['b']}: {row['verdict']} "
              f"({row.get('test')}, p = {row.get('p_value')})")

    one = evidence_inputs(one_runs)
    for row in evidence.compare_study(one, reference="permuted"):
        if row["metric"] == "accuracy":
            print(f"  one split: {row['a']} vs {row['b']}: diff {row['diff'] * 100:+.2f} pts, {row['verdict']} "
                  f"({row['test']}, p = {row['p_value']:.4g})")
    for r in one_runs:
        print(f"  one split {r.name}: test accuracy {r.summary.get('test', {}).get('accuracy') * 100:.2f}")
    print(f"  wall time: cross-validation {cv_seconds:.0f} s ({len(cv_runs)} runs), one split {one_seconds:.0f} s "
          f"({len(one_runs)} runs): × {cv_seconds / one_seconds:.1f}")
    print(f"  run folders: {out}")


if __name__ == "__main__":
    main()
