"""The orchestrator: claim each run, prepare it, fit it, finish it; then select, retrain and hand back.

Planning (which runs, in which order, which train together) is plan.py; the loop is train/fit.py; the
metrics are evaluate.py; the folder's layout is runs.py. This module only puts them in order.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from classlab import evidence
from classlab.cam import mistake_cams
from classlab.config import RunConfig, StudyConfig, load_study, validate
from classlab.data import ImageData, load_dataset
from classlab.errors import ClasslabError, RunFailed
from classlab.evaluate import evaluate_run, run_summary
from classlab.io import atomic_write_json
from classlab.locks import RunLock, RunLocked
from classlab.models import build_model
from classlab.models.summary import layer_table_text, model_table, parameter_count
from classlab.observers import StudyObserver, TensorBoardObserver, study_observers
from classlab.outcome import RunOptions, StudyResult
from classlab.photo import input_stats
from classlab.plan import (
    PlannedRun,
    confirm_plan,
    confirm_seeds,
    expand,
    retrain_plan,
    run_config_dict,
    stack_groups,
)
from classlab.results import RunSummary
from classlab.runs import RunFolder
from classlab.train import distributed
from classlab.train.callbacks import EarlyStopper, TimeEstimate
from classlab.train.device import resolve_device
from classlab.train.fit import FitResult, fit
from classlab.train.progress import EpochProgress
from classlab.transforms import Preprocess, preprocess_for
from classlab.transforms import describe as describe_preprocess


@dataclass
class _Prepared:
    """A run ready for fitting: its folder, data, preprocessing, fresh model and resume state."""

    cfg: RunConfig
    folder: RunFolder
    data: ImageData
    pre: Preprocess
    model: torch.nn.Module
    resume: dict | None


# Settings that change how a trained run is evaluated, never its weights: a finished run whose config differs
# only in these is evaluated again from its checkpoint, not retrained.
EVAL_ONLY = ("eval.", "train.eval_batch_size")


def config_differences(stored: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, new value) for every leaf where two config dicts differ."""
    if isinstance(stored, dict) and isinstance(new, dict):
        out = []
        for key in [*stored, *(k for k in new if k not in stored)]:
            out += config_differences(stored.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if stored == new else [(prefix.rstrip("."), stored, new)]


def _stored_differences(folder: RunFolder, cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """What differs between the stored config, read as this version reads it (so an older spelling of the same
    setting, such as `amp: true`, is still the same config), and the run's."""
    try:
        stored = run_config_dict(validate(RunConfig, folder.read_config()))
    except ClasslabError:
        return [("config.yaml", "unreadable", "")]
    return config_differences(stored, run_config_dict(cfg))


def _check_same_config(folder: RunFolder, cfg: RunConfig, diffs: list[tuple[str, Any, Any]] | None = None) -> None:
    diffs = _stored_differences(folder, cfg) if diffs is None else diffs
    if diffs:
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diffs[:3])
        more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ClasslabError(
            f"{folder.path} holds a run with a different config ({shown}{more}); retrain this run alone with "
            f"--restart-run {shlex.quote(folder.path.name)}, or set out_dir to keep both"
        )


def _reevaluate(folder: RunFolder, cfg: RunConfig, device: torch.device, diffs: list[tuple[str, Any, Any]]
                ) -> RunSummary:
    """A finished run whose config changed only in evaluation settings: its test evaluation again, from the
    weights its numbers came from (temperature, TTA, predictions, summary), then config.yaml last (so an
    interrupted re-evaluation is simply done again)."""
    from classlab.inference import read_preprocess

    data = load_dataset(cfg.data)
    pre = read_preprocess(folder)
    model_cfg = cfg.model
    if getattr(model_cfg, "pretrained", "none") != "none":  # the checkpoint holds every weight: fetch nothing
        model_cfg = model_cfg.model_copy(update={"pretrained": "none"})
    model = build_model(model_cfg, len(data.classes), pre.input_shape)
    state, _ = folder.read_result_weights()
    model.load_state_dict(state)
    model = model.to(device).eval()
    test = evaluate_run(model, data, pre, cfg, device)
    if test.temperature is not None:
        folder.write_calibration(test.temperature)
    else:
        folder.calibration_path.unlink(missing_ok=True)  # predict must not apply a temperature no longer asked for
    folder.write_predictions(data.test.labels, test.probs, test.worst, data.test.images[test.worst])
    old = folder.read_summary()
    doc = {**(old.to_json() if hasattr(old, "to_json") else old), "test": test.metrics,
           "calibration": test.calibration, "test_tta": test.tta}
    summary = type(old).model_validate(doc) if hasattr(old, "to_json") else doc  # typed, or an older dict
    folder.write_summary(summary)
    changed = ", ".join(f"{key}: {before!r} -> {after!r}" for key, before, after in diffs)
    folder.write_run_log([*folder.read_run_log(), f"re-evaluated from {folder.result_weights_path().name} "
                          f"(evaluation settings changed: {changed}); not retrained"])
    folder.write_config(run_config_dict(cfg))
    return summary


def _start_state(folder: RunFolder, cfg: RunConfig, restart: bool, device: torch.device | None = None
                 ) -> tuple[RunSummary | None, dict | None]:
    """(the summary of a finished run to skip, or None; the training state to resume from, or None). A finished
    run whose config differs only in evaluation settings (EVAL_ONLY) is re-evaluated from its checkpoint (the
    second item then names those settings)."""
    if folder.is_complete and not restart:
        diffs = _stored_differences(folder, cfg)
        if diffs and device is not None and all(key.startswith(EVAL_ONLY) for key, _, _ in diffs):
            return _reevaluate(folder, cfg, device, diffs), {"reevaluated": ", ".join(k for k, _, _ in diffs)}
        _check_same_config(folder, cfg, diffs)
        return folder.read_summary(), None
    if not restart and folder.last_path.is_file() and folder.config_path.is_file():
        _check_same_config(folder, cfg)
        return None, folder.read_last()
    return None, None


def _write_run_files(folder: RunFolder, cfg: RunConfig, data: ImageData, model: torch.nn.Module,
                     pre: Preprocess) -> None:
    """Everything a run folder says about the run before its first epoch."""
    folder.write_input_stats(input_stats(data.train.images.numpy()))
    params = parameter_count(model)
    table, rows = model_table(model, pre.input_shape, cfg.train.lr_groups, cfg.train.lr)
    folder.write_config(run_config_dict(cfg))
    folder.write_preprocessing(pre.to_dict())
    folder.write_model_summary(layer_table_text(rows, params, pre.input_shape) + "\n\n" + table + "\n",
                               {"rows": rows, "parameters": params})
    lines = [f"data: {data.source}", f"train {len(data.train)}, val {len(data.val) if data.val else 0}, "
             f"test {len(data.test)} images, classes {data.classes}", distributed.describe()]
    lines += [f"{name} split: {where}" for name, where in data.origins.items()]  # folders, or carved by which key
    lines += describe_preprocess(pre)  # what the model sees, where each value came from, mismatch warnings
    if cfg.train.class_weights is not None:  # the weights the loss uses, `auto` resolved on this training split
        from classlab.train.optim import class_weights

        weights = class_weights(cfg.train.class_weights, data.classes, data.train.labels)
        spec = "auto" if cfg.train.class_weights == "auto" else "as listed, 1 for the rest"
        lines.append(f"class weights ({spec}): " + ", ".join(
            f"{name} {w:.4g}" for name, w in zip(data.classes, weights.tolist(), strict=True)))
    folder.write_run_log(lines + [f"skipped file: {s}" for s in data.skipped])


def _finish_run(prep: _Prepared, result: FitResult, device: torch.device) -> RunSummary:
    """Evaluate the trained model on the test set; write predictions and the Grad-CAM maps of its worst
    mistakes (the report only reads them), then summary.json (last)."""
    data, model = prep.data, prep.model
    test = evaluate_run(model, data, prep.pre, prep.cfg, device)  # + the eval section: temperature, TTA
    if test.temperature is not None:
        prep.folder.write_calibration(test.temperature)
    worst = data.test.images[test.worst]
    prep.folder.write_predictions(data.test.labels, test.probs, test.worst, worst)
    guess = test.probs[test.worst].argmax(1).tolist()  # the predicted class of each mistake: what its map explains
    prep.folder.write_gradcam(**mistake_cams(model, prep.pre, worst.numpy(), guess, device))
    if data.held_out is not None:  # data.cv: the fold's out-of-fold predictions
        _write_out_of_fold(prep, device)
    summary = run_summary(prep.cfg, data, result, test, parameter_count(model), device)
    prep.folder.write_summary(summary)
    return summary


def _write_out_of_fold(prep: _Prepared, device: torch.device) -> None:
    """Probabilities on the fold's held-out part, with the weights the test numbers use."""
    from classlab.evaluate import predict_logits
    from classlab.transforms import BatchTransform

    data = prep.data
    logits = predict_logits(prep.model, data.held_out.images, BatchTransform(prep.pre, None, device),
                            prep.cfg.train.eval_batch_size, device)
    prep.folder.write_oof(data.held_out_index, data.held_out.labels, logits.softmax(1).cpu(),
                          prep.cfg.data.cv.fold, data.pool_size)


def _checkpoint_due(tc, epoch: int, state: dict) -> bool:
    """last.pt every `train.checkpoint_every` epochs, and always at the run's last epoch (the final or the
    early-stopped one), which the summary and a later `--restart`-free run rely on."""
    es = tc.early_stopping
    stopping = es is not None and EarlyStopper.stops(state["stopper"], es.patience)
    return epoch % tc.checkpoint_every == 0 or epoch == tc.epochs or stopping


def _saved_epochs(folder: RunFolder) -> list[dict]:
    try:
        return folder.read_metrics()
    except ClasslabError:  # an unreadable metrics file is rewritten by the run; it only shortens the estimate
        return []


def _say(console: Console, text: str, style: str) -> None:
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)  # one line, as written


class _Trainer:
    """Trains planned runs into their folders: claims, resumes, stacks what can train together, finishes."""

    def __init__(self, folder: Path, device: torch.device, console: Console, options: RunOptions) -> None:
        self.folder, self.device, self.console, self.options = folder, device, console, options
        self.summaries: list[RunSummary] = []
        self.failed: list[str] = []
        self.busy: list[str] = []
        self.estimate: TimeEstimate | None = None
        self.observers: list[StudyObserver] = [TensorBoardObserver()]  # + MLflow with track.mlflow (run_study)
        self.callbacks: list = []  # more fit callbacks, after the save (a search trial's pruning)

    def run_folder(self, run: PlannedRun) -> RunFolder:
        return RunFolder(self.folder / run.config.name)

    def train(self, planned: list[PlannedRun], restart: bool) -> None:
        todo = [p for p in planned if restart or p.config.name in self.options.restart_runs
                or not self.run_folder(p).is_complete]
        # epochs already saved by interrupted runs are not trained again
        left = sum(max(p.config.train.epochs - len(_saved_epochs(self.run_folder(p))), 0) for p in todo)
        self.estimate = TimeEstimate(self.console, left)
        if distributed.is_distributed():  # each run is already spread over the processes
            groups = [[i] for i in range(len(planned))]
        else:
            pending = [i for i, p in enumerate(planned) if p in todo]
            together = [[pending[i] for i in g] for g in stack_groups([planned[i].config for i in pending],
                                                                       self.device.type)]
            first = {g[0]: g for g in together}
            groups = [first.get(i, [i]) for i in range(len(planned)) if i not in pending or i in first]
        for group in groups:
            if len(group) == 1:
                self.console.print(f"[bold]run {group[0] + 1}/{len(planned)}: {planned[group[0]].config.name}[/]")
            self._train_group([(planned[i].config, self.run_folder(planned[i])) for i in group], restart)

    def _claim(self, folder: RunFolder, restart: bool) -> tuple[RunLock | None, str | None]:
        """Claim a run before training it, so no other process (shard, machine, second `classlab run`)
        trains it at the same time; a finished run needs no claim. Rank 0 claims; every rank learns the
        outcome. Returns (this process's lock, or None; why another process has the run, or None)."""
        claimed: list[RunLock] = []

        def claim() -> str | None:
            if folder.is_complete and not restart:
                return None
            try:
                claimed.append(RunLock.acquire(folder.path, steal=self.options.steal_locks))
            except RunLocked as e:
                return str(e)
            return None

        held = distributed.decided_by_main(claim)
        return (claimed[0] if claimed else None), held

    def _prepare(self, cfg: RunConfig, folder: RunFolder, restart: bool) -> RunSummary | _Prepared:
        """The finished summary when the run is already complete, else a _Prepared. Under torch.distributed
        every rank calls this together: rank 0 alone reads and writes the folder and hands the others
        what they need (skip or resume)."""
        main = distributed.is_main()
        done, resume = distributed.decided_by_main(lambda: _start_state(folder, cfg, restart, self.device))
        if done is not None:
            if resume and "reevaluated" in resume:
                _say(self.console, f"{cfg.name}: re-evaluated from its checkpoint ({resume['reevaluated']} "
                     "changed), not retrained", "cyan")
            else:
                self.console.print(f"[dim]{cfg.name}: already complete, skipped[/]")
            return done
        if main:
            folder.prepare(restart=restart and not resume)
        data = load_dataset(cfg.data)
        if cfg.train.batch_size > len(data.train):
            raise ClasslabError(
                f"train.batch_size {cfg.train.batch_size} is larger than the training set ({len(data.train)} images)"
            )
        if data.skipped:
            self.console.print(f"[yellow]{cfg.name}: skipped {len(data.skipped)} file(s) (unreadable, or hidden), "
                               f"listed in run.log[/]")
        pre = preprocess_for(cfg, data)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, len(data.classes), pre.input_shape).to(self.device)
        if main:
            _write_run_files(folder, cfg, data, model, pre)
        if resume is not None:
            self.console.print(f"[cyan]{cfg.name}: resuming after epoch {resume['epoch']}[/]")
        return _Prepared(cfg, folder, data, pre, model, resume)

    def _train_group(self, group: list[tuple[RunConfig, RunFolder]], restart: bool) -> None:
        """Claim every run of the group, fit the claimed ones together (one if alone), finish each."""
        locks: list[RunLock | None] = []
        try:
            ready: list[_Prepared] = []
            for cfg, folder in group:
                restart_this = restart or cfg.name in self.options.restart_runs  # --restart-run NAME
                lock, held = self._claim(folder, restart_this)
                if held is not None:
                    _say(self.console, f"{cfg.name}: skipped, {held}", "yellow")
                    self.busy.append(cfg.name)
                    continue
                locks.append(lock)
                prep = self._prepare(cfg, folder, restart_this)
                if isinstance(prep, RunSummary):
                    self.summaries.append(prep)
                else:
                    ready.append(prep)
            if ready:
                self._fit(ready)
        finally:
            for lock in locks:
                if lock is not None:
                    lock.release()

    def _fit(self, ready: list[_Prepared]) -> None:
        if len(ready) > 1:
            self.console.print(f"[dim]training {len(ready)} runs together: {', '.join(p.cfg.name for p in ready)}[/]")
        main = distributed.is_main()
        callbacks = []
        if main:
            def save(k: int, row: dict, state: dict) -> None:
                # best.pt before last.pt before metrics: a kill between two writes leaves nothing that claims
                # an epoch last.pt lacks, and the resumed run redoes that epoch identically
                folder, tc = ready[k].folder, ready[k].cfg.train
                if _checkpoint_due(tc, row["epoch"], state):
                    folder.save_epoch(state, row["best"])
                elif row["best"]:
                    folder.save_best(state["model"], row["epoch"])
                folder.write_metrics(state["history"])

            for observer in self.observers:
                observer.runs_start(ready)
            callbacks = [save, *(o.epoch for o in self.observers)] + ([self.estimate] if self.estimate else [])
            callbacks += self.callbacks
        epochs = ready[0].cfg.train.epochs
        try:
            results = fit([p.model for p in ready], ready[0].data, [p.cfg for p in ready], ready[0].pre,
                          self.device, callbacks=callbacks, resume=[p.resume for p in ready],
                          progress=(lambda name: EpochProgress(self.console, name, epochs)) if main else None)
        finally:
            for observer in self.observers if main else ():
                observer.runs_end()
        for prep, result in zip(ready, results, strict=True):
            if result.notes and main:
                prep.folder.write_run_log(prep.folder.read_run_log() + result.notes)
                for note in result.notes:
                    _say(self.console, f"{prep.cfg.name}: {note}", "yellow")
            if result.failed is not None:
                if main:
                    prep.folder.mark_failed(result.failed)
                    for observer in self.observers:
                        observer.run_end(prep.folder, result.failed)
                _say(self.console, f"failed: {result.failed}", "red")
                self.failed.append(prep.cfg.name)
                continue
            # the test set, predictions and summary: rank 0's work; the other ranks get its summary (or error)
            self.summaries.append(distributed.decided_by_main(lambda p=prep, r=result: _finish_run(p, r, self.device)))
            for observer in self.observers if main else ():
                observer.run_end(prep.folder, None)


def train_run(cfg: RunConfig, folder: RunFolder, device: torch.device, console: Console,
              restart: bool = False) -> RunSummary:
    """Train one run into its folder (resuming an interrupted one), as run_study trains each of a study's
    runs, and return its summary; a run whose loss turns non-finite raises RunFailed."""
    trainer = _Trainer(folder.path.parent, device, console, RunOptions(restart=restart))
    trainer._train_group([(cfg, folder)], restart)
    if trainer.failed:
        raise RunFailed(folder.read_failed())
    if trainer.busy:
        raise ClasslabError(f"{folder.path}: another process is training this run")
    return trainer.summaries[0]


def _select(study: StudyConfig, summaries: list[RunSummary], console: Console) -> str:
    try:
        scores = evidence.validation_scores(summaries, study.select.by)
    except ValueError as e:
        raise ClasslabError(str(e)) from None
    best = evidence.select_variant(scores, study.select.rule, higher_is_better=_higher_is_better(study.select.by))
    selected = study.select.variant or best
    rule = "" if study.select.rule == "mean" else f" ({study.select.rule})"
    how = f"pinned in the study ({study.select.by}{rule} picks {best})" if study.select.variant \
        else f"by {study.select.by}{rule}"
    console.print(f"[bold]selected[/] {selected} {how}")
    return selected


def _higher_is_better(metric: str) -> bool:
    return metric.removeprefix("val_") != "loss"


def _confirm(study: StudyConfig, planned: list[PlannedRun], selected: str, trainer: _Trainer, where: str,
             restart: bool) -> None:
    """Train the selected variant again with fresh seeds (select.confirm_seeds): those runs are the comparisons'
    test reference (not the seeds whose validation luck picked it), and their validation score beside the
    selection-time one says how optimistic the selection was."""
    if any(p.variant == selected and getattr(p.config.data, "cv", None) is not None for p in planned):
        return  # a cross-validated choice is retrained on all its training data instead
    seeds = confirm_seeds(study)
    if not seeds:
        return
    trainer.train(confirm_plan(planned, selected, seeds, where), restart)
    fresh = f"confirm-{selected}"
    try:
        scores = evidence.validation_scores([s for s in trainer.summaries
                                             if evidence.variant_of(s["name"]) in (selected, fresh)], study.select.by)
    except ValueError:
        return
    if fresh in scores and selected in scores:
        gap = evidence.optimism(scores[selected], scores[fresh], _higher_is_better(study.select.by))
        trainer.console.print(f"[bold]confirmed[/] {selected} on {len(scores[fresh])} fresh seed(s): validation "
                              f"{study.select.by} {sum(scores[selected]) / len(scores[selected]):.4f} at selection, "
                              f"{sum(scores[fresh]) / len(scores[fresh]):.4f} fresh (optimism: {gap * 100:+.2f} "
                              "points); the fresh runs are the test reference")


def _evidence_settings(study: StudyConfig, selected: str | None) -> dict:
    """What the report's verdicts need from the study file (evidence.json beside the run folders)."""
    by = study.select.by if study.select is not None else None
    return {"selected": selected, "select_by": by, "higher_is_better": _higher_is_better(by) if by else True,
            "min_effect": study.evidence.min_effect}


def study_report(folder: Path, selected: str | None, console: Console) -> tuple[Path, Path] | None:
    """report.html, report.md and comparison.json of the study folder, with the selected variant as the reference;
    a report that cannot be made is a warning (training succeeded: `classlab report` re-makes it)."""
    from classlab.errors import one_line
    from classlab.report import make_report

    try:
        return make_report(folder, reference=selected)
    except ClasslabError as e:
        _say(console, f"warning: report not written: {one_line(e)}; re-make it with classlab report {folder}",
             "yellow")
        return None


def run_study(path: str | Path, overrides: list[str] | tuple[str, ...] = (), console: Console | None = None,
              options: RunOptions | None = None, **flags) -> StudyResult:
    """Train every run of a study file; failed runs are reported and the rest go on.

    `options` (or its fields as keyword arguments) say how: see RunOptions. Every run is claimed with a
    lock file while it trains (locks.RunLock), so no two processes ever train the same run; a run another
    live process holds is skipped and listed in `busy`. Launched by torchrun, all processes train each
    run together (DDP, train/distributed.py) and rank 0 alone writes and prints.
    """
    options = options or RunOptions(**flags)
    console = console or Console()
    notes: list[str] = []  # what an -o did beyond the base (config.apply_override), said below
    study = load_study(path, overrides, notes)
    if study.search is not None:  # trials asked from Optuna, not planned here
        from classlab.trials import run_search

        result = run_search(path, study, options, console, _Trainer)
        if result.writer and not options.worker:
            result.report = study_report(result.folder, result.selected, console)
        return result
    planned = expand(study, where=str(path))
    variants = sorted({p.variant for p in planned})
    if study.select is not None and study.select.variant is not None and study.select.variant not in variants:
        raise ClasslabError(f"{path}: select.variant '{study.select.variant}' is not a run of this study; "
                            f"runs: {', '.join(variants)}")
    if study.select is not None:  # checked before training, as early stopping is (config.RunConfig)
        blind = [p.config.name for p in planned
                 if p.config.data.val_fraction is None and getattr(p.config.data, "cv", None) is None]
        if blind:
            raise ClasslabError(f"{path}: select picks the variant by a validation metric ({study.select.by}), but "
                                f"{', '.join(blind[:3])}{' ...' if len(blind) > 3 else ''} ha"
                                f"{'s' if len(blind) == 1 else 've'} no validation split: set data.val_fraction "
                                "(e.g. 0.1), or remove select")
    folder = Path(study.out_dir).expanduser() / str(study.name)
    dev, joined = distributed.setup(resolve_device(options.device or planned[0].config.train.device))
    writer = distributed.is_main()
    if not writer:
        console = Console(quiet=True)  # rank 0 speaks for all
    restart = options.restart
    unknown = sorted(options.restart_runs - {p.config.name for p in planned})
    if unknown:
        raise ClasslabError(f"--restart-run {unknown[0]}: no such run in {path}; runs: "
                            f"{', '.join(p.config.name for p in planned)}")
    observers: list[StudyObserver] = []
    try:
        mine = planned
        done = sum(RunFolder(folder / p.config.name).is_complete for p in mine) if not restart else 0
        extra = " (+ retrain of the best)" if study.retrain_on and not options.worker else ""
        part = " worker of the queue," if options.worker else ""
        on = f"{distributed.world_size()} processes × {dev.type}" if distributed.is_distributed() else str(dev)
        console.print(f"[bold]{study.name}[/]:{part} {len(planned)} run(s){extra}, {done} already complete, "
                      f"on {on} -> {folder}")
        for note in notes if not options.worker else ():
            _say(console, f"note: {note}", "yellow")
        for warning in {distributed.batch_warning(p.config.train.batch_size) for p in mine} - {None}:
            _say(console, f"warning: {warning}", "yellow")
        trainer = _Trainer(folder, dev, console, options)
        if writer and not options.worker:
            from classlab.report.load import write_run_order  # the report lists the runs in this order

            write_run_order(folder, [p.config.name for p in planned], [p.variant for p in planned])
        if writer:
            trainer.observers = observers = study_observers(study, folder, planned, console)
        started = time.perf_counter()
        if not options.retry_failed and not restart:
            gave_up = [p for p in mine if trainer.run_folder(p).is_failed]
            trainer.failed.extend(p.config.name for p in gave_up)
            mine = [p for p in mine if p not in gave_up]
        if options.queue:  # a worker of a queue that any number of processes and machines share
            from classlab.trials import open_queue, work_queue

            queue = open_queue(study, folder, planned, options.storage, restart and not options.worker, console) \
                if writer else None
            work_queue(trainer, mine, queue, restart, options.batch)
        else:
            trainer.train(mine, restart)
        selected = None
        select = study.select is not None and not options.worker  # a --jobs worker leaves it to its parent
        unfinished = [p for p in planned if not (trainer.run_folder(p).is_complete or trainer.run_folder(p).is_failed)]
        if select and (trainer.busy or (options.queue and unfinished)):
            console.print("[yellow]select / retrain_on need every run: when all are done, run this study again "
                          "(finished runs are skipped)[/]")
        elif select and trainer.summaries:
            selected = _select(study, trainer.summaries, console)
            # a cross-validated choice has no model trained on all the training data yet: retrain it always
            folds = any(p.variant == selected and p.config.data.cv is not None for p in planned)
            if study.retrain_on == "train+val" or folds:
                trainer.train(retrain_plan(planned, selected, str(path)), restart or options.restart_retrain)
        if selected is not None:
            _confirm(study, planned, selected, trainer, str(path), restart)
        if writer and not options.worker:
            atomic_write_json(folder / evidence.SETTINGS_FILE, _evidence_settings(study, selected))
        console.print(f"[dim]study finished in {time.perf_counter() - started:.1f}s[/]")
        waiting = [p.config.name for p in planned
                   if not trainer.run_folder(p).is_complete and not trainer.run_folder(p).is_failed]
        # the report, made here once for the whole study folder (a --jobs worker leaves it to its parent)
        report = study_report(folder, selected, console) if writer and not options.worker else None
        for observer in observers:
            observer.study_end(trainer.failed, waiting, report)
    except BaseException as e:
        for observer in observers:
            observer.abort(e)
        raise
    finally:
        distributed.cleanup(joined)
    place = {p.config.name: i for i, p in enumerate(planned)}  # the study's order (the report's), retrains last
    trainer.summaries.sort(key=lambda s: place.get(s.name, len(place)))
    return StudyResult(study, folder, trainer.summaries, trainer.failed, selected, busy=trainer.busy,
                       waiting=waiting, writer=writer, report=report)
