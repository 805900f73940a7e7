"""A test of the test: how often does classlab's verdict call a difference between identical settings real?

    python benchmarks/evidence_null.py                    # 20 repeats, real Fashion-MNIST (~5 min on 2 cores)
    python benchmarks/evidence_null.py --repeats 40 --train-subset 20000 --epochs 2

Each repeat compares two variants with the same settings and different seeds, on the full real
Fashion-MNIST test set (10,000 images), through `evidence.compare_study`, the function behind the
terminal table, the report and comparison.json:
- 2 seeds each (a = seeds 4i, 4i+1; b = seeds 4i+2, 4i+3): the hierarchical bootstrap over seeds and images;
- 1 seed each (a = seed 4i, b = seed 4i+2): McNemar's exact test.
With 2 seeds, every verdict other than "no detectable difference" is a false positive of the settings
comparison; at α = 0.05 the rate should be about 5% or less. With 1 seed the test compares two trained
models, not two settings: McNemar is right to call two seeds' models different when seed-to-seed variation
is larger than what the test set can resolve, which is why settings comparisons need 2 or more seeds.
The 4 × repeats models (study D's MLP with BatchNorm, Adam 1e-3) train together as one member stack of
classlab's `fit`, each from its own seed (weights, batch order, dropout), as it would alone.
This is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from classlab import evidence
from classlab.config import RunConfig, validate
from classlab.data import ImageData, Split, load_dataset
from classlab.models import build_model
from classlab.train.fit import fit
from classlab.train.forward import predict_logits
from classlab.transforms import BatchTransform, preprocess_for

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fashion-mnist"
CPU = torch.device("cpu")


def configs(root: str, n: int, epochs: int) -> list[RunConfig]:
    base = {"data": {"dataset": "fashion-mnist", "root": root, "val_fraction": None},
            "model": {"name": "study_d_mlp", "batchnorm": True},
            "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 64, "epochs": epochs}}
    return [validate(RunConfig, {**base, "name": f"same-seed{s}", "seed": s}) for s in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=10_000, help="training images (the test set is whole)")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"no Fashion-MNIST at {args.data}: pass --data FOLDER (the IDX files)")

    cfgs = configs(args.data, 4 * args.repeats, args.epochs)
    full = load_dataset(cfgs[0].data)
    data = ImageData(train=Split(full.train.images[: args.train_subset], full.train.labels[: args.train_subset]),
                     test=full.test, classes=full.classes, mean=full.mean, std=full.std, val=None, source=full.source)
    pre = preprocess_for(cfgs[0], data)
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        models.append(build_model(c.model, len(data.classes), pre.input_shape))
    t0 = time.perf_counter()
    fit(models, data, cfgs, pre, CPU)
    trained = time.perf_counter() - t0
    tf = BatchTransform(pre, None, CPU)
    y_true = data.test.labels.numpy()
    preds = [predict_logits(m, data.test.images, tf, 1024, CPU).argmax(1).numpy() for m in models]
    accs = [float((p == y_true).mean()) for p in preds]

    def run(name: str, seed: int) -> dict:
        return {"name": f"{name}-seed{seed}", "variant": name, "y_true": y_true, "y_pred": preds[seed]}

    found = {("2 seeds", m): 0 for m in evidence.METRICS} | {("1 seed", m): 0 for m in evidence.METRICS}
    diffs = []
    for i in range(args.repeats):
        s = 4 * i
        for label, runs in (("2 seeds", [run("a", s), run("a", s + 1), run("b", s + 2), run("b", s + 3)]),
                            ("1 seed", [run("a", s), run("b", s + 2)])):
            for row in evidence.compare_study(runs, reference="b", seed=i):
                if row["verdict"] != evidence.NO_DIFFERENCE:
                    found[(label, row["metric"])] += 1
                if label == "2 seeds" and row["metric"] == "accuracy":
                    diffs.append(row["diff"])
    print(f"{4 * args.repeats} models trained together in {trained:.0f} s ({args.epochs} epoch(s), "
          f"{args.train_subset} training images); test accuracy {np.mean(accs) * 100:.2f}% ± "
          f"{np.std(accs, ddof=1) * 100:.2f} (seed std), range {min(accs) * 100:.2f}–{max(accs) * 100:.2f}%")
    print(f"2-seed differences a − b: mean {np.mean(diffs) * 100:+.2f}, largest |diff| "
          f"{max(abs(d) for d in diffs) * 100:.2f} points")
    for (label, metric), n in found.items():
        what = "false-positive rate" if label == "2 seeds" else "two seeds' models told apart (not a settings test)"
        print(f"{label:8s} {metric:9s}: {n}/{args.repeats} verdicts other than 'no detectable difference' "
              f"({what}: {n / args.repeats:.0%})")


if __name__ == "__main__":
    main()
