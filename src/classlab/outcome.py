"""What a study run is asked to do (RunOptions: the CLI's flags) and what it gives back (StudyResult).

A leaf beside study.py, so the search driver (trials.py) can take and return them without importing the
orchestrator that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from classlab.config import StudyConfig
from classlab.results import RunSummary


@dataclass(frozen=True)
class RunOptions:
    """How `run_study` runs a study (the CLI's flags), apart from what the study file says.

    `storage`: Optuna storage (search.open_storage) that a search, or a grid's queue, lives in; `queue`:
    train a grid's runs as queued trials of that storage, `batch` popped at a time, so any number of workers
    (processes, machines) share the study, each run trained once. `steal_locks`: take over a run's lock
    (set for a trial Optuna saw the worker of die). `worker`: a process of `classlab run --jobs N`
    (it leaves select / retrain to its parent), `finish_only`: that parent's final pass of a search (no
    trials, only confirm / select / retrain); `retry_failed=False`
    (that parent's final pass) lists runs that failed as failed instead of retraining them, and
    `restart_retrain` retrains the selected variant from scratch even when `restart` is off.
    `restart_runs` retrains the named runs from scratch (`--restart-run NAME`), the others as usual."""

    device: str | None = None
    restart: bool = False
    restart_runs: frozenset[str] = frozenset()
    storage: str | None = None
    queue: bool = False
    batch: int = 1
    steal_locks: bool = False
    worker: bool = False
    finish_only: bool = False
    retry_failed: bool = True
    restart_retrain: bool = False


@dataclass
class StudyResult:
    study: StudyConfig
    folder: Path
    summaries: list[RunSummary]
    failed: list[str]
    selected: str | None = None
    busy: list[str] = field(default_factory=list)  # skipped: another process holds their lock
    waiting: list[str] = field(default_factory=list)  # runs of the whole study neither finished nor failed
    writer: bool = True  # this process wrote the run folders (rank 0 under torchrun): it prints and reports
    report: tuple[Path, Path] | None = None  # (html, md): the study's report, made once here (None: not made)
