"""Searches and shared work queues on Optuna: the study's state lives in Optuna storage, so workers on any
number of processes or machines share one search (or one grid) and the same command again continues it.

- A `search:` study asks Optuna for trials; each trial is an ordinary run folder `trial-NNNN`, trained by
  study.py's trainer, pruned from its per-epoch validation metric through a fit callback.
- A grid study run by several workers (`--jobs N`, `--storage URL`) puts each planned run in the same
  storage as a fixed (enqueued) trial; a worker pops it, so each run is trained once.
- A worker that dies leaves a RUNNING trial: on an RDB (SQLite, PostgreSQL, MySQL) Optuna's heartbeat marks it
  failed and RetryFailedTrialCallback enqueues it again; on any storage, a trial of a process of this machine
  that no longer exists is failed and enqueued again at once. The retry keeps the trial's run folder, so it
  resumes from last.pt. Optuna's journal file has no heartbeat: a worker that died on another machine leaves
  its trial RUNNING until a worker is started on that machine again (then its pid is checked).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classlab.config import RunConfig, StudyConfig, deep_merge, set_dotted, validate
from classlab.errors import ClasslabError
from classlab.io import atomic_write_bytes, atomic_write_json
from classlab.plan import PlannedRun, grid_cells

if TYPE_CHECKING:
    import optuna

SEARCH_DB = "search.db"
JOURNAL = "search.journal"
SEARCH_DIR = "search"  # the study folder's search artifacts: search.json and the plots the report embeds
PRUNED = "pruned.json"  # a trial's run folder: stopped by the pruner (not failed)
HEARTBEAT_S, GRACE_S = 60, 180  # RDB heartbeat: a RUNNING trial silent for GRACE_S is failed and retried
PRIMITIVE = (type(None), bool, int, float, str)


# ----------------------------------------------------------------------------- storage


def storage_label(spec: str | None, folder: Path) -> str:
    """What `--storage` means, for messages: the URL, or the journal file's path."""
    if spec is None:
        return f"sqlite:///{folder / SEARCH_DB}"
    if spec == "journal":
        return f"journal:{folder / JOURNAL}"
    return spec


def open_storage(spec: str | None, folder: Path) -> optuna.storages.BaseStorage:
    """Optuna storage: SQLite `search.db` in the study folder (None), `journal` / `journal:PATH` (Optuna's
    journal file, for a shared file system without a database), or any RDB URL (postgresql://, mysql://)."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    quiet_optuna()
    label = storage_label(spec, folder)
    if label.startswith("journal:"):
        path = Path(label.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in label:
        raise ClasslabError(f"--storage '{spec}': give an RDB URL (sqlite:///path.db, postgresql://..., "
                            "mysql://...) or journal / journal:PATH")
    if label.startswith("sqlite:///"):
        Path(label.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(6):
        try:
            return RDBStorage(label, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                              engine_kwargs={"connect_args": {"timeout": 120}} if label.startswith("sqlite") else None)
        except Exception as e:  # SQLAlchemy: a bad URL, a missing driver, a server that does not answer
            racing = type(e).__name__ in ("IntegrityError", "OperationalError")  # workers creating the tables at once
            if racing and attempt < 5:
                time.sleep(0.5 + attempt)
                continue
            raise ClasslabError(f"--storage {label}: cannot open it ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]})") from None
    raise AssertionError("unreachable")


def quiet_optuna() -> None:
    """Optuna's log lines and its warnings about experimental arguments (heartbeat) and about ask/tell with a
    heartbeat (classlab beats itself: Heartbeat below) off: classlab prints what happens to each trial."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


WORKER_ENV = "CLASSLAB_WORKER"  # set by `--jobs` (launch.worker_env) and for Ray tasks: the worker's index


def worker_seed() -> int:
    """What a worker adds to search.seed, so workers sharing a search do not draw the same first trials (their
    samplers would otherwise start from one seed): `--jobs` worker i adds 1000 i; a worker started by hand with
    --storage on another machine sets CLASSLAB_WORKER itself (e.g. SLURM_ARRAY_TASK_ID); the one process of a
    plain run adds 0 (the search is reproducible)."""
    try:
        return 1000 * int(os.environ.get(WORKER_ENV, "0"))
    except ValueError:
        return 0


def open_optuna_study(study: StudyConfig, storage: Any, higher: bool) -> optuna.Study:
    """The Optuna study named after the classlab study, created on first use."""
    import optuna

    s = study.search
    seed = (s.seed if s else 0) + worker_seed()
    sampler: optuna.samplers.BaseSampler
    if s is None or s.sampler != "tpe":
        sampler = optuna.samplers.RandomSampler(seed=seed)  # grid cells are enqueued, never sampled
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if s is not None and s.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials)
    elif s is not None and s.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.create_study(study_name=str(study.name), storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize" if higher else "minimize", load_if_exists=True)


def delete_search(study: StudyConfig, storage: Any) -> None:
    """`--restart`: forget the search (or the grid's queue) in its storage; the run folders are retrained."""
    import optuna

    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=str(study.name), storage=storage)


# ----------------------------------------------------------------------------- the space


def space_of(study: StudyConfig) -> dict[str, dict[str, Any]]:
    """search.space with the study's grid keys joined as choices."""
    grid = {k: {"choice": list(v)} for k, v in (study.grid or {}).items()}
    return {**grid, **(study.search.space if study.search else {})}


def _encoded(values: list[Any]) -> list[Any]:
    """Optuna's categorical values are None / bool / int / float / str: anything else travels as JSON."""
    if all(isinstance(v, PRIMITIVE) for v in values):
        return values
    return [json.dumps(v) for v in values]


def _decoded(values: list[Any], chosen: Any) -> Any:
    return chosen if all(isinstance(v, PRIMITIVE) for v in values) else json.loads(chosen)


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Dotted key -> value for one trial (a fixed, enqueued trial gets its fixed values back)."""
    params = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            params[key] = _decoded(values, trial.suggest_categorical(key, _encoded(values)))
        elif kind == "int":
            params[key] = trial.suggest_int(key, values[0], values[1])
        else:
            params[key] = trial.suggest_float(key, float(values[0]), float(values[1]), log=kind == "loguniform")
    return params


def grid_params(space: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of a choices-only space, as Optuna's (encoded) params: `sampler: grid`'s trials."""
    cells = grid_cells({k: _encoded(spec["choice"]) for k, spec in space.items()})
    return [cell for _, cell in cells]


def trial_config(study: StudyConfig, params: dict[str, Any], name: str, seed: int, where: str = "") -> RunConfig:
    """The run config of a trial: the study's sections with the trial's dotted values set."""
    base = {"data": study.data, "model": study.model, "train": study.train, "eval": study.eval}
    override: dict[str, Any] = {}
    for key, value in params.items():
        set_dotted(override, key, value)
    return validate(RunConfig, {**deep_merge(base, override), "name": name, "seed": seed},
                    where=f"{where} trial {name}".strip())


# ----------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class Objective:
    """The metric a search optimizes: `select.by` (validation), read per epoch and from summary.json."""

    by: str
    higher: bool

    @property
    def row_key(self) -> str:  # the per-epoch key in fit's rows
        return "val_" + self.by.removeprefix("val_")

    @property
    def summary_key(self) -> str:  # the key in summary.json's kept_val
        return self.by.removeprefix("val_")

    def of(self, summary: dict) -> float | None:
        val = summary.get("kept_val") or summary.get("best_val") or {}
        value = val.get(self.summary_key)
        return None if value is None or not math.isfinite(value) else float(value)


def objective_of(study: StudyConfig) -> Objective:
    by = study.select.by if study.select is not None else "val_accuracy"
    try:  # the metric registry says which direction is better
        from classlab import metrics

        return Objective(by, metrics.get(by.removeprefix("val_")).higher_is_better)
    except (ImportError, KeyError):  # a registry without this name: the loss alone is lower-is-better
        return Objective(by, by != "val_loss")


class Pruning:
    """fit callback: reports each epoch's validation metric to the trial and stops a hopeless trial. It runs
    after the callback that saves the epoch, so the pruned trial's folder holds every epoch it trained."""

    def __init__(self, trial: optuna.Trial, objective: Objective, prune: bool = True) -> None:
        self.trial, self.objective, self.prune = trial, objective, prune

    def __call__(self, k: int, row: dict, state: dict) -> None:
        import optuna

        value = row.get(self.objective.row_key)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), row["epoch"])
        if self.prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {row['epoch']}: {self.objective.row_key} {value:.4f}")


# ----------------------------------------------------------------------------- queue bookkeeping


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _dead_here(frozen: optuna.trial.FrozenTrial) -> bool:
    from classlab.locks import _pid_alive

    host, pid = frozen.user_attrs.get("host"), frozen.user_attrs.get("pid")
    return host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def requeue(ostudy: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
    """Enqueue a trial again with its params and run folder (as Optuna's RetryFailedTrialCallback does)."""
    import optuna

    attrs = {k: v for k, v in frozen.user_attrs.items() if k not in ("host", "pid")}
    ostudy.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        user_attrs=attrs, system_attrs={"failed_trial": frozen.number}))


def reclaim(ostudy: optuna.Study) -> list[str]:
    """Trials left RUNNING by a dead worker: failed and enqueued again (their run folders resume). On an RDB
    Optuna's heartbeat does it for any machine; here, a worker of this machine whose process is gone."""
    import optuna
    from optuna.storages import fail_stale_trials

    with _quiet(), contextlib.suppress(Exception):  # a storage hiccup: the next worker's check does it
        fail_stale_trials(ostudy)  # RDB heartbeat; a no-op on storages without one
    names = []
    for frozen in ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if _dead_here(frozen):
            ostudy._storage.set_trial_state_values(frozen._trial_id, optuna.trial.TrialState.FAIL)
            requeue(ostudy, frozen)
            names.append(str(frozen.user_attrs.get("run", frozen.number)))
    return names


class _quiet:
    """Optuna's warnings (experimental features, retried trials) off for a block."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)


def queue_runs(ostudy: optuna.Study, planned: list[PlannedRun]) -> int:
    """Enqueue each planned run that has no COMPLETE, WAITING or RUNNING trial; returns how many."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    have = {t.user_attrs.get("run") for t in ostudy.get_trials(deepcopy=False, states=states)}
    todo = [p for p in planned if p.config.name not in have]
    for run in todo:
        ostudy.enqueue_trial({}, user_attrs={"run": run.config.name}, skip_if_exists=False)
    return len(todo)


def _waiting(ostudy: optuna.Study) -> int:
    import optuna

    return len(ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def pop(ostudy: optuna.Study, queue_only: bool) -> optuna.Trial | None:
    """The next trial for this worker (waiting ones first), its owner recorded; None when a queue-only study
    (a grid, sampler: grid) has nothing waiting. A queued run that a lower-numbered trial already trains or
    trained (two workers enqueued it at once) is given back as a duplicate and the next one taken."""
    import optuna

    TS = optuna.trial.TrialState
    while True:
        if queue_only and not _waiting(ostudy):
            return None
        trial = ostudy.ask()
        run = trial.user_attrs.get("run")
        if queue_only and run is None and "fixed_params" not in system_attrs(trial):
            # another worker popped the last waiting trial between the two calls: give this one back unused
            trial.set_user_attr("unused", True)
            ostudy.tell(trial, state=TS.FAIL)
            return None
        if run is not None and any(t.user_attrs.get("run") == run and t.number < trial.number
                                   for t in ostudy.get_trials(deepcopy=False, states=(TS.RUNNING, TS.COMPLETE))):
            trial.set_user_attr("duplicate", True)
            ostudy.tell(trial, state=TS.FAIL)
            continue
        for key, value in _owner().items():
            trial.set_user_attr(key, value)
        return trial


def system_attrs(trial: optuna.Trial) -> dict[str, Any]:
    """A live trial's system attributes (Optuna keeps them out of the Trial object)."""
    return trial.study._storage.get_trial_system_attrs(trial._trial_id)


class Heartbeat:
    """Records the heartbeat of the trials this worker holds (ask/tell has no thread of Optuna's own), so on
    an RDB a worker that dies is noticed GRACE_S later by any other worker."""

    def __init__(self, ostudy: optuna.Study) -> None:
        from optuna.storages._heartbeat import is_heartbeat_enabled

        storage = ostudy._storage
        self.storage = storage if is_heartbeat_enabled(storage) else None
        self.ids: set[int] = set()
        self.stop = threading.Event()
        if self.storage is not None:
            threading.Thread(target=self._beat, daemon=True).start()

    def hold(self, trial: optuna.Trial) -> None:
        if self.storage is not None:
            self.ids.add(trial._trial_id)
            self.storage.record_heartbeat(trial._trial_id)

    def drop(self, trial: optuna.Trial) -> None:
        self.ids.discard(trial._trial_id)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            for trial_id in list(self.ids):
                with contextlib.suppress(Exception):  # the storage hiccups: the next beat tries again
                    self.storage.record_heartbeat(trial_id)  # type: ignore[union-attr]

    def close(self) -> None:
        self.stop.set()


def give_back(ostudy: optuna.Study, trials: list[optuna.Trial]) -> None:
    """Ctrl-C / SIGTERM with trials in hand: failed and enqueued again, so the same command resumes them
    from their run folders (the trial count goes on where it stopped)."""
    import optuna

    for trial in trials:
        try:
            frozen = ostudy._storage.get_trial(trial._trial_id)
            if frozen.state == optuna.trial.TrialState.RUNNING:
                ostudy.tell(trial, state=optuna.trial.TrialState.FAIL)
                requeue(ostudy, frozen)
        except Exception:  # the storage is gone too: the dead-worker check does it next time
            pass


def mark_pruned(folder: Path, reason: str) -> None:
    atomic_write_json(folder / PRUNED, {"state": "pruned", "reason": reason})


def finished_count(ostudy: optuna.Study) -> int:
    """Trials that count against search.trials: complete and pruned ones."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(ostudy.get_trials(deepcopy=False, states=done))


def budget_left(ostudy: optuna.Study, trials: int | None) -> bool:
    """Whether to ask for another trial: finished + in flight below `search.trials`."""
    import optuna

    if trials is None:
        return True
    live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    return finished_count(ostudy) + len(ostudy.get_trials(deepcopy=False, states=live)) < trials


# ----------------------------------------------------------------------------- results of a search


def top_trials(ostudy: optuna.Study, n: int, higher: bool) -> list[optuna.trial.FrozenTrial]:
    """The n best complete trials with distinct params (a retried trial counts once)."""
    import optuna

    done = [t for t in ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    done.sort(key=lambda t: -t.value if higher else t.value)
    out, seen = [], set()
    for t in done:
        key = json.dumps(t.params, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out[:n]


def history(ostudy: optuna.Study) -> list[dict]:
    """Every trial as search.json lists it: number, run folder, state, params, value, per-epoch values."""
    rows = []
    for t in ostudy.get_trials(deepcopy=False):
        if t.user_attrs.get("unused") or t.user_attrs.get("duplicate"):
            continue
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "run": t.user_attrs.get("run"), "state": t.state.name.lower(),
                     "params": t.params, "value": t.value, "seconds": seconds,
                     "retry_of": t.system_attrs.get("failed_trial"),
                     "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())}})
    return rows


def write_artifacts(ostudy: optuna.Study, folder: Path, objective: Objective, extra: dict) -> dict:
    """search.json and the plots (history, importance, parallel coordinates) in <study>/search/, which the
    report reads; returns what search.json holds."""
    out = folder / SEARCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    importance: dict[str, float] = {}
    with _quiet():
        try:
            import optuna

            importance = {k: float(v) for k, v in optuna.importance.get_param_importances(ostudy).items()}
        except Exception:  # fewer than two complete trials, or a single value: nothing to rank
            importance = {}
    doc = {"metric": objective.by, "direction": "max" if objective.higher else "min", "importance": importance,
           "trials": history(ostudy), **extra}
    plots = {}
    for name, draw in (("history", _plot_history), ("importance", _plot_importance), ("parallel", _plot_parallel)):
        png = draw(ostudy, importance)
        if png is not None:
            atomic_write_bytes(out / f"{name}.png", png)
            plots[name] = f"{SEARCH_DIR}/{name}.png"
    doc["plots"] = plots
    atomic_write_json(out / "search.json", doc)
    return doc


def _png(draw: Callable[[], Any]) -> bytes | None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _quiet():
        try:
            ax = draw()
        except Exception:  # too few trials for this plot
            plt.close("all")
            return None
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(max(fig.get_size_inches()[0], 7), max(fig.get_size_inches()[1], 4))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close("all")
    return buf.getvalue()


def _plot_history(ostudy: optuna.Study, importance: dict) -> bytes | None:
    from optuna.visualization.matplotlib import plot_optimization_history

    return _png(lambda: plot_optimization_history(ostudy))


def _plot_importance(ostudy: optuna.Study, importance: dict) -> bytes | None:
    if not importance:
        return None
    from optuna.visualization.matplotlib import plot_param_importances

    return _png(lambda: plot_param_importances(ostudy))


def _plot_parallel(ostudy: optuna.Study, importance: dict) -> bytes | None:
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    if not importance:
        return None
    return _png(lambda: plot_parallel_coordinate(ostudy))


def read_search(study_folder: Path) -> dict | None:
    """search.json of a study folder (None when the study is not a search): what the report shows."""
    path = Path(study_folder) / SEARCH_DIR / "search.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def timed_out(started: float, timeout: float | None) -> bool:
    return timeout is not None and time.monotonic() - started >= timeout
