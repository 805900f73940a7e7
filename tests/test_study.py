import pytest

from classlab.config import RunConfig, load_study, validate
from classlab.plan import expand, grid_cells
from tests.conftest import tiny_study, write_study


def test_runs_times_seeds_have_stable_names(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, seeds=[0, 1, 2],
                       runs=[{"name": "original"}, {"name": "permuted", "data": {"permute_pixels": {"seed": 7}}}])
    cfg = load_study(write_study(tmp_path / "s.yaml", study))
    runs = expand(cfg)
    assert [r.config.name for r in runs] == [f"{v}-seed{s}" for v in ("original", "permuted") for s in (0, 1, 2)]
    assert [r.config.seed for r in runs] == [0, 1, 2] * 2
    assert runs[3].config.data.permute_pixels.seed == 7 and runs[0].config.data.permute_pixels is None
    assert runs[3].variant == "permuted"
    # the same file expands the same way twice
    assert [r.config for r in expand(cfg)] == [r.config for r in runs]


def test_grid_2x2_times_2_seeds_is_8_named_runs(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, seeds=[0, 1],
                       grid={"train.optimizer": ["adam", "rmsprop"], "train.l1": [0.0, 0.001]})
    cfg = load_study(write_study(tmp_path / "s.yaml", study))
    runs = expand(cfg)
    names = [r.config.name for r in runs]
    assert len(names) == 8 == len(set(names))
    assert "adam-l1_0.001-seed1" in names
    cell = next(r.config for r in runs if r.config.name == "rmsprop-l1_0.001-seed0")
    assert cell.train.optimizer == "rmsprop" and cell.train.l1 == 0.001


def test_grid_names_fall_back_to_keys_when_values_clash():
    cells = grid_cells({"train.lr": [0.1, 0.2], "train.momentum": [0.1, 0.2]})
    assert len({n for n, _ in cells}) == 4


def test_switching_model_in_a_run_replaces_it(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "cnn"}, {"name": "mlp", "model": {"name": "mlp",
                                                                                               "hidden": [8]}}])
    cfg = load_study(write_study(tmp_path / "s.yaml", study))
    runs = expand(cfg)
    assert runs[1].config.model.name == "mlp" and runs[1].config.model.hidden == [8]


def test_select_and_retrain_on_train_plus_val(tmp_path, idx_folder):
    from rich.console import Console

    from classlab.runs import RunFolder
    from classlab.study import run_study

    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "small"}, {"name": "wide", "model": {
        "name": "cnn", "layers": [{"conv": {"out": 8, "kernel": 3}}, "relu", {"maxpool": 2}, "flatten"]}}],
        grid={"train.optimizer": ["adam", "sgd"]}, select={"metric": "val_accuracy"}, retrain_on="train+val")
    study["train"]["epochs"] = 1
    result = run_study(write_study(tmp_path / "s.yaml", study), console=Console(quiet=True))
    names = [s["name"] for s in result.summaries]
    assert names[:4] == ["small-adam", "small-sgd", "wide-adam", "wide-sgd"]
    val_acc = {s["name"]: s["best_val"]["accuracy"] for s in result.summaries[:4]}
    assert result.selected == max(val_acc, key=val_acc.get)
    assert names[4] == f"retrain-{result.selected}"
    retrained = result.summaries[4]
    assert retrained["data"]["val"] == 0 and retrained["data"]["train"] == 240
    assert RunFolder(tmp_path / "runs" / "toy" / names[4]).read_config()["data"]["val_fraction"] is None
    # pinning the choice retrains that variant; the finished grid is reused, not retrained
    other = next(n for n in names[:4] if n != result.selected)
    again = run_study(tmp_path / "s.yaml", [f"select.variant={other}"], console=Console(quiet=True))
    assert again.selected == other and again.summaries[-1]["name"] == f"retrain-{other}"
    from classlab.errors import ClasslabError

    with pytest.raises(ClasslabError, match="select.variant 'nope' is not a run"):
        run_study(tmp_path / "s.yaml", ["select.variant=nope"], console=Console(quiet=True))


def test_every_experiment_file_expands(tmp_path):
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
    assert len(files) >= 8
    counts = {}
    for path in files:
        cfg = load_study(path)
        runs = expand(cfg, where=str(path))
        counts[path.stem] = len(runs)
        for run in runs:  # what config.yaml stores must load back to the same config
            assert validate(RunConfig, run.config.model_dump(mode="json")) == run.config
    assert counts["fashion-mlp-grid"] == 8 and counts["fer-resnet18"] == 4
    assert counts["fashion-3class-permutation"] == counts["fashion-3class-cnn-dropout"] == 2


def test_seeds_give_mean_and_std_in_the_comparison(tmp_path, idx_folder, run_cli):
    study = tiny_study(tmp_path, idx_folder, seeds=[0, 1], grid={"train.optimizer": ["adam", "sgd"]})
    study["train"]["epochs"] = 1
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    from classlab.evidence import compare_runs
    from classlab.runs import find_runs

    summaries = [r.read_summary() for r in find_runs(tmp_path / "runs" / "toy")]
    rows = {r.variant: r for r in compare_runs(summaries)}
    assert set(rows) == {"adam", "sgd"} and rows["adam"].accuracy.n == 2
    accs = [s["test"]["accuracy"] for s in summaries if s["name"].startswith("adam")]
    assert abs(rows["adam"].accuracy.mean - sum(accs) / 2) < 1e-12
    assert "±" in out  # the printed table shows mean ± std per variant


def test_tensorboard_scalars(tmp_path, idx_folder, run_cli):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study = tiny_study(tmp_path, idx_folder)
    study["train"]["tensorboard"] = True
    code, _, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / "runs" / "toy" / "base" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"} <= tags
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]


def test_mlp_grid_cells_train_together_into_their_own_folders(tmp_path, idx_folder, run_cli):
    from classlab.runs import RunFolder

    study = tiny_study(tmp_path, idx_folder, grid={"train.optimizer": ["adam", "rmsprop"], "train.l1": [0.0, 1e-4]})
    study["model"] = {"name": "mlp", "hidden": [32, 16]}
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    assert "training 4 runs together" in out
    for name in ("adam-l1_0.0", "adam-l1_0.0001", "rmsprop-l1_0.0", "rmsprop-l1_0.0001"):
        folder = RunFolder(tmp_path / "runs" / "toy" / name)
        summary = folder.read_summary()
        assert summary["trained_together"] and summary["test"]["accuracy"] > 0.9
        assert len(folder.read_metrics()) == 2 and (folder.path / "checkpoints" / "last.pt").is_file()
        assert folder.read_config()["train"]["optimizer"] == name.split("-")[0]
    code, out, _ = run_cli("run", str(tmp_path / "s.yaml"))  # finished runs are skipped, not retrained
    assert code == 0 and out.count("already complete, skipped") == 4


def test_select_ranks_with_the_seed_spread_pooled_over_cells():
    from classlab.evidence import select_variant, validation_scores

    def runs(variant, accs):
        return [{"name": f"{variant}-seed{i}", "kept_val": {"accuracy": a, "loss": 1 - a}} for i, a in enumerate(accs)]

    summaries = runs("noisy", [0.97, 0.75, 0.96]) + runs("stable", [0.86, 0.87, 0.86])
    assert select_variant(validation_scores(summaries, "val_accuracy")) == "noisy"  # the higher mean
    # equal seeds: one spread pooled over the cells, so the lower bound ranks as the mean does
    assert select_variant(validation_scores(summaries, "val_accuracy"), "lower_bound") == "noisy"
    assert select_variant(validation_scores(summaries, "val_loss"), "lower_bound", higher_is_better=False) == "noisy"
    # a one-seed cell is not ranked above the others on one lucky seed: its bound uses the pooled spread
    lucky = validation_scores(summaries + runs("lucky", [0.99])[:1], "val_accuracy")
    assert select_variant(lucky, "lower_bound") == "noisy"


def test_grid_cell_names_say_which_number_is_which():
    names = [n for n, _ in grid_cells({"train.lr": [0.001, 0.01], "train.batch_size": [16]})]
    assert names == ["lr0.001-bs16", "lr0.01-bs16"]
    assert [n for n, _ in grid_cells({"train.optimizer": ["adam"], "model.batchnorm": [True]})] == \
        ["adam-batchnorm_true"]  # words stay as they are; a boolean says whose it is
    assert [n for n, _ in grid_cells({"train.l1": [0.0001], "model.hidden": [[256, 128]]})] == \
        ["l1_0.0001-hidden256x128"]


def test_terminal_and_report_list_runs_in_the_study_order(tmp_path, idx_folder):
    """MLP runs train stacked before a CNN listed between them: the results still come in the study's order,
    and the study folder records that order for the report."""
    from rich.console import Console

    from classlab.report.load import load_study_runs
    from classlab.study import run_study

    mlp = {"name": "mlp", "hidden": [8]}
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "b-mlp", "model": mlp}, {"name": "a-cnn"},
                                                   {"name": "c-mlp", "model": mlp, "train": {"lr": 0.02}}])
    study["train"]["epochs"] = 1
    result = run_study(write_study(tmp_path / "s.yaml", study), console=Console(quiet=True))
    order = ["b-mlp", "a-cnn", "c-mlp"]
    assert [s["name"] for s in result.summaries] == order
    runs, _ = load_study_runs(result.folder)
    assert [r.name for r in runs] == order
