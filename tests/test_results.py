"""Typed results and the one metric registry end to end: a run folder written by the previous release
(tests/fixtures/release-0.1.0, made by classlab 0.1.0 before the registry: `monitor: val_macro_f1`, test macro
F1 only under test.macro.f1) loads, reports and resumes; config reads the registry's names and the older
spellings; early stopping and selection take their direction from the registry; both trackers log every
key of an epoch row."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from sklearn.metrics import balanced_accuracy_score, f1_score

from classlab import metrics
from classlab.config import EarlyStopping, Select
from classlab.errors import ClasslabError
from classlab.plan import run_config_dict
from classlab.results import EpochRow, RunSummary, migrate_summary, summary_from
from classlab.runs import RunFolder
from classlab.train.callbacks import EarlyStopper, TensorBoardLogger, epoch_scalars
from tests.conftest import write_study

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.1.0"


def _old_study(root: Path, epochs: int) -> Path:
    """The fixture's study file, writing into root/runs (its run folder: root/runs/prev/small)."""
    study = yaml.safe_load((FIXTURE / "study.yaml").read_text())
    study["out_dir"] = str(root / "runs")
    study["train"]["epochs"] = epochs
    root.mkdir(parents=True, exist_ok=True)
    return write_study(root / "prev.yaml", study)


def _copy_fixture(root: Path) -> RunFolder:
    target = root / "runs" / "prev" / "small"
    shutil.copytree(FIXTURE / "small", target)
    return RunFolder(target)


def test_previous_release_summary_and_rows_load_typed():
    folder = RunFolder(FIXTURE / "small")
    raw = json.loads(folder.summary_path.read_text())
    assert "macro_f1" not in raw["test"]  # written before the registry
    summary = folder.read_summary()
    assert isinstance(summary, RunSummary) and summary.name == "small" and summary.weights == "best"
    cm = np.asarray(raw["test"]["confusion_matrix"])
    y_true = np.repeat(np.arange(len(cm)), cm.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(len(cm)), row) for row in cm])
    assert summary.test.value("macro_f1") == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert summary.test.value("macro_f1") == pytest.approx(raw["test"]["macro"]["f1"])
    assert summary.test.value("accuracy") == raw["test"]["accuracy"]
    assert summary.val.value("macro_f1") == raw["kept_val"]["macro_f1"]
    rows = folder.read_metrics()
    assert [type(r) for r in rows] == [EpochRow, EpochRow] and [r.epoch for r in rows] == [1, 2]
    assert rows[1].val("macro_f1") == json.loads(folder.metrics_path.read_text().splitlines()[1])["val_macro_f1"]


def test_migration_derives_what_older_summaries_lack():
    raw = json.loads((FIXTURE / "small" / "summary.json").read_text())
    older = {**raw, "test": {k: v for k, v in raw["test"].items() if k != "balanced_accuracy"}}
    older.pop("kept_val")
    older.pop("weights")
    summary = summary_from(older)
    cm = np.asarray(raw["test"]["confusion_matrix"])
    y_true = np.repeat(np.arange(len(cm)), cm.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(len(cm)), row) for row in cm])
    assert summary.test.value("balanced_accuracy") == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert summary.val == summary.best_val and summary.weights == "best"
    assert migrate_summary(migrate_summary(older)) == migrate_summary(older)  # idempotent
    # what summary.json keeps: the keys it was made with, no nulls added
    assert set(summary.to_json()) == set(older) | {"kept_val", "format"}


def test_a_summary_that_is_not_one_is_one_line(tmp_path):
    folder = RunFolder(tmp_path / "r")
    folder.path.mkdir()
    folder.summary_path.write_text(json.dumps({"name": "r", "test": {"accuracy": "high"}}))
    with pytest.raises(ClasslabError, match="not a classlab summary"):
        folder.read_summary()


def test_previous_release_folder_reports(tmp_path, run_cli):
    _copy_fixture(tmp_path)
    code, out, err = run_cli("report", str(tmp_path / "runs" / "prev"))
    assert code == 0, err
    md = (tmp_path / "runs" / "prev" / "report.md").read_text()
    summary = RunFolder(FIXTURE / "small").read_summary()
    # the report and the terminal table show the registry's formatting of the same numbers
    assert metrics.get("accuracy").format(summary.test.value("accuracy")) in md
    assert metrics.get("macro_f1").format(summary.test.value("macro_f1")) in md


@pytest.mark.slow
def test_previous_release_folder_resumes_exactly(tmp_path):
    """The old run, made a run killed after epoch 2 of 3, resumes with this version, and ends where a
    3-epoch run trained by this version from scratch ends: the same weights, the same rows."""
    from classlab.study import run_study

    torch.set_num_threads(1)
    folder = _copy_fixture(tmp_path / "resumed")
    for path in (folder.summary_path, folder.predictions_path):
        path.unlink()
    config = yaml.safe_load(folder.config_path.read_text())
    config["train"]["epochs"] = 3
    folder.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old `val_macro_f1` spelling
        resumed = run_study(_old_study(tmp_path / "resumed", 3), device="cpu", console=Console(file=io.StringIO()))
        fresh = run_study(_old_study(tmp_path / "fresh", 3), device="cpu", console=Console(file=io.StringIO()))
    assert [s.epochs_run for s in resumed.summaries] == [3] == [s.epochs_run for s in fresh.summaries]
    again = RunFolder(tmp_path / "fresh" / "runs" / "prev" / "small")
    a, b = folder.read_metrics(), again.read_metrics()
    assert [r.train_loss for r in a] == [r.train_loss for r in b]  # bit for bit
    for name in metrics.VALIDATION:
        assert [r.val(name) for r in a] == pytest.approx([r.val(name) for r in b], rel=1e-6)
    wa, wb = folder.read_last()["model"], again.read_last()["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed.summaries[0].test.value("accuracy") == fresh.summaries[0].test.value("accuracy")


def test_config_reads_registry_names_and_older_spellings():
    assert EarlyStopping(monitor="macro_f1").monitor == "macro_f1"
    assert Select(by="balanced_accuracy").by == "balanced_accuracy"
    with pytest.warns(FutureWarning, match="'val_macro_f1' is the older spelling of 'macro_f1'"):
        assert EarlyStopping(monitor="val_macro_f1").monitor == "macro_f1"
    with pytest.warns(FutureWarning, match="select.by: 'val_accuracy'"):
        assert Select(by="val_accuracy").by == "accuracy"
    assert EarlyStopping().monitor == "loss" and Select().by == "accuracy"
    with pytest.raises(ValueError):
        EarlyStopping(monitor="ece")  # not computed on validation
    with pytest.raises(ValueError):
        Select(by="f1")
    # a run folder's stored config says the registry's name
    from classlab.config import RunConfig, validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cfg = validate(RunConfig, RunFolder(FIXTURE / "small").read_config())
    assert run_config_dict(cfg)["train"]["early_stopping"]["monitor"] == "macro_f1"


@pytest.mark.parametrize("name", metrics.VALIDATION)
def test_early_stopping_direction_comes_from_the_registry(name):
    model = torch.nn.Linear(1, 1)
    stopper = EarlyStopper(patience=1, monitor=name)
    worse, better = (0.2, 0.1) if name == "loss" else (0.1, 0.2)
    assert stopper.update(1, worse, model)
    assert stopper.update(2, better, model) and stopper.best_epoch == 2
    assert not stopper.update(3, worse, model) and stopper.should_stop
    assert EarlyStopper.stops(stopper.state_dict(), 1) and not EarlyStopper.stops(stopper.state_dict(), 2)


def _row() -> dict:
    row = {"epoch": 3, "train_loss": 0.5, "train_accuracy": 0.8, **{metrics.VAL_PREFIX + n: 0.1 * (i + 1)
                                                                      for i, n in enumerate(metrics.VALIDATION)},
           "lr": 0.01, "lrs": {"0": 0.01, "head": 0.1}, "best": True, "seconds": 1.5, "train_seconds": 1.2,
           "images_per_s": 800.0}
    return row


def test_epoch_scalars_are_every_number_of_the_row():
    scalars = epoch_scalars(_row())
    assert {"val_macro_f1", "val_balanced_accuracy", "val_loss", "val_accuracy"} <= set(scalars)
    assert scalars["lr.head"] == 0.1 and "best" not in scalars and "epoch" not in scalars
    assert epoch_scalars(EpochRow.model_validate(_row())) == scalars


def test_tensorboard_gets_every_key_of_the_row(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger([tmp_path / "tb"])
    logger(0, _row(), {})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"macro_f1/val", "balanced_accuracy/val", "loss/val", "accuracy/val", "loss/train", "accuracy/train",
            "lr", "lr_group/head", "seconds", "seconds/train", "images_per_s"} <= tags
    assert len(tags) == len(epoch_scalars(_row()))
    assert events.Scalars("macro_f1/val")[0].value == pytest.approx(_row()["val_macro_f1"])
    assert events.Scalars("balanced_accuracy/val")[0].step == 3
