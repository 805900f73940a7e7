"""`classlab export`: ONNX / TorchScript with the preprocessing in the graph, checked against classlab's own
probabilities (inference.predict_images) on real test images (the bundled Fashion-MNIST demo subset), for an
MLP, a CNN, a pixel-permuted CNN and a ResNet-18 (gray -> RGB, resize, ImageNet normalization in the graph)."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from classlab.data import load_dataset
from classlab.errors import ClasslabError
from classlab.export import Preprocessing, export_run, resize_matrix
from classlab.inference import load_run, predict_images
from classlab.study import run_study
from classlab.transforms import BatchTransform, Preprocess
from tests.conftest import TINY_CNN, write_study

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation

SUBSET = {"train": 300, "test": 120}
KINDS = ("mlp", "cnn", "permuted", "resnet")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Four tiny runs on the real demo images, one epoch each: trained once for this module."""
    root = tmp_path_factory.mktemp("export")
    study = {
        "name": "export", "out_dir": str(root / "runs"), "seeds": [0],
        "data": {"dataset": "demo", "val_fraction": None, "subset": SUBSET},
        "model": {"name": "cnn", "layers": TINY_CNN},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.003},
        "runs": [
            {"name": "mlp", "model": {"name": "mlp", "hidden": [32], "batchnorm": True}},
            {"name": "cnn"},
            {"name": "permuted", "data": {"permute_pixels": {"seed": 0}}},
            {"name": "resnet", "model": {"name": "resnet18", "freeze": {"all_but": ["layer4", "fc"]}},
             "data": {"to_rgb": True, "resize": 32, "normalize": "imagenet", "subset": {**SUBSET, "train": 64}}},
        ],
    }
    torch.set_num_threads(2)
    result = run_study(write_study(root / "export.yaml", study), device="cpu", console=Console(file=io.StringIO()))
    assert not result.failed
    return root / "runs" / "export"


@functools.cache
def run_test_images(run: Path) -> np.ndarray:
    """The run's own test images (uint8 N×C×H×W), as its test evaluation saw them."""
    return load_dataset(load_run(run, "cpu").config.data).test.images.numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_probabilities_equal_classlab(runs, tmp_path, kind):
    images = run_test_images(runs / kind)
    result = export_run(runs / kind, tmp_path / "model.onnx")
    expected = predict_images(load_run(runs / kind, "cpu"), images)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    whole = session.run(None, {name: images})[0]  # one batch of 120
    pieces = np.concatenate([session.run(None, {name: images[i: i + 7]})[0]  # batches of 7 (and 1)
                             for i in range(0, len(images), 7)])
    assert whole.shape == expected.shape == (len(images), 10)
    assert np.abs(whole - expected).max() < TOLERANCE
    assert np.abs(pieces - expected).max() < TOLERANCE
    assert (whole.argmax(1) == expected.argmax(1)).all()
    stored = np.load(runs / kind / "predictions.npz")["probs"]  # and what the run's test evaluation stored
    assert np.abs(whole - stored).max() < TOLERANCE


@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_torchscript_probabilities_equal_classlab(runs, tmp_path, kind):
    images = run_test_images(runs / kind)[:40]
    result = export_run(runs / kind, tmp_path / "model.pt", "torchscript")
    expected = predict_images(load_run(runs / kind, "cpu"), images)
    model = torch.jit.load(str(result.path))
    with torch.no_grad():
        whole = model(torch.from_numpy(images)).numpy()
        few = model(torch.from_numpy(images[:5])).numpy()
    assert np.abs(whole - expected).max() < TOLERANCE
    assert np.abs(few - expected[:5]).max() < TOLERANCE


def test_files_beside_the_model_describe_it(runs, tmp_path):
    result = export_run(runs / "permuted", tmp_path / "out" / "permuted.onnx")
    assert result.preprocessing == tmp_path / "out" / "preprocessing.json"
    doc = json.loads(result.preprocessing.read_text())
    classes = result.classes.read_text().splitlines()
    assert classes == doc["classes"] == list(load_run(runs / "permuted", "cpu").classes)
    assert doc["input"] == {"name": "image", "dtype": "uint8", "layout": "NCHW", "shape": ["batch", 1, 28, 28],
                            "range": "0..255, as the dataset stores images"}
    assert doc["output"]["name"] == "probabilities"
    assert any("permutation" in step for step in doc["in_graph"])
    assert doc["preprocessing"]["permutation"] == json.loads((runs / "permuted" / "preprocessing.json").read_text())[
        "permutation"]


def test_default_output_is_inside_the_run(runs):
    result = export_run(runs / "mlp")
    assert result.path == runs / "mlp" / "export" / "model.onnx" and result.path.is_file()
    assert (runs / "mlp" / "export" / "classes.txt").is_file()


def test_cli_export_and_its_errors(runs, tmp_path, run_cli):
    code, out, _ = run_cli("export", str(runs / "cnn"), "--format", "torchscript", "-o", str(tmp_path / "m.pt"))
    assert code == 0 and "torchscript:" in out and (tmp_path / "m.pt").is_file()
    code, _, err = run_cli("export", str(runs / "cnn"), "--format", "tflite")
    assert code == 2 and err.strip() == "error: --format 'tflite': choose onnx or torchscript"
    code, _, err = run_cli("export", str(tmp_path / "nothing"))
    assert code == 2 and err.count("\n") == 1 and "no such run folder" in err


def test_a_model_that_cannot_be_exported_is_one_line(runs, tmp_path, monkeypatch, run_cli):
    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::strange' to ONNX\nopset version 17 is not supported.")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(ClasslabError, match=r"cannot be exported to onnx: RuntimeError: Exporting the operator"):
        export_run(runs / "cnn", tmp_path / "x.onnx")
    code, _, err = run_cli("export", str(runs / "cnn"), "-o", str(tmp_path / "x.onnx"))
    assert code == 2 and err.count("\n") == 1 and "'aten::strange'" in err
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))  # nothing half-written


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(14, 14), (32, 32), (20, 40), (224, 224)])
def test_resize_as_matrices_equals_torch(size, mode):
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    pre = Preprocess(input_shape=(3, *size), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     classes=("a", "b"), permutation=tuple(torch.randperm(784).tolist()), source_shape=(1, 28, 28),
                     to_rgb=True, resize=size, interpolation=mode)
    expected = BatchTransform(pre, None, torch.device("cpu"))(x)
    assert torch.allclose(Preprocessing(pre)(x), expected, atol=1e-4)
    assert torch.allclose(resize_matrix(28, size[0], mode).sum(1), torch.ones(size[0]))  # rows are averages


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """Two tiny runs on the demo images whose numbers include their eval section: a fitted temperature alone,
    and a temperature with test-time augmentation (mirror and ±12° rotations)."""
    root = tmp_path_factory.mktemp("export-eval")
    study = {
        "name": "cal", "out_dir": str(root / "runs"), "seeds": [0],
        "data": {"dataset": "demo", "val_fraction": 0.2, "subset": SUBSET, "resize": 32},
        "model": {"name": "cnn", "layers": TINY_CNN},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.003},
        "runs": [{"name": "temperature", "eval": {"temperature_scaling": True}},
                 {"name": "tta", "eval": {"temperature_scaling": True, "tta": ["hflip", "rotate:12"]}}],
    }
    result = run_study(write_study(root / "cal.yaml", study), device="cpu", console=Console(file=io.StringIO()))
    assert not result.failed
    return root / "runs" / "cal"


@pytest.mark.parametrize("kind", ["temperature", "tta"])
def test_export_gives_the_runs_own_probabilities_temperature_and_tta_in_the_graph(calibrated, tmp_path, kind):
    """Issue 26.3: the exported model's probabilities are classlab predict's (and, without TTA, predictions.npz's),
    with the fitted temperature and the test-time views in the graph; preprocessing.json says so."""
    run = calibrated / kind
    loaded = load_run(run, "cpu")
    assert loaded.temperature is not None and loaded.temperature != pytest.approx(1.0, abs=1e-3)
    images = run_test_images(run)
    expected = predict_images(loaded, images)
    onnx = export_run(run, tmp_path / "model.onnx")
    got = ort.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    scripted = export_run(run, tmp_path / "model.pt", "torchscript")
    with torch.no_grad():
        traced = torch.jit.load(str(scripted.path))(torch.from_numpy(images)).numpy()
    for probs in (got, traced):
        assert np.abs(probs - expected).max() < 1e-3 and (probs.argmax(1) == expected.argmax(1)).all()
    plain = np.load(run / "predictions.npz")["probs"]
    if kind == "temperature":
        assert np.abs(got - plain).max() < TOLERANCE
    else:  # predictions.npz holds the plain view's probabilities; the TTA average differs, as predict's does
        assert np.abs(expected - plain).max() > 1e-3
    doc = json.loads(onnx.preprocessing.read_text())
    assert any(step.startswith("temperature: logits / ") for step in doc["in_graph"])
    assert doc["temperature"] == pytest.approx(loaded.temperature)
    if kind == "tta":
        assert doc["tta"] == ["hflip", "rotate:12"]
        assert "identity, hflip, rotate:12, rotate:-12" in doc["in_graph"][0]
        assert doc["in_graph"][-1] == "average of the 4 views' probabilities"


def test_another_image_size_is_refused_by_name_not_inside_a_matmul(calibrated, tmp_path):
    """The resize in the graph goes from the run's stored size only: TorchScript says which shape it takes."""
    result = export_run(calibrated / "temperature", tmp_path / "model.pt", "torchscript")
    model = torch.jit.load(str(result.path))
    shape = r"takes uint8 images N x 1 x 28 x 28 .* \(got \[2, 1, 40, 40\]\)"
    with pytest.raises((torch.jit.Error, RuntimeError), match=shape):
        model(torch.zeros((2, 1, 40, 40), dtype=torch.uint8))
    doc = json.loads(result.preprocessing.read_text())
    assert doc["input_size"].startswith("28 x 28 only") and "[32, 32]" in doc["input_size"]
