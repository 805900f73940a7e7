from classlab.config import load_study
from classlab.study import expand, grid_cells
from tests.conftest import tiny_study, write_study


def test_runs_times_seeds_have_stable_names(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, seeds=[0, 1, 2],
                       runs=[{"name": "original"}, {"name": "permuted", "data": {"permute_pixels": {"seed": 7}}}])
    cfg, cli = load_study(write_study(tmp_path / "s.yaml", study))
    runs = expand(cfg, cli)
    assert [r.config.name for r in runs] == [f"{v}-seed{s}" for v in ("original", "permuted") for s in (0, 1, 2)]
    assert [r.config.seed for r in runs] == [0, 1, 2] * 2
    assert runs[3].config.data.permute_pixels.seed == 7 and runs[0].config.data.permute_pixels is None
    assert runs[3].variant == "permuted"
    # the same file expands the same way twice
    assert [r.config for r in expand(cfg, cli)] == [r.config for r in runs]


def test_grid_2x2_times_2_seeds_is_8_named_runs(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, seeds=[0, 1],
                       grid={"train.optimizer": ["adam", "rmsprop"], "train.l1": [0.0, 0.001]})
    cfg, cli = load_study(write_study(tmp_path / "s.yaml", study))
    runs = expand(cfg, cli)
    names = [r.config.name for r in runs]
    assert len(names) == 8 == len(set(names))
    assert "adam-0.001-seed1" in names
    cell = next(r.config for r in runs if r.config.name == "rmsprop-0.001-seed0")
    assert cell.train.optimizer == "rmsprop" and cell.train.l1 == 0.001


def test_grid_names_fall_back_to_keys_when_values_clash():
    cells = grid_cells({"train.lr": [0.1, 0.2], "train.momentum": [0.1, 0.2]})
    assert len({n for n, _ in cells}) == 4


def test_switching_model_in_a_run_replaces_it(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "cnn"}, {"name": "mlp", "model": {"name": "mlp",
                                                                                               "hidden": [8]}}])
    cfg, cli = load_study(write_study(tmp_path / "s.yaml", study))
    runs = expand(cfg, cli)
    assert runs[1].config.model.name == "mlp" and runs[1].config.model.hidden == [8]
