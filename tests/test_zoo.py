"""timm/<arch> and torchvision/<arch>: building, weight sources, preprocessing from the weights' config,
freezing and learning rates by stage, and one real training epoch. Weight files are saved by the tests
(nothing is downloaded); the shared EfficientNet-Lite0 ImageNet weights are used when present."""

import json

import pytest
import timm
import torch
import torchvision
from rich.console import Console

from classlab.config import RunConfig, validate
from classlab.errors import ClasslabError
from classlab.models import build_model
from classlab.models.freeze import model_groups, parameter_assignment, parameter_groups
from classlab.models.summary import layer_table_text, model_table, parameter_count
from classlab.runs import RunFolder
from classlab.study import train_run
from classlab.transforms import BatchTransform, Preprocess, preprocess_for

from .conftest import SHARED_DATA

QUIET = Console(quiet=True)
LITE0 = SHARED_DATA / "weights" / "tf_efficientnet_lite0.in1k.pth"

# (architecture, a weights file in its library's layout saved by the test): a ResNet, an EfficientNet and a
# ConvNeXt from timm, and a ResNet, an EfficientNet and a MobileNet from torchvision
FAMILIES = ["timm/resnet10t", "timm/tf_efficientnet_lite0", "timm/convnext_atto",
            "torchvision/resnet18", "torchvision/efficientnet_b0", "torchvision/mobilenet_v3_small"]


def _model(name, **model):
    return validate(RunConfig, {"name": "r", "model": {"name": name, **model}}).model


def _library_state(name: str) -> dict:
    family, arch = name.split("/")
    torch.manual_seed(7)
    if family == "timm":
        return timm.create_model(arch, pretrained=False).state_dict()  # 1000 classes, 3 channels, like the hub
    return torchvision.models.get_model(arch, weights=None).state_dict()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo-weights")
    out = {}
    for name in FAMILIES:
        out[name] = folder / (name.replace("/", "_") + ".pth")
        torch.save(_library_state(name), out[name])
    return out


def _run(idx_folder, name, train=None, data=None, **model):
    return validate(RunConfig, {
        "name": "r", "data": {"dataset": "idx", "root": str(idx_folder), "val_fraction": 0.25,
                              "subset": {"train": 64, "test": 16}, "resize": 32, **(data or {})},
        "model": {"name": name, **model},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.01, **(train or {})},
    })


@pytest.mark.parametrize("name", FAMILIES)
def test_family_builds_summarises_freezes_by_stage_and_trains(name, weight_files, idx_folder, tmp_path):
    cfg = _run(idx_folder, name, pretrained=str(weight_files[name]), freeze={"all_but": ["last_stage", "head"]})
    folder = RunFolder(tmp_path / "r")
    train_run(cfg, folder, torch.device("cpu"), QUIET)
    before = torch.load(weight_files[name], weights_only=True)
    after = torch.load(folder.path / "checkpoints" / "last.pt", weights_only=True)["model"]
    model = build_model(cfg.model.model_copy(update={"pretrained": "none"}), 4, (3, 32, 32))
    groups = model_groups(model)
    roles = [g.role for g in groups]
    assert roles[0] == "stem" and roles[-1] == "head" and roles.count("stage") >= 3
    last_stage = next(g for g in reversed(groups) if g.role == "stage")
    frozen_keys = [n for g in groups if g.role == "stem" for n, _ in g.params]
    trained_keys = [n for n, p in last_stage.params if p.ndim > 1]
    for key in frozen_keys:  # the stem kept its pretrained weights (and frozen BatchNorm its statistics)
        assert torch.equal(after[key], before[key]), key
    frozen_bn = [k for k in after if k.endswith("running_mean") and k.rsplit(".", 1)[0] + ".weight" in frozen_keys]
    assert frozen_bn or name.endswith("convnext_atto")  # ConvNeXt has LayerNorm, no BatchNorm
    for key in frozen_bn:
        assert torch.equal(after[key], before[key]), key
    assert any(not torch.equal(after[k], before[k]) for k in trained_keys)
    head = [n for g in groups if g.role == "head" for n, _ in g.params]
    assert [after[k] for k in head if after[k].ndim == 2][-1].shape[0] == 4  # a new 4-class head
    # summary: every layer's group and LR, frozen layers without one
    table = folder.read_model_summary()[1]
    rows = {r["layer"]: r for r in table["rows"]}
    assert any(r["lr_group"] == last_stage.name and r["lr"] == 0.01 for r in rows.values())
    assert all(r["lr"] is None for r in rows.values() if r["params"] and r["lr_group"] in
               {g.name for g in groups if g.role == "stem"})
    # the weights' preprocessing (timm pretrained_cfg / torchvision transforms()) but the YAML's size
    pre = json.loads(folder.preprocessing_path.read_text())
    assert pre["input_shape"] == [3, 32, 32] and pre["origin"]["input_size"] == "data.resize"
    assert ("timm pretrained_cfg" if name.startswith("timm") else "torchvision") in pre["origin"]["mean_std"]
    log = "\n".join(folder.read_run_log())
    assert "warning: input 32x32 is under half the " in log


def test_imagenet_offline_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ClasslabError) as e:
        build_model(_model("timm/resnet10t", pretrained="imagenet"), 3, (3, 32, 32))
    msg = str(e.value)
    assert "timm/resnet10t.c3_in1k" in msg and str(tmp_path / "hf" / "hub") in msg and "offline" in msg
    assert "\n" not in msg
    with pytest.raises(ClasslabError) as e:
        build_model(_model("torchvision/resnet18", pretrained="imagenet"), 3, (3, 32, 32))
    assert "resnet18-f37072fd.pth" in str(e.value) and str(tmp_path / "torch-home") in str(e.value)


def test_imagenet_from_the_caches(weight_files, tmp_path, monkeypatch):
    """timm's weights from the Hugging Face cache layout, torchvision's from torch.hub's folder."""
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in _library_state("timm/resnet10t").items()}
    save_file(state, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    model = build_model(_model("timm/resnet10t", pretrained="imagenet"), 3, (3, 32, 32))
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(weight_files["torchvision/resnet18"].read_bytes())
    model = build_model(_model("torchvision/resnet18", pretrained="imagenet"), 3, (3, 32, 32))
    saved = torch.load(weight_files["torchvision/resnet18"], weights_only=True)
    assert torch.equal(model.layer3[0].conv1.weight, saved["layer3.0.conv1.weight"]) and model.fc.out_features == 3


def test_bad_names_and_weights_are_one_line(weight_files, tmp_path):
    with pytest.raises(ClasslabError, match="did you mean 'tf_efficientnet_lite0'"):
        build_model(_model("timm/tf_efficientnet_lite00"), 3, (3, 32, 32))
    with pytest.raises(ClasslabError, match="did you mean 'resnet18'"):
        build_model(_model("torchvision/resnet81"), 3, (3, 32, 32))
    state = torch.load(weight_files["timm/resnet10t"], weights_only=True)
    del state["layer1.0.bn1.running_var"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(ClasslabError, match="missing key 'layer1.0.bn1.running_var'"):
        build_model(_model("timm/resnet10t", pretrained=str(tmp_path / "cut.pth")), 3, (3, 32, 32))
    with pytest.raises(ClasslabError, match="weights do not fit"):  # another architecture's file
        build_model(_model("timm/resnet10t", pretrained=str(weight_files["timm/convnext_atto"])), 3, (3, 32, 32))
    with pytest.raises(ClasslabError, match="unknown group 'stage9'|has 4 stages"):
        build_model(_model("torchvision/resnet18", freeze={"all_but": ["stage9"]}), 3, (3, 32, 32))
    with pytest.raises(ClasslabError, match="only 'stages' takes a list"):
        validate(RunConfig, {"name": "r", "model": {"name": "timm/resnet10t"}, "train": {"lr_groups": {"head": [1.0]}}})


def test_gray_input_and_head_layers():
    model = build_model(_model("timm/resnet10t", head=[{"linear": 32}, "relu"]), 5, (1, 32, 32))
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    assert isinstance(model.fc, torch.nn.Sequential) and model.fc[0].out_features == 32
    model = build_model(_model("torchvision/mobilenet_v3_small", head=[{"linear": 16}]), 5, (3, 32, 32))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_lr_groups_by_role_list_and_decay():
    model = build_model(_model("torchvision/resnet18"), 3, (3, 32, 32))
    groups = parameter_groups(model, {"stem": 1e-5, "stages": [1e-5, 5e-5, 1e-4, 5e-4], "head": 1e-3}, 0.1)
    assert {g["name"]: g["lr"] for g in groups} == {"conv1": 1e-5, "bn1": 1e-5, "layer1": 1e-5, "layer2": 5e-5,
                                                    "layer3": 1e-4, "layer4": 5e-4, "fc": 1e-3}
    groups = parameter_groups(model, {"decay": 0.5, "layer1": 0.2}, 1e-3)  # a named group wins over decay
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["fc"] == 1e-3 and lrs["layer4"] == 5e-4 and lrs["layer2"] == 1.25e-4 and lrs["layer1"] == 0.2
    assert lrs["conv1"] == lrs["bn1"] == pytest.approx(1e-3 * 0.5 ** 5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    with pytest.raises(ClasslabError, match="4 rates for 7 stages|7 stages"):
        parameter_groups(build_model(_model("timm/tf_efficientnet_lite0"), 3, (3, 32, 32)),
                         {"stages": [1e-3] * 4, "stem": 1e-3, "head": 1e-3})
    _, rows = model_table(model, (3, 32, 32), {"decay": 0.5}, 1e-3)
    text = layer_table_text(rows, parameter_count(model), (3, 32, 32))
    assert "group" in text.splitlines()[0] and "layer4" in text and "3.125e-05" in text


def test_preprocessing_from_the_weights_and_mismatch_warnings(idx_folder, weight_files):
    from classlab.data import load_dataset

    cfg = _run(idx_folder, "timm/tf_efficientnet_lite0", pretrained=str(weight_files["timm/tf_efficientnet_lite0"]),
               data={"resize": None})
    data = load_dataset(cfg.data)
    pre = preprocess_for(cfg, data)
    assert pre.input_shape == (3, 224, 224) and pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert pre.interpolation == "bicubic" and pre.to_rgb and not pre.warnings
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    cfg = _run(idx_folder, "torchvision/resnet18", pretrained=str(weight_files["torchvision/resnet18"]),
               data={"resize": 28, "normalize": {"mean": [0.5], "std": [0.5]}})
    pre = preprocess_for(cfg, load_dataset(cfg.data))
    assert pre.interpolation == "bilinear" and pre.input_shape == (3, 28, 28)
    assert len(pre.warnings) == 2 and "under half the 224x224" in pre.warnings[0]
    assert "differs from the pretrained weights' (mean [0.485, 0.456, 0.406]" in pre.warnings[1]
    scratch = preprocess_for(_run(idx_folder, "timm/resnet10t", data={"resize": None}), data)
    assert scratch.input_shape == (1, 28, 28) and dict(scratch.origin)["input_size"] == "the images"
    assert not scratch.warnings
    assert preprocess_for(_run(idx_folder, "torchvision/resnet18"), data).input_shape == (3, 32, 32)


def test_gray_resized_before_the_copy_to_rgb_and_antialias_only_when_shrinking():
    x = torch.randint(0, 256, (3, 1, 48, 48), dtype=torch.uint8)
    for size, interpolation in (((96, 96), "bicubic"), ((20, 20), "bilinear")):
        pre = Preprocess(input_shape=(3, *size), mean=(0.5,) * 3, std=(0.5,) * 3, classes=("a",),
                         source_shape=(1, 48, 48), to_rgb=True, resize=size, interpolation=interpolation)
        t = BatchTransform(pre, None, torch.device("cpu"))
        assert t.antialias == (size[0] < 48)
        out = t(x)
        ref = torch.nn.functional.interpolate(x.float().expand(-1, 3, -1, -1), size=size, mode=interpolation,
                                              align_corners=False, antialias=size[0] < 48) / 127.5 - 1
        assert out.shape == (3, 3, *size) and torch.allclose(out, ref, atol=1e-4)


def test_start_from_a_zoo_run_folder(idx_folder, tmp_path):
    first = _run(idx_folder, "timm/resnet10t")
    train_run(first, RunFolder(tmp_path / "first"), torch.device("cpu"), QUIET)
    best = RunFolder(tmp_path / "first").read_result_weights()[0]
    second = _run(idx_folder, "timm/resnet10t", pretrained=str(tmp_path / "first"), data={"resize": None})
    from classlab.data import load_dataset

    pre = preprocess_for(second, load_dataset(second.data))
    assert pre.input_shape == (1, 32, 32) and "run folder" in dict(pre.origin)["input_size"]
    model = build_model(second.model, 9, pre.input_shape)
    assert torch.equal(model.layer4[0].conv2.weight, best["layer4.0.conv2.weight"]) and model.fc.out_features == 9
    from classlab.inference import load_run, predict_images

    run = load_run(tmp_path / "first", device="cpu")  # predict rebuilds the zoo model from the run folder
    assert predict_images(run, torch.zeros(2, 1, 28, 28, dtype=torch.uint8).numpy()).shape == (2, 4)


def test_models_listing():
    from classlab.models.zoo import list_architectures

    names = list_architectures("efficientnet_lite0", pretrained=True)
    assert "timm/tf_efficientnet_lite0.in1k" in names
    assert "torchvision/resnet18" in list_architectures("resnet1")


def test_groups_cover_every_parameter_once():
    for name in FAMILIES + ["timm/vit_tiny_patch16_224", "torchvision/vit_b_16", "resnet18"]:
        model = build_model(_model(name), 3, (3, 224, 224) if "vit" in name else (3, 32, 32))
        params = [id(p) for g in model_groups(model) for _, p in g.params]
        assert len(params) == len(set(params)) == len(list(model.parameters())), name
        assert set(parameter_assignment(model, None, 1e-3)) == set(params)


@pytest.mark.skipif(not LITE0.is_file(), reason=f"shared ImageNet weights not found at {LITE0}")
def test_shared_imagenet_lite0_preprocessing_and_freezing(idx_folder, tmp_path):
    cfg = _run(idx_folder, "timm/tf_efficientnet_lite0", pretrained=str(LITE0), data={"resize": 64},
               freeze={"all_but": ["last_stage", "head"]})
    folder = RunFolder(tmp_path / "lite0")
    train_run(cfg, folder, torch.device("cpu"), QUIET)
    pre = json.loads(folder.preprocessing_path.read_text())
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5] and pre["interpolation"] == "bicubic"
    assert "tf_efficientnet_lite0.in1k" in pre["origin"]["mean_std"] and pre["input_shape"] == [3, 64, 64]
    before = torch.load(LITE0, weights_only=True)
    after = torch.load(folder.path / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.0.0.conv_dw.weight", "blocks.5.3.bn3.weight",
                "blocks.5.3.bn3.running_var"):
        assert torch.equal(after[key], before[key]), key  # frozen: unchanged, BatchNorm statistics too
    for key in ("blocks.6.0.conv_pw.weight", "conv_head.weight", "bn2.running_mean"):
        assert not torch.equal(after[key], before[key]), key  # the last stage trained
    assert after["classifier.weight"].shape == (4, 1280)
