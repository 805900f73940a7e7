"""Searches and shared queues on Optuna (classlab.search, classlab.trials) and runs as Ray tasks
(classlab.ray_runs): workers sharing SQLite or a journal file train each grid cell once, a killed worker's
trial is resumed by another, the median pruner stops a bad learning rate, an interrupted search keeps its
trial count, and a local Ray cluster runs the demo grid."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from classlab import search
from classlab.runs import RunFolder
from classlab.study import run_study
from tests.conftest import make_idx_folder, tiny_study, write_study

TIMEOUT = 300
MLP = {"name": "mlp", "hidden": [16]}


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "CLASSLAB_OFFLINE": "1", "CLASSLAB_DATA": str(tmp_path / "no-data"),
            "OMP_NUM_THREADS": "1"}


def _study(tmp_path: Path, n_train: int = 160, epochs: int = 1, **sections) -> Path:
    data = make_idx_folder(tmp_path / "data", n_train=n_train, n_test=40)
    study = tiny_study(tmp_path, data, model=dict(MLP), **sections)
    study["train"].update({"epochs": epochs, "threads": 1})
    return write_study(tmp_path / "study.yaml", study)


def _trials(folder: Path, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    store = search.open_storage(storage, folder)
    return optuna.load_study(study_name=folder.name, storage=store).get_trials(deepcopy=False)


def _trained(output: str) -> list[str]:
    """The runs a process trained: its `run i/k: NAME` lines, less any it skipped."""
    names = re.findall(r"^run \d+/\d+: (\S+)$", output, flags=re.M)
    return [n for n in names if f"{n}: skipped" not in output and f"{n}: already complete" not in output]


def _start(path: Path, tmp_path: Path, tag: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"{tag}.out"
    with out.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "classlab.cli", "run", str(path), "--device", "cpu", *extra],
                                cwd=tmp_path, env=_env(tmp_path), stdout=f, stderr=subprocess.STDOUT)
    return proc, out


def _finish(proc: subprocess.Popen, out: Path) -> str:
    try:
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert code == 0, text
    return text


# ----------------------------------------------------------------------------- the study file


def test_a_bad_search_section_is_one_line_exit_2(tmp_path: Path, run_cli) -> None:
    bad = [({"space": {"train.lr": {"loguniform": [0, 1]}}, "trials": 2}, "low > 0"),
           ({"space": {"train.lr": {"normal": [0, 1]}}, "trials": 2}, "search.space.train.lr"),
           ({"space": {"lr": {"uniform": [0, 1]}}, "trials": 2}, "must start with data., model. or train."),
           ({"space": {"train.lr": {"uniform": [0.1, 0.2]}}}, "trials"),
           ({"space": {"train.lr": {"uniform": [0.1, 0.2]}}, "sampler": "grid"}, "choices only"),
           ({"space": {"train.lr": {"uniform": [0.1, 0.2]}}, "timeout": "soon"}, "duration")]
    for i, (section, message) in enumerate(bad):
        path = _study(tmp_path / str(i), search=section)
        code, _, err = run_cli("run", str(path), "--device", "cpu")
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_grid_joins_the_space_as_choices_and_sampler_grid_enqueues_every_cell() -> None:
    from classlab.config import StudyConfig

    cfg = StudyConfig.model_validate({"model": MLP, "grid": {"train.optimizer": ["adam", "sgd"]},
                                      "search": {"space": {"train.batch_size": {"choice": [16, 32, 64]}},
                                                 "sampler": "grid"}})
    space = search.space_of(cfg)
    assert space == {"train.optimizer": {"choice": ["adam", "sgd"]}, "train.batch_size": {"choice": [16, 32, 64]}}
    cells = search.grid_params(space)
    assert len(cells) == 6 and len({json.dumps(c, sort_keys=True) for c in cells}) == 6


# ----------------------------------------------------------------------------- workers sharing one storage


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_workers_sharing_storage_train_each_of_6_grid_cells_once(tmp_path: Path, storage: str) -> None:
    """Two `classlab run --storage ...` processes at once (two machines, say): the grid's runs are queued as
    fixed trials in the shared storage and each is popped, so trained, by exactly one worker."""
    path = _study(tmp_path, grid={"train.lr": [0.01, 0.02, 0.05], "train.optimizer": ["adam", "sgd"]})
    folder = tmp_path / "runs" / "toy"
    url = f"sqlite:///{tmp_path / 'shared.db'}" if storage == "sqlite" else f"journal:{tmp_path / 'shared.journal'}"
    procs = [_start(path, tmp_path, f"w{i}", "--storage", url) for i in range(2)]
    outputs = [_finish(proc, out) for proc, out in procs]
    names = sorted(p.name for p in folder.iterdir() if (p / "config.yaml").is_file())
    assert len(names) == 6 and all(RunFolder(folder / n).is_complete for n in names)
    trained = _trained(outputs[0]) + _trained(outputs[1])
    assert sorted(trained) == names  # each cell trained once, by one of the two
    done = [t for t in _trials(folder, url) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["run"] for t in done) == names


def test_a_sigkilled_workers_trial_is_resumed_by_another_worker(tmp_path: Path) -> None:
    """Worker A is killed (SIGKILL: no chance to clean up) after its trial's first epoch; worker B finds the
    trial RUNNING under a dead process, fails it, enqueues it again and resumes its run folder."""
    space = {"train.lr": {"loguniform": [1e-3, 1e-2]}}
    path = _study(tmp_path, n_train=3000, epochs=4, search={"space": space, "trials": 1,
                                                    "sampler": "random", "pruner": "none"},
                  select={"by": "accuracy", "confirm_top": 0})
    folder = tmp_path / "runs" / "toy"
    proc, out = _start(path, tmp_path, "a")
    metrics = folder / "trial-0000" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not RunFolder(folder / "trial-0000").is_complete
    text = _finish(*_start(path, tmp_path, "b"))
    assert "resuming trial(s) of stopped workers: trial-0000" in text and "resuming after epoch" in text
    assert RunFolder(folder / "trial-0000").is_complete and not (folder / "trial-0001").exists()
    states = [(t.user_attrs.get("run"), t.state.name) for t in _trials(folder)]
    assert states == [("trial-0000", "FAIL"), ("trial-0000", "COMPLETE")]


# ----------------------------------------------------------------------------- pruning, confirmation, resume


def test_the_median_pruner_prunes_a_bad_learning_rate_and_the_best_is_confirmed(tmp_path: Path) -> None:
    """sampler: grid tries lr 0.02, 0.03, then 1e-7 (learns nothing): after two finished trials the median
    pruner stops the third at its first epoch. It is marked pruned (not failed); the two good settings are
    confirmed on fresh seeds, the winner retrained on train + validation, and search.json and the plots
    hold the history."""
    path = _study(tmp_path, epochs=3, search={"space": {"train.lr": {"choice": [0.02, 0.03, 1e-7]}}, "sampler": "grid",
                                    "pruner": "median", "startup_trials": 2},
                  select={"by": "accuracy", "confirm_top": 2, "confirm_seeds": 2}, retrain_on="train+val")
    result = run_study(path, device="cpu")
    folder = tmp_path / "runs" / "toy"
    trials = {t.params["train.lr"]: t for t in _trials(folder)}
    assert trials[1e-7].state == optuna.trial.TrialState.PRUNED
    assert trials[0.02].state == trials[0.03].state == optuna.trial.TrialState.COMPLETE
    bad = RunFolder(folder / trials[1e-7].user_attrs["run"])
    assert (bad.path / search.PRUNED).is_file() and not bad.failed_path.is_file() and not bad.is_complete
    assert len(bad.read_metrics()) < 3
    doc = search.read_search(folder)
    assert [t["state"] for t in doc["trials"]] == ["complete", "complete", "pruned"]
    assert doc["plots"]["history"] == "search/history.png" and (folder / doc["plots"]["history"]).is_file()
    conf = doc["confirmation"]
    assert sorted(r["trial"] for r in conf["rows"]) == sorted(trials[lr].user_attrs["run"] for lr in (0.02, 0.03))
    assert all(r["seeds"] == 2 and r["optimism"] is not None for r in conf["rows"])
    confirmed = sorted(p.name for p in folder.iterdir() if p.name.startswith("confirm-"))
    assert len(confirmed) == 4 and all(RunFolder(folder / n).is_complete for n in confirmed)
    assert result.selected == conf["selected"] and conf["selected"].startswith("confirm-trial-")
    retrain = [p for p in folder.iterdir() if p.name.startswith("retrain-")]
    assert [p.name for p in retrain] == ["retrain-" + conf["selected"].removeprefix("confirm-")]


def test_a_search_resumed_after_ctrl_c_continues_its_trial_count(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C in trial 2 of 3: the trial is given back to the storage; the same command resumes its run folder
    after its saved epoch and stops at 3 finished trials, not 3 more."""
    from classlab import study as study_mod

    path = _study(tmp_path, epochs=2, search={"space": {"train.lr": {"loguniform": [1e-3, 1e-1]}}, "trials": 3,
                                    "sampler": "random", "pruner": "none"},
                  select={"by": "accuracy", "confirm_top": 0})
    real_fit = study_mod.fit

    def fit_until(*args, **kwargs):
        def stop(k, row, state):
            if args[2][k].name == "trial-0001" and row["epoch"] == 1:
                raise KeyboardInterrupt

        kwargs["callbacks"] = [*kwargs["callbacks"], stop]
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(study_mod, "fit", fit_until)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, device="cpu")
    folder = tmp_path / "runs" / "toy"
    store = search.open_storage(None, folder)
    assert search.finished_count(optuna.load_study(study_name="toy", storage=store)) == 1
    monkeypatch.setattr(study_mod, "fit", real_fit)
    from io import StringIO

    from rich.console import Console

    log = StringIO()
    run_study(path, device="cpu", console=Console(file=log, width=200))
    assert "trial-0001: resuming after epoch 1" in log.getvalue()
    ostudy = optuna.load_study(study_name="toy", storage=search.open_storage(None, folder))
    assert search.finished_count(ostudy) == 3
    runs = sorted(p.name for p in folder.iterdir() if p.name.startswith("trial-"))
    assert len(runs) == 3 and all(RunFolder(folder / n).is_complete for n in runs)
    log = StringIO()
    run_study(path, device="cpu", console=Console(file=log, width=200))  # the budget is spent: nothing to train
    assert "resuming" not in log.getvalue() and search.finished_count(ostudy) == 3


# ----------------------------------------------------------------------------- Ray


def _patient_ray(monkeypatch) -> None:
    """A busy CI machine starts Ray's agents slowly: give the raylet longer than its default to wait for them."""
    monkeypatch.setenv("RAY_agent_register_timeout_ms", "300000")


def _demo_grid(tmp_path: Path) -> Path:
    import yaml

    from tests.conftest import demo_study_copy

    path = demo_study_copy(tmp_path)
    study = yaml.safe_load(path.read_text())
    study["train"]["epochs"] = 1
    study["data"]["subset"] = {"train": 300, "test": 100}
    return write_study(path, study)


@pytest.mark.slow
@pytest.mark.ray
def test_a_local_ray_instance_runs_the_demo_grid_as_tasks(tmp_path: Path, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    from rich.console import Console

    from classlab.ray_runs import run_on_ray

    path = _demo_grid(tmp_path)
    monkeypatch.chdir(tmp_path)
    _patient_ray(monkeypatch)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_on_ray(path, [], "local", None, "cpu", False, Console(width=200))
    finally:
        ray.shutdown()
    folder = tmp_path / "runs" / "demo"
    assert not result.failed and all(RunFolder(folder / n).is_complete for n in ("original", "permuted"))


@pytest.mark.slow
@pytest.mark.ray
def test_a_two_node_ray_cluster_runs_the_demo_grid(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster
    from rich.console import Console

    from classlab.ray_runs import run_on_ray

    path = _demo_grid(tmp_path)
    monkeypatch.chdir(tmp_path)
    _patient_ray(monkeypatch)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        result = run_on_ray(path, [], cluster.address, None, "cpu", False, Console(width=200))
    finally:
        ray.shutdown()
        cluster.shutdown()
    folder = tmp_path / "runs" / "demo"
    assert not result.failed and all(RunFolder(folder / n).is_complete for n in ("original", "permuted"))
