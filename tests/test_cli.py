"""The CLI end to end: one clear line and exit 2 for bad input; the demo trains and prints its table."""

import json

from tests.conftest import make_idx_folder, tiny_study, write_study


def _assert_one_clear_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_misspelt_key_exit_2(run_cli, tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder)
    study["train"]["optimiser"] = "sgd"
    code, _, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 2
    _assert_one_clear_line(err, "s.yaml", "unknown key 'optimiser' in 'train'", "did you mean 'optimizer'")
    assert not (tmp_path / "runs").exists()


def test_missing_data_folder_exit_2(run_cli, tmp_path):
    study = tiny_study(tmp_path, tmp_path / "nowhere")
    study["data"] = {"dataset": "fashion-mnist", "root": str(tmp_path / "nowhere"), "download": False}
    code, _, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 2
    _assert_one_clear_line(err, "not found", str(tmp_path / "nowhere"), "train-images-idx3-ubyte.gz")
    assert not list((tmp_path / "runs").rglob("summary.json"))


def test_wrong_file_in_data_folder_exit_2(run_cli, tmp_path):
    folder = make_idx_folder(tmp_path / "data")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"<html>404 not found</html>")
    study = tiny_study(tmp_path, folder)
    code, _, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 2
    _assert_one_clear_line(err, "t10k-labels-idx1-ubyte.gz", "not an IDX file")


def test_missing_study_file_and_bad_override(run_cli, tmp_path, idx_folder):
    code, _, err = run_cli("run", str(tmp_path / "absent.yaml"))
    assert code == 2
    _assert_one_clear_line(err, "absent.yaml", "file not found")
    path = write_study(tmp_path / "s.yaml", tiny_study(tmp_path, idx_folder))
    code, _, err = run_cli("run", str(path), "-o", "train.epochs=zero")
    assert code == 2
    _assert_one_clear_line(err, "train.epochs")


def test_run_trains_skips_and_prints_table(run_cli, tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "original"},
                                                    {"name": "permuted", "data": {"permute_pixels": {"seed": 0}}}])
    path = write_study(tmp_path / "s.yaml", study)
    code, out, err = run_cli("run", str(path))
    assert code == 0, err
    assert "original" in out and "permuted" in out and "acc %" in out
    summary = json.loads((tmp_path / "runs" / "toy" / "permuted" / "summary.json").read_text())
    assert summary["epochs_run"] == 2
    code, out, _ = run_cli("run", str(path))
    assert code == 0 and out.count("already complete, skipped") == 2


def test_demo_runs_with_no_argument(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("run", "-o", "train.epochs=1", "-o", "data.subset={train: 600, test: 200}")
    assert code == 0, err
    assert "demo" in out and "original" in out and "permuted" in out
    assert (tmp_path / "runs" / "demo" / "original" / "summary.json").is_file()


def test_summary_command_prints_model_table(run_cli, tmp_path, idx_folder):
    path = write_study(tmp_path / "s.yaml", tiny_study(tmp_path, idx_folder))
    code, out, err = run_cli("summary", str(path))
    assert code == 0, err
    assert "Conv2d" in out and "trainable" in out and "frozen" in out
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- issue 15: items 6 and 10


def test_restart_run_retrains_only_the_named_run(run_cli, tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "a"}, {"name": "b"}],
                       train={"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.01})
    path = write_study(tmp_path / "s.yaml", study)
    assert run_cli("run", str(path))[0] == 0
    runs = tmp_path / "runs" / "toy"
    (runs / "a" / "marker").write_text("from the first training")
    (runs / "b" / "marker").write_text("from the first training")
    code, out, err = run_cli("run", str(path), "--restart-run", "a")
    assert code == 0, err
    assert not (runs / "a" / "marker").exists() and (runs / "a" / "summary.json").is_file()  # a: retrained
    assert (runs / "b" / "marker").exists() and "b: already complete, skipped" in out  # b: kept
    code, _, err = run_cli("run", str(path), "--restart-run", "c")
    assert code == 2 and "--restart-run c" in err and "runs: a, b" in err


def test_changed_config_and_corrupt_checkpoint_name_the_per_run_restart(run_cli, tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "a"}, {"name": "b"}],
                       train={"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.01})
    path = write_study(tmp_path / "s.yaml", study)
    assert run_cli("run", str(path))[0] == 0
    code, _, err = run_cli("run", str(path), "-o", "train.lr=0.02")
    assert code == 2 and "--restart-run a" in err, err
    folder = tmp_path / "runs" / "toy" / "b"
    (folder / "summary.json").unlink()  # b: interrupted, with a broken last.pt
    (folder / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run_cli("run", str(path))
    assert code == 2 and "classlab run STUDY --restart-run b" in err, err
    code, _, err = run_cli("run", str(path), "--restart-run", "b")
    assert code == 0, err


def test_version_option(run_cli):
    from classlab import __version__

    for args in (["--version"], ["version"]):
        code, out, _ = run_cli(*args)
        assert code == 0 and out.strip() == __version__


def test_progress_line_off_a_terminal_at_least_every_log_every(monkeypatch):
    """In a log (not a terminal) a long epoch still prints: a plain line once LOG_EVERY seconds have passed
    (fit asks `wants_updates` every few steps; between lines it is False, so the host reads are skipped)."""
    import io

    from rich.console import Console

    from classlab.train import progress as progress_module
    from classlab.train.progress import EpochProgress

    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    progress = EpochProgress(Console(file=log, force_terminal=False, width=200), "base", 3)
    progress.start_epoch(1, 500)
    assert not progress.wants_updates
    clock[0] += 29.0
    assert not progress.wants_updates
    clock[0] += 1.0
    assert progress.wants_updates
    progress.step(120, 0.5, 0.75, 1234.0)
    assert "base epoch 1/3  step 120/500  train loss 0.5000 acc 75.00%  1,234 img/s" in log.getvalue()
    assert not progress.wants_updates  # the next line only 30 s later


def test_early_stopping_is_said_on_the_console(run_cli, tmp_path, idx_folder):
    # test_train's setting: a huge LR makes validation loss get worse after the first epochs
    study = tiny_study(tmp_path, idx_folder, train={"epochs": 30, "batch_size": 32, "optimizer": "sgd", "lr": 0.5,
                                                    "early_stopping": {"patience": 2}})
    del study["data"]["val_fraction"]  # the default 0.1
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "toy" / "base" / "summary.json").read_text())
    assert summary["stopped_early"], "the toy run did not stop early: pick a faster-overfitting setting"
    line = next(line for line in out.splitlines() if "keeping epoch" in line)
    assert f"base: early stopping: no val_loss improvement for 2 epochs; keeping epoch {summary['best_epoch']}" in line
