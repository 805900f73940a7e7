"""Reproduce the reference studies (STUDIES.md) at full settings on real data and print one table:
study, run, the study's reported figure, ours (mean ± std over seeds), difference.

    python benchmarks/reproduce.py                      # every study, 3 seeds (hours on a 2-core CPU)
    python benchmarks/reproduce.py --studies D B --seeds 0 --out runs-repro

Finished runs are reused (run folders are skipped when complete), so it can be stopped and resumed.
This is a benchmark, not a test: nothing here is asserted, the table is the result.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from classlab.evidence import stat, variant_of
from classlab.study import run_study

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()


@dataclass(frozen=True)
class Study:
    key: str
    file: str
    data_root: str | None
    metric: str  # "test" or "val": which accuracy the study reported
    reported: dict[str, float]  # variant -> reported accuracy in %
    pinned: str | None = None  # the variant the study itself retrained, if ours selects another


STUDIES = [
    Study("A", "fashion-3class-permutation.yaml", "fashion-mnist", "test", {"original": 98.87, "permuted": 99.08}),
    Study("B", "fashion-3class-cnn-dropout.yaml", "fashion-mnist", "test", {"original": 99.55, "permuted": 99.26}),
    Study("C", "notmnist-permutation.yaml", "notmnist-small", "test", {}),
    Study("D", "fashion-mlp-grid.yaml", "fashion-mnist", "val", {
        "none-adam": 87.57, "batchnorm-adam": 88.23, "dropout-adam": 87.27, "l1-adam": 80.76,
        "none-rmsprop": 87.45, "batchnorm-rmsprop": 88.54, "dropout-rmsprop": 87.14, "l1-rmsprop": 85.13,
        "retrain-batchnorm-rmsprop": 87.33}, pinned="batchnorm-rmsprop"),
    Study("E", "fashion-cnn-earlystop.yaml", "fashion-mnist", "test", {"base": 90.90}),
]


def accuracy(summary: dict, metric: str) -> float:
    if metric == "val" and summary.get("best_val") and not summary["name"].startswith("retrain-"):
        return summary["best_val"]["accuracy"] * 100
    return summary["test"]["accuracy"] * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="*", default=[s.key for s in STUDIES])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "runs-reproduce"))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    console = Console()
    rows = []
    started = time.perf_counter()
    by_key = {s.key: s for s in STUDIES}
    unknown = [k for k in args.studies if k not in by_key]
    if unknown:
        parser.error(f"unknown studies {unknown}; choose from {list(by_key)}")
    for study in (by_key[k] for k in args.studies):
        overrides = [f"seeds={args.seeds}", f"out_dir={args.out}"]
        if study.data_root:
            overrides.append(f"data.root={Path(args.data) / study.data_root}")
        result = run_study(REPO / "experiments" / study.file, overrides, device=args.device, console=console)
        summaries = list(result.summaries)
        if study.pinned and result.selected not in (None, study.pinned):  # also retrain the study's own choice
            pinned = run_study(REPO / "experiments" / study.file, [*overrides, f"select.variant={study.pinned}"],
                               device=args.device, console=console)
            summaries += [s for s in pinned.summaries if s["name"].startswith("retrain-")]
        groups: dict[str, list[float]] = {}
        for s in summaries:
            groups.setdefault(variant_of(s["name"]), []).append(accuracy(s, study.metric))
        for variant, values in groups.items():
            st = stat(values)
            reported = study.reported.get(variant)
            diff = f"{st.mean - reported:+.2f}" if reported is not None else "—"
            rows.append((study.key, variant, study.metric if not variant.startswith("retrain") else "test",
                         f"{reported:.2f}" if reported is not None else "—", st.format(), str(st.n), diff))
    header = ("study", "run", "metric", "reported %", "ours %", "seeds", "diff")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    console.print(f"\n{time.strftime('%Y-%m-%d')} · {platform.machine()} · {torch.get_num_threads()} threads · "
                  f"torch {torch.__version__} · {time.perf_counter() - started:.0f}s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
