"""A study: expand runs × grid × seeds into RunConfigs, train each into its run folder, compare."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console

from classlab.config import RunConfig, StudyConfig, deep_merge, load_study, set_dotted, validate
from classlab.data import ImageData, load_dataset
from classlab.errors import ClasslabError, RunFailed
from classlab.evaluate import classification_report
from classlab.models import build_model
from classlab.models.summary import layer_table_text, model_table, parameter_count
from classlab.photo import input_stats
from classlab.runs import RunFolder, RunLock, RunLocked, atomic_torch_save, atomic_write_bytes
from classlab.train import distributed
from classlab.train.loop import FitResult, evaluate_split, fit, resolve_device
from classlab.train.progress import EpochProgress
from classlab.train.stacked import fit_stacked, stack_groups
from classlab.transforms import BatchTransform, Preprocess, pixel_permutation

WORST_MISTAKES = 16


@dataclass(frozen=True)
class PlannedRun:
    config: RunConfig
    variant: str  # the run's name without its seed suffix: runs that differ only by seed share it


def _value_name(value: Any) -> str:
    if isinstance(value, dict):
        return "-".join(_value_name(v) for v in value.values())
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def grid_cells(grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Cartesian product of the grid's dotted keys; each cell named by its values, e.g. 'adam-batchnorm'."""
    keys = list(grid)
    cells = []
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "-".join(_value_name(v) for v in values)
        cells.append((name, dict(zip(keys, values, strict=True))))
    names = [n for n, _ in cells]
    if len(set(names)) != len(names):  # values alone are ambiguous: prefix each with its key
        cells = [("-".join(f"{k.split('.')[-1]}={_value_name(v)}" for k, v in cell.items()), cell)
                 for _, cell in cells]
    return cells


def expand(study: StudyConfig, cli_overrides: list[tuple[str, Any]] = (), where: str = "") -> list[PlannedRun]:
    """One RunConfig per (run, grid cell, seed). Names are stable: `<run>[-<cell>][-seed<k>]`."""
    base = {"data": study.data, "model": study.model, "train": study.train}
    variants: list[tuple[str, dict[str, Any]]] = []
    run_list = study.runs or [{"name": "base"}]
    cells = grid_cells(study.grid) if study.grid else [("", {})]
    for run in run_list:
        for cell_name, cell in cells:
            name = f"{run['name']}-{cell_name}" if study.runs and cell_name else cell_name or run["name"]
            override = {k: v for k, v in run.items() if k != "name"}
            variants.append((name, {**override, **cell}))
    planned = []
    for index, (variant, override) in enumerate(variants):
        merged = deep_merge(base, override)
        for key, value in cli_overrides:
            set_dotted(merged, key, value)
        for seed in study.seeds:
            name = variant if len(study.seeds) == 1 else f"{variant}-seed{seed}"
            at = f"{where} run '{variant}'" if study.runs or study.grid else where
            if study.runs and not study.grid:
                at = f"{where} runs[{index}] ({variant})"
            cfg = validate(RunConfig, {**merged, "name": name, "seed": seed}, where=at.strip())
            planned.append(PlannedRun(cfg, variant))
    return planned


def preprocess_for(cfg: RunConfig, data: ImageData) -> Preprocess:
    """What evaluation (and prediction) applies, from the stored uint8 shape to the model's input."""
    c, h, w = data.image_shape
    perm = None
    if cfg.data.permute_pixels is not None:
        perm = tuple(pixel_permutation(cfg.data.permute_pixels.seed, h * w).tolist())
    out_c = 3 if cfg.data.to_rgb and c == 1 else c
    out_h, out_w = cfg.data.resize or (h, w)
    mean, std = data.mean, data.std
    if len(mean) == 1 and out_c == 3:
        mean, std = mean * 3, std * 3
    if len(mean) != out_c:
        raise ClasslabError(f"data.normalize has {len(mean)} values but the model input has {out_c} channels")
    return Preprocess(input_shape=(out_c, out_h, out_w), mean=tuple(mean), std=tuple(std),
                      classes=tuple(data.classes), permutation=perm, source_shape=(c, h, w),
                      to_rgb=cfg.data.to_rgb and c == 1, resize=tuple(cfg.data.resize) if cfg.data.resize else None)


def run_config_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def _check_same_config(folder: RunFolder, cfg: RunConfig) -> None:
    stored = folder.read_config()
    if stored != run_config_dict(cfg):
        raise ClasslabError(
            f"{folder.path} holds a run with a different config; use --restart to retrain it, "
            "or set out_dir to keep both"
        )


def _worst_mistakes(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of wrong predictions made with the highest confidence."""
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    wrong = torch.nonzero(pred != labels).flatten()
    conf = probs[wrong, pred[wrong]]
    return wrong[conf.argsort(descending=True)[:k]]


def _tensorboard_writer(folder: RunFolder):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ClasslabError(
            "train.tensorboard needs the tensorboard package: pip install 'classlab[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(folder.path / "tensorboard"))


def _log_scalars(writer, row: dict) -> None:
    epoch = row["epoch"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        if row.get(key) is not None:
            group, _, name = key.partition("_")
            writer.add_scalar(f"{name or group}/{group}" if name else key, row[key], epoch)
    for group, lr in row.get("lrs", {}).items():
        writer.add_scalar(f"lr_group/{group}", lr, epoch)
    writer.flush()


def _start_state(folder: RunFolder, cfg: RunConfig, restart: bool) -> tuple[dict | None, dict | None]:
    """(the summary of a finished run to skip, or None; the training state to resume from, or None)."""
    if folder.is_complete and not restart:
        _check_same_config(folder, cfg)
        return folder.read_summary(), None
    if not restart and folder.last_path.is_file() and folder.config_path.is_file():
        _check_same_config(folder, cfg)
        return None, folder.read_last()
    return None, None


@dataclass
class _Prepared:
    """A run ready for fitting: its data, preprocessing, fresh model, resume state and epoch hook."""

    cfg: RunConfig
    folder: RunFolder
    data: ImageData
    pre: Preprocess
    model: torch.nn.Module
    resume: dict | None
    save_epoch: Any
    writer: Any


def _prepare_run(cfg: RunConfig, folder: RunFolder, device: torch.device, console: Console, restart: bool,
                 on_epoch=None) -> dict | _Prepared:
    """Everything before `fit`: the finished summary when the run is already complete, else a _Prepared.

    Under torch.distributed every rank calls this together: rank 0 alone reads and writes the folder
    (the other ranks never create it) and hands them what they need: skip or resume."""
    main = distributed.is_main()
    done, resume = distributed.decided_by_main(lambda: _start_state(folder, cfg, restart))
    if done is not None:
        console.print(f"[dim]{cfg.name}: already complete, skipped[/]")
        return done
    if main:
        folder.prepare(restart=restart and not resume)
    data = load_dataset(cfg.data)
    if cfg.train.batch_size > len(data.train):
        raise ClasslabError(
            f"train.batch_size {cfg.train.batch_size} is larger than the training set ({len(data.train)} images)"
        )
    if data.skipped:
        console.print(f"[yellow]{cfg.name}: skipped {len(data.skipped)} unreadable file(s), listed in run.log[/]")
    pre = preprocess_for(cfg, data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(data.classes), pre.input_shape).to(device)
    if main:
        _write_run_files(folder, cfg, data, model, pre)
    if resume is not None:
        console.print(f"[cyan]{cfg.name}: resuming after epoch {resume['epoch']}[/]")

    writer = _tensorboard_writer(folder) if cfg.train.tensorboard and main else None

    def save_epoch(row: dict, state: dict) -> None:
        # best.pt before last.pt before metrics: a kill between two writes leaves nothing that claims an
        # epoch last.pt lacks, and the resumed run redoes that epoch identically (rewriting best.pt too)
        if row["best"]:
            atomic_torch_save(folder.best_path, {"model": state["model"], "epoch": row["epoch"]})
        atomic_torch_save(folder.last_path, state)
        folder.write_metrics(state["history"])
        if writer is not None:
            _log_scalars(writer, row)
        if on_epoch is not None:
            on_epoch(row)

    return _Prepared(cfg, folder, data, pre, model, resume, save_epoch if main else None, writer)


def train_run(cfg: RunConfig, folder: RunFolder, device: torch.device, console: Console,
              restart: bool = False, on_epoch=None) -> dict:
    """Train one run into its folder (resuming an interrupted one) and return its summary."""
    prep = _prepare_run(cfg, folder, device, console, restart, on_epoch)
    if isinstance(prep, dict):
        return prep
    progress = EpochProgress(console, cfg.name, cfg.train.epochs) if distributed.is_main() else None
    try:
        result = fit(prep.model, prep.data, cfg, prep.pre, device, on_epoch_end=prep.save_epoch,
                     resume=prep.resume, progress=progress)
    except RunFailed as e:
        if distributed.is_main():
            folder.mark_failed(str(e))
        raise
    finally:
        if prep.writer is not None:
            prep.writer.close()
    # the test set, predictions and summary: rank 0's work; the other ranks get its summary (or its error)
    return distributed.decided_by_main(
        lambda: _finish_run(cfg, folder, prep.model, prep.data, prep.pre, device, result))


def train_group(cfgs: list[RunConfig], folders: list[RunFolder], device: torch.device, console: Console,
                restart: bool = False, on_epoch=None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Train runs that share an architecture and data together (train/stacked.py: one batch gather and
    one kernel per layer for all of them), each into its own folder exactly as `train_run` would.
    Returns the summaries and (name, reason) of runs that failed."""
    summaries: list[dict] = []
    failed: list[tuple[str, str]] = []
    ready: list[_Prepared] = []
    for cfg, folder in zip(cfgs, folders, strict=True):
        prep = _prepare_run(cfg, folder, device, console, restart, on_epoch)
        if isinstance(prep, dict):
            summaries.append(prep)
        else:
            ready.append(prep)
    if not ready:
        return summaries, failed
    console.print(f"[dim]training {len(ready)} runs together: {', '.join(p.cfg.name for p in ready)}[/]")
    try:
        results = fit_stacked(
            [p.model for p in ready], ready[0].data, [p.cfg for p in ready], ready[0].pre, device,
            on_epoch_end=lambda k, row, state: ready[k].save_epoch(row, state),
            resume=[p.resume for p in ready],
            progress=lambda name: EpochProgress(console, name, ready[0].cfg.train.epochs),
        )
    finally:
        for p in ready:
            if p.writer is not None:
                p.writer.close()
    for prep, result in zip(ready, results, strict=True):
        if "failed" in result.extra:
            prep.folder.mark_failed(result.extra["failed"])
            failed.append((prep.cfg.name, result.extra["failed"]))
            continue
        summaries.append(_finish_run(prep.cfg, prep.folder, prep.model, prep.data, prep.pre, device, result))
    return summaries, failed


def _write_run_files(folder: RunFolder, cfg: RunConfig, data: ImageData, model: torch.nn.Module,
                     pre: Preprocess) -> None:
    """Everything a run folder says about the run before its first epoch."""
    folder.write_json("input_stats.json", input_stats(data.train.images.numpy()))
    params = parameter_count(model)
    table, rows = model_table(model, pre.input_shape, cfg.train.lr_groups, cfg.train.lr)
    folder.write_config(run_config_dict(cfg))
    folder.write_json("preprocessing.json", pre.to_dict())
    text = layer_table_text(rows, params, pre.input_shape)
    atomic_write_bytes(folder.path / "model_summary.txt", (text + "\n\n" + table + "\n").encode())
    folder.write_json("model_summary.json", {"rows": rows, "parameters": params})
    log_lines = [f"data: {data.source}", f"train {len(data.train)}, val {len(data.val) if data.val else 0}, "
                 f"test {len(data.test)} images, classes {data.classes}", distributed.describe()]
    log_lines += [f"skipped unreadable file: {s}" for s in data.skipped]
    atomic_write_bytes(folder.path / "run.log", ("\n".join(log_lines) + "\n").encode())


def _finish_run(cfg: RunConfig, folder: RunFolder, model: torch.nn.Module, data: ImageData, pre: Preprocess,
                device: torch.device, result: FitResult) -> dict:
    """Evaluate the trained model on the test set and write predictions and summary.json (last)."""
    params = parameter_count(model)
    eval_tf = BatchTransform(pre, None, device)
    test_loss, test_acc, logits = evaluate_split(model, data.test, eval_tf, cfg, device)
    labels = data.test.labels.to(device)
    report = classification_report(labels, logits, len(data.classes))
    worst = _worst_mistakes(logits, labels, WORST_MISTAKES).cpu()
    probs = logits.softmax(1).cpu()
    _save_predictions(folder, data, probs, worst)
    history = result.history
    epoch_seconds = [r["seconds"] for r in history]
    summary = {
        "name": cfg.name,
        "seed": cfg.seed,
        "classes": data.classes,
        "test": {"loss": test_loss, "accuracy": test_acc, **report},
        "best_epoch": result.best_epoch,
        "epochs_run": len(history),
        "stopped_early": result.stopped_early,
        "final_train": {"loss": history[-1]["train_loss"], "accuracy": history[-1]["train_accuracy"]},
        "best_val": _best_val(history, result.best_epoch),
        "parameters": params,
        "seconds": float(sum(epoch_seconds)),
        "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0,
        "device": str(device),
        "trained_together": int(result.extra.get("stacked", 1)) > 1,
        "data": {"source": data.source, "train": len(data.train), "val": len(data.val) if data.val else 0,
                 "test": len(data.test), "skipped_files": len(data.skipped)},
    }
    folder.write_summary(summary)
    return summary


def _best_val(history: list[dict], best_epoch: int) -> dict | None:
    for row in history:
        if row["epoch"] == best_epoch and row.get("val_loss") is not None:
            return {"loss": row["val_loss"], "accuracy": row["val_accuracy"], "epoch": best_epoch}
    return None


def _save_predictions(folder: RunFolder, data: ImageData, probs: torch.Tensor, worst: torch.Tensor) -> None:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        y_true=data.test.labels.numpy(),
        y_pred=probs.argmax(1).numpy(),
        probs=probs.numpy().astype(np.float32),
        worst_index=worst.numpy(),
        worst_images=data.test.images[worst].numpy(),
    )
    atomic_write_bytes(folder.path / "predictions.npz", buffer.getvalue())


@dataclass
class StudyResult:
    study: StudyConfig
    folder: Path
    summaries: list[dict]
    failed: list[str]
    selected: str | None = None
    busy: list[str] = field(default_factory=list)  # skipped: another process holds their lock
    waiting: list[str] = field(default_factory=list)  # runs of the whole study neither finished nor failed
    shard: tuple[int, int] | None = None
    writer: bool = True  # this process wrote the run folders (rank 0 under torchrun): it prints and reports


def select_variant(summaries: list[dict], metric: str) -> str:
    """The variant with the best mean (over seeds) validation metric at its kept epoch."""
    from classlab.comparison import variant_of

    scores: dict[str, list[float]] = {}
    for s in summaries:
        if s.get("best_val") is None:
            raise ClasslabError(f"select: run '{s['name']}' has no validation metrics; set data.val_fraction")
        scores.setdefault(variant_of(s["name"]), []).append(s["best_val"][metric.removeprefix("val_")])
    sign = -1 if metric == "val_loss" else 1
    return max(scores, key=lambda v: sign * float(np.mean(scores[v])))


def retrain_plan(planned: list[PlannedRun], variant: str, where: str) -> list[PlannedRun]:
    """The chosen variant again, trained on train + validation (no split, so no early stopping)."""
    out = []
    for run in planned:
        if run.variant != variant:
            continue
        raw = run_config_dict(run.config)
        raw["name"] = "retrain-" + run.config.name
        raw["data"]["val_fraction"] = None
        raw["train"]["early_stopping"] = None
        out.append(PlannedRun(validate(RunConfig, raw, where=where), "retrain-" + variant))
    return out


def _saved_epochs(path: Path) -> list[dict]:
    try:
        return RunFolder(path).read_metrics()
    except ClasslabError:
        return []


class _Estimator:
    """Prints the study's expected duration once, from the first trained epoch."""

    def __init__(self, console: Console, planned: list[PlannedRun], folder: Path) -> None:
        self.console = console
        # epochs already saved by interrupted runs are not trained again
        self.epochs_left = sum(max(p.config.train.epochs - len(_saved_epochs(folder / p.config.name)), 0)
                               for p in planned)
        self.done = False

    def __call__(self, row: dict) -> None:
        if self.done:
            return
        self.done = True
        minutes = row["seconds"] * self.epochs_left / 60
        self.console.print(f"[dim]estimate: {self.epochs_left} epochs × {row['seconds']:.1f}s ≈ {minutes:.1f} min "
                           "(from the first epoch; early stopping may shorten it)[/]")


def _claim_run(folder: RunFolder, restart: bool, steal: bool) -> tuple[RunLock | None, str | None]:
    """Claim a run before training it, so no other process (shard, machine, second `classlab run`) trains
    it at the same time; a finished run needs no claim. Rank 0 claims; every rank learns the outcome.
    Returns (this process's lock, or None; why another process has the run, or None)."""
    claimed: list[RunLock] = []

    def claim() -> str | None:
        if folder.is_complete and not restart:
            return None
        try:
            claimed.append(RunLock.acquire(folder.path, steal=steal))
        except RunLocked as e:
            return str(e)
        return None

    held = distributed.decided_by_main(claim)
    return (claimed[0] if claimed else None), held


def _train_all(planned: list[PlannedRun], folder: Path, dev: torch.device, console: Console, restart: bool,
               summaries: list[dict], failed: list[str], busy: list[str] | None = None,
               steal_locks: bool = False) -> None:
    todo = [p for p in planned if restart or not RunFolder(folder / p.config.name).is_complete]
    estimator = _Estimator(console, todo, folder)
    together = _stacked_groups(planned, folder, dev, restart)
    handled: set[int] = set()
    for i, run in enumerate(planned, start=1):
        if i - 1 in handled:
            continue
        group = together.get(i - 1)
        if group is not None:
            handled.update(group)
            _train_together([planned[k] for k in group], folder, dev, console, restart, summaries, failed, busy,
                            steal_locks, estimator)
            continue
        console.print(f"[bold]run {i}/{len(planned)}: {run.config.name}[/]")
        run_folder = RunFolder(folder / run.config.name)
        lock, held = _claim_run(run_folder, restart, steal_locks)
        if held is not None:
            console.print(f"{run.config.name}: skipped, {held}", style="yellow", markup=False, highlight=False,
                          soft_wrap=True)
            if busy is not None:
                busy.append(run.config.name)
            continue
        try:
            summaries.append(train_run(run.config, run_folder, dev, console, restart, on_epoch=estimator))
        except RunFailed as e:
            console.print(f"failed: {e}", style="red", markup=False, highlight=False, soft_wrap=True)  # one line
            failed.append(run.config.name)
        finally:
            if lock is not None:
                lock.release()


def _stacked_groups(planned: list[PlannedRun], folder: Path, dev: torch.device, restart: bool) -> dict[int, list[int]]:
    """First index -> indices of unfinished runs that can train together (same MLP shape and data; see
    train/stacked.py). Never under torch.distributed, where each run is already spread over processes."""
    if distributed.is_distributed():
        return {}
    pending = [k for k, p in enumerate(planned) if restart or not RunFolder(folder / p.config.name).is_complete]
    groups = stack_groups([planned[k].config for k in pending], dev)
    return {pending[g[0]]: [pending[i] for i in g] for g in groups if len(g) > 1}


def _train_together(group: list[PlannedRun], folder: Path, dev: torch.device, console: Console, restart: bool,
                    summaries: list[dict], failed: list[str], busy: list[str] | None, steal_locks: bool,
                    estimator) -> None:
    """Claim every run of a stackable group, train the claimed ones together, release the locks."""
    locks, cfgs, folders = [], [], []
    try:
        for run in group:
            run_folder = RunFolder(folder / run.config.name)
            lock, held = _claim_run(run_folder, restart, steal_locks)
            if held is not None:
                console.print(f"{run.config.name}: skipped, {held}", style="yellow", markup=False,
                              highlight=False, soft_wrap=True)
                if busy is not None:
                    busy.append(run.config.name)
                continue
            locks.append(lock)
            cfgs.append(run.config)
            folders.append(run_folder)
        if cfgs:
            done, bad = train_group(cfgs, folders, dev, console, restart, on_epoch=estimator)
            summaries.extend(done)
            for name, reason in bad:
                console.print(f"failed: {reason}", style="red", markup=False, highlight=False, soft_wrap=True)
                failed.append(name)
    finally:
        for lock in locks:
            if lock is not None:
                lock.release()


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (as in `--shard 0/4`) -> (I, N), with 0 <= I < N."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ClasslabError(f"--shard '{text}': write I/N, e.g. 0/4 for the first of 4 shards") from None
    if n < 1 or not 0 <= i < n:
        raise ClasslabError(f"--shard '{text}': I must be between 0 and N-1 (e.g. 0/{max(n, 1)})")
    return i, n


def shard_runs(planned: list[PlannedRun], shard: tuple[int, int]) -> list[PlannedRun]:
    """Shard (i, n) of a study: the runs whose index in `expand`'s stable order mod n is i. Every machine
    expands the same file to the same order, so n shards split the study without talking to each other."""
    i, n = shard
    return [run for index, run in enumerate(planned) if index % n == i]


def run_study(path: str | Path, overrides: list[str] | tuple[str, ...] = (), device: str | None = None,
              restart: bool = False, console: Console | None = None, shard: tuple[int, int] | None = None,
              steal_locks: bool = False, worker: bool = False, retry_failed: bool = True,
              restart_retrain: bool = False) -> StudyResult:
    """Train every run of a study file; failed runs are reported and the rest go on.

    `shard=(i, n)` trains only shard i of n (see `shard_runs`), so n machines can share one study folder.
    Every run is claimed with a lock file while it trains (runs.RunLock), so no two processes ever train
    the same run; a run another live process holds is skipped and listed in `busy`. Launched by torchrun,
    all processes train each run together (DDP, train/distributed.py) and rank 0 alone writes and prints.
    `worker`: a process of `classlab run --jobs N` (a shard that leaves select / retrain to its parent);
    `retry_failed=False` (that parent's final pass) lists runs that failed as failed instead of retraining them,
    and `restart_retrain` retrains the selected variant from scratch even when `restart` is off.
    """
    console = console or Console()
    study, cli = load_study(path, overrides)
    planned = expand(study, cli, where=str(path))
    variants = sorted({p.variant for p in planned})
    if study.select is not None and study.select.variant is not None and study.select.variant not in variants:
        raise ClasslabError(f"{path}: select.variant '{study.select.variant}' is not a run of this study; "
                            f"runs: {', '.join(variants)}")
    folder = Path(study.out_dir).expanduser() / str(study.name)
    dev = resolve_device(device or planned[0].config.train.device)
    if dev.type == "cpu" and planned[0].config.train.threads:
        torch.set_num_threads(planned[0].config.train.threads)
    dev, joined = distributed.setup(dev)
    writer = distributed.is_main()
    if not writer:
        console = Console(quiet=True)  # rank 0 speaks for all
    try:
        mine = shard_runs(planned, shard) if shard is not None else planned
        done = sum(RunFolder(folder / p.config.name).is_complete for p in mine) if not restart else 0
        extra = " (+ retrain of the best)" if study.retrain_on and shard is None else ""
        part = f" shard {shard[0]}/{shard[1]}: {len(mine)} of" if shard is not None else ""
        on = f"{distributed.world_size()} processes × {dev.type}" if distributed.is_distributed() else str(dev)
        console.print(f"[bold]{study.name}[/]:{part} {len(planned)} run(s){extra}, {done} already complete, "
                      f"on {on} -> {folder}")
        summaries: list[dict] = []
        failed: list[str] = []
        busy: list[str] = []
        started = time.perf_counter()
        if not retry_failed and not restart:
            gave_up = [p for p in mine if RunFolder(folder / p.config.name).failed_path.is_file()]
            failed.extend(p.config.name for p in gave_up)
            mine = [p for p in mine if p not in gave_up]
        _train_all(mine, folder, dev, console, restart, summaries, failed, busy=busy, steal_locks=steal_locks)
        selected = None
        select = study.select is not None and not worker  # a --jobs worker leaves it to its parent
        if select and (shard is not None or busy):
            console.print("[yellow]select / retrain_on need every run: when all are done, run this study again "
                          "without --shard (finished runs are skipped)[/]")
        elif select and summaries:
            best = select_variant(summaries, study.select.metric)
            selected = study.select.variant or best
            how = f"pinned in the study ({study.select.metric} picks {best})" if study.select.variant \
                else f"by {study.select.metric}"
            console.print(f"[bold]selected[/] {selected} {how}")
            if study.retrain_on == "train+val":
                _train_all(retrain_plan(planned, selected, str(path)), folder, dev, console,
                           restart or restart_retrain, summaries, failed, busy=busy, steal_locks=steal_locks)
        console.print(f"[dim]study finished in {time.perf_counter() - started:.1f}s[/]")
        waiting = [p.config.name for p in planned
                   if not RunFolder(folder / p.config.name).is_complete
                   and not RunFolder(folder / p.config.name).failed_path.is_file()]
    finally:
        distributed.cleanup(joined)
    return StudyResult(study, folder, summaries, failed, selected, busy=busy, waiting=waiting, shard=shard,
                       writer=writer)


def study_yaml_dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(run_config_dict(cfg), sort_keys=False)
