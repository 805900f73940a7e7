"""`classlab run STUDY --ray [ADDRESS]`: a study's runs, or a search's trials, as Ray tasks on a Ray cluster
(an existing one, or a local one). Each task asks Ray for the study's `resources` (num_cpus, num_gpus per run)
and trains one run folder; a task lost with its node is retried by Ray and resumes from the run folder, so the
study folder must be on storage every node sees (checked at start). A search's trials are asked by this
driver from the study's Optuna storage and trained, pruned and told by the tasks; select, confirmation,
retrain and the report follow here, as after `--jobs`."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from classlab.errors import ClasslabError

MAX_RETRIES = 3  # a task whose node dies is run again this many times (it resumes from its run folder)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClasslabError("--ray needs Ray: pip install 'classlab[ray]'") from None
    return ray


def connect(address: str) -> None:
    """ray.init: `local` starts a Ray instance on this machine; anything else is an existing cluster's address
    (auto, host:6379, ray://host:10001)."""
    ray = _ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError, and Ray's bare Exception on a start timeout
        raise ClasslabError(f"--ray {address}: cannot connect or start ({str(e).splitlines()[0]}); start the cluster "
                            "with `ray start --head`, or pass --ray alone for a local one (on a busy machine, "
                            "RAY_agent_register_timeout_ms=300000 gives Ray's agents longer to start)") from None


def check_shared(folder: Path) -> None:
    """Every alive node must see the study folder (the run folders are where tasks resume): a token written
    here is read back by a task pinned to each node."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    probe = folder / f".ray-probe-{token}"
    probe.write_text(token, encoding="utf-8")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [_sees.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe), token) for n in nodes]
        for node, seen in zip(nodes, ray.get(refs), strict=True):
            if not seen:
                raise ClasslabError(f"--ray: the study folder {folder} is not visible on node "
                                    f"{node.get('NodeManagerAddress')}: put out_dir on storage every node mounts "
                                    "(NFS, a cluster file system) at the same path")
    finally:
        probe.unlink(missing_ok=True)


def _remote(fn: Any) -> Any:
    """A Ray remote function made on first use (so importing this module needs no Ray)."""
    return _ray().remote(fn)


def _sees_fn(path: str, token: str) -> bool:
    try:
        return Path(path).read_text(encoding="utf-8") == token
    except OSError:
        return False


class _Lazy:
    def __init__(self, fn: Any) -> None:
        self.fn, self.remote_fn = fn, None

    def __getattr__(self, name: str) -> Any:
        if self.remote_fn is None:
            self.remote_fn = _remote(self.fn)
        return getattr(self.remote_fn, name)


_sees = _Lazy(_sees_fn)


def _run_task(cwd: str, path: str, overrides: list[str], name: str, device: str | None, restart: bool) -> str:
    """One planned run of a study, in its folder (resuming it when it was begun): complete / failed / busy."""
    os.chdir(cwd)  # the study's relative paths (out_dir, data.root) mean the same on every node
    from classlab.config import load_study
    from classlab.plan import expand
    from classlab.runs import RunFolder
    from classlab.study import train_run
    from classlab.train.device import resolve_device

    study = load_study(path, overrides)
    cfg = next(p.config for p in expand(study, where=path) if p.config.name == name)
    folder = RunFolder(Path(study.out_dir).expanduser() / str(study.name) / name)
    try:
        train_run(cfg, folder, resolve_device(device or cfg.train.device), Console(quiet=True), restart=restart)
    except ClasslabError as e:
        return f"failed: {e}"
    return "complete"


def _trial_task(cwd: str, path: str, overrides: list[str], storage: str | None, trial_id: int,
                device: str | None) -> str:
    """One search trial: rebuilt from the Optuna storage, trained (pruned), told; a retried task resumes the
    trial's run folder."""
    os.chdir(cwd)
    import optuna

    from classlab import search
    from classlab.config import load_study
    from classlab.study import RunOptions, _Trainer
    from classlab.train.device import resolve_device
    from classlab.trials import train_trial, trial_run_config

    study = load_study(path, overrides)
    folder = Path(study.out_dir).expanduser() / str(study.name)
    ostudy = optuna.load_study(study_name=str(study.name), storage=search.open_storage(storage, folder))
    trial = optuna.trial.Trial(ostudy, trial_id)
    cfg = trial_run_config(study, path, trial)
    trainer = _Trainer(folder, resolve_device(device or cfg.train.device), Console(quiet=True),
                       RunOptions(device=device))
    prune = study.search.pruner != "none"
    return train_trial(cfg.model_dump(mode="json"), trial, trainer, search.objective_of(study), Console(quiet=True),
                       prune, retried=True, ostudy=ostudy)


_run_remote = _Lazy(_run_task)
_trial_remote = _Lazy(_trial_task)


def run_on_ray(path: Path, overrides: list[str], address: str, storage: str | None, device: str | None,
               restart: bool, console: Console) -> Any:
    """Train the study's runs (or its search's trials) as Ray tasks, then finish it here (select, confirm,
    retrain) like `--jobs`' final pass; returns that pass's StudyResult (the command prints and reports it)."""
    from classlab.config import load_study

    study = load_study(path, overrides)
    path = Path(path).resolve()
    folder = (Path(study.out_dir).expanduser() / str(study.name)).resolve()
    ray = _ray()
    ours = not ray.is_initialized()  # started here (not by a caller such as a test): shut down here
    connect(address)
    try:
        check_shared(folder)
        res = study.resources
        opts = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_retries": MAX_RETRIES}
        cwd = os.getcwd()
        started = time.perf_counter()
        if study.search is None:
            outcomes = _grid_on_ray(study, str(path), overrides, cwd, opts, device, restart, console)
        else:
            outcomes = _search_on_ray(study, str(path), overrides, cwd, opts, storage, device, console)
    finally:
        if ours:
            ray.shutdown()
    console.print(f"Ray: {len(outcomes)} task(s) in {time.perf_counter() - started:.1f}s "
                  f"({', '.join(f'{v} {k}' for k, v in _count(outcomes).items())})", style="dim", markup=False,
                  highlight=False)
    from classlab.study import RunOptions, run_study

    return run_study(path, overrides, console=console,
                     options=RunOptions(device=device, retry_failed=False, finish_only=True, storage=storage,
                                        restart_retrain=restart))


def _count(outcomes: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = o.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


def _grid_on_ray(study: Any, path: str, overrides: list[str], cwd: str, opts: dict, device: str | None,
                 restart: bool, console: Console) -> list[str]:
    """One task per planned run that is not complete (every one with --restart)."""
    ray = _ray()
    from classlab.plan import expand
    from classlab.runs import RunFolder

    folder = Path(study.out_dir).expanduser() / str(study.name)
    todo = [p.config.name for p in expand(study, where=path)
            if restart or not RunFolder(folder / p.config.name).is_complete]
    console.print(f"Ray: {len(todo)} run(s) as tasks, {opts['num_cpus']:g} CPU / {opts['num_gpus']:g} GPU each",
                  markup=False, highlight=False)
    refs = {_run_remote.options(**opts, name=f"classlab:{n}").remote(cwd, path, overrides, n, device, restart): n
            for n in todo}
    outcomes = []
    for ref, name in refs.items():
        try:
            outcome = ray.get(ref)
        except Exception as e:  # the task gave up after its retries
            outcome = f"failed: {type(e).__name__}"
        console.print(f"{name}: {outcome}", markup=False, highlight=False)
        outcomes.append(outcome)
    return outcomes


def _search_on_ray(study: Any, path: str, overrides: list[str], cwd: str, opts: dict, storage: str | None,
                   device: str | None, console: Console) -> list[str]:
    """Ask trials here and train each as a task, as many at once as the cluster has room for."""
    ray = _ray()
    from classlab import search
    from classlab.trials import _enqueue_grid, ask_trial

    folder = Path(study.out_dir).expanduser() / str(study.name)
    ostudy = search.open_optuna_study(study, search.open_storage(storage, folder), search.objective_of(study).higher)
    _enqueue_grid(study, ostudy)
    search.reclaim(ostudy)
    total = ray.cluster_resources()
    room = int(total.get("CPU", 1) // max(opts["num_cpus"], 1e-9))
    if opts["num_gpus"]:
        room = min(room, int(total.get("GPU", 0) // opts["num_gpus"]))
    room = max(room, 1)
    console.print(f"Ray: trials as tasks, {room} at once, {opts['num_cpus']:g} CPU / {opts['num_gpus']:g} GPU each",
                  markup=False, highlight=False)
    beat = search.Heartbeat(ostudy)
    started = time.monotonic()
    running: dict[Any, Any] = {}
    outcomes: list[str] = []
    try:
        while True:
            while len(running) < room:
                trial = ask_trial(study, path, ostudy, started)
                if trial is None:
                    break
                beat.hold(trial)
                ref = _trial_remote.options(**opts, name=f"classlab:{trial.user_attrs['run']}").remote(
                    cwd, path, overrides, storage, trial._trial_id, device)
                running[ref] = trial
            if not running:
                return outcomes
            done, _ = ray.wait(list(running), num_returns=1)
            trial = running.pop(done[0])
            beat.drop(trial)
            try:
                outcome = ray.get(done[0])
            except Exception as e:  # gave up after its retries: the trial failed
                outcome = f"failed: {type(e).__name__}"
                search.give_back(ostudy, [trial]) if "Interrupt" in outcome else ostudy.tell(trial, state=_fail())
            console.print(f"{trial.user_attrs['run']}: {outcome}", markup=False, highlight=False)
            outcomes.append(outcome)
    except BaseException:
        for ref, trial in running.items():
            ray.cancel(ref, force=True)
            search.give_back(ostudy, [trial])
        raise
    finally:
        beat.close()


def _fail() -> Any:
    import optuna

    return optuna.trial.TrialState.FAIL
