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


def test_overrides_are_type_checked_and_set_the_base(tmp_path, idx_folder):
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "a", "train": {"epochs": 5}}, {"name": "b"}])
    path = write_study(tmp_path / "s.yaml", study)
    notes: list[str] = []
    cfg = load_study(path, ["train.epochs=3", "seeds=[1, 2]"], notes)
    runs = expand(cfg)
    assert [r.config.name for r in runs] == ["a-seed1", "a-seed2", "b-seed1", "b-seed2"]
    assert {r.config.name: r.config.train.epochs for r in runs} == {"a-seed1": 5, "a-seed2": 5, "b-seed1": 3,
                                                                   "b-seed2": 3}
    assert notes == ["-o train.epochs=3: set for the base; kept the own value of a (5), which set train.epochs "
                     "themselves; to change one, -o runs.a.train.epochs=..."]
    assert "train.epochs" in _error(tmp_path, study, "train.epochs=three")
    assert "greater than 0" in _error(tmp_path, study, "train.epochs=-1")


def test_override_never_collapses_a_comparison_silently(tmp_path, idx_folder, capsys):
    """Issue 26.1: `-o model.pretrained=<file>` must not give the `scratch` run weights; a grid axis on the key is
    pinned with a line; one run or one axis can be addressed."""
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "scratch", "model": {"pretrained": "none"}},
                                                   {"name": "fc-only", "model": {"freeze": {"all_but": ["head"]}}}],
                       grid={"model.name": ["torchvision/resnet18", "timm/resnet10t"]})
    study["model"] = {"name": "torchvision/resnet18", "pretrained": "imagenet"}
    path = write_study(tmp_path / "s.yaml", study)
    cfg = load_study(path, ["model.pretrained=w.pth", "model.name=torchvision/resnet18"])
    err = capsys.readouterr().err  # without a notes list, the lines go to stderr
    got = {p.config.name: (p.config.model.name, p.config.model.pretrained) for p in expand(cfg)}
    assert got == {"scratch-torchvision_resnet18": ("torchvision/resnet18", "none"),
                   "fc-only-torchvision_resnet18": ("torchvision/resnet18", "w.pth")}
    assert "kept the own value of scratch (none)" in err and "-o runs.scratch.model.pretrained=" in err
    assert "grid axis model.name pinned" in err and "timm/resnet10t" in err
    cfg = load_study(path, ["runs.scratch.model.pretrained=w.pth", "grid.model.name=[timm/resnet10t]"], [])
    assert {p.config.name: p.config.model.pretrained for p in expand(cfg)} == {
        "scratch-timm_resnet10t": "w.pth", "fc-only-timm_resnet10t": "imagenet"}
    msg = _error(tmp_path, study, "runs.scrach.model.pretrained=x")
    assert "no run named 'scrach' (did you mean 'scratch'?)" in msg
    assert "takes a list of values" in _error(tmp_path, study, "grid.model.name=timm/resnet10t")


def test_the_zoo_experiments_offline_instruction_keeps_scratch_from_scratch(capsys):
    """experiments/fer-transfer-zoo.yaml's own offline command gives the intended study."""
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "experiments" / "fer-transfer-zoo.yaml").read_text()
    lines = text.splitlines()
    at = next(i for i, ln in enumerate(lines) if "model.pretrained=../shared" in ln)  # the command's last line
    command = " ".join(ln.lstrip("# ").rstrip(" \\") for ln in lines[at - 1 : at + 1])
    assert command.startswith("classlab run experiments/fer-transfer-zoo.yaml")
    overrides = [part.strip() for part in command.split(" -o ")[1:]]
    assert overrides == ["model.name=timm/tf_efficientnet_lite0",
                         "model.pretrained=../shared/data/weights/tf_efficientnet_lite0.in1k.pth"]
    cfg = load_study(repo / "experiments" / "fer-transfer-zoo.yaml", overrides, [])
    got = {p.config.name.split("-timm")[0]: p.config.model.pretrained for p in expand(cfg)}
    assert got == {"scratch": "none", "fc-only": overrides[1].split("=", 1)[1],
                   "fine-tuned": overrides[1].split("=", 1)[1]}


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


@pytest.mark.parametrize(("section", "values", "words"), [
    ("train", {"loss": "nll", "label_smoothing": 0.1}, ["label_smoothing acts in loss: cross_entropy"]),
    ("train", {"optimizer": "adam", "momentum": 0.9}, ["momentum acts in sgd and rmsprop", "adam has none"]),
    ("train", {"optimizer": "adamw", "momentum": 0.5}, ["adamw has none"]),
    ("train", {"scheduler": {"name": "cosine", "step_size": 3}}, ["step_size set the step schedule", "'cosine'"]),
    ("train", {"scheduler": {"name": "none", "gamma": 0.5}}, ["gamma set the step schedule", "'none'"]),
    ("train", {"device": "cpu", "amp": "bf16"}, ["amp: bf16 acts on CUDA only"]),
    ("train", {"device": "cpu", "sync_batchnorm": True}, ["sync_batchnorm acts under DDP on CUDA"]),
    ("model", {"name": "mlp", "dropout_after": [1]}, ["dropout is 0"]),
    ("model", {"name": "mlp", "hidden": [8, 8], "dropout": 0.2, "dropout_after": [3]}, ["hidden layers are 1..2"]),
    ("model", {"name": "study_a_cnn", "dropout": 0.3}, ["study_a_cnn has no dropout layer"]),
    ("data", {"test_fraction": 0.3}, ["test_fraction act on image folders only"]),
    ("data", {"channels": 3}, ["channels act on image folders only"]),
    ("data", {"dataset": "fashion-mnist", "augment": {"color_jitter": {"brightness": 0.2, "hue": 0.1}}, "to_rgb": True},
     ["saturation / hue change colours", "gray"]),
])
def test_settings_that_would_be_ignored_are_refused_with_why(tmp_path, idx_folder, section, values, words):
    """Issue 26.2: a setting either acts or is refused with one line naming it and why (never read and ignored)."""
    study = tiny_study(tmp_path, idx_folder)
    if section == "model":
        study["model"] = values
    else:
        study[section].update(values)
    msg = _error(tmp_path, study)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_settings_that_act_are_accepted_and_dumped_configs_reload(tmp_path, idx_folder):
    """The refusals above look at values that differ from the defaults: a run's config.yaml (every field, the
    defaults included) validates again, and the same keys where they act are accepted."""
    study = tiny_study(tmp_path, idx_folder)
    study["train"].update({"optimizer": "sgd", "momentum": 0.9, "label_smoothing": 0.1,
                           "scheduler": {"name": "step", "step_size": 3, "gamma": 0.5}})
    study["model"] = {"name": "mlp", "hidden": [8, 8], "dropout": 0.2, "dropout_after": [2]}
    (cfg,) = [p.config for p in expand(load_study(write_study(tmp_path / "s.yaml", study)))]
    assert validate(RunConfig, cfg.model_dump(mode="json")) == cfg
    study["train"].update({"optimizer": "adam", "momentum": 0.0, "scheduler": "cosine"})
    (cfg,) = [p.config for p in expand(load_study(write_study(tmp_path / "s.yaml", study)))]
    assert cfg.train.scheduler.step_size == 5 and validate(RunConfig, cfg.model_dump(mode="json")) == cfg
