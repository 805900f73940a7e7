"""The study report: run folders in, report.html (self-contained), report.md (+ report_files/) and
comparison.json (the paired tests, for scripts) out.

It reads only run folders, so `classlab report RUNS_DIR` re-makes it at any time without training.
"""

from __future__ import annotations

from pathlib import Path

from classlab.report.context import build_context, study_evidence
from classlab.report.load import load_study_runs, lr_sweeps, outside_study
from classlab.report.render import write_pages
from classlab.report.search_view import search_view
from classlab.runs import atomic_write_json, find_runs

COMPARISON_JSON = "comparison.json"
REPORT_FILES = ("report.html", "report.md", COMPARISON_JSON)  # what make_report writes (report_files/ aside)


def make_report(study_folder: str | Path, reference: str | None = None) -> tuple[Path, Path]:
    """Write report.html, report.md and comparison.json into the study folder; returns (html_path, md_path).

    `reference`: the variant every other is compared against (the study's selected cell); default: the
    variant a `retrain-` run retrained, else the first variant."""
    folder = Path(study_folder)
    try:
        runs, failed = load_study_runs(folder)  # only the runs the study's file (as last run) plans
        outside = outside_study(folder, [f.name for f in find_runs(folder)])
        tests = study_evidence(runs, reference)
        atomic_write_json(folder / COMPARISON_JSON, {"study": folder.resolve().name, **tests, "outside_study": outside})
        context, figures = build_context(folder.resolve().name, runs, failed, tests=tests, sweeps=lr_sweeps(folder))
        context["outside_study"] = outside
        context["search"], search_figures = search_view(folder)  # a search study's trials and confirmation
        figures += search_figures
        return write_pages(folder, "report", context, figures)
    except Exception:
        # a report that could not be re-made no longer describes the run folders: never leave it as if current
        for name in REPORT_FILES:
            (folder / name).unlink(missing_ok=True)
        raise


__all__ = ["COMPARISON_JSON", "make_report"]
