"""Reproduce the reference studies (STUDIES.md) at full settings on real data and print one table:
study, run, the study's reported figure, ours (mean ± std over seeds), difference.

    python benchmarks/reproduce.py                      # every study, 3 seeds (hours on a 2-core CPU)
    python benchmarks/reproduce.py --studies D B --seeds 0 --out runs-repro
    python benchmarks/reproduce.py --fer-runs runs/fer2013-lite0-cpu runs/fer2013-resnet18   # FER rows only

FER rows (--fer-runs: study folders of experiments/fer2013-lite0-cpu.yaml and fer2013-resnet18.yaml, already
trained) are read, not trained: for each arm the studies' number beside classlab's (mean ± std over seeds)
for accuracy, macro and weighted F1, and per-class F1, on the studies' split (a run on another split is
marked so: the studies' test set is validation/ + test/, 7,178 images, support 958/111/1024/1774/1233/1247/831).

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


FER_SUPPORT = [958, 111, 1024, 1774, 1233, 1247, 831]  # the studies' test set, per class (STUDIES.md, study C)
FER_CLASSES = ["Angry", "Disgusted", "Fearful", "Happy", "Neutral", "Sad", "Surprised"]
# arm -> the studies' figures: (label, accuracy %, macro F1, weighted F1, per-class F1)
FER_STUDIES: dict[str, list[tuple[str, float, float | None, float | None, list[float] | None]]] = {
    "scratch-sgd": [("A", 46.13, None, None, None)],
    "layer4-fc-sgd": [("A", 60.78, None, None, None)],
    "scratch-adam": [("B", 62.72, None, None, None)],
    "layer4-fc-adam": [("B", 66.27, None, None, None)],
    "fc-only": [("C", 45.46, 0.38, 0.44, None)],
    "per-layer-lrs": [("C", 62.69, 0.59, 0.62, [0.54, 0.49, 0.46, 0.83, 0.58, 0.51, 0.77])],
}
# EfficientNet-Lite0 arms (experiments/fer2013-lite0-cpu.yaml) beside the ResNet-18 arm each stands for
FER_STUDIES |= {"fine-tuned": FER_STUDIES["per-layer-lrs"], "head-only": FER_STUDIES["fc-only"],
                "scratch": FER_STUDIES["scratch-sgd"] + FER_STUDIES["scratch-adam"],
                "frozen-but-last-stage": FER_STUDIES["layer4-fc-sgd"] + FER_STUDIES["layer4-fc-adam"]}
FER_BEST = 66.27  # the studies' best FER figure (B, ImageNet ResNet-18 frozen but layer4 + fc)


def fer_summaries(folder: Path) -> dict[str, list[dict]]:
    """Finished runs (summary.json) of one study folder, by arm (the run name without its seed)."""
    import json

    arms: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if "test" in summary:
            arms.setdefault(variant_of(summary.get("name", path.parent.name)), []).append(summary)
    return arms


def on_studies_split(summary: dict) -> bool:
    counts = ((summary.get("data") or {}).get("class_counts") or {}).get("test")
    return counts == FER_SUPPORT or summary["test"].get("per_class", {}).get("support") == FER_SUPPORT


def fer_rows(folders: list[Path]) -> str:
    """The FER table (studies' figures beside classlab's, per arm) and the per-class F1 table, as markdown."""
    def cell(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        st = stat([v * scale for v in values])
        return f"{st.mean:.{digits}f}" + (f" ± {st.std:.{digits}f}" if st.n > 1 else "")

    main = ["| study folder | arm | seeds | split | studies' accuracy % | classlab accuracy % | vs studies | "
            "vs best (66.27) | studies' macro F1 | macro F1 | studies' weighted F1 | weighted F1 |",
            "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    per_class = ["| study folder | arm | " + " | ".join(FER_CLASSES) + " |", "|---|---|" + "---:|" * 7]
    per_class.append("| STUDIES.md | C per-layer-lrs | " + " | ".join(
        f"{v:.2f}" for v in FER_STUDIES["per-layer-lrs"][0][4]) + " |")  # type: ignore[union-attr]
    for folder in folders:
        arms = fer_summaries(folder)
        if not arms:
            main.append(f"| {folder.name} | (no finished runs in {folder}) | | | | | | | | | | |")
        for arm, runs in arms.items():
            tests = [r["test"] for r in runs]
            acc = [t["accuracy"] * 100 for t in tests]
            theirs = FER_STUDIES.get(arm, [])
            reported = " / ".join(f"{v:.2f} ({who})" for who, v, *_ in theirs) or "—"
            diff = " / ".join(f"{stat(acc).mean - v:+.2f}" for _, v, *_ in theirs) or "—"
            macro_ref = next((f"{m:.2f}" for _, _, m, _, _ in theirs if m is not None), "—")
            weighted_ref = next((f"{w:.2f}" for _, _, _, w, _ in theirs if w is not None), "—")
            split = "studies'" if all(on_studies_split(r) for r in runs) else "**other**"
            main.append(f"| {folder.name} | {arm} | {len(runs)} | {split} | {reported} | {cell(acc)} | {diff} | "
                        f"{stat(acc).mean - FER_BEST:+.2f} | {macro_ref} | {cell([t['macro']['f1'] for t in tests])}"
                        f" | {weighted_ref} | {cell([t['weighted']['f1'] for t in tests])} |")
            f1 = [[t["per_class"]["f1"][k] for t in tests] for k in range(len(FER_CLASSES))]
            per_class.append(f"| {folder.name} | {arm} | " + " | ".join(cell(v) for v in f1) + " |")
    return "\n".join(main) + "\n\nPer-class F1 on the test set:\n\n" + "\n".join(per_class)


def accuracy(summary: dict, metric: str) -> float:
    if metric == "val" and summary.get("best_val") and not summary["name"].startswith("retrain-"):
        return summary["best_val"]["accuracy"] * 100
    return summary["test"]["accuracy"] * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="*", help="A-E (default: all, unless --fer-runs alone)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "runs-reproduce"))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fer-runs", nargs="*", type=Path, default=[],
                        help="study folders of the FER-2013 experiments to read (not train); alone: only those rows")
    args = parser.parse_args()
    if args.fer_runs:
        print(fer_rows(args.fer_runs))
        if args.studies is None:
            return
    if args.studies is None:
        args.studies = [s.key for s in STUDIES]
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
