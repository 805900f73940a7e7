"""What watches a study train, behind one protocol: TensorBoard and MLflow are observers of the study (its
start and end, each fitted group of runs, each epoch, each run's end), called by study.py in one loop, so a
tracker is never a special case of the orchestrator. The report is the study's, made once; an observer only
gets its paths (MLflow logs them to the study's parent run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from classlab.runs import RunFolder


class StudyObserver(Protocol):
    """The study's events, in order: runs_start (a group about to be fitted: study._Prepared with cfg, folder,
    resume), epoch (member k's row, as a fit callback), runs_end (the group's fit returned or raised), run_end
    (each run finished or failed), study_end (with the report's paths, or None), abort (training stopped)."""

    def runs_start(self, ready: list[Any]) -> None: ...

    def epoch(self, k: int, row: dict, state: dict) -> None: ...

    def runs_end(self) -> None: ...

    def run_end(self, folder: RunFolder, failed: str | None) -> None: ...

    def study_end(self, failed: list[str], waiting: list[str], report: tuple[Path, Path] | None) -> None: ...

    def abort(self, error: BaseException) -> None: ...


class TensorBoardObserver:
    """Each run's epoch scalars into its own TensorBoard log folder, when its config says train.tensorboard."""

    def __init__(self) -> None:
        self.logger = None

    def runs_start(self, ready: list[Any]) -> None:
        from classlab.train.callbacks import TensorBoardLogger

        self.logger = TensorBoardLogger([p.folder.tensorboard_dir if p.cfg.train.tensorboard else None for p in ready])

    def epoch(self, k: int, row: dict, state: dict) -> None:
        if self.logger is not None:
            self.logger(k, row, state)

    def runs_end(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.logger = None

    def run_end(self, folder: RunFolder, failed: str | None) -> None:
        return None

    def study_end(self, failed: list[str], waiting: list[str], report: tuple[Path, Path] | None) -> None:
        return None

    def abort(self, error: BaseException) -> None:
        self.runs_end()


class MlflowObserver:
    """A study's MLflow runs (tracking.StudyTracker) as an observer: a child run per run, its epochs as they are
    trained, its summary and artifacts when it ends; the study's report on the parent run once no run is left."""

    def __init__(self, tracker) -> None:
        self.tracker, self.logger = tracker, None

    def runs_start(self, ready: list[Any]) -> None:
        self.logger = self.tracker.start_runs(ready)

    def epoch(self, k: int, row: dict, state: dict) -> None:
        if self.logger is not None:
            self.logger(k, row, state)

    def runs_end(self) -> None:
        self.logger = None

    def run_end(self, folder: RunFolder, failed: str | None) -> None:
        if failed is None:
            self.tracker.run_finished(folder)
        else:
            self.tracker.run_failed(folder, failed)

    def study_end(self, failed: list[str], waiting: list[str], report: tuple[Path, Path] | None) -> None:
        if report is not None and not waiting:  # the report of the whole study: only once no run is left
            self.tracker._guard(lambda: self.tracker.log_report(paths=report))
        self.tracker.close(failed, waiting, report=False)

    def abort(self, error: BaseException) -> None:
        self.tracker.abort(error)


def study_observers(study, folder: Path, planned: list, console=None) -> list[StudyObserver]:
    """TensorBoard (each run decides by train.tensorboard) and, when the study file asks, MLflow."""
    from classlab.tracking import open_tracker

    tracker = open_tracker(study, folder, planned, console)
    return [TensorBoardObserver(), *([MlflowObserver(tracker)] if tracker is not None else [])]
