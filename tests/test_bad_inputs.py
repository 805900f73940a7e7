"""The bad-input catalogue: every case runs the real CLI (`classlab ...`, in-process) on a small study and
must end with its documented exit code (2: bad input) and exactly one line on stderr, starting with
"error: " and naming the file or key at fault — never a traceback. A few cases that need more than
exit code + message (disk full, a corrupt PNG among good ones, a non-finite loss) check the run folder too.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from classlab.config import set_dotted
from classlab.data.idx import write_idx
from tests.conftest import make_idx_folder, tiny_study, write_study

# --------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Case:
    """A setup builds the bad input under tmp and returns (CLI args, substrings the error line must hold)."""

    setup: Callable[[Path, pytest.MonkeyPatch], tuple[list[str], list[str]]]
    code: int = 2
    check: Callable[[Path], None] | None = None  # extra checks on tmp after the command


CASES: dict[str, Case] = {}


def case(name: str, code: int = 2, check: Callable[[Path], None] | None = None):
    def register(fn: Callable[[Path, pytest.MonkeyPatch], tuple[list[str], list[str]]]):
        assert name not in CASES, name
        CASES[name] = Case(fn, code, check)
        return fn

    return register


def _idx(tmp: Path) -> Path:
    folder = tmp / "data"
    return folder if folder.is_dir() else make_idx_folder(folder)


def _write(tmp: Path, study: dict | str, name: str = "study.yaml") -> Path:
    path = tmp / name
    if isinstance(study, str):
        path.write_text(study)
        return path
    return write_study(path, study)


def _study(tmp: Path, changes: dict | None = None, data_root: Path | None = None) -> dict:
    """The tiny IDX study with dotted-key changes applied (a value of ... deletes the key)."""
    study = tiny_study(tmp, data_root if data_root is not None else _idx(tmp))
    for key, value in (changes or {}).items():
        if value is ...:
            parent, _, leaf = key.rpartition(".")
            node = study
            for part in parent.split(".") if parent else []:
                node = node[part]
            del node[leaf]
        else:
            set_dotted(study, key, value)
    return study


def _run_study(tmp: Path, changes: dict | None = None, data_root: Path | None = None) -> tuple[list[str], Path]:
    path = _write(tmp, _study(tmp, changes, data_root))
    return ["run", str(path)], path


def config_case(name: str, changes: dict, *needles: str) -> None:
    """A study with one bad value: the error names the study file and the key."""

    def setup(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
        args, path = _run_study(tmp, changes)
        return args, [str(path), *needles]

    case(name)(setup)


def _png_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), n: int = 12,
                splits: tuple[str, ...] = ("train", "test"), size: int = 8) -> Path:
    """root/<split>/<class>/<i>.png, small gray images (class = which half is bright)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 80, size=(size, size), dtype=np.uint8)
                arr[:, c * size // 2 : (c + 1) * size // 2] += 150
                Image.fromarray(arr, mode="L").save(folder / f"{i:03d}.png")
    return root


def _folder_study(tmp: Path, root: Path, **train) -> list[str]:
    study = _study(tmp, {"data": {"dataset": "image-folder", "root": str(root), "val_fraction": 0.2},
                         "train.batch_size": 4, "train.epochs": 1, **{f"train.{k}": v for k, v in train.items()}})
    return ["run", str(_write(tmp, study))]


def _fake_run_folder(tmp: Path, changes: dict | None = None) -> tuple[list[str], Path]:
    """A study file and its run folder's config.yaml as `classlab run` writes it, without training."""
    from classlab.config import load_study
    from classlab.plan import expand, run_config_dict
    from classlab.runs import RunFolder

    args, path = _run_study(tmp, changes)
    study = load_study(path)
    (planned,) = expand(study)
    folder = RunFolder(Path(study.out_dir) / study.name / planned.config.name)
    folder.path.mkdir(parents=True)
    folder.write_config(run_config_dict(planned.config))
    return args, folder.path


def _edit_yaml(path: Path, **changes: object) -> None:
    doc = yaml.safe_load(path.read_text())
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


class _Evil:
    """Unpickling this runs code: exactly what weights_only=True must refuse."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _resnet(tmp: Path, pretrained: str) -> list[str]:
    args, _ = _run_study(tmp, {"model": {"name": "resnet18", "pretrained": pretrained}})
    return args


def _no_file_named(tmp: Path, pattern: str) -> None:
    assert not list((tmp / "runs").rglob(pattern)), list((tmp / "runs").rglob(pattern))


def _not_complete(tmp: Path) -> None:
    _no_file_named(tmp, "summary.json")
    _no_file_named(tmp, "*.tmp")


# --------------------------------------------------------------------------------------------- the study file

config_case("unknown-key", {"train.optimiser": "sgd"}, "unknown key 'optimiser' in 'train'",
            "did you mean 'optimizer'")
config_case("unknown-nested-key", {"data.augment": {"hflp": 0.5}}, "unknown key 'hflp' in 'data.augment'",
            "did you mean 'hflip'")
config_case("unknown-top-level-key", {"trian": {"epochs": 1}}, "unknown key 'trian'", "did you mean 'train'")
config_case("wrong-type", {"train.epochs": "ten"}, "train.epochs", "'ten'")
config_case("wrong-type-section", {"train": "fast"}, "train", "dictionary")
config_case("negative-epochs", {"train.epochs": -3}, "train.epochs", "greater than 0")
config_case("lr-zero", {"train.lr": 0}, "train.lr", "greater than 0")
config_case("lr-negative", {"train.lr": -0.1}, "train.lr", "greater than 0")
config_case("batch-size-zero", {"train.batch_size": 0}, "train.batch_size", "greater than 0")
config_case("empty-runs", {"runs": []}, "runs", "empty")
config_case("duplicate-run-names", {"runs": [{"name": "a"}, {"name": "b"}, {"name": "a"}]},
            "duplicate run names: a")
config_case("unknown-optimizer", {"train.optimizer": "adma"}, "train.optimizer", "'adma'", "did you mean 'adam'")
config_case("unknown-model", {"model": {"name": "resnet81"}}, "model.name", "'resnet81'", "did you mean 'resnet18'")
config_case("unknown-dataset", {"data.dataset": "fashion-minst"}, "data.dataset", "did you mean 'fashion-mnist'")
config_case("val-fraction-zero", {"data.val_fraction": 0}, "data.val_fraction", "greater than 0")
config_case("val-fraction-one", {"data.val_fraction": 1}, "data.val_fraction", "less than 1")
config_case("val-fraction-above-one", {"data.val_fraction": 1.5}, "data.val_fraction", "less than 1")
config_case("early-stopping-without-val", {"data.val_fraction": None, "train.early_stopping": {"patience": 2}},
            "early_stopping", "data.val_fraction")
config_case("duplicate-seeds", {"seeds": [1, 1]}, "seeds", "distinct")
config_case("grid-key-outside-sections", {"grid": {"epochs": [1, 2]}}, "grid key 'epochs'")
config_case("model-missing", {"model": ...}, "model", "required key is missing")
config_case("bad-value-inside-a-run", {"runs": [{"name": "ok"}, {"name": "slow", "train": {"epochs": 0}}]},
            "runs[1] (slow)", "train.epochs", "greater than 0")
config_case("run-name-with-a-path", {"runs": [{"name": "../elsewhere"}]}, "run name '../elsewhere'")
config_case("study-name-with-a-path", {"name": "../../elsewhere"}, "study name '../../elsewhere'")
config_case("normalize-std-zero", {"data.normalize": {"mean": [0.5], "std": [0]}}, "data.normalize", "std")


@case("batch-size-larger-than-data")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp, {"train.batch_size": 500})
    return args, ["train.batch_size 500", "larger than the training set"]


@case("normalize-wrong-channel-count")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp, {"data.normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}})
    return args, ["data.normalize has 3 values"]


@case("relabel-unknown-class")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp, {"data.relabel": {"low": ["0", "1"], "high": ["2", "3x"]}})
    return args, ["data.relabel.high", "unknown class '3x'", "did you mean '3'"]


@case("relabel-class-unmapped")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp, {"data.relabel": {"low": ["0", "1"], "high": ["2"]}})
    return args, ["data.relabel", "not in any group: 3"]


@case("relabel-class-in-two-groups")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp, {"data.relabel": {"low": ["0", "1", "2"], "high": ["2", "3"]}})
    return args, ["data.relabel", "'2' is in more than one group"]


@case("yaml-python-tag")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = _write(tmp, "name: toy\nmodel: !!python/object/apply:os.system ['echo pwned > /dev/null']\n")
    return ["run", str(path)], [str(path), "line 2", "no Python tags"]


@case("yaml-duplicate-key")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = _write(tmp, "name: toy\ntrain: {epochs: 2}\nmodel: {name: mlp}\ntrain: {epochs: 5}\n")
    return ["run", str(path)], [str(path), "duplicate key 'train'", "line 2", "line 4"]


@case("yaml-syntax-error")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = _write(tmp, "name: toy\nmodel: {name: cnn\ntrain: {epochs: 2}\n")
    return ["run", str(path)], [str(path), "invalid YAML"]


@case("study-not-a-mapping")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = _write(tmp, "- name: a\n- name: b\n")
    return ["run", str(path)], [str(path), "must be a mapping"]


@case("study-file-missing")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["run", str(tmp / "absent.yaml")], [str(tmp / "absent.yaml"), "file not found"]


@case("override-without-equals")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp)
    return [*args, "-o", "train.epochs"], ["override 'train.epochs'", "key.path=value"]


@case("override-unknown-key")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp)
    return [*args, "-o", "train.lrr=0.1"], ["unknown key 'lrr' in 'train'", "did you mean 'lr'"]


@case("bad-device-option")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp)
    return [*args, "--device", "tpu"], ["--device 'tpu'"]


# --------------------------------------------------------------------------------------------- data files


@case("missing-data-folder")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp, data_root=tmp / "nowhere")
    return args, ["not found", str(tmp / "nowhere"), "train-images-idx3-ubyte.gz"]


@case("idx-file-missing")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (_idx(tmp) / "t10k-labels-idx1-ubyte.gz").unlink()
    args, _path = _run_study(tmp)
    return args, ["incomplete", str(tmp / "data"), "t10k-labels-idx1-ubyte.gz"]


@case("idx-truncated")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    folder = make_idx_folder(tmp / "data", gzip=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    args, _path = _run_study(tmp)
    return args, [str(path), "truncated IDX file"]


@case("idx-wrong-magic")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    folder = make_idx_folder(tmp / "data", gzip=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x56\x78" + path.read_bytes()[4:])
    args, _path = _run_study(tmp)
    return args, [str(path), "wrong magic number 12345678"]


@case("idx-html-instead-of-gzip")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = _idx(tmp) / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"<html>404 not found</html>")
    args, _path = _run_study(tmp)
    return args, [str(path), "not an IDX file"]


@case("idx-broken-gzip")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = _idx(tmp) / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:300])
    args, _path = _run_study(tmp)
    return args, [str(path), "broken gzip"]


@case("idx-image-label-count-mismatch")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    write_idx(_idx(tmp) / "train-labels-idx1-ubyte.gz", np.zeros(10, dtype=np.uint8))
    args, _path = _run_study(tmp)
    return args, [str(tmp / "data"), "240 images but 10 labels"]


@case("image-folder-missing")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return _folder_study(tmp, tmp / "photos"), [str(tmp / "photos"), "does not exist"]


@case("image-folder-empty")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "photos").mkdir()
    return _folder_study(tmp, tmp / "photos"), [str(tmp / "photos"), "no class folders"]


@case("image-folder-no-images-at-all")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    for name in ("cat", "dog"):
        (tmp / "photos" / "train" / name).mkdir(parents=True)
        (tmp / "photos" / "train" / name / "notes.txt").write_text("not an image")
    return _folder_study(tmp, tmp / "photos"), [str(tmp / "photos" / "train"), "no images found"]


@case("class-folder-with-no-images")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = _png_folder(tmp / "photos")
    (root / "train" / "bird").mkdir()
    return _folder_study(tmp, root), [str(root), "no training images for 'bird'", "no test images for 'bird'"]


@case("image-sizes-differ")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = _png_folder(tmp / "photos")
    odd = root / "train" / "dog" / "999.png"
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8), mode="L").save(odd)
    return _folder_study(tmp, root), [str(odd), "differs", "data.image_size"]


@case("every-image-unreadable")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = _png_folder(tmp / "photos")
    for png in (root / "test").rglob("*.png"):
        png.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return _folder_study(tmp, root), [str(root / "test"), "none of the 24 images could be read"]


@case("split-with-a-class-train-lacks")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = _png_folder(tmp / "photos")
    _png_folder(tmp / "extra", classes=("bird",), splits=("test",))
    (tmp / "extra" / "test" / "bird").rename(root / "test" / "bird")
    return _folder_study(tmp, root), [str(root), "no training images for 'bird'", "data.allow_missing_classes"]


@case("split-with-a-class-test-lacks")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = _png_folder(tmp / "photos")
    _png_folder(tmp / "extra", classes=("bird",), splits=("train",))
    (tmp / "extra" / "train" / "bird").rename(root / "train" / "bird")
    return _folder_study(tmp, root), [str(root), "no test images for 'bird'", "data.allow_missing_classes: true"]


@case("one-class-only")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp, {"data.relabel": {"all": ["0", "1", "2", "3"]}})
    return args, ["data.relabel", "only one class ('all')", "at least two"]


@case("subset-larger-than-the-data")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp, {"data.subset": {"train": 1000}})
    return args, ["data.subset.train 1000", "only 240 images"]


@case("subset-smaller-than-the-classes")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, _path = _run_study(tmp, {"data.subset": {"test": 3}})
    return args, ["data.subset.test 3", "4 classes", "at least 4"]


@case("relabel-number-that-names-and-indexes-two-classes")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = _png_folder(tmp / "photos", classes=("1", "10", "2"), n=4)
    study = _study(tmp, {"data": {"dataset": "image-folder", "root": str(root), "val_fraction": None,
                                  "relabel": {"one": [1], "rest": ["10", "2"]}}})
    return ["run", str(_write(tmp, study))], ["data.relabel.one", "1 is ambiguous", "'1' (quoted)",
                                              "'10' for the class at index 1"]


@case("fer-csv-wrong-columns")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = tmp / "fer2013.csv"
    path.write_text("label,image\n0,1 2 3\n")
    args, _path = _run_study(tmp, {"data": {"dataset": "fer2013", "root": str(path)}})
    return args, [str(path), "expected columns emotion, pixels, Usage"]


@case("fer-csv-short-row")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = tmp / "fer2013.csv"
    row = " ".join(["7"] * 48 * 48)
    path.write_text(f"emotion,pixels,Usage\n3,{row},Training\n4,1 2 3,PrivateTest\n")
    args, _path = _run_study(tmp, {"data": {"dataset": "fer2013", "root": str(path)}})
    return args, [str(path), "line 3", "3 pixels, expected 2304"]


@case("fer-csv-non-numeric-pixels")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = tmp / "fer2013.csv"
    path.write_text("emotion,pixels,Usage\n3,1 2 x,Training\n")
    args, _path = _run_study(tmp, {"data": {"dataset": "fer2013", "root": str(path)}})
    return args, [str(path), "line 2", "whole numbers 0–255"]


@case("fer-csv-binary-file")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = tmp / "fer2013.csv"
    path.write_bytes(b"PK\x03\x04\xff\xfe\x00 a zip, not a csv")
    args, _path = _run_study(tmp, {"data": {"dataset": "fer2013", "root": str(path)}})
    return args, [str(path), "not a readable CSV file"]


@case("idx-negative-labels")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    folder = _idx(tmp)
    labels = np.full(80, -1, dtype=np.int8)
    payload = bytes([0, 0, 0x09, 1]) + (80).to_bytes(4, "big") + labels.tobytes()  # IDX int8 labels
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(payload))
    args, _path = _run_study(tmp)
    return args, [str(folder), "negative class labels"]


# --------------------------------------------------------------------------------------------- weights files


@case("pretrained-wrong-architecture")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = tmp / "mlp.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(784, 10)).state_dict(), path)
    return _resnet(tmp, str(path)), [str(path), "do not fit resnet18", "conv1.weight"]


@case("pretrained-not-a-checkpoint")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = tmp / "notes.pth"
    path.write_text("these are not weights\n")
    return _resnet(tmp, str(path)), [str(path), "not a readable PyTorch checkpoint"]


@case("pretrained-pickle-with-code")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = tmp / "evil.pth"
    path.write_bytes(pickle.dumps({"fc.weight": _Evil()}))
    return _resnet(tmp, str(path)), [str(path), "refused to load", "weights_only=True"]


@case("pretrained-tensors-but-no-state-dict")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = tmp / "list.pth"
    torch.save([torch.zeros(3)], path)
    return _resnet(tmp, str(path)), [str(path), "no state dict"]


@case("pretrained-missing-file")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return _resnet(tmp, str(tmp / "absent.pth")), ["model.pretrained", str(tmp / "absent.pth")]


@case("pretrained-folder-without-checkpoint")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "empty-run").mkdir()
    return _resnet(tmp, str(tmp / "empty-run")), ["model.pretrained", str(tmp / "empty-run"), "no classlab checkpoint"]


@case("imagenet-cache-file-corrupt")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    cache = tmp / "torch-home" / "hub" / "checkpoints"  # conftest points $TORCH_HOME here
    cache.mkdir(parents=True)
    path = cache / "resnet18-f37072fd.pth"
    path.write_bytes(b"PK\x03\x04 half a download")
    return _resnet(tmp, "imagenet"), [str(path), "not a readable PyTorch checkpoint"]


# --------------------------------------------------------------------------------------------- run folders


@case("run-folder-from-newer-version-config")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, run = _fake_run_folder(tmp)
    _edit_yaml(run / "config.yaml", format=99)
    return args, [str(run / "config.yaml"), "newer classlab", "format 99"]


@case("run-folder-from-newer-version-summary")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, run = _fake_run_folder(tmp)
    (run / "summary.json").write_text(json.dumps({"format": 99, "name": "base"}))
    return args, [str(run / "summary.json"), "newer classlab", "format 99"]


@case("report-on-run-folder-from-newer-version")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    _args, run = _fake_run_folder(tmp)
    (run / "summary.json").write_text(json.dumps({"format": 99, "name": "base"}))
    return ["report", str(run.parent)], [str(run / "summary.json"), "newer classlab"]


@case("predict-with-run-folder-from-newer-version")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    _args, run = _fake_run_folder(tmp)
    _edit_yaml(run / "config.yaml", format=99)
    image = tmp / "shoe.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8), mode="L").save(image)
    return ["predict", str(run), str(image)], [str(run / "config.yaml"), "newer classlab"]


@case("run-folder-with-other-config")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, run = _fake_run_folder(tmp)
    (run / "summary.json").write_text(json.dumps({"format": 1, "name": "base"}))
    _edit_yaml(run / "config.yaml", train={"epochs": 7})
    return args, [str(run), "different config", "--restart"]


@case("checkpoint-pickle-with-code")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, run = _fake_run_folder(tmp)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(pickle.dumps({"epoch": 1, "model": _Evil()}))
    return args, [str(run / "checkpoints" / "last.pt"), "refused to load"]


@case("checkpoint-truncated")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, run = _fake_run_folder(tmp)
    (run / "checkpoints").mkdir()
    torch.save({"epoch": 1, "model": {"w": torch.zeros(1000)}}, run / "checkpoints" / "full.pt")
    (run / "checkpoints" / "last.pt").write_bytes((run / "checkpoints" / "full.pt").read_bytes()[:700])
    return args, [str(run / "checkpoints" / "last.pt"), "not a readable PyTorch checkpoint", "--restart"]


def _unlock(tmp: Path) -> None:
    _no_file_named(tmp, "summary.json")
    if (tmp / "locked").is_dir():
        (tmp / "locked").chmod(0o700)  # so the test's folder can be cleaned up


@case("out-dir-not-writable", check=_unlock)
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(locked, os.W_OK):  # root ignores permissions: a file standing where a folder must go
        locked.chmod(0o700)
        locked.rmdir()
        locked.write_text("a file, not a folder")
    args, _path = _run_study(tmp, {"out_dir": str(locked / "runs")})
    return args, ["cannot create run folder", str(locked / "runs")]


def _fsync_fails_for_checkpoints(fd: int, real=os.fsync) -> None:
    target = os.readlink(f"/proc/self/fd/{fd}")
    if Path(target).name.startswith(".last.pt."):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(fd)


@case("disk-full-while-writing-checkpoint", check=_not_complete)
def _(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell the checkpoint's temp file from the others")
    monkeypatch.setattr(os, "fsync", _fsync_fails_for_checkpoints)
    args, _path = _run_study(tmp)
    return args, [str(tmp / "runs" / "toy" / "base" / "checkpoints" / "last.pt"), "No space left on device"]


# --------------------------------------------------------------------------------------------- issue 15, item 8


config_case("image-size-zero", {"data.image_size": [0, 28]}, "image_size", "[0, 28]", "at least 1 pixel")


@case("data-root-is-a-file")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    data = _idx(tmp)
    file = data / "train-images-idx3-ubyte.gz"
    args, _path = _run_study(tmp, {"data.root": str(file)})
    return args, [f"data.root {file} is a file, not a folder", str(data)]


@case("image-folder-root-is-a-file")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = _png_folder(tmp / "photos")
    file = root / "train" / "cat" / "000.png"
    args = _folder_study(tmp, root)
    study = yaml.safe_load(Path(args[1]).read_text())
    study["data"]["root"] = str(file)
    Path(args[1]).write_text(yaml.safe_dump(study))
    return args, [f"data.root {file} is a file, not a folder"]


@case("checkpoint-plain-text")
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args, run = _fake_run_folder(tmp)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_text("not a checkpoint\n")
    return args, [str(run / "checkpoints" / "last.pt"), "not a readable PyTorch checkpoint",
                  "neither a zip archive nor a pickle", "--restart-run base"]


def _no_stale_report(tmp: Path) -> None:
    study = tmp / "runs" / "toy"
    assert not (study / "report.html").exists() and not (study / "report.md").exists()


@case("report-fails-removes-the-stale-report", check=_no_stale_report)
def _(tmp: Path, _: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    _args, run = _fake_run_folder(tmp)
    (run.parent / "report.html").write_text("<html>an old report</html>")
    (run.parent / "report.md").write_text("an old report")
    (run / "summary.json").write_text(json.dumps({"format": 99, "name": "base"}))
    return ["report", str(run.parent)], [str(run / "summary.json"), "newer classlab"]


def test_plain_text_checkpoint_is_not_said_to_carry_code(tmp_path: Path) -> None:
    from classlab.errors import ClasslabError
    from classlab.io import safe_torch_load

    for text in ("not a checkpoint\n", "corrupt", ""):
        (tmp_path / "best.pt").write_text(text)
        with pytest.raises(ClasslabError) as raised:
            safe_torch_load(tmp_path / "best.pt")
        assert "neither a zip archive nor a pickle" in str(raised.value) and "code" not in str(raised.value)
    (tmp_path / "best.pt").write_bytes(pickle.dumps({"model": _Evil()}))  # real pickled code: still said so
    with pytest.raises(ClasslabError, match="carries Python objects or code"):
        safe_torch_load(tmp_path / "best.pt")


# --------------------------------------------------------------------------------------------- the test


def _assert_one_error_line(err: str, out: str, needles: list[str]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in err and "Traceback" not in out, err + out
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    bad = CASES[name]
    args, needles = bad.setup(tmp_path, monkeypatch)
    code, out, err = run_cli(*args)
    assert code == bad.code, f"exit {code}, expected {bad.code}\nstdout:\n{out}\nstderr:\n{err}"
    _assert_one_error_line(err, out, needles)
    if bad.check is not None:
        bad.check(tmp_path)


def test_catalogue_is_complete() -> None:
    assert len(CASES) >= 30


def test_disk_full_run_resumes_once_space_is_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    args, needles = CASES["disk-full-while-writing-checkpoint"].setup(tmp_path, monkeypatch)
    code, _, err = run_cli(*args)
    assert code == 2 and "No space left" in err
    monkeypatch.undo()
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert (tmp_path / "runs" / "toy" / "base" / "summary.json").is_file()


def test_corrupt_png_among_good_ones_is_skipped_and_counted(tmp_path: Path, run_cli) -> None:
    root = _png_folder(tmp_path / "photos")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    good = (root / "train" / "dog" / "000.png").read_bytes()
    (root / "train" / "dog" / "half.png").write_bytes(good[: len(good) // 2])
    code, out, err = run_cli(*_folder_study(tmp_path, root))
    assert code == 0, err
    assert "Traceback" not in err and "skipped 2 file(s) (unreadable, or hidden)" in out
    run = tmp_path / "runs" / "toy" / "base"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["skipped_files"] == 2
    assert summary["data"]["train"] + summary["data"]["val"] == 24
    log = (run / "run.log").read_text()
    assert "broken.png" in log and "half.png" in log


def test_hidden_files_and_folders_are_not_data_and_are_listed(tmp_path: Path, run_cli) -> None:
    """Issue 26.6: .ipynb_checkpoints/ inside a class folder (and a macOS ._ file) are tools' copies: not trained as
    that class, and run.log names what was left out."""
    root = _png_folder(tmp_path / "photos")
    good = (root / "train" / "dog" / "000.png").read_bytes()
    (root / "train" / "cat" / ".ipynb_checkpoints").mkdir()
    for i in range(3):
        (root / "train" / "cat" / ".ipynb_checkpoints" / f"{i:03d}-checkpoint.png").write_bytes(good)
    (root / "train" / "dog" / "._000.png").write_bytes(good)
    code, out, err = run_cli(*_folder_study(tmp_path, root))
    assert code == 0, err
    assert "skipped 2 file(s) (unreadable, or hidden)" in out
    run = tmp_path / "runs" / "toy" / "base"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train"] + summary["data"]["val"] == 24  # as without them
    log = (run / "run.log").read_text()
    assert ".ipynb_checkpoints/ (hidden: not read as data)" in log and "._000.png (hidden: not read as data)" in log


def test_non_finite_loss_fails_that_run_and_the_study_goes_on(tmp_path: Path, run_cli) -> None:
    runs = [{"name": "boom", "train": {"optimizer": "sgd", "lr": 1e6}}, {"name": "fine"}]
    args, _path = _run_study(tmp_path, {"runs": runs})
    code, out, err = run_cli(*args)
    assert code == 1, err
    assert "Traceback" not in err + out
    lines = [line for line in (out + err).splitlines() if "non-finite" in line]
    assert lines, out + err
    assert len(lines) == 1, lines
    for needle in ("failed: run 'boom'", "epoch 1, by step ", "learning rate 1e+06", "lower train.lr"):
        assert needle in lines[0], lines[0]
    assert "1 run(s) failed: boom" in err and "failed.json" in err  # the closing line names the failed run
    study = tmp_path / "runs" / "toy"
    failed = json.loads((study / "boom" / "failed.json").read_text())
    assert "non-finite" in failed["reason"] and "epoch 1" in failed["reason"]
    assert not (study / "boom" / "summary.json").exists()
    assert (study / "fine" / "summary.json").is_file() and not (study / "fine" / "failed.json").exists()
