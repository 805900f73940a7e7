"""ResNet-18 transfer learning: weight sources, head replacement, freezing, LR groups, input adaptation."""

import pickle

import pytest
import torch
import torchvision
from rich.console import Console

from classlab.config import RunConfig, validate
from classlab.errors import ClasslabError
from classlab.models import build_model
from classlab.runs import RunFolder
from classlab.study import train_run
from classlab.transforms import BatchTransform, Preprocess, color_jitter

QUIET = Console(quiet=True)


def _model_cfg(**model):
    return validate(RunConfig, {"name": "r", "model": {"name": "resnet18", **model}}).model


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A torchvision-format ResNet-18 state dict saved by the test (no ImageNet weights exist here)."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18-test.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_load_from_file_replaces_the_head(weights_file):
    model = build_model(_model_cfg(pretrained=str(weights_file)), 7, (3, 32, 32))
    saved = torch.load(weights_file, weights_only=True)
    assert torch.equal(model.layer3[0].conv1.weight, saved["layer3.0.conv1.weight"])
    assert model.fc.out_features == 7


def test_imagenet_from_torch_home_cache(weights_file, tmp_path, monkeypatch):
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(weights_file.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    model = build_model(_model_cfg(pretrained="imagenet"), 3, (3, 32, 32))
    saved = torch.load(weights_file, weights_only=True)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])


def test_imagenet_offline_names_every_place(tmp_path):
    with pytest.raises(ClasslabError) as e:
        build_model(_model_cfg(pretrained="imagenet"), 3, (3, 32, 32))
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "torch-home") in msg and "offline" in msg


def test_mismatched_weights_name_the_first_key(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    del state["layer2.0.bn1.running_mean"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ClasslabError, match="missing key 'layer2.0.bn1.running_mean'"):
        build_model(_model_cfg(pretrained=str(tmp_path / "missing.pth")), 3, (3, 32, 32))
    state = torch.load(weights_file, weights_only=True)
    state["layer1.0.conv1.weight"] = torch.zeros(8, 64, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ClasslabError, match=r"'layer1.0.conv1.weight' has shape \[8, 64, 3, 3\]"):
        build_model(_model_cfg(pretrained=str(tmp_path / "shape.pth")), 3, (3, 32, 32))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_and_non_checkpoint_are_refused(tmp_path):
    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ClasslabError, match="refused to load"):
        build_model(_model_cfg(pretrained=str(tmp_path / "evil.pth")), 3, (3, 32, 32))
    (tmp_path / "notes.pth").write_text("just some text")
    with pytest.raises(ClasslabError, match="not a readable PyTorch checkpoint"):
        build_model(_model_cfg(pretrained=str(tmp_path / "notes.pth")), 3, (3, 32, 32))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ClasslabError):
        build_model(_model_cfg(pretrained=str(tmp_path / "plain.pkl")), 3, (3, 32, 32))


def _resnet_run(idx_folder, to_rgb=False, **model):
    data = {"dataset": "idx", "root": str(idx_folder), "val_fraction": 0.25, "subset": {"train": 96, "test": 32},
            "to_rgb": to_rgb}
    train = {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9}
    return validate(RunConfig, {"name": "r", "data": data, "model": {"name": "resnet18", **model}, "train": train})


def test_start_from_a_run_folder_with_other_class_count(idx_folder, tmp_path):
    first = _resnet_run(idx_folder)
    train_run(first, RunFolder(tmp_path / "first"), torch.device("cpu"), QUIET)
    best = torch.load(tmp_path / "first" / "checkpoints" / "best.pt", weights_only=True)["model"]
    model = build_model(_model_cfg(pretrained=str(tmp_path / "first")), 9, (1, 28, 28))
    assert model.fc.out_features == 9
    assert torch.equal(model.layer4[1].conv2.weight, best["layer4.1.conv2.weight"])


def test_freezing_keeps_frozen_weights_and_bn_statistics(idx_folder, weights_file, tmp_path):
    cfg = _resnet_run(idx_folder, to_rgb=True, pretrained=str(weights_file), freeze={"all_but": ["layer4", "fc"]})
    before = torch.load(weights_file, weights_only=True)
    train_run(cfg, RunFolder(tmp_path / "r"), torch.device("cpu"), QUIET)
    after = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer3.1.bn2.weight", "layer3.1.bn2.running_mean",
                "bn1.running_var", "layer2.0.downsample.1.running_mean"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])
    assert not torch.equal(after["layer4.0.bn1.running_mean"], before["layer4.0.bn1.running_mean"])


def test_head_list_and_freeze_all_but_head():
    model = build_model(_model_cfg(freeze={"all_but": ["head"]}, head=[{"linear": 256}, "relu", {"dropout": 0.3}]),
                        10, (3, 224, 224))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 133898 and sum(p.numel() for p in model.parameters()) == 11310410


def test_lr_groups_as_configured_and_recorded(idx_folder, tmp_path):
    lrs = {"conv1": 1e-5, "bn1": 1e-5, "layer1": 1e-5, "layer2": 5e-5, "layer3": 1e-4, "layer4": 5e-4, "fc": 1e-3}
    cfg = _resnet_run(idx_folder)
    cfg = validate(RunConfig, {**cfg.model_dump(), "train": {**cfg.train.model_dump(), "lr_groups": lrs}})
    train_run(cfg, RunFolder(tmp_path / "r"), torch.device("cpu"), QUIET)
    rows = RunFolder(tmp_path / "r").read_metrics()
    assert rows[0]["lrs"] == lrs
    from classlab.models.freeze import parameter_groups

    model = build_model(cfg.model, 4, (1, 28, 28))
    groups = parameter_groups(model, lrs)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    with pytest.raises(ClasslabError, match="without a learning rate: fc"):
        parameter_groups(model, {k: v for k, v in lrs.items() if k != "fc"})
    with pytest.raises(ClasslabError, match="did you mean 'layer4'"):
        parameter_groups(model, {**lrs, "layer5": 1e-3})


def test_gray_to_rgb_resize_and_imagenet_normalize():
    pre = Preprocess(input_shape=(3, 64, 64), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     classes=("a",), source_shape=(1, 48, 48), to_rgb=True, resize=(64, 64))
    x = torch.randint(0, 256, (5, 1, 48, 48), dtype=torch.uint8)
    out = BatchTransform(pre, None, torch.device("cpu"))(x)
    assert out.shape == (5, 3, 64, 64)
    raw = out * torch.tensor(pre.std).view(1, 3, 1, 1) + torch.tensor(pre.mean).view(1, 3, 1, 1)
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)


def test_color_jitter_is_seeded_and_bounded():
    from classlab.config import ColorJitter

    x = torch.rand(16, 3, 8, 8)
    jitter = ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)
    a = color_jitter(x.clone(), jitter, torch.Generator().manual_seed(0))
    b = color_jitter(x.clone(), jitter, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)
    only_b = color_jitter(x.clone(), ColorJitter(brightness=0.2), torch.Generator().manual_seed(0))
    ratio = (only_b / x.clamp_min(1e-6)).flatten(1)
    unclipped = (x * 1.2 < 1).flatten(1)
    per_image = [r[m].median() for r, m in zip(ratio, unclipped, strict=True)]
    assert all(0.8 - 1e-4 <= f <= 1.2 + 1e-4 for f in per_image)


def test_summary_table_shows_frozen_and_lr_per_layer():
    from classlab.models.summary import layer_table_text, model_table, parameter_count

    lrs = {"conv1": 1e-5, "bn1": 1e-5, "layer1": 1e-5, "layer2": 5e-5, "layer3": 1e-4, "layer4": 5e-4, "fc": 1e-3}
    model = build_model(_model_cfg(freeze={"all_but": ["layer4", "fc"]}), 7, (3, 64, 64))
    _, rows = model_table(model, (3, 64, 64), lrs, 1e-3)
    by_name = {r["layer"]: r for r in rows}
    assert by_name["layer1.0.conv1"]["trainable"] == 0 and by_name["layer1.0.conv1"]["lr"] is None
    assert by_name["layer4.0.conv1"]["trainable"] == 256 * 512 * 9 and by_name["layer4.0.conv1"]["lr"] == 5e-4
    assert by_name["fc"]["output_shape"] == [2, 7]
    text = layer_table_text(rows, parameter_count(model), (3, 64, 64))
    assert "frozen" in text and "0.0005" in text and "11,180,103 parameters" not in text
    assert f"{parameter_count(model)['frozen']:,} frozen" in text
