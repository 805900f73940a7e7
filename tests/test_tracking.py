"""MLflow tracking (`track: {mlflow: ...}`) against a real local store: sqlite in a temp folder, read back with
mlflow.search_runs. One tracked study (MLPs, a grid over the learning rate where one cell's loss turns
non-finite, two seeds), run twice: the second pass trains nothing new and logs no finished run again."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from classlab.config import RunConfig, load_study, validate
from classlab.plan import expand
from classlab.runs import RunFolder
from classlab.study import run_study
from classlab.tracking import PARENT, epoch_metrics, params_of, summary_metrics
from tests.conftest import make_idx_folder, write_study

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # sqlalchemy's, inside mlflow

EPOCHS = 2
GOOD, BAD = 0.05, 1e6  # the grid's two learning rates: BAD makes the loss non-finite


def _study(root: Path, data: Path, uri: str, name: str, **extra) -> dict:
    return {
        "name": name, "out_dir": str(root / "runs"), "seeds": [0, 1],
        "data": {"dataset": "idx", "root": str(data), "val_fraction": 0.2},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"epochs": EPOCHS, "batch_size": 32, "optimizer": "sgd", "momentum": 0.9},
        "grid": {"train.lr": [GOOD, BAD]},
        "track": {"mlflow": {"uri": uri, "artifact_location": str(root / "artifacts"), "log_model": True}},
        **extra,
    }


def _runs(uri: str, experiment: str):
    """The experiment's runs, read back with mlflow.search_runs (which reads the global tracking URI: set for
    the call only, so nothing ever reaches MLflow's default store in the working directory)."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        assert mlflow.get_tracking_uri() == uri
        return client, mlflow.search_runs([exp.experiment_id], output_format="list", max_results=1000)
    finally:
        if before is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tracking")
    data = make_idx_folder(root / "toy")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    path = write_study(root / "study.yaml", _study(root, data, uri, "tracked"))
    torch.set_num_threads(2)
    first = run_study(path, device="cpu", console=Console(file=io.StringIO()))
    client, runs = _runs(uri, "tracked")
    second = run_study(path, device="cpu", console=Console(file=io.StringIO()))  # finished runs are skipped
    _, again = _runs(uri, "tracked")
    return {"root": root, "path": path, "data": data, "uri": uri, "first": first, "second": second, "client": client,
            "runs": runs, "again": again, "folder": root / "runs" / "tracked"}


def _children(runs) -> list:
    return [r for r in runs if PARENT in r.data.tags]


def test_one_mlflow_run_per_classlab_run_under_the_study(tracked):
    runs = tracked["runs"]
    (parent,) = [r for r in runs if PARENT not in r.data.tags]
    children = _children(runs)
    planned = {p.config.name: p.config for p in expand(load_study(tracked["path"]))}
    assert len(planned) == 4 and sorted(r.info.run_name for r in children) == sorted(planned)
    assert all(r.data.tags[PARENT] == parent.info.run_id for r in children)
    assert parent.info.run_name == "tracked" and parent.info.status == "FAILED"  # two runs failed
    status = {r.info.run_name: r.info.status for r in children}
    assert status == {name: "FAILED" if cfg.train.lr == BAD else "FINISHED" for name, cfg in planned.items()}
    assert sorted(tracked["first"].failed) == sorted(n for n, cfg in planned.items() if cfg.train.lr == BAD)


def test_params_are_the_resolved_config_and_tags_name_seed_and_cell(tracked):
    for run in _children(tracked["runs"]):
        folder = RunFolder(tracked["folder"] / run.info.run_name)
        cfg = validate(RunConfig, folder.read_config())
        assert run.data.params == params_of(cfg)
        assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["model.hidden"] == "[16]"
        assert run.data.tags["classlab.seed"] == str(cfg.seed)
        assert run.data.tags["classlab.variant"] == run.info.run_name.rsplit("-seed", 1)[0]
        assert run.data.tags["classlab.grid.train.lr"] == str(cfg.train.lr)


def test_metrics_per_epoch_and_summary_equal_the_run_folder(tracked):
    client = tracked["client"]
    for run in _children(tracked["runs"]):
        if run.info.status != "FINISHED":
            continue
        folder = RunFolder(tracked["folder"] / run.info.run_name)
        rows = folder.read_metrics()
        assert len(rows) == EPOCHS
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            assert [m.step for m in history] == [r["epoch"] for r in rows]
            assert [m.value for m in history] == pytest.approx([r[key] for r in rows], rel=1e-12)
        summary = folder.read_summary()
        expected = {**epoch_metrics(rows[-1]), **summary_metrics(summary)}
        assert run.data.metrics == pytest.approx(expected, rel=1e-12)  # latest value of each metric
        assert run.data.metrics["test.accuracy"] == summary["test"]["accuracy"]
        assert "test.macro.f1" in run.data.metrics and "test.per_class.f1" not in run.data.metrics


def test_every_validation_metric_reaches_mlflow(tracked):
    """Each key of an epoch row is logged, the registry's validation macro F1 and balanced accuracy included."""
    client = tracked["client"]
    finished = [r for r in _children(tracked["runs"]) if r.info.status == "FINISHED"]
    assert finished
    for run in finished:
        rows = RunFolder(tracked["folder"] / run.info.run_name).read_metrics()
        for key in ("val_macro_f1", "val_balanced_accuracy", "images_per_s", "train_seconds"):
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            assert [(m.step, m.value) for m in history] == [(r.epoch, pytest.approx(r.get(key))) for r in rows]


def test_artifacts_confusion_matrix_run_files_model_and_report(tracked):
    client = tracked["client"]
    finished = [r for r in _children(tracked["runs"]) if r.info.status == "FINISHED"]
    run = finished[0]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.json", "confusion_matrix.csv", "run", "model"} <= names
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        "model/model.onnx", "model/preprocessing.json", "model/classes.txt"}
    assert "run/summary.json" in {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    local = Path(client.download_artifacts(run.info.run_id, "confusion_matrix.json", str(tracked["root"] / "dl")))
    summary = RunFolder(tracked["folder"] / run.info.run_name).read_summary()
    assert json.loads(local.read_text())["true_by_predicted"] == summary["test"]["confusion_matrix"]
    (parent,) = [r for r in tracked["runs"] if PARENT not in r.data.tags]
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= report


def test_running_the_study_again_logs_no_finished_run_twice(tracked):
    before, after = _children(tracked["runs"]), _children(tracked["again"])
    finished = lambda runs: sorted(r.info.run_id for r in runs if r.info.status == "FINISHED")  # noqa: E731
    assert finished(after) == finished(before)
    assert len([r for r in tracked["again"] if PARENT not in r.data.tags]) == 1  # the same parent
    assert len(after) == len(before) + 2  # the failed cells were tried again, each in a new MLflow run


def test_runs_trained_without_tracking_are_logged_whole_later(tracked, tmp_path):
    uri = tracked["uri"]
    study = _study(tmp_path, tracked["data"], uri, "later", seeds=[0], grid={"train.lr": [GOOD]})
    del study["track"]
    path = write_study(tmp_path / "later.yaml", study)
    run_study(path, device="cpu", console=Console(file=io.StringIO()))
    study["track"] = {"mlflow": {"uri": uri, "experiment": "later-exp", "artifact_location": str(tmp_path / "a")}}
    write_study(path, study)
    run_study(path, device="cpu", console=Console(file=io.StringIO()))
    client, runs = _runs(uri, "later-exp")
    (child,) = _children(runs)
    (name,) = [p.config.name for p in expand(load_study(path))]
    assert child.info.status == "FINISHED" and child.info.run_name == name
    assert len(client.get_metric_history(child.info.run_id, "train_loss")) == EPOCHS
    summary = RunFolder(tmp_path / "runs" / "later" / name).read_summary()
    assert child.data.metrics["test.accuracy"] == summary["test"]["accuracy"]


def test_mlflow_missing_is_one_line(tmp_path, monkeypatch, run_cli, idx_folder):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    study = _study(tmp_path, idx_folder, f"sqlite:///{tmp_path / 'x.db'}", "missing", seeds=[0])
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)), "--device", "cpu")
    assert code == 2, out + err
    assert err == "error: track.mlflow needs the mlflow package: pip install 'classlab[mlflow]'\n"
    assert not list((tmp_path / "runs").glob("missing/*/summary.json"))  # refused before any training


def test_a_misspelt_track_key_names_its_path(tmp_path, run_cli, idx_folder):
    study = _study(tmp_path, idx_folder, "sqlite:///x.db", "typo", seeds=[0])
    study["track"] = {"mlflow": {"url": "sqlite:///x.db"}}
    code, _, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 2 and "unknown key 'url' in 'track.mlflow'" in err and "did you mean 'uri'" in err
