"""Read everything the report needs from run folders only, so a report can be re-made without training.

A piece a run folder lacks (an older run, a half-copied folder) becomes None and its section says so,
rather than failing the whole report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classlab.errors import ClasslabError
from classlab.results import EpochRow, RunSummary, row_from, summary_from
from classlab.runs import RunFolder, atomic_write_json, find_failed, find_runs


@dataclass
class RunData:
    """One finished run as the report sees it."""

    name: str
    path: Path
    summary: RunSummary
    config: dict
    metrics: list[EpochRow]
    preprocessing: dict | None
    model_rows: list[dict] | None
    model_text: str | None
    predictions: dict[str, np.ndarray] | None

    def __post_init__(self) -> None:  # the typed results, also when given as the files' documents
        self.summary = summary_from(self.summary)
        self.metrics = [row_from(r) for r in self.metrics]

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.summary.classes]

    @property
    def planned_epochs(self) -> int | None:
        return (self.config.get("train") or {}).get("epochs")


@dataclass(frozen=True)
class FailedRun:
    name: str
    reason: str


@dataclass(frozen=True)
class LrSweep:
    """`classlab lr-find`'s sweep of one run of the study (a trained run or one not trained yet)."""

    name: str
    result: dict
    png: bytes | None


def _optional(read: Callable[[], Any]) -> Any:
    """What `read` returns, or None when the piece is missing or unreadable."""
    try:
        return read()
    except ClasslabError:
        return None


def load_run(folder: RunFolder) -> RunData:
    summary = folder.read_summary()
    model_text, model_table = folder.read_model_summary()
    return RunData(
        name=summary.name or folder.name,
        path=folder.path,
        summary=summary,
        config=folder.read_config() if folder.config_path.is_file() else {},
        metrics=folder.read_metrics(),
        preprocessing=_optional(folder.read_preprocessing),
        model_rows=model_table.get("rows") if model_table else None,
        model_text=model_text,
        predictions=folder.read_predictions(),
    )


def failed_runs(study_folder: Path) -> list[FailedRun]:
    """Runs that wrote failed.json instead of summary.json."""
    return [FailedRun(f.name, f.read_failed()) for f in find_failed(study_folder)]


RUN_ORDER = "run_order.json"  # beside the run folders: the study's run names in plan order (study.py writes it)


def write_run_order(study_folder: Path, names: list[str], variants: list[str] | None = None) -> None:
    """Record the study's run order, so the report lists runs as the terminal's table does, and its variants:
    which run folders belong to the study as its file now defines it (`outside_study`). A study folder
    that cannot be written is left to the first run folder to report (RunFolder.prepare says why)."""
    try:
        study_folder.mkdir(parents=True, exist_ok=True)
        doc = {"runs": list(names), **({"variants": list(dict.fromkeys(variants))} if variants is not None else {})}
        atomic_write_json(study_folder / RUN_ORDER, doc)
    except (OSError, ClasslabError):
        return


DERIVED = ("retrain-", "confirm-")  # runs a study plans from one of its variants after selection


def outside_study(study_folder: Path, names: list[str]) -> list[str]:
    """The run folders (of `names`) that the study's file, as last run, no longer plans: a variant removed or
    renamed since. They stay on disk and are listed as such, never compared. A `retrain-` / `confirm-` run
    belongs when the variant it comes from does. Without a recorded plan (an older folder) every run belongs."""
    try:
        doc = json.loads((study_folder / RUN_ORDER).read_text(encoding="utf-8"))
        planned, variants = set(doc["runs"]), doc.get("variants")
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(variants, list):  # recorded before variants were: the run names alone decide
        variants = sorted(planned)

    def belongs(name: str) -> bool:
        if name in planned:
            return True
        rest = next((name[len(p) :] for p in DERIVED if name.startswith(p)), None)
        return rest is not None and any(rest == v or rest.startswith(f"{v}-") for v in variants)

    return [n for n in names if not belongs(n)]


def run_order(study_folder: Path, names: list[str]) -> list[str]:
    """`names` in the study's recorded order; names it does not list (a retrain, an older folder) follow,
    in natural order (seed2 before seed10)."""
    try:
        recorded = json.loads((study_folder / RUN_ORDER).read_text(encoding="utf-8"))["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = []
    place = {str(n): i for i, n in enumerate(recorded)}

    def natural(name: str) -> tuple:
        return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)

    return sorted(names, key=lambda n: (place.get(n, len(place)), natural(n)))


def lr_sweeps(study_folder: Path) -> list[LrSweep]:
    """Every run folder's LR-finder sweep, in the study's run order."""
    found = {}
    for path in sorted(p for p in study_folder.iterdir() if p.is_dir()):
        result, png = RunFolder(path).read_lr_find()
        if result is not None:
            found[path.name] = LrSweep(path.name, result, png)
    return [found[n] for n in run_order(study_folder, list(found))]


def load_study_runs(study_folder: str | Path) -> tuple[list[RunData], list[FailedRun]]:
    """Every finished run (and every failed one) under a study folder, in the study's run order."""
    folder = Path(study_folder)
    if not folder.is_dir():
        raise ClasslabError(f"{folder}: no such study folder")
    found = find_runs(folder)
    outside = set(outside_study(folder, [f.name for f in found]))
    runs = [load_run(f) for f in found if f.name not in outside]  # the study as its file now defines it
    order = {n: i for i, n in enumerate(run_order(folder, [r.name for r in runs]))}
    runs.sort(key=lambda r: order[r.name])
    failed = [f for f in failed_runs(folder) if f.name not in set(outside_study(folder, [f.name]))]
    if not runs and not failed:
        raise ClasslabError(f"{folder}: no classlab runs found (no */summary.json); train with `classlab run` first")
    return runs, failed
