"""Read everything the report needs from run folders only, so a report can be re-made without training.

A piece a run folder lacks (an older run, a half-copied folder) becomes None and its section says so,
rather than failing the whole report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classlab.errors import ClasslabError
from classlab.runs import RunFolder, find_runs


@dataclass
class RunData:
    """One finished run as the report sees it."""

    name: str
    path: Path
    summary: dict
    config: dict
    metrics: list[dict]
    preprocessing: dict | None
    model_rows: list[dict] | None
    model_text: str | None
    predictions: dict[str, np.ndarray] | None

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.summary.get("classes", [])]

    @property
    def planned_epochs(self) -> int | None:
        return (self.config.get("train") or {}).get("epochs")


@dataclass(frozen=True)
class FailedRun:
    name: str
    reason: str


def _optional_json(folder: RunFolder, name: str) -> dict | None:
    path = folder.path / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _predictions(path: Path) -> dict[str, np.ndarray] | None:
    """predictions.npz holds plain arrays only; allow_pickle stays off so it can never run code."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError):
        return None


def load_run(folder: RunFolder) -> RunData:
    summary = folder.read_summary()
    text_path = folder.path / "model_summary.txt"
    model_json = _optional_json(folder, "model_summary.json")
    return RunData(
        name=str(summary.get("name", folder.name)),
        path=folder.path,
        summary=summary,
        config=folder.read_config() if folder.config_path.is_file() else {},
        metrics=folder.read_metrics(),
        preprocessing=_optional_json(folder, "preprocessing.json"),
        model_rows=model_json.get("rows") if model_json else None,
        model_text=text_path.read_text(encoding="utf-8") if text_path.is_file() else None,
        predictions=_predictions(folder.path / "predictions.npz"),
    )


def failed_runs(study_folder: Path) -> list[FailedRun]:
    """Runs that wrote failed.json instead of summary.json."""
    out = []
    for path in sorted(study_folder.glob("*/failed.json")):
        if (path.parent / "summary.json").is_file():
            continue
        try:
            reason = str(json.loads(path.read_text(encoding="utf-8")).get("reason", ""))
        except (OSError, json.JSONDecodeError, AttributeError):
            reason = "failed.json unreadable"
        out.append(FailedRun(path.parent.name, reason))
    return out


def load_study_runs(study_folder: str | Path) -> tuple[list[RunData], list[FailedRun]]:
    """Every finished run (and every failed one) under a study folder."""
    folder = Path(study_folder)
    if not folder.is_dir():
        raise ClasslabError(f"{folder}: no such study folder")
    runs = [load_run(f) for f in find_runs(folder)]
    failed = failed_runs(folder)
    if not runs and not failed:
        raise ClasslabError(f"{folder}: no classlab runs found (no */summary.json); train with `classlab run` first")
    return runs, failed
