"""RunFolder owns the run folder: typed artifacts, the checkpoint schema, crash-safe epoch saves, and the
one choice of which weights a run's results came from."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from classlab import io as cio
from classlab import locks, runs
from classlab.errors import ClasslabError
from classlab.models.weights import load_state_dict_from
from classlab.runs import CHECKPOINT_KEYS, RunFolder, find_failed, find_runs


def state(epoch: int, value: float = 0.0) -> dict:
    """A training state with the schema's keys and one weight that tells epochs apart."""
    return {"epoch": epoch, "model": {"module.w": torch.full((3,), value or float(epoch))}, "optimizer": {},
            "scheduler": None, "stopper": {}, "rng": {}, "history": [{"epoch": e} for e in range(1, epoch + 1)]}


def temps(folder: RunFolder) -> list[Path]:
    return list(folder.path.rglob("*.tmp"))


def test_save_epoch_links_best_to_last_instead_of_writing_it_twice(tmp_path):
    folder = RunFolder(tmp_path / "r")
    folder.save_epoch(state(1), is_best=True)
    assert os.path.samefile(folder.best_path, folder.last_path)  # one file, two names
    folder.save_epoch(state(2), is_best=False)
    assert not os.path.samefile(folder.best_path, folder.last_path)
    assert folder.read_last()["epoch"] == 2
    assert cio.safe_torch_load(folder.best_path)["epoch"] == 1
    folder.save_epoch(state(3), is_best=True)
    assert os.path.samefile(folder.best_path, folder.last_path) and folder.read_last()["epoch"] == 3
    assert not temps(folder)


def test_save_epoch_copies_where_hard_links_are_refused(tmp_path, monkeypatch):
    def no_links(*_args, **_kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    folder = RunFolder(tmp_path / "r")
    folder.save_epoch(state(1), is_best=True)
    assert not os.path.samefile(folder.best_path, folder.last_path)
    assert folder.best_path.read_bytes() == folder.last_path.read_bytes()
    assert not temps(folder)


def test_checkpoints_stream_into_their_temp_file(tmp_path, monkeypatch):
    """torch.save writes into the open temp file, never into an in-memory copy of the whole file."""
    targets = []
    real = torch.save

    def spy(obj, f, *args, **kwargs):
        targets.append(f)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    RunFolder(tmp_path / "r").save_epoch(state(1), is_best=True)
    cio.atomic_torch_save(tmp_path / "other.pt", {"x": torch.zeros(1)})
    assert len(targets) == 2 and all(isinstance(f, io.BufferedWriter) for f in targets)


def test_a_failed_save_keeps_both_checkpoints_and_no_temp_file(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "r")
    folder.save_epoch(state(1), is_best=True)
    folder.save_epoch(state(2), is_best=False)
    before = folder.last_path.read_bytes(), folder.best_path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ClasslabError, match=f"cannot write {folder.last_path}: No space left on device"):
        folder.save_epoch(state(3), is_best=True)
    assert (folder.last_path.read_bytes(), folder.best_path.read_bytes()) == before
    assert not temps(folder)


def test_a_kill_between_the_renames_leaves_best_ahead_never_behind(tmp_path, monkeypatch):
    """best.pt is renamed first: a kill before last.pt's rename leaves best.pt one epoch ahead (the
    resumed run redoes that epoch and rewrites both), never a best epoch that best.pt lacks."""
    folder = RunFolder(tmp_path / "r")
    folder.save_epoch(state(1), is_best=True)
    real = runs.commit

    def killed_before_last(tmp: Path, path: Path) -> None:
        if path == folder.last_path:
            raise KeyboardInterrupt
        real(tmp, path)

    monkeypatch.setattr(runs, "commit", killed_before_last)
    with pytest.raises(KeyboardInterrupt):
        folder.save_epoch(state(2), is_best=True)
    assert folder.read_last()["epoch"] == 1 and cio.safe_torch_load(folder.best_path)["epoch"] == 2
    monkeypatch.setattr(runs, "commit", real)
    folder.prepare()  # the resumed run cleans up, then redoes epoch 2
    folder.save_epoch(state(2), is_best=True)
    assert os.path.samefile(folder.best_path, folder.last_path) and not temps(folder)


def test_checkpoint_schema_is_checked_in_one_place(tmp_path):
    folder = RunFolder(tmp_path / "r")
    bad = {k: v for k, v in state(1).items() if k != "stopper"}
    with pytest.raises(ClasslabError, match="no 'stopper'"):
        folder.save_epoch(bad, is_best=False)
    cio.atomic_torch_save(folder.last_path, bad)
    with pytest.raises(ClasslabError, match="no 'stopper'.*--restart"):
        folder.read_last()
    assert set(CHECKPOINT_KEYS) == set(state(1))


@pytest.mark.parametrize(("summary", "files", "expected"), [
    ({"weights": "last"}, ("best", "last"), "last"),
    ({"weights": "best"}, ("best", "last"), "best"),
    ({}, ("best", "last"), "best"),  # a summary from before the key: best.pt, as classlab always did
    (None, ("best", "last"), "best"),  # unfinished
    (None, ("last",), "last"),  # unfinished, no best epoch saved yet
])
def test_result_weights(tmp_path, summary, files, expected):
    folder = RunFolder(tmp_path / "r")
    for name in files:
        cio.atomic_torch_save(getattr(folder, f"{name}_path"), state(1, 1.0 if name == "best" else 2.0))
    if summary is not None:
        folder.write_summary(summary)
    weights, path = folder.read_result_weights()
    assert path.name == f"{expected}.pt" and list(weights) == ["w"]  # DDP's "module." prefix removed
    assert float(weights["w"][0]) == (1.0 if expected == "best" else 2.0)
    # `pretrained: <run folder>` starts from the same weights
    assert torch.equal(load_state_dict_from(str(folder.path))[0]["w"], weights["w"])


def test_result_weights_errors(tmp_path):
    folder = RunFolder(tmp_path / "r")
    folder.path.mkdir()
    with pytest.raises(ClasslabError, match="has the run trained an epoch yet"):
        folder.read_result_weights()
    with pytest.raises(ClasslabError, match="holds no classlab checkpoint"):
        load_state_dict_from(str(folder.path))
    cio.atomic_torch_save(folder.best_path, state(1))
    folder.write_summary({"weights": "last"})
    with pytest.raises(ClasslabError, match="last.pt: missing"):
        folder.read_result_weights()
    folder.write_summary({"weights": "middle"})
    with pytest.raises(ClasslabError, match="'middle'"):
        folder.read_result_weights()


def test_typed_artifacts_round_trip(tmp_path):
    folder = RunFolder(tmp_path / "r")
    assert folder.read_input_stats() is None and folder.read_model_summary() == (None, None)
    assert folder.read_predictions() is None and folder.read_run_log() == []
    folder.write_preprocessing({"input_shape": [1, 28, 28]})
    folder.write_input_stats({"n": 3})
    folder.write_model_summary("layers", {"rows": [{"name": "fc"}], "parameters": 10})
    folder.write_run_log(["data: toy", "train 3"])
    probs = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    folder.write_predictions(torch.tensor([1, 1]), probs, torch.tensor([1]), torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    assert folder.read_preprocessing() == {"input_shape": [1, 28, 28]}
    assert folder.read_input_stats() == {"n": 3}
    assert folder.read_model_summary() == ("layers\n", {"rows": [{"name": "fc"}], "parameters": 10})
    assert folder.read_run_log() == ["data: toy", "train 3"]
    predictions = folder.read_predictions()
    assert predictions is not None and predictions["y_pred"].tolist() == [1, 0]
    assert predictions["probs"].dtype == np.float32 and predictions["worst_images"].shape == (1, 1, 2, 2)
    assert folder.tensorboard_dir.parent == folder.path and not folder.is_failed


def test_pickled_predictions_are_not_loaded(tmp_path):
    folder = RunFolder(tmp_path / "r")
    folder.path.mkdir()
    np.savez(folder.predictions_path, probs=np.array([object()], dtype=object))
    assert folder.read_predictions() is None


def test_failed_and_finished_runs_are_found(tmp_path):
    done, failed, garbled = (RunFolder(tmp_path / n) for n in ("done", "failed", "garbled"))
    done.write_summary({"name": "done"})
    failed.mark_failed("loss became nan")
    garbled.path.mkdir()
    garbled.failed_path.write_text("[1, 2")
    assert [f.name for f in find_runs(tmp_path)] == ["done"]
    assert [(f.name, f.read_failed()) for f in find_failed(tmp_path)] == [
        ("failed", "loss became nan"), ("garbled", "failed.json unreadable")]
    failed.prepare()  # training it again removes the mark
    assert not failed.is_failed


def test_locks_and_atomic_io_keep_their_old_import_path():
    assert runs.RunLock is locks.RunLock and runs.RunLocked is locks.RunLocked and runs.LOCK_NAME == locks.LOCK_NAME
    assert runs.atomic_torch_save is cio.atomic_torch_save and runs.safe_torch_load is cio.safe_torch_load
    assert RunFolder("x").lock_path.name == locks.LOCK_NAME


def test_save_best_alone_keeps_last_and_gives_the_result_weights(tmp_path):
    """train.checkpoint_every > 1: a best epoch between two full checkpoints writes best.pt only."""
    folder = RunFolder(tmp_path / "r")
    folder.save_epoch(state(2), is_best=True)
    folder.save_best({"w": torch.full((3,), 3.0)}, 3)
    assert folder.read_last()["epoch"] == 2 and cio.safe_torch_load(folder.best_path)["epoch"] == 3
    weights, path = folder.read_result_weights()
    assert path == folder.best_path and float(weights["w"][0]) == 3.0 and not temps(folder)
