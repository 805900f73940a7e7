from pathlib import Path

import pytest
from pydantic import ValidationError

from classlab.config import RunConfig, load_study, parse_override, validate
from classlab.errors import ClasslabError
from classlab.plan import expand
from tests.conftest import tiny_study, write_study


def _error(tmp_path: Path, study: dict, *overrides: str) -> str:
    path = write_study(tmp_path / "s.yaml", study)
    with pytest.raises(ClasslabError) as e:
        cfg = load_study(path, overrides)
        expand(cfg, where=str(path))
    return str(e.value)


def test_misspelt_top_level_key_suggests(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder)
    study["seeds"] = [0]
    study["trian"] = study.pop("train")
    msg = _error(tmp_path, study)
    assert "unknown key 'trian'" in msg and "did you mean 'train'" in msg and "s.yaml" in msg


def test_misspelt_nested_key_has_dotted_path(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder)
    study["train"]["epocs"] = 3
    msg = _error(tmp_path, study)
    assert "unknown key 'epocs' in 'train'" in msg and "did you mean 'epochs'" in msg


def test_misspelt_layer_param_inside_model_union(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder)
    study["model"]["layers"][0] = {"conv": {"out": 4, "kernal": 3}}
    msg = _error(tmp_path, study)
    assert "model.layers[0].conv" in msg and "did you mean 'kernel'" in msg


def test_unknown_model_and_optimizer_suggest(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder)
    study["model"] = {"name": "cnnn", "layers": ["relu"]}
    assert "did you mean 'cnn'" in _error(tmp_path, study)
    study = tiny_study(tmp_path, idx_folder)
    study["train"]["optimizer"] = "adamm"
    msg = _error(tmp_path, study)
    assert "train.optimizer" in msg and "did you mean 'adam'" in msg


def test_overrides_are_type_checked_and_win(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "a", "train": {"epochs": 5}}, {"name": "b"}])
    path = write_study(tmp_path / "s.yaml", study)
    cfg = load_study(path, ["train.epochs=3", "seeds=[1, 2]"])
    runs = expand(cfg)
    assert [r.config.name for r in runs] == ["a-seed1", "a-seed2", "b-seed1", "b-seed2"]
    assert {r.config.train.epochs for r in runs} == {3}
    assert "train.epochs" in _error(tmp_path, study, "train.epochs=three")
    assert "greater than 0" in _error(tmp_path, study, "train.epochs=-1")


def test_parse_override_values():
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("data.augment={hflip: 0.5}") == ("data.augment", {"hflip": 0.5})
    with pytest.raises(ClasslabError):
        parse_override("train.lr")


def test_config_is_frozen(idx_folder):
    cfg = validate(RunConfig, {"name": "x", "model": {"name": "mlp"}})
    with pytest.raises(ValidationError):
        cfg.train.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"runs": []}, "runs: is empty"),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, "duplicate run names: a"),
        ({"data": {"dataset": "idx", "val_fraction": 1.5}}, "data.val_fraction"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"data": {"dataset": "fashion-mnistt"}}, "did you mean 'fashion-mnist'"),
    ],
)
def test_bad_values_name_their_key(tmp_path, idx_folder, change, needle):
    study = tiny_study(tmp_path, idx_folder)
    study.update(change)
    assert needle in _error(tmp_path, study)


def test_python_tag_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ClasslabError, match="plain YAML only"):
        load_study(path)


def test_layer_shorthands():
    cfg = validate(RunConfig, {"name": "x", "model": {"name": "cnn", "layers": [
        {"conv": 8}, "relu", {"maxpool": 2}, {"dropout": 0.1}, {"linear": 10}, {"leaky_relu": 0.2}]}})
    kinds = [layer.kind for layer in cfg.model.layers]
    assert kinds == ["conv", "relu", "maxpool", "dropout", "linear", "leaky_relu"]
    assert cfg.model.layers[0].conv.out == 8 and cfg.model.layers[5].leaky_relu.slope == 0.2


def test_registries_are_the_one_source_of_names():
    """Every name the config accepts has a builder and the other way round; unknown names get the
    registry's own did-you-mean."""
    import classlab.data
    import classlab.models  # noqa: F401  (their imports register the builders)
    from classlab.registry import ACTIVATIONS, DATASETS, MODELS

    for registry in (DATASETS, MODELS, ACTIVATIONS):
        assert registry.registered() == tuple(sorted(registry.names())), registry.kind
    with pytest.raises(ClasslabError, match=r"unknown dataset 'fashion-mnst' \(did you mean 'fashion-mnist'\?\)"):
        validate(RunConfig, {"name": "r", "data": {"dataset": "fashion-mnst"}, "model": {"name": "mlp"}})
    with pytest.raises(ClasslabError, match=r"unknown model 'resnet81' \(did you mean 'resnet18'\?\)"):
        validate(RunConfig, {"name": "r", "model": {"name": "resnet81"}})


def test_duplicate_yaml_key_names_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: toy\ntrain:\n  epochs: 2\nmodel: {name: mlp}\ntrain:\n  epochs: 5\n")
    with pytest.raises(ClasslabError, match=r"line 5: duplicate key 'train' \(first on line 2, again on line 5\)"):
        load_study(path)
    path.write_text("model: {name: mlp}\ntrain:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n")  # nested, too
    with pytest.raises(ClasslabError, match=r"duplicate key 'epochs' \(first on line 3, again on line 5\)"):
        load_study(path)
    # a key that overrides one merged in with << is not a duplicate
    path.write_text("base: &b {epochs: 2, lr: 0.1}\nmodel: {name: mlp}\ntrain:\n  <<: *b\n  epochs: 3\n")
    from classlab.config import read_yaml

    assert read_yaml(path)["train"] == {"epochs": 3, "lr": 0.1}
