"""Turn loaded runs into the report's content: tables as formatted strings and figures as PNGs.

Both templates (HTML and Markdown) render this same context, so the two reports cannot drift apart.
Strings stay plain here; escaping is the templates' job (autoescape in HTML, a finalize filter in Markdown).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classlab import __version__, evidence, metrics
from classlab.errors import ClasslabError
from classlab.evidence import Stat, VariantRow, against_reference, compare_runs, variant_of, within_noise
from classlab.report import plots
from classlab.report.load import FailedRun, LrSweep, RunData, load_study_runs
from classlab.report.sanity import is_permuted, originals, sanity_notes
from classlab.results import RunSummary, SplitMetrics
from classlab.runs import RunFolder
from classlab.tables import with_child_totals

TOP_CONFUSED = 5
CHECKS = ("test accuracy near chance", "validation accuracy far above training accuracy",
          "a pixel-permuted run beating its original by more than the noise", "classes with no test images",
          "Grad-CAM maps of a pixel-permuted run against its original's", "warnings in each run.log")


def seconds_digits(seconds: float) -> int:
    """Decimals that show a run's time as more than 0.0: a stacked run's amortized share of its group's seconds
    (train/fit.py) is often a few hundredths."""
    import math

    return 1 if seconds >= 1 or seconds <= 0 else min(4, 1 - math.floor(math.log10(seconds)))


def slug(text: str) -> str:
    """A file-name-safe stem (user names never reach the file system as they are)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "run"


def pct(x: float) -> str:
    return f"{x * 100:.2f}"


def _accuracy_ci(s: Stat, scale: float = 100, digits: int = 2) -> str:
    if s.n < 2:
        return "—"
    if not s.has_interval:
        return "needs ≥ 3 seeds"
    low, high = max(s.mean - s.ci95, 0.0), min(s.mean + s.ci95, 1.0)  # an accuracy lies in [0, 1]
    return f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def comparison_rows(rows: list[VariantRow], permuted_of: dict[str, str],
                    tests: list[dict] | None = None) -> list[dict[str, Any]]:
    """The comparison table; with the paired tests (`tests`), each variant's accuracy difference against the
    reference and its verdict."""
    best = max((r.accuracy.mean for r in rows), default=0.0)
    out = []
    for row in rows:
        near = [o.variant for o in rows if o is not row and within_noise(row.accuracy, o.accuracy)]
        vs, call = against_reference(row.variant, tests or [])
        out.append({
            "variant": row.variant, "seeds": row.accuracy.n, "runs": ", ".join(row.runs),
            **{name: metrics.get(name).format_stat(getattr(row, name)) for name in metrics.TABLE},
            "ci": _accuracy_ci(row.accuracy),
            "parameters": f"{row.parameters:,}", "epochs": row.epochs.format(1, 1),
            "seconds": row.seconds.format(1, seconds_digits(row.seconds.mean)), "within_noise": near,
            "best": row.accuracy.mean == best, "permuted_of": permuted_of.get(row.variant),
            "vs_reference": vs, "verdict": call,
        })
    return out


def points(x: float) -> str:
    """A difference of two fractions, in percentage points with its sign."""
    return f"{x * 100:+.2f}"


def points_interval(row: dict) -> str:
    return f"[{row['ci_low'] * 100:+.2f}, {row['ci_high'] * 100:+.2f}]"


def p_text(p: float | None) -> str | None:
    if p is None:
        return None
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def evidence_inputs(runs: list[RunData]) -> list[evidence.RunPredictions]:
    """The runs whose predictions.npz holds test labels and predictions (older folders may lack it)."""
    from classlab.runs import RunFolder

    out = []
    for run in runs:
        oof = RunFolder(run.path).read_oof()  # a data.cv fold: its verdicts are on its held-out part
        if oof is not None:
            out.append(evidence.run_predictions(run.name, oof["y_true"], oof["probs"], fold=tuple(oof["fold"]),
                                                train_size=(run.summary.data or {}).get("train")))
            continue
        pred = run.predictions or {}
        if "y_true" not in pred or ("y_pred" not in pred and "probs" not in pred):
            continue
        out.append(evidence.run_predictions(run.name, pred["y_true"], pred.get("probs"), pred.get("y_pred"),
                                            worst_index=pred.get("worst_index"),
                                            worst_images=pred.get("worst_images")))
    return out


def evidence_settings(folder: Path) -> dict[str, Any]:
    """evidence.json beside the run folders (study.py writes it): the selected variant, select.by and
    evidence.min_effect; empty for a folder without one."""
    try:
        doc = json.loads((folder / evidence.SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def selection_optimism(runs: list[RunData], settings: dict[str, Any]) -> dict[str, Any] | None:
    """The selected variant's validation score at selection beside its fresh (`confirm-`) seeds' score."""
    selected, by = settings.get("selected"), settings.get("select_by")
    if not selected or not by:
        return None
    fresh = f"confirm-{selected}"
    try:
        scores = evidence.validation_scores([r.summary for r in runs if variant_of(r.name) in (selected, fresh)], by)
    except ValueError:
        return None
    if selected not in scores or fresh not in scores:
        return None
    higher = bool(settings.get("higher_is_better", True))
    gap = evidence.optimism(scores[selected], scores[fresh], higher)
    at, now = float(np.mean(scores[selected])), float(np.mean(scores[fresh]))
    text = (f"optimism: {gap * 100:+.2f} points (validation {by.removeprefix('val_')} of {selected}: "
            f"{at * 100:.2f} at selection on {len(scores[selected])} seed(s), {now * 100:.2f} on "
            f"{len(scores[fresh])} fresh seed(s) of {fresh}, the test reference)")
    return {"selected": selected, "by": by, "selection": at, "fresh": now, "optimism": gap, "text": text}


def study_evidence(runs: list[RunData], reference: str | None = None) -> dict[str, Any]:
    """The paired tests of the study as comparison.json holds them: every variant against the reference."""
    inputs = evidence_inputs(runs)
    settings = evidence_settings(runs[0].path.parent) if runs else {}
    variants = list(dict.fromkeys(r.variant for r in inputs))
    ref = evidence.reference_variant(variants, reference or settings.get("selected")) if variants else None
    rows = evidence.compare_study(inputs, reference=ref, min_effect=settings.get("min_effect"))
    return {"reference": ref, "alpha": evidence.ALPHA, "correction": evidence.CORRECTION,
            "questions": evidence.QUESTIONS, "optimism": selection_optimism(runs, settings),
            "diff": "a - b (a: the variant, b: the reference), as a fraction", "rows": rows,
            "without_predictions": [r.name for r in runs if r.name not in {i.name for i in inputs}]}


def folder_tests(folder: Path, names: set[str], reference: str | None = None) -> list[dict]:
    """The paired tests of the named runs of a study folder (none when the folder cannot be read): the
    terminal's comparison table shows them before the report is written."""
    try:
        runs, _ = load_study_runs(folder)
    except ClasslabError:
        return []
    return study_evidence([r for r in runs if r.name in names], reference)["rows"]


def evidence_rows(tests: list[dict]) -> list[dict[str, Any]]:
    """The 'Is the difference real?' table, formatted."""
    out = []
    for t in tests:
        compared = t["diff"] is not None
        out.append({"a": t["a"], "b": t["b"], "metric": "accuracy" if t["metric"] == "accuracy" else "macro F1",
                    "diff": points(t["diff"]) if compared else None,
                    "ci": points_interval(t) if compared else None,
                    "p": p_text(t["p_value"]), "p_adjusted": p_text(t["p_adjusted"]), "test": t["test"],
                    "verdict": t["verdict"], "seeds": f"{t['n_seeds_a']} / {t['n_seeds_b']}",
                    "power": t.get("power"), "reason": t.get("reason") or t.get("note"),
                    "question": t.get("question") or "—",
                    "tone": "better" if t["verdict"] in (evidence.BETTER, evidence.MODEL_BETTER) else "worse",
                    "detected": t["verdict"] in evidence.DETECTED})
    return out


def seed_views(runs: list[RunData], study_name: str) -> tuple[plots.Plot | None, list[dict[str, Any]]]:
    """With ≥ 2 seeds in some variant: one curve per variant (mean, min–max band over seeds) and each such
    variant's mean confusion matrix."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(variant_of(run.name), []).append(run)
    if not any(len(g) > 1 for g in groups.values()):
        return None, []
    curves = None
    if any(r.metrics for r in runs):
        curves = plots.seed_band_curves([(v, [r.metrics for r in g if r.metrics]) for v, g in groups.items()
                                         if any(r.metrics for r in g)], "00-study-curves", study_name)
    views = []
    for index, (variant, group) in enumerate(groups.items(), start=1):
        if len(group) < 2:
            continue
        mean = np.mean([np.asarray(r.summary.test.confusion_matrix, dtype=float) for r in group], axis=0)
        plot = plots.confusion(mean, group[0].classes, f"00-variant-{index:02d}-{slug(variant)}-confusion",
                               f"{variant} (mean over {len(group)} seeds)", "{:.1f}", "mean counts")
        views.append({"variant": variant, "seeds": len(group), "confusion": plot})
    return curves, views


def out_of_fold_views(runs: list[RunData]) -> list[dict[str, Any]]:
    """data.cv: per cross-validated variant, the confusion matrix and per-class F1 of its folds' held-out
    predictions together, which cover every training image once per repeat (and seed)."""
    from classlab.data.folds import out_of_fold
    from classlab.runs import RunFolder

    groups: dict[str, list[tuple[RunData, dict]]] = {}
    for run in runs:
        oof = RunFolder(run.path).read_oof()
        if oof is not None:
            groups.setdefault(variant_of(run.name), []).append((run, oof))
    views = []
    for index, (variant, group) in enumerate(groups.items(), start=1):
        classes = group[0][0].classes
        pooled = out_of_fold([oof for _, oof in group], len(classes))
        cm = pooled["confusion"] / pooled["passes"]
        plot = plots.confusion(cm, classes, f"00-oof-{index:02d}-{slug(variant)}-confusion",
                               f"{variant}: out-of-fold ({len(group)} folds)", "{:.0f}" if pooled["passes"] == 1
                               else "{:.1f}", "counts" if pooled["passes"] == 1 else "mean counts per repeat")
        pc = pooled["per_class"]
        rows = [{"name": c, "precision": f"{pc['precision'][i]:.3f}", "recall": f"{pc['recall'][i]:.3f}",
                 "f1": f"{pc['f1'][i]:.3f}", "support": f"{pc['support'][i] / pooled['passes']:.0f}"}
                for i, c in enumerate(classes)]
        gap = None if pooled["complete"] else (
            f"the folds cover {pooled['covered']} of {pooled['pool_size']} training images (a fold run is missing "
            "or failed)")
        views.append({"variant": variant, "folds": len(group), "passes": pooled["passes"],
                      "images": pooled["pool_size"], "confusion": plot, "per_class": rows, "gap": gap,
                      "scores": {name: f"{float(value):.3f}" for name, value in metrics.of_confusion(
                          torch.as_tensor(pooled["confusion"], dtype=torch.float64), metrics.EVIDENCE).items()}})
    return views


def two_variant_diff(runs: list[RunData], reference: str | None) -> tuple[dict[str, Any] | None, list[plots.Plot]]:
    """For a study of exactly two variants: per-class differences with intervals, the confusion difference and
    the images one gets right and the other wrong."""
    inputs = evidence_inputs(runs)
    variants = list(dict.fromkeys(r.variant for r in inputs))
    if len(variants) != 2 or len({variant_of(r.name) for r in runs}) != 2:
        return None, []
    b = evidence.reference_variant(variants, reference)
    a = next(v for v in variants if v != b)
    runs_a, runs_b = [r for r in inputs if r.variant == a], [r for r in inputs if r.variant == b]
    diff = evidence.variant_diff(runs_a, runs_b)
    if diff is None:
        return None, []
    classes = next(r.classes for r in runs if variant_of(r.name) == a)
    classes = classes + [str(i) for i in range(len(classes), len(diff["per_class"]))]
    rows = []
    for c in diff["per_class"]:
        row = {"name": classes[c["class"]]}
        for key in ("recall", "f1"):
            d = c[key]
            row[key] = {"a": f"{d['a']:.3f}", "b": f"{d['b']:.3f}", "diff": points(d["diff"]),
                        "ci": points_interval(d), "excludes_zero": d["ci_low"] > 0 or d["ci_high"] < 0}
        rows.append(row)
    figures = [plots.confusion_difference(diff["confusion_diff"], classes, (a, b), "00-variant-diff-confusion")]
    blocks = []
    for label, side, a_is_right in ((f"{a} right, {b} wrong", diff["a_only"], True),
                                    (f"{b} right, {a} wrong", diff["b_only"], False)):
        pred_a, pred_b = (side["pred_right"], side["pred_wrong"]) if a_is_right else (side["pred_wrong"],
                                                                                     side["pred_right"])
        captions = [f"true: {plots.short(classes[t], 14)}\n{plots.short(a, 10)}: {plots.short(classes[x], 12)}\n"
                    f"{plots.short(b, 10)}: {plots.short(classes[y], 12)}"
                    for t, x, y in zip(side["true"], pred_a, pred_b, strict=True)]
        blocks.append((label, side["images"], captions))
    gallery = None
    if any(len(images) for _, images, _ in blocks):
        gallery = plots.disagreement_gallery(blocks, "00-variant-diff-gallery", f"{a} against {b}")
        figures.append(gallery)
    section = {"a": a, "b": b, "test": diff["test"], "rows": rows, "confusion": figures[0], "gallery": gallery,
               "a_only": diff["a_only"]["count"], "b_only": diff["b_only"]["count"],
               "a_shown": len(diff["a_only"]["index"]), "b_shown": len(diff["b_only"]["index"])}
    return section, figures


def run_rows(runs: list[RunData]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        s = run.summary
        rows.append({"name": run.name, "seed": s.seed if s.seed is not None else "", **test_values(s),
                     "balanced_accuracy": balanced(s) or "—",
                     "epochs": s.epochs_run or len(run.metrics), "best_epoch": s.best_epoch or "",
                     "stopped_early": "yes" if s.stopped_early else "no",
                     "seconds": f"{s.seconds:.{seconds_digits(s.seconds)}f}"})
    return rows


def test_values(summary: RunSummary) -> dict[str, str]:
    """The comparison table's metrics (metrics.TABLE) of a run's test split, formatted by the registry."""
    return {name: metrics.get(name).format(summary.test_value(name)) for name in metrics.TABLE}


def per_class_rows(test: SplitMetrics, classes: list[str]) -> dict[str, Any]:
    pc = test.per_class
    rows = [{"name": c, "precision": f"{pc['precision'][i]:.3f}", "recall": f"{pc['recall'][i]:.3f}",
             "f1": f"{pc['f1'][i]:.3f}", "support": pc["support"][i]} for i, c in enumerate(classes)]
    averages = [{"name": f"{kind} avg", "precision": f"{avg['precision']:.3f}", "recall": f"{avg['recall']:.3f}",
                 "f1": f"{avg['f1']:.3f}", "support": int(avg["support"])}
                for kind, avg in (("macro", test.macro), ("weighted", test.weighted))]
    return {"rows": rows, "averages": averages}


def confused_pairs(matrix: list[list[int]], classes: list[str], top: int = TOP_CONFUSED) -> list[dict[str, Any]]:
    """The largest off-diagonal cells: which true class is most often taken for which."""
    cm = np.asarray(matrix)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), cm.shape[1])
        if off[i, j] <= 0:
            break
        row_total = cm[i].sum()
        pairs.append({"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
                      "share": f"{off[i, j] / row_total * 100:.1f}" if row_total else "—"})
    return pairs


def model_table(run: RunData) -> dict[str, Any] | None:
    params = run.summary.parameters
    if run.model_rows is None and run.model_text is None:
        return None
    rows = [{"layer": r["layer"], "indent": int(r.get("depth", 0)), "type": r.get("type", ""),
             "lr": f"{r['lr']:g}" if r.get("lr") is not None else "",
             "output_shape": "×".join(str(d) for d in r.get("output_shape", [])[1:]) or "—",  # minus batch
             "params": f"{r.get('params', 0):,}", "trainable": f"{r.get('trainable', 0):,}",
             "frozen": f"{r.get('params', 0) - r.get('trainable', 0):,}"}
            for r in with_child_totals(run.model_rows or [])]  # a block: the sum of its layers, not 0
    return {"rows": rows, "text": run.model_text,
            "total": f"{params.get('total', 0):,}", "trainable": f"{params.get('trainable', 0):,}",
            "frozen": f"{params.get('frozen', 0):,}"}


def _mistakes(run: RunData, key: str) -> plots.Plot | None:
    pred = run.predictions
    if not pred or "worst_images" not in pred or len(pred["worst_images"]) == 0:
        return None
    index = pred["worst_index"]
    classes = run.classes
    true = [classes[int(t)] for t in pred["y_true"][index]]
    guess = [classes[int(p)] for p in pred["y_pred"][index]]
    prob = [float(pred["probs"][i, int(p)]) for i, p in zip(index, pred["y_pred"][index], strict=True)]
    return plots.mistakes_grid(pred["worst_images"], true, guess, prob, key, run.name)


def model_origin(run: RunData) -> list[str]:
    """Where the run's model and input came from: the architecture and its weights, then run.log's
    preprocessing lines (input size, any resize from the stored size, mean / std and where each came from)."""
    from classlab.runs import RunFolder

    model = run.config.get("model") or {}
    weights = model.get("pretrained", "none")
    lines = [f"model: {model.get('name', '?')}, weights: "
             + ("none (trained from scratch)" if weights in (None, "none") else str(weights))]
    log = RunFolder(run.path).read_run_log()
    start = next((i for i, line in enumerate(log) if line.startswith("preprocessing:")), None)
    if start is not None:
        lines.append(log[start])
        lines += [line.strip() for line in log[start + 1 :] if line.startswith("  ")][:8]
    return lines


def run_section(index: int, run: RunData, permuted_of: dict[str, str]) -> tuple[dict[str, Any], list[plots.Plot]]:
    s = run.summary
    stem = f"{index:02d}-{slug(run.name)}"
    figures = [plots.learning_curves(run.metrics, s.best_epoch, s.stopped_early,
                                     run.planned_epochs, f"{stem}-curves", run.name)] if run.metrics else []
    figures.append(plots.confusion(s.test.confusion_matrix, run.classes, f"{stem}-confusion", run.name))
    mistakes = _mistakes(run, f"{stem}-mistakes")
    variant = variant_of(run.name)
    section = {
        "anchor": f"run-{index}", "name": run.name, "seed": s.seed if s.seed is not None else "",
        "permuted": is_permuted(run), "original": permuted_of.get(variant),
        **test_values(s), "epochs_run": s.epochs_run or len(run.metrics), "planned_epochs": run.planned_epochs,
        "best_epoch": s.best_epoch, "stopped_early": s.stopped_early,
        "seconds": f"{s.seconds:.{seconds_digits(s.seconds)}f}", "device": s.device, "data": s.data or {},
        "classes": run.classes,
        "curves": figures[0] if run.metrics else None, "confusion": figures[-1], "mistakes": mistakes,
        "per_class": per_class_rows(s.test, run.classes),
        "confused": confused_pairs(s.test.confusion_matrix, run.classes),
        "model": model_table(run),
        "origin": model_origin(run),
    }
    views, view_figures = understanding(run, stem)
    section.update(views)
    return section, figures + ([mistakes] if mistakes else []) + view_figures


# ----------------------------------------------------------------------------- understanding the model


def balanced(summary: RunSummary) -> str | None:
    value = summary.test_value("balanced_accuracy")
    return metrics.get("balanced_accuracy").format(value) if value is not None else None


def with_balanced_accuracy(rows: list[dict[str, Any]], runs: list[RunData]) -> list[dict[str, Any]]:
    """Each comparison row with its variant's test balanced accuracy (mean ± std over seeds; — for runs whose
    summary predates it)."""
    from classlab.evidence import stat

    values: dict[str, list[float]] = {}
    for run in runs:
        value = run.summary.test_value("balanced_accuracy")
        if value is not None:
            values.setdefault(variant_of(run.name), []).append(value)
    return [{**row, "balanced_accuracy": stat(values[row["variant"]]).format(100) if row["variant"] in values
             else "—"} for row in rows]


def class_distribution(run: RunData) -> dict[str, Any] | None:
    """Images per class in each split (summary.json's data.class_counts), with each class's share."""
    counts = (run.summary.data or {}).get("class_counts")
    if not counts:
        return None
    splits = [name for name in ("train", "val", "test") if counts.get(name)]
    totals = {name: sum(counts[name]) for name in splits}
    rows = [{"name": c, "cells": [f"{counts[n][i]} ({counts[n][i] / totals[n] * 100:.1f}%)" if totals[n] else "0"
                                  for n in splits]} for i, c in enumerate(run.classes)]
    train = [c for c in counts.get("train", []) if c > 0]
    ratio = f"{max(train) / min(train):.1f}" if train else None
    return {"splits": ["validation" if n == "val" else n for n in splits], "rows": rows,
            "totals": [totals[n] for n in splits], "imbalance": ratio}


def calibration(run: RunData, key: str) -> tuple[dict[str, Any] | None, plots.Plot | None]:
    """ECE and the reliability diagram: from summary.json's "calibration" (before and after temperature
    scaling), else (an older run) from the probabilities in predictions.npz."""
    cal = run.summary.calibration
    if cal is None:
        pred = run.predictions or {}
        if "probs" not in pred or "y_true" not in pred:
            return None, None
        import torch

        from classlab.metrics import ece_of, reliability_bins

        rel = reliability_bins(torch.from_numpy(pred["probs"]), torch.from_numpy(pred["y_true"]).long())
        cal = {"temperature": None, "ece": ece_of(rel), "reliability": rel}
    t = cal.get("temperature")
    panels = [("test set", cal["reliability"], cal["ece"])]
    if t is not None:
        panels = [("before temperature scaling", cal["reliability_before"], cal["ece_before"]),
                  (f"after (T = {t:.3f})", cal["reliability"], cal["ece"])]
    figure = plots.reliability_diagram(panels, key, run.name)
    view = {"ece": f"{cal['ece']:.4f}", "temperature": f"{t:.3f}" if t is not None else None,
            "ece_before": f"{cal['ece_before']:.4f}" if t is not None else None,
            "loss_before": f"{cal['loss_before']:.4f}" if t is not None and "loss_before" in cal else None,
            "val": cal.get("val"), "figure": figure}
    return view, figure


def tta_view(run: RunData) -> dict[str, Any] | None:
    tta = run.summary.test_tta
    if not tta:
        return None
    plain = run.summary.test_value("accuracy")
    return {"views": ", ".join(tta["views"]), "plain": pct(plain), "diff": points(tta["accuracy"] - plain),
            **{m.name: m.format(tta[m.name]) for m in metrics.METRICS.values() if tta.get(m.name) is not None}}


def cam_view(run: RunData, key: str) -> tuple[dict[str, Any] | None, plots.Plot | None]:
    """Grad-CAM maps of the predicted class on the worst mistakes, as the run stored them when it finished
    (gradcam.npz; the report runs no model); {"reason": ...} when there are none (no convolution, a run
    trained before the maps were stored)."""
    pred = run.predictions
    if not pred or "worst_images" not in pred or len(pred["worst_images"]) == 0:
        return None, None
    stored = RunFolder(run.path).read_gradcam()
    if stored is None or stored["maps"] is None or len(stored["maps"]) != len(pred["worst_images"]):
        reason = stored["reason"] if stored is not None and stored["maps"] is None else (
            "not stored with this run (trained by an older classlab, or its maps do not match its mistakes); "
            "retrain it to get them, or see one image's with classlab predict --cam")
        return {"figure": None, "layer": None, "autocorrelation": None, "smoothness": "—",
                "reason": reason or "not stored with this run"}, None
    maps, layer, autocorrelation = stored["maps"], stored["layer"], stored["autocorrelation"]
    index = pred["worst_index"]
    guess = [int(p) for p in pred["y_pred"][index]]
    classes = run.classes
    figure = plots.cam_grid(pred["worst_images"], maps, [classes[int(t)] for t in pred["y_true"][index]],
                            [classes[g] for g in guess], [float(pred["probs"][i, g]) for i, g in
                                                          zip(index, guess, strict=True)], key, run.name, layer)
    return {"figure": figure, "layer": layer, "reason": None, "autocorrelation": autocorrelation,
            "smoothness": f"{autocorrelation:.2f}" if autocorrelation is not None else "—"}, figure


def understanding(run: RunData, stem: str) -> tuple[dict[str, Any], list[plots.Plot]]:
    """The run section's balanced accuracy, class distribution, calibration, TTA and Grad-CAM parts."""
    cal, reliability = calibration(run, f"{stem}-reliability")
    cam, cam_figure = cam_view(run, f"{stem}-gradcam")
    views = {"balanced_accuracy": balanced(run.summary), "distribution": class_distribution(run),
             "calibration": cal, "tta": tta_view(run), "cam": cam}
    return views, [f for f in (reliability, cam_figure) if f is not None]


def lr_find_views(sweeps: Sequence[LrSweep]) -> tuple[list[dict[str, Any]], list[plots.Plot]]:
    """The LR finder's suggestion and plot per swept run (`classlab lr-find` writes them into the run folder)."""
    views, figures = [], []
    for i, sweep in enumerate(sweeps, start=1):
        r = sweep.result
        alt = f"LR finder: loss against learning rate, {sweep.name}"
        figure = plots.Plot(f"lr-find-{i:02d}-{slug(sweep.name)}", alt, sweep.png) if sweep.png else None
        figures += [figure] if figure else []
        clear = r.get("clear_descent", True)  # no clear descent: no suggestion (lr_find.descent)
        views.append({"name": sweep.name, "suggested": f"{r['suggested']:.3g}" if clear else
                      f"none: no clear descent (falls {r.get('descent', 0):.1%})",
                      "min_over_10": f"{r['min_over_10']:.3g}", "configured": f"{r['configured']:g}",
                      "steps": len(r.get("lrs", [])), "figure": figure})
    return views, figures


def build_context(study_name: str, runs: list[RunData], failed: list[FailedRun], reference: str | None = None,
                  tests: dict[str, Any] | None = None, sweeps: Sequence[LrSweep] = ()
                  ) -> tuple[dict[str, Any], list[plots.Plot]]:
    """Everything the templates show, and every figure they reference. `tests`: study_evidence's result when
    the caller already has it (it also writes comparison.json), else computed here."""
    rows = compare_runs([r.summary for r in runs]) if runs else []
    permuted_of = originals(runs)
    tests = tests if tests is not None else study_evidence(runs, reference)
    figures: list[plots.Plot] = []
    overlay, seeded = seed_views(runs, study_name)
    out_of_fold = out_of_fold_views(runs)
    figures += [v["confusion"] for v in out_of_fold]
    if overlay is None and any(r.metrics for r in runs):
        overlay = plots.overlaid_curves([(r.name, variant_of(r.name), r.metrics) for r in runs if r.metrics],
                                        "00-study-curves", study_name)
    figures += [overlay] if overlay else []
    figures += [v["confusion"] for v in seeded]
    diff, diff_figures = two_variant_diff(runs, tests["reference"])
    figures += diff_figures
    lr_finds, lr_figures = lr_find_views(sweeps)
    figures += lr_figures
    sections = []
    for i, run in enumerate(runs, start=1):
        section, run_figures = run_section(i, run, permuted_of)
        sections.append(section)
        figures += run_figures
    cam_scores = {s["name"]: s["cam"]["autocorrelation"] for s in sections
                  if s["cam"] and s["cam"].get("autocorrelation") is not None}
    context = {
        "study": study_name, "version": __version__, "n_runs": len(runs),
        "notes": sanity_notes(rows, runs, cam_scores) if runs else [], "checks": CHECKS,
        "comparison": with_balanced_accuracy(comparison_rows(rows, permuted_of, tests["rows"]), runs),
        "multi_seed": any(r.accuracy.n > 1 for r in rows),
        "reference": tests["reference"], "evidence": evidence_rows(tests["rows"]),
        "evidence_tests": list(dict.fromkeys(t["test"] for t in tests["rows"] if t["test"])),
        "evidence_pairs": len({(t["a"], t["b"]) for t in tests["rows"] if t["p_value"] is not None}),
        "without_predictions": tests["without_predictions"], "alpha": tests["alpha"],
        "optimism": (tests.get("optimism") or {}).get("text"),
        "seeded": seeded, "seed_bands": bool(seeded) and overlay is not None, "variant_diff": diff,
        "out_of_fold": out_of_fold,
        "all_runs": run_rows(runs), "overlay": overlay, "runs": sections, "failed": failed, "lr_finds": lr_finds,
        "outside_study": [], "search": None,  # a study folder's: filled by report.make_report from its files
    }
    return context, figures
