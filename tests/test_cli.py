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
