"""The study report: run folders in, report.html (self-contained) and report.md (+ report_files/) out.

It reads only run folders, so `classlab report RUNS_DIR` re-makes it at any time without training.
"""

from __future__ import annotations

from pathlib import Path

from classlab.report.context import build_context
from classlab.report.load import load_study_runs
from classlab.report.render import write_pages


def make_report(study_folder: str | Path) -> tuple[Path, Path]:
    """Write report.html and report.md into the study folder; returns (html_path, md_path)."""
    folder = Path(study_folder)
    runs, failed = load_study_runs(folder)
    context, figures = build_context(folder.resolve().name, runs, failed)
    return write_pages(folder, "report", context, figures)


__all__ = ["make_report"]
