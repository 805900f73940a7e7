"""MLflow tracking: a study's runs as MLflow runs, when the study file says `track: {mlflow: {...}}`.

One MLflow run per classlab run, nested under one parent run for the study (MLflow's `mlflow.parentRunId`
tag), in the experiment `track.mlflow.experiment` (default: the study's name). Each run gets the resolved
RunConfig flattened to dotted params (`train.lr`, `data.permute_pixels.seed`, ...), its per-epoch metrics as
they are trained (a `fit` callback, step = epoch), then the summary's scalar metrics (`test.accuracy`,
`test.<metric>`, `best_val.loss`, ...), the confusion matrix (JSON and CSV) and the run folder's small files
as artifacts, and with `log_model` the exported model (classlab.export: ONNX or TorchScript, with its
preprocessing.json and classes.txt). Tags: `classlab.seed`, `classlab.variant` (the run without its seed
suffix: the grid cell) and `classlab.grid.<key>` for each grid axis. The study's report goes to the parent.

Runs are found again by tags, never by a file in the run folder: a resumed run continues its MLflow run
(epochs its killed process saved but did not log are logged first), a restarted run gets a new one, a run
finished without tracking is logged whole when a tracked study passes it, and the processes of `--jobs` or
`--shard` share one parent run. Everything goes through one `MlflowClient` (no global active run). A logging
error warns once and training goes on; mlflow itself is an optional dependency (`classlab[mlflow]`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import math
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from classlab.config import RunConfig, StudyConfig, validate
from classlab.errors import ClasslabError, one_line
from classlab.plan import PlannedRun, run_config_dict
from classlab.results import EpochRow, RunSummary
from classlab.runs import RunFolder, find_runs
from classlab.train.callbacks import epoch_scalars

PARENT = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
STUDY_KEY, STUDY_DIR, STUDY = "classlab.study_key", "classlab.study_dir", "classlab.study"
RUN_DIR, RUN, SEED, VARIANT = "classlab.run_dir", "classlab.run", "classlab.seed", "classlab.variant"
GRID = "classlab.grid."
MAX_PARAM = 6000  # MLflow's limit on a param value's length
BATCH = 100  # params per log_batch call (MLflow's limit); metrics go 1000 at a time


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise ClasslabError("track.mlflow needs the mlflow package: pip install 'classlab[mlflow]'") from None
    for name in ("alembic", "mlflow.store.db.utils"):  # the sqlite store's schema set-up talks on INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}; lists stay whole (a cnn's layers are one param)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def param_value(value: Any) -> str:
    """A param as MLflow stores it: scalars as Python writes them, lists and None as JSON."""
    import json

    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) or value is None \
        else str(value)
    return text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 3] + "..."


def params_of(cfg: RunConfig) -> dict[str, str]:
    """The resolved run config as flat MLflow params (what a run logs; the tests read them back)."""
    return {key: param_value(v) for key, v in flatten(run_config_dict(cfg)).items()}


def metric_key(key: str) -> str:
    """MLflow allows letters, digits, `_ - . / ` and spaces in a metric name; anything else becomes `_`."""
    return re.sub(r"[^\w\-./ ]", "_", key)


def summary_metrics(summary: RunSummary | dict) -> dict[str, float]:
    """summary.json's finite numbers, flattened: test.accuracy, test.<metric>, best_val.loss, seconds, ..."""
    summary = summary.to_json() if isinstance(summary, RunSummary) else summary
    skip = {"seed", "format", "classes", "confusion_matrix"}
    out = {}
    for key, value in flatten({k: v for k, v in summary.items() if k not in skip}).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if key.rsplit(".", 1)[-1] in skip:
            continue
        out[metric_key(key)] = float(value)
    return out


def epoch_metrics(row: dict | EpochRow) -> dict[str, float]:
    """One metrics.jsonl row (a `fit` callback's row) as MLflow metrics: every number it has (each validation
    metric of the registry included), lr groups as lr.<group>."""
    return {metric_key(k): v for k, v in epoch_scalars(row).items()}


def confusion_csv(classes: list[str], matrix: list[list[int]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, matrix, strict=True):
        writer.writerow([name, *row])
    return buf.getvalue()


@contextlib.contextmanager
def _store_lock(uri: str):
    """One process at a time opens a store on this machine: the processes of `--jobs` start together, and two
    of them creating a new sqlite store at once corrupt its schema migration (and may both make a parent run)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = Path(tempfile.gettempdir()) / f"classlab-mlflow-{hashlib.sha1(uri.encode()).hexdigest()[:16]}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _key(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20]


class StudyTracker:
    """A study's parent MLflow run and its children; made by `open_tracker`, used by study.py."""

    def __init__(self, study: StudyConfig, folder: Path, planned: list[PlannedRun], console=None) -> None:
        mlflow = _mlflow()
        from mlflow.entities import Metric, Param, RunTag

        self.Metric, self.Param, self.RunTag = Metric, Param, RunTag
        self.cfg = study.track.mlflow
        self.study, self.folder, self.console = study, folder, console
        self.variants = {p.config.name: p.variant for p in planned}
        self.variants.update({"retrain-" + p.config.name: "retrain-" + p.variant for p in planned})
        self.grid = list(study.grid or {})
        self.live: dict[str, str] = {}  # run folder -> MLflow run id, runs this process is training
        self.warned = False
        uri = self.cfg.uri or mlflow.get_tracking_uri()
        try:
            with _store_lock(uri), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # alembic's, while a new sqlite store gets its tables
                self.client = mlflow.MlflowClient(tracking_uri=uri)
                self.experiment_id = self._experiment()
                self.parent_id = self._parent()
        except ClasslabError:
            raise
        except Exception as e:
            raise ClasslabError(f"track.mlflow: cannot use {uri}: {type(e).__name__}: {one_line(e)[:200]}") from None

    # ------------------------------------------------------------------------- the experiment and the study's run

    def _experiment(self) -> str:
        name = self.cfg.experiment or str(self.study.name)
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise ClasslabError(f"track.mlflow.experiment '{name}' is deleted in {self.cfg.uri}; restore it "
                                    "or choose another name")
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.cfg.artifact_location)
        except Exception:  # another process created it in between
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _search(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000, page_token=token,
                                           order_by=["attributes.start_time ASC"])
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _parents(self) -> list:
        runs = self._search(f"tags.`{STUDY_KEY}` = '{_key(self.folder)}'")
        return sorted((r for r in runs if PARENT not in r.data.tags), key=lambda r: (r.info.start_time, r.info.run_id))

    def _parent(self) -> str:
        """The study's parent run: found by the study folder's key, else created. Two processes starting at once
        (--jobs, --shard) may both create one: each then keeps the oldest and deletes its own."""
        found = self._parents()
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {STUDY_KEY: _key(self.folder), STUDY_DIR: str(self.folder.resolve()), STUDY: str(self.study.name)}
        mine = self.client.create_run(self.experiment_id, tags=tags, run_name=str(self.study.name)).info.run_id
        self.client.log_batch(mine, params=[self.Param("seeds", param_value(self.study.seeds)),
                                            self.Param("grid", param_value(self.study.grid)),
                                            self.Param("out_dir", self.study.out_dir)])
        oldest = self._parents()[0].info.run_id
        if oldest != mine:
            self.client.delete_run(mine)
        return oldest

    def _children(self) -> dict[str, list]:
        """The parent's child runs by run folder, oldest first."""
        out: dict[str, list] = {}
        for r in self._search(f"tags.`{PARENT}` = '{self.parent_id}'"):
            out.setdefault(r.data.tags.get(RUN_DIR, ""), []).append(r)
        return out

    # ------------------------------------------------------------------------- one classlab run

    def _tags(self, cfg: RunConfig, folder: RunFolder) -> dict[str, str]:
        from classlab.evidence import variant_of

        tags = {PARENT: self.parent_id, RUN_DIR: str(folder.path.resolve()), RUN: cfg.name, SEED: str(cfg.seed),
                VARIANT: self.variants.get(cfg.name, variant_of(cfg.name)), STUDY: str(self.study.name)}
        flat = flatten(run_config_dict(cfg))
        for key in self.grid:
            if key in flat:
                tags[GRID + key] = param_value(flat[key])
        return tags

    def _create(self, cfg: RunConfig, folder: RunFolder) -> str:
        run_id = self.client.create_run(self.experiment_id, tags=self._tags(cfg, folder), run_name=cfg.name).info.run_id
        params = [self.Param(k, v) for k, v in params_of(cfg).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(run_id, params=params[i: i + BATCH])
        return run_id

    def _log_metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i: i + 1000])

    def _log_epochs(self, run_id: str, rows: list[EpochRow], after: int = 0) -> None:
        for row in rows:
            if row.epoch > after:
                self._log_metrics(run_id, epoch_metrics(row), row.epoch)

    def start_runs(self, ready: list) -> EpochLogger:
        """The MLflow runs of runs about to be fitted (study._Prepared: cfg, folder, resume), and the fit callback
        that logs their epochs. A resumed run continues its latest MLflow run; a fresh one gets a new run."""
        ids: list[str | None] = []
        children = self._guard(self._children) or {}
        for prep in ready:
            key = str(prep.folder.path.resolve())
            old = children.get(key, [])

            def start(prep=prep, old=old) -> str:
                if prep.resume is not None and old:
                    run_id = old[-1].info.run_id
                    self.client.update_run(run_id, status="RUNNING")
                    logged = self.client.get_metric_history(run_id, "train_loss")
                    self._log_epochs(run_id, prep.folder.read_metrics(), max((m.step for m in logged), default=0))
                    return run_id
                for r in old:  # a restart: an unfinished earlier attempt stays, marked killed
                    if r.info.status == "RUNNING":
                        self.client.set_terminated(r.info.run_id, "KILLED")
                run_id = self._create(prep.cfg, prep.folder)
                if prep.resume is not None:  # resumed, but its start was never logged: its saved epochs first
                    self._log_epochs(run_id, prep.folder.read_metrics())
                return run_id

            run_id = self._guard(start)
            if run_id is not None:
                self.live[key] = run_id
            ids.append(run_id)
        return EpochLogger(self, ids)

    def run_finished(self, folder: RunFolder) -> None:
        """A run's summary metrics and artifacts (and model, when asked), then its MLflow run is finished."""
        run_id = self.live.pop(str(folder.path.resolve()), None)
        if run_id is not None:
            self._guard(lambda: self._finish(run_id, folder))

    def run_failed(self, folder: RunFolder, reason: str) -> None:
        run_id = self.live.pop(str(folder.path.resolve()), None)
        if run_id is not None:
            self._guard(lambda: (self.client.set_tag(run_id, "classlab.failed", reason[:5000]),
                                 self.client.set_terminated(run_id, "FAILED")))

    def _finish(self, run_id: str, folder: RunFolder) -> None:
        summary = folder.read_summary()
        self._log_metrics(run_id, summary_metrics(summary), summary.kept_epoch or 0)
        self.client.set_tag(run_id, "classlab.weights", summary.weights)
        matrix = summary.test.confusion_matrix if summary.test is not None else None
        classes = summary.classes
        if matrix is not None:
            self.client.log_dict(run_id, {"classes": classes, "true_by_predicted": matrix}, "confusion_matrix.json")
            self.client.log_text(run_id, confusion_csv(classes, matrix), "confusion_matrix.csv")
        for path in (folder.summary_path, folder.config_path, folder.preprocessing_path, folder.metrics_path,
                     folder.model_text_path, folder.run_log_path):
            if path.is_file():
                self.client.log_artifact(run_id, str(path), "run")
        if self.cfg.log_model:
            self._log_model(run_id, folder)
        self.client.set_terminated(run_id, "FINISHED")

    def _log_model(self, run_id: str, folder: RunFolder) -> None:
        from classlab.export import SUFFIX, export_run

        fmt = "torchscript" if self.cfg.log_model == "torchscript" else "onnx"
        with tempfile.TemporaryDirectory(prefix="classlab-export-") as tmp:
            try:
                export_run(folder.path, Path(tmp) / f"model{SUFFIX[fmt]}", fmt)
            except ClasslabError as e:
                self._warn(f"{folder.name}: model not logged to MLflow: {one_line(e)}")
                return
            self.client.log_artifacts(run_id, tmp, "model")

    # ------------------------------------------------------------------------- the end of a study

    def close(self, failed: list[str], waiting: list[str], report: bool = True, reference: str | None = None
              ) -> tuple[Path, Path] | None:
        """Log finished runs that have no MLflow run yet (trained before tracking was on), the report (made here,
        with `reference` as the comparisons' reference; its paths are returned, so the CLI does not make it
        again), and end the parent run: FINISHED (or FAILED when a run failed) once no run of the study is
        left, else it stays open."""
        def finish() -> None:
            children = self._children()
            for folder in find_runs(self.folder):
                if folder.name not in self.variants:
                    continue
                old = children.get(str(folder.path.resolve()), [])
                if not old:
                    cfg = validate(RunConfig, folder.read_config(), where=str(folder.config_path))
                    run_id = self._create(cfg, folder)
                    self._log_epochs(run_id, folder.read_metrics())
                    self._finish(run_id, folder)
                elif old[-1].info.status == "RUNNING" and not folder.lock_path.exists():
                    self._finish(old[-1].info.run_id, folder)  # finished by a process that did not track

        self._guard(finish)
        if waiting:
            return None
        paths = self._guard(lambda: self.log_report(reference=reference)) if report else None
        self._guard(lambda: self.client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED"))
        return paths

    def log_report(self, paths: tuple[Path, Path] | None = None, reference: str | None = None
                   ) -> tuple[Path, Path] | None:
        """The study's report (report.html, report.md and its files) as the parent run's artifacts; made here
        unless `paths` (html, md) says where a caller has just written it. Returns the paths."""
        from classlab.report import make_report

        try:
            html, md = paths if paths is not None else make_report(self.folder, reference=reference)[:2]
        except Exception as e:  # the report is a bonus here: `classlab report` can always re-make it
            self._warn(f"report not logged to MLflow: {type(e).__name__}: {one_line(e)[:200]}")
            return None
        self.client.log_artifact(self.parent_id, str(html), "report")
        self.client.log_artifact(self.parent_id, str(md), "report")
        files = md.parent / f"{md.stem}_files"
        if files.is_dir():
            self.client.log_artifacts(self.parent_id, str(files), f"report/{files.name}")
        return html, md

    def abort(self, error: BaseException) -> None:
        """Training stopped (Ctrl-C, an error): the runs in progress and the parent are marked killed / failed;
        the same command later resumes them."""
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        for run_id in [*self.live.values(), self.parent_id]:
            self._guard(lambda r=run_id: self.client.set_terminated(r, status))
        self.live.clear()

    # ------------------------------------------------------------------------- errors

    def _guard(self, fn):
        """Run an MLflow call; an error warns once and training goes on (a tracker must not lose a study)."""
        try:
            return fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            self._warn(f"MLflow logging failed ({type(e).__name__}: {one_line(e)[:200]}); training goes on")
            return None

    def _warn(self, text: str) -> None:
        if self.warned and text.startswith("MLflow logging failed"):
            return
        self.warned = self.warned or text.startswith("MLflow logging failed")
        if self.console is not None:
            self.console.print(f"warning: {text}", style="yellow", markup=False, highlight=False, soft_wrap=True)
        else:
            sys.stderr.write(f"warning: {text}\n")


class EpochLogger:
    """`fit` callback: member k's epoch row as MLflow metrics (step = epoch) in its run."""

    def __init__(self, tracker: StudyTracker, run_ids: list[str | None]) -> None:
        self.tracker, self.run_ids = tracker, run_ids

    def __call__(self, k: int, row: dict, state: dict) -> None:
        run_id = self.run_ids[k]
        if run_id is not None:
            self.tracker._guard(lambda: self.tracker._log_metrics(run_id, epoch_metrics(row), row["epoch"]))


def open_tracker(study: StudyConfig, folder: Path, planned: list[PlannedRun], console=None) -> StudyTracker | None:
    """The study's tracker when its file asks for one (`track.mlflow`), else None."""
    if study.track.mlflow is None:
        return None
    return StudyTracker(study, folder, planned, console)
