"""Running a search study (`search:`) and a shared grid queue: trials and queued runs are trained by
study.py's trainer into ordinary run folders; Optuna (search.py) only decides what runs next and records
the outcome. After the search: its artifacts, the confirmation of the best settings with fresh seeds and
the paired tests, then select and retrain as in any study."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from classlab import search
from classlab.config import RunConfig, StudyConfig, validate
from classlab.errors import ClasslabError
from classlab.outcome import RunOptions, StudyResult
from classlab.plan import PlannedRun, retrain_plan, run_config_dict
from classlab.runs import RunFolder
from classlab.train import distributed

if TYPE_CHECKING:
    import optuna



_Trainer = Any  # study._Trainer: trains, claims and finishes runs (passed in, never imported: no cycle)


def _say(console: Console, text: str, style: str | None = None) -> None:
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"


def _outcome(ostudy: optuna.Study, trial: optuna.Trial, folder: RunFolder, objective: search.Objective | None,
             busy: bool) -> str:
    """Tell Optuna how the trial's run folder ended; returns the state's word."""
    import optuna

    TS = optuna.trial.TrialState
    if busy:  # another live process holds the run's lock: it trains the run, this trial gives it up
        trial.set_user_attr("busy", True)
        ostudy.tell(trial, state=TS.FAIL)
        return "busy"
    if folder.is_complete:
        value = objective.of(folder.read_summary()) if objective is not None else None
        if value is None and objective is not None:
            trial.set_user_attr("reason", f"no validation {objective.summary_key} in summary.json")
            ostudy.tell(trial, state=TS.FAIL)
            return "failed"
        ostudy.tell(trial, 0.0 if value is None else value)
        return "complete"
    if folder.is_failed:
        trial.set_user_attr("reason", folder.read_failed())
    ostudy.tell(trial, state=TS.FAIL)
    return "failed"


# ----------------------------------------------------------------------------- a grid's shared queue


@contextlib.contextmanager
def _holding(ostudy: optuna.Study | None) -> Iterator[tuple[list[Any], Any]]:
    """The trials a worker holds and its heartbeat: on any exit the heartbeat stops; on an error (Ctrl-C, a
    crash) the trials still held go back to the storage for another worker."""
    beat = search.Heartbeat(ostudy) if ostudy is not None else None
    held: list[Any] = []
    try:
        yield held, beat
    except BaseException:
        if ostudy is not None and held:
            search.give_back(ostudy, held)
        raise
    finally:
        if beat is not None:
            beat.close()


def work_queue(trainer: _Trainer, planned: list[PlannedRun], ostudy: optuna.Study | None, restart: bool,
               batch: int) -> None:
    """Pop queued runs until none is left, `batch` at a time (runs popped together may train stacked), and
    train them; rank 0 talks to the storage, every rank trains."""
    by_name = {p.config.name: p for p in planned}
    with _holding(ostudy) as (held, beat):
        while True:
            def take() -> list[str]:
                held.clear()
                while len(held) < batch:
                    trial = search.pop(ostudy, queue_only=True)
                    if trial is None:
                        break
                    name = trial.user_attrs.get("run")
                    if name not in by_name:  # a run of an older version of the study file: not this study's
                        trial.set_user_attr("reason", "not a run of the study file any more")
                        ostudy.tell(trial, state=_fail())
                        continue
                    beat.hold(trial)
                    held.append(trial)
                return [t.user_attrs["run"] for t in held]

            names = distributed.decided_by_main(take)
            if not names:
                return
            busy_before = len(trainer.busy)
            trainer.train([by_name[n] for n in names], restart)
            if distributed.is_main():
                busy = set(trainer.busy[busy_before:])
                for trial in held:
                    name = trial.user_attrs["run"]
                    _outcome(ostudy, trial, trainer.run_folder(by_name[name]), None, name in busy)
                    beat.drop(trial)
                held.clear()


def _fail() -> Any:
    import optuna

    return optuna.trial.TrialState.FAIL


def open_queue(study: StudyConfig, folder: Path, planned: list[PlannedRun], storage: str | None,
               restart: bool, console: Console) -> optuna.Study:
    """The grid's queue in Optuna storage: every planned run without a live or finished trial enqueued;
    runs of dead workers of this machine enqueued again; `restart` starts the queue over."""

    store = search.open_storage(storage, folder)
    if restart:
        search.delete_search(study, store)
    ostudy = search.open_optuna_study(study, store, higher=True)
    again = search.reclaim(ostudy)
    if again:
        _say(console, f"resuming run(s) of stopped workers: {', '.join(again)}", "cyan")
    added = search.queue_runs(ostudy, planned)
    _say(console, f"queue {search.storage_label(storage, folder)}: {added} run(s) enqueued, "
                  f"{search._waiting(ostudy)} waiting", "dim")
    return ostudy


# ----------------------------------------------------------------------------- a search


def run_search(path: str | Path, study: StudyConfig, options: RunOptions, console: Console,
               trainer_type: type[_Trainer]) -> StudyResult:
    """Train a search study's trials (this process is one of its workers), then, unless it is a `--jobs`
    worker or other workers still train trials, finish it: artifacts, confirmation, select, retrain.
    `trainer_type` is study._Trainer, handed in by study.run_study (this module does not import the study)."""
    from classlab.train.device import resolve_device

    folder = Path(study.out_dir).expanduser() / str(study.name)
    objective = search.objective_of(study)
    base = search.trial_config(study, {}, "trial-check", study.seeds[0], str(path))
    if base.data.val_fraction is None and base.data.cv is None:
        raise ClasslabError(f"{path}: search needs a validation split to score trials: set data.val_fraction")
    dev, joined = distributed.setup(resolve_device(options.device or base.train.device))
    writer = distributed.is_main()
    if not writer:
        console = Console(quiet=True)
    trainer = trainer_type(folder, dev, console, options)
    started = time.perf_counter()
    try:
        ostudy = None
        if writer:
            store = search.open_storage(options.storage, folder)
            if options.restart and not options.worker:  # --restart: the search starts over (its trials retrain)
                search.delete_search(study, store)
            ostudy = search.open_optuna_study(study, store, objective.higher)
        if ostudy is not None and not options.finish_only:
            _enqueue_grid(study, ostudy)
            again = search.reclaim(ostudy)
            if again:
                _say(console, f"resuming trial(s) of stopped workers: {', '.join(again)}", "cyan")
            s = study.search
            budget = f"{s.trials} trials" if s.trials else ""
            if s.timeout:
                budget += (" / " if budget else "") + f"{s.timeout:g}s"
            _say(console, f"{study.name}: search, {budget or 'every grid cell'}, {search.finished_count(ostudy)} "
                          f"finished, storage {search.storage_label(options.storage, folder)}, on {dev}")
        if not options.finish_only:
            _work(study, str(path), ostudy, trainer, objective, console, options.restart)
        result = StudyResult(study, folder, [], trainer.failed, writer=writer)
        if options.worker:
            return result
        finished = distributed.decided_by_main(lambda: _still_running(ostudy) if ostudy is not None else 0)
        if finished:
            _say(console, f"{finished} trial(s) are still being trained by other workers; when they are done, run "
                          f"the same command again to confirm, select and report", "yellow")
            result.waiting = [f"{finished} trial(s)"]
            result.writer = False
            return result
        summaries, selected = finish_search(study, str(path), ostudy, trainer, objective, console,
                                            restart_retrain=options.restart or options.restart_retrain)
        _say(console, f"study finished in {time.perf_counter() - started:.1f}s", "dim")
        return StudyResult(study, folder, summaries, trainer.failed, selected, busy=trainer.busy, writer=writer)
    finally:
        distributed.cleanup(joined)


def _enqueue_grid(study: StudyConfig, ostudy: optuna.Study) -> None:
    """`sampler: grid`: every combination a fixed trial, enqueued once (by the first worker to mark it)."""
    if study.search.sampler != "grid" or ostudy.user_attrs.get("grid_enqueued"):
        return
    cells = search.grid_params(search.space_of(study))
    ostudy.set_user_attr("grid_enqueued", len(cells))
    for cell in cells:
        ostudy.enqueue_trial(cell, skip_if_exists=True)


def _still_running(ostudy: optuna.Study) -> int:
    """Trials other live workers are training now (a dead worker's are enqueued again, for the next run)."""
    import optuna

    search.reclaim(ostudy)
    return len(ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def ask_trial(study: StudyConfig, where: str, ostudy: optuna.Study, started: float) -> optuna.Trial | None:
    """The next trial (its values suggested, so any process can rebuild its config from storage), or None
    when the budget (trials, timeout) is spent or a grid has nothing waiting."""
    s = study.search
    if search.timed_out(started, s.timeout):
        return None
    # waiting trials (retries of interrupted ones, grid cells) are in the budget already: always taken first
    queue_only = s.sampler == "grid" or not search.budget_left(ostudy, s.trials)
    trial = search.pop(ostudy, queue_only=queue_only)
    if trial is None:
        return None
    trial.set_user_attr("run", trial.user_attrs.get("run") or trial_name(trial.number))
    search.suggest(trial, search.space_of(study))
    return trial


def trial_run_config(study: StudyConfig, where: str, trial: optuna.Trial) -> RunConfig:
    params = search.suggest(trial, search.space_of(study))  # a trial's suggestions are fixed once made
    return search.trial_config(study, params, trial.user_attrs["run"], study.seeds[0], where)


def train_trial(raw: dict, trial: optuna.Trial | None, trainer: _Trainer, objective: search.Objective,
                console: Console, prune: bool, retried: bool, ostudy: optuna.Study | None,
                restart: bool = False) -> str:
    """Train one trial's run folder (resuming it when a retry finds it begun), pruned from its per-epoch
    validation metric, and tell Optuna the outcome (rank 0); returns complete / pruned / failed / busy."""
    import optuna

    cfg = validate(RunConfig, raw)
    folder = RunFolder(trainer.folder / cfg.name)
    trainer.callbacks = [search.Pruning(trial, objective, prune)] if trial is not None else []
    trainer.options = replace(trainer.options, steal_locks=retried)  # Optuna saw its worker die
    busy_before = len(trainer.busy)
    pruned: str | None = None
    try:
        trainer._train_group([(cfg, folder)], restart=restart)  # --restart: a new search's trial-NNNN
    except optuna.TrialPruned as e:
        pruned = str(e)
    finally:
        trainer.callbacks = []
    if ostudy is None or trial is None:
        return "pruned" if pruned is not None else "complete" if folder.is_complete else "failed"
    if pruned is not None:
        search.mark_pruned(folder.path, pruned)
        ostudy.tell(trial, state=optuna.trial.TrialState.PRUNED)
        _say(console, f"{cfg.name}: pruned at {pruned}", "yellow")
        return "pruned"
    state = _outcome(ostudy, trial, folder, objective, len(trainer.busy) > busy_before)
    if state == "complete":
        _say(console, f"{cfg.name}: {objective.by} {ostudy._storage.get_trial(trial._trial_id).value:.4f}", "dim")
    return state


def _work(study: StudyConfig, where: str, ostudy: optuna.Study | None, trainer: _Trainer,
          objective: search.Objective, console: Console, restart: bool = False) -> None:
    """Ask, train, tell, until the budget (trials, timeout) is spent or a grid has nothing waiting. Under
    torchrun rank 0 asks and hands every rank the trial's config."""
    s = study.search
    space = search.space_of(study)
    started = time.monotonic()
    prune = s.pruner != "none" and not distributed.is_distributed()  # fit has no cross-rank stop: off under DDP
    with _holding(ostudy) as (held, beat):
        while True:
            def ask() -> tuple[dict, bool, int] | None:
                held.clear()
                trial = ask_trial(study, where, ostudy, started)
                if trial is None:
                    return None
                beat.hold(trial)
                held.append(trial)
                cfg = trial_run_config(study, where, trial)
                return run_config_dict(cfg), "failed_trial" in search.system_attrs(trial), search.finished_count(ostudy)

            asked = distributed.decided_by_main(ask)
            if asked is None:
                return
            raw, retried, done = asked
            _say(console, f"{raw['name']} ({done + 1}{f'/{s.trials}' if s.trials else ''}): "
                          + ", ".join(f"{k}={_short(v)}" for k, v in raw_params(raw, space).items()), "bold")
            train_trial(raw, held[0] if held else None, trainer, objective, console, prune, retried, ostudy,
                        restart=restart and not retried)
            if held:
                beat.drop(held[0])
            held.clear()


def raw_params(raw: dict, space: dict) -> dict[str, Any]:
    """The trial's values of the space's keys, read from its run config."""
    out = {}
    for key in space:
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- after the search


def search_confirm_seeds(study: StudyConfig) -> list[int]:
    """Fresh seeds for the confirmation (plan.confirm_seeds: select.confirm_seeds); `auto` with the one seed a
    search trains trials with means 3 fresh seeds here: a search's winner is the most optimistic score of many."""
    from classlab.plan import confirm_seeds

    seeds = confirm_seeds(study)
    if not seeds and study.select is not None and study.select.confirm_seeds == "auto":
        seeds = [max(study.seeds) + 1 + i for i in range(3)]
    return seeds


def search_confirm_plan(study: StudyConfig, where: str, top: list[optuna.trial.FrozenTrial]) -> list[PlannedRun]:
    """The best trials' settings again, each with fresh seeds (plan.confirm_plan): `confirm-trial-NNNN-seed<s>`."""
    from classlab.plan import confirm_plan

    space = search.space_of(study)
    seeds = search_confirm_seeds(study)
    planned: list[PlannedRun] = []
    for t in top:
        params = {k: search._decoded(space[k]["choice"], v) if "choice" in space[k] else v
                  for k, v in t.params.items() if k in space}
        name = str(t.user_attrs.get("run") or trial_name(t.number))
        trial = PlannedRun(search.trial_config(study, params, name, study.seeds[0], where), name)
        planned += confirm_plan([trial], name, seeds, where)
    return planned


def finish_search(study: StudyConfig, where: str, ostudy: optuna.Study | None, trainer: _Trainer,
                  objective: search.Objective, console: Console, restart_retrain: bool = False
                  ) -> tuple[list[dict], str | None]:
    """Artifacts, the confirmation (best `select.confirm_top` trials, fresh seeds, paired tests), then
    select + retrain. Returns the confirmation and retrain runs' summaries and the selected variant."""
    n_top = study.select.confirm_top if study.select is not None else 0

    def plan() -> tuple[list[dict], list[str], dict[str, float]]:
        top = search.top_trials(ostudy, max(n_top, 1), objective.higher)
        if not top:
            return [], [], {}
        scores = {"confirm-" + str(t.user_attrs.get("run") or trial_name(t.number)): float(t.value) for t in top}
        confirm = search_confirm_plan(study, where, top[:n_top]) if n_top else []
        if not confirm:  # no confirmation: the best trial as the search scored it
            return [], [str(top[0].user_attrs.get("run"))], scores
        return [run_config_dict(p.config) for p in confirm], [], scores

    raw, best_trial, search_scores = distributed.decided_by_main(plan)
    confirm = [PlannedRun(validate(RunConfig, r), r["name"].rsplit("-seed", 1)[0]) for r in raw]
    if confirm:
        seeds = search_confirm_seeds(study)
        _say(console, f"confirming the best {len(confirm) // len(seeds)} setting(s) with fresh seeds {seeds}: "
                      f"{len(confirm)} run(s)", "bold")
        for run in confirm:  # one by one: their settings differ, and a stack of differing members was ~10x slower
            trainer._train_group([(run.config, trainer.run_folder(run))], restart_retrain)
    summaries = [s for s in trainer.summaries if s["name"].startswith("confirm-")]
    doc: dict[str, Any] = {}
    selected: str | None = None
    if summaries:
        doc["confirmation"] = confirmation(summaries, objective, search_scores, trainer.folder)
        selected = doc["confirmation"]["selected"]
        _print_confirmation(doc["confirmation"], console)
    elif best_trial:
        selected = best_trial[0]
    if distributed.is_main() and ostudy is not None:
        search.write_artifacts(ostudy, trainer.folder, objective, doc)
    retrained: list[dict] = []
    if selected is not None and study.retrain_on == "train+val":  # the chosen trial's settings, the study's seeds
        trial = _trial_run(trainer.folder / selected.removeprefix("confirm-"))
        runs = [PlannedRun(validate(RunConfig, {**run_config_dict(trial.config), "seed": seed,
                                                "name": trial.variant + (f"-seed{seed}" if len(study.seeds) > 1
                                                                         else "")}), trial.variant)
                for seed in study.seeds]
        before = len(trainer.summaries)
        trainer.train(retrain_plan(runs, trial.variant, where), restart_retrain)
        retrained = trainer.summaries[before:]
    if selected is not None:
        _say(console, f"selected {selected} by {objective.by}" + (" over fresh seeds" if confirm else ""), "bold")
    return summaries + retrained, selected


def _trial_run(folder: Path) -> PlannedRun:
    cfg = validate(RunConfig, RunFolder(folder).read_config())
    return PlannedRun(cfg, cfg.name)


def confirmation(summaries: list[dict], objective: search.Objective, search_scores: dict[str, float],
                 study_folder: Path) -> dict[str, Any]:
    """Each confirmed setting: its search score, its mean validation score over fresh seeds and the gap
    (evidence.optimism: fresh minus search, negative = the search was optimistic), its test accuracy; the
    best by the fresh seeds (evidence.select_variant) and the tests of each runner-up against it
    (evidence.compare_study: the settings question over seeds, Holm-corrected)."""
    from classlab import evidence

    scores = evidence.validation_scores(summaries, objective.by)
    rows = []
    for variant, fresh in scores.items():
        found = [s.get("test", {}).get("accuracy") for s in summaries if evidence.variant_of(s["name"]) == variant]
        tests = [t for t in found if t is not None]
        score = search_scores.get(variant)
        rows.append({"variant": variant, "trial": variant.removeprefix("confirm-"), "seeds": len(fresh),
                     "search_score": score, "confirmed": sum(fresh) / len(fresh),
                     "optimism": None if score is None else evidence.optimism([score], fresh, objective.higher),
                     "test_accuracy": sum(tests) / len(tests) if tests else None})
    selected = evidence.select_variant(scores, "mean", objective.higher)
    rows.sort(key=lambda r: (r["variant"] != selected, -r["confirmed"] if objective.higher else r["confirmed"]))
    preds = []
    for s in summaries:
        arrays = RunFolder(study_folder / s["name"]).read_predictions()
        if arrays is not None:
            preds.append(evidence.run_predictions(s["name"], arrays["y_true"], y_pred=arrays["y_pred"]))
    tests: list[dict] = []
    note = None
    if len(scores) > 1:
        try:
            tests = evidence.compare_study(preds, reference=selected)
        except (ValueError, ArithmeticError) as e:  # a degenerate spread (identical runs): no test to show
            note = f"paired tests not computed: {e}"
    return {"metric": objective.by, "selected": selected, "rows": rows, "note": note,
            "tests": [{k: v for k, v in t.items() if not k.startswith("_")} for t in tests]}


def _print_confirmation(conf: dict, console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"confirmation: {conf['metric']} on fresh seeds")
    table.add_column("trial", no_wrap=True)
    for col in ("seeds", "search", "fresh seeds", "optimism", "test acc %"):
        table.add_column(col, justify="right")

    def f(x: float | None, scale: float = 1.0) -> str:
        return "" if x is None else f"{x * scale:.4f}" if scale == 1.0 else f"{x * scale:.2f}"

    for r in conf["rows"]:
        table.add_row(r["trial"], str(r["seeds"]), f(r["search_score"]), f(r["confirmed"]),
                      f(r["optimism"]), f(r["test_accuracy"], 100))
    console.print(table)
    for t in conf["tests"]:
        if t.get("metric") != "accuracy" or t.get("diff") is None:
            continue
        p = t.get("p_adjusted")
        _say(console, f"{t['a']} vs {t['b']} (the best): test accuracy {t['diff'] * 100:+.2f} points "
                      f"[{t['ci_low'] * 100:+.2f}, {t['ci_high'] * 100:+.2f}], p (Holm) "
                      f"{'n/a' if p is None else f'{p:.3g}'}: {t['verdict']}", "dim")
    if conf.get("note"):
        _say(console, conf["note"], "yellow")
