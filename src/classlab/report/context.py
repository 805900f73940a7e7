"""Turn loaded runs into the report's content: tables as formatted strings and figures as PNGs.

Both templates (HTML and Markdown) render this same context, so the two reports cannot drift apart.
Strings stay plain here; escaping is the templates' job (autoescape in HTML, a finalize filter in Markdown).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from classlab import __version__
from classlab.comparison import Stat, VariantRow, compare_runs, variant_of, within_noise
from classlab.report import plots
from classlab.report.load import FailedRun, RunData
from classlab.report.sanity import is_permuted, originals, sanity_notes

TOP_CONFUSED = 5
CHECKS = ("test accuracy near chance", "validation accuracy far above training accuracy",
          "a pixel-permuted run beating its original by more than the noise")


def slug(text: str) -> str:
    """A file-name-safe stem (user names never reach the file system as they are)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "run"


def pct(x: float) -> str:
    return f"{x * 100:.2f}"


def _accuracy_ci(s: Stat, scale: float = 100, digits: int = 2) -> str:
    if s.n < 2:
        return "—"
    low, high = max(s.mean - s.ci95, 0.0), min(s.mean + s.ci95, 1.0)  # an accuracy lies in [0, 1]
    return f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def comparison_rows(rows: list[VariantRow], permuted_of: dict[str, str]) -> list[dict[str, Any]]:
    best = max((r.accuracy.mean for r in rows), default=0.0)
    out = []
    for row in rows:
        near = [o.variant for o in rows if o is not row and within_noise(row.accuracy, o.accuracy)]
        out.append({
            "variant": row.variant, "seeds": row.accuracy.n, "runs": ", ".join(row.runs),
            "accuracy": row.accuracy.format(100), "ci": _accuracy_ci(row.accuracy),
            "loss": row.loss.format(1, 4), "macro_f1": row.macro_f1.format(1, 4),
            "parameters": f"{row.parameters:,}", "epochs": row.epochs.format(1, 1),
            "seconds": row.seconds.format(1, 1), "within_noise": near,
            "best": row.accuracy.mean == best, "permuted_of": permuted_of.get(row.variant),
        })
    return out


def run_rows(runs: list[RunData]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        s = run.summary
        rows.append({"name": run.name, "seed": s.get("seed", ""), "accuracy": pct(s["test"]["accuracy"]),
                     "loss": f"{s['test']['loss']:.4f}", "macro_f1": f"{s['test']['macro']['f1']:.4f}",
                     "epochs": s.get("epochs_run", len(run.metrics)), "best_epoch": s.get("best_epoch", ""),
                     "stopped_early": "yes" if s.get("stopped_early") else "no",
                     "seconds": f"{s.get('seconds', 0.0):.1f}"})
    return rows


def per_class_rows(test: dict, classes: list[str]) -> dict[str, Any]:
    pc = test["per_class"]
    rows = [{"name": c, "precision": f"{pc['precision'][i]:.3f}", "recall": f"{pc['recall'][i]:.3f}",
             "f1": f"{pc['f1'][i]:.3f}", "support": pc["support"][i]} for i, c in enumerate(classes)]
    averages = [{"name": f"{kind} avg", "precision": f"{test[kind]['precision']:.3f}",
                 "recall": f"{test[kind]['recall']:.3f}", "f1": f"{test[kind]['f1']:.3f}",
                 "support": test[kind]["support"]} for kind in ("macro", "weighted")]
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
    params = run.summary.get("parameters") or {}
    if run.model_rows is None and run.model_text is None:
        return None
    rows = [{"layer": r["layer"], "indent": int(r.get("depth", 0)), "type": r.get("type", ""),
             "lr": f"{r['lr']:g}" if r.get("lr") is not None else "",
             "output_shape": "×".join(str(d) for d in r.get("output_shape", [])[1:]) or "—",  # minus batch
             "params": f"{r.get('params', 0):,}", "trainable": f"{r.get('trainable', 0):,}",
             "frozen": f"{r.get('params', 0) - r.get('trainable', 0):,}"} for r in (run.model_rows or [])]
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


def run_section(index: int, run: RunData, permuted_of: dict[str, str]) -> tuple[dict[str, Any], list[plots.Plot]]:
    s = run.summary
    stem = f"{index:02d}-{slug(run.name)}"
    figures = [plots.learning_curves(run.metrics, s.get("best_epoch"), bool(s.get("stopped_early")),
                                     run.planned_epochs, f"{stem}-curves", run.name)] if run.metrics else []
    figures.append(plots.confusion(s["test"]["confusion_matrix"], run.classes, f"{stem}-confusion", run.name))
    mistakes = _mistakes(run, f"{stem}-mistakes")
    variant = variant_of(run.name)
    section = {
        "anchor": f"run-{index}", "name": run.name, "seed": s.get("seed", ""),
        "permuted": is_permuted(run), "original": permuted_of.get(variant),
        "accuracy": pct(s["test"]["accuracy"]), "loss": f"{s['test']['loss']:.4f}",
        "epochs_run": s.get("epochs_run", len(run.metrics)), "planned_epochs": run.planned_epochs,
        "best_epoch": s.get("best_epoch"), "stopped_early": bool(s.get("stopped_early")),
        "seconds": f"{s.get('seconds', 0.0):.1f}", "device": s.get("device", ""), "data": s.get("data") or {},
        "classes": run.classes,
        "curves": figures[0] if run.metrics else None, "confusion": figures[-1], "mistakes": mistakes,
        "per_class": per_class_rows(s["test"], run.classes),
        "confused": confused_pairs(s["test"]["confusion_matrix"], run.classes),
        "model": model_table(run),
    }
    return section, figures + ([mistakes] if mistakes else [])


def build_context(study_name: str, runs: list[RunData], failed: list[FailedRun]) -> tuple[dict[str, Any],
                                                                                           list[plots.Plot]]:
    """Everything the templates show, and every figure they reference."""
    rows = compare_runs([r.summary for r in runs]) if runs else []
    permuted_of = originals(runs)
    figures: list[plots.Plot] = []
    overlay = None
    if any(r.metrics for r in runs):
        overlay = plots.overlaid_curves([(r.name, variant_of(r.name), r.metrics) for r in runs if r.metrics],
                                        "00-study-curves", study_name)
        figures.append(overlay)
    sections = []
    for i, run in enumerate(runs, start=1):
        section, run_figures = run_section(i, run, permuted_of)
        sections.append(section)
        figures += run_figures
    context = {
        "study": study_name, "version": __version__, "n_runs": len(runs),
        "notes": sanity_notes(rows, runs) if runs else [], "checks": CHECKS,
        "comparison": comparison_rows(rows, permuted_of), "multi_seed": any(r.accuracy.n > 1 for r in rows),
        "all_runs": run_rows(runs), "overlay": overlay, "runs": sections, "failed": failed,
    }
    return context, figures
