import json

import pytest
import torch
from rich.console import Console

from classlab.config import RunConfig, validate
from classlab.data import load_dataset
from classlab.models import build_model
from classlab.runs import RunFolder, safe_torch_load
from classlab.study import train_run
from classlab.train.fit import fit
from classlab.train.optim import loss_fn
from classlab.transforms import preprocess_for
from tests.conftest import TINY_CNN, stop_fit_after

QUIET = Console(quiet=True)


def _cfg(idx_folder, data=None, seed=0, **train) -> RunConfig:
    t = {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.01, **train}
    d = {"dataset": "idx", "root": str(idx_folder), **(data or {})}
    model = {"name": "cnn", "layers": TINY_CNN}
    return validate(RunConfig, {"name": "r", "seed": seed, "data": d, "model": model, "train": t})


def _train(cfg, tmp_path, name="r"):
    return train_run(cfg, RunFolder(tmp_path / name), torch.device("cpu"), QUIET)


def test_same_seed_same_metrics_and_it_learns(idx_folder, tmp_path):
    cfg = _cfg(idx_folder, epochs=4)
    a = _train(cfg, tmp_path, "a")
    b = _train(cfg, tmp_path, "b")
    assert a["test"] == b["test"]
    assert a["test"]["accuracy"] > 0.9  # the toy classes are easy
    other = _train(_cfg(idx_folder, epochs=4, seed=1), tmp_path, "c")
    assert other["test"]["loss"] != a["test"]["loss"]


def test_run_folder_contents(idx_folder, tmp_path):
    cfg = _cfg(idx_folder, epochs=2, scheduler={"name": "step", "step_size": 1, "gamma": 0.5})
    summary = _train(cfg, tmp_path)
    folder = RunFolder(tmp_path / "r")
    for name in ("config.yaml", "preprocessing.json", "metrics.jsonl", "summary.json", "model_summary.txt",
                 "predictions.npz", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (folder.path / name).is_file(), name
    rows = folder.read_metrics()
    assert [r["lr"] for r in rows] == [0.01, 0.005]  # StepLR halves each epoch
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"} <= set(rows[0])
    assert folder.read_config()["train"]["epochs"] == 2
    assert summary["parameters"]["total"] > 0 and len(summary["test"]["confusion_matrix"]) == 4
    assert not list(folder.path.rglob("*.tmp"))


def test_best_epoch_without_early_stopping_is_the_best_validation_epoch(idx_folder, tmp_path):
    """Issue 15 item 2: without early stopping the run keeps its last epoch (and says so), while best_epoch,
    best.pt and the console's star follow the best validation loss, not every epoch."""
    import io

    cfg = _cfg(idx_folder, epochs=6, lr=0.5, optimizer="sgd")  # validation loss rises after a few epochs
    out = io.StringIO()
    summary = train_run(cfg, RunFolder(tmp_path / "r"), torch.device("cpu"), Console(file=out, width=200))
    rows = RunFolder(tmp_path / "r").read_metrics()
    best = min(rows, key=lambda r: r["val_loss"])["epoch"]
    assert best < len(rows)  # the setting makes validation loss rise, else this test shows nothing
    assert summary["best_epoch"] == best and summary["kept_epoch"] == len(rows) and summary["weights"] == "last"
    assert [r["epoch"] for r in rows if r["best"]] == sorted({r["epoch"] for r in rows if r["best"]})
    assert sum(r["best"] for r in rows) < len(rows)
    assert safe_torch_load(tmp_path / "r" / "checkpoints" / "best.pt")["epoch"] == best
    starred = [line for line in out.getvalue().splitlines() if "epoch" in line and line.rstrip().endswith("*")]
    assert len(starred) == sum(r["best"] for r in rows)


def test_early_stopping_restores_the_best_weights(idx_folder, tmp_path):
    # a huge LR makes validation loss get worse after the first epochs, so patience triggers
    cfg = _cfg(idx_folder, epochs=30, lr=0.5, optimizer="sgd", early_stopping={"patience": 2})
    summary = _train(cfg, tmp_path)
    rows = RunFolder(tmp_path / "r").read_metrics()
    best = min(rows, key=lambda r: r["val_loss"])
    assert summary["stopped_early"] and len(rows) == best["epoch"] + 2
    assert summary["best_epoch"] == best["epoch"]
    # the weights used for test are the best epoch's: re-evaluating them on val gives the best val loss
    state = safe_torch_load(tmp_path / "r" / "checkpoints" / "best.pt")
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, 4, (1, 28, 28))
    model.load_state_dict(state["model"])
    from classlab.evaluate import evaluate_test
    from classlab.transforms import BatchTransform

    pre = preprocess_for(cfg, data)
    val = evaluate_test(model, data.val.images, data.val.labels, BatchTransform(pre, None, torch.device("cpu")),
                        cfg.train, 4, torch.device("cpu"))
    assert val.metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_resume_equals_uninterrupted(idx_folder, tmp_path):
    cfg = _cfg(idx_folder, data={"augment": {"hflip": 0.5, "rotate": 10}}, epochs=4, optimizer="sgd",
               momentum=0.9, lr=0.05, scheduler={"name": "step", "step_size": 2})
    full = _train(cfg, tmp_path, "full")
    # stop after epoch 2 by making the epoch-end hook raise, as a kill would, then run again
    with pytest.MonkeyPatch.context() as m:
        stop_fit_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            _train(cfg, tmp_path, "resumed")
    folder = RunFolder(tmp_path / "resumed")
    assert not folder.is_complete and len(folder.read_metrics()) == 2
    resumed = _train(cfg, tmp_path, "resumed")
    assert resumed["test"] == full["test"]
    keys = ("train_loss", "val_loss", "lr")
    assert [{k: r[k] for k in keys} for r in folder.read_metrics()] == [
        {k: r[k] for k in keys} for r in RunFolder(tmp_path / "full").read_metrics()]


def test_complete_run_is_skipped_and_changed_config_refused(idx_folder, tmp_path):
    cfg = _cfg(idx_folder, epochs=1)
    first = _train(cfg, tmp_path)
    mtime = (tmp_path / "r" / "summary.json").stat().st_mtime_ns
    assert _train(cfg, tmp_path)["test"] == first["test"]
    assert (tmp_path / "r" / "summary.json").stat().st_mtime_ns == mtime
    from classlab.errors import ClasslabError

    with pytest.raises(ClasslabError, match="different config"):
        _train(_cfg(idx_folder, epochs=2), tmp_path)


def test_loss_variants_and_l1(idx_folder):
    logits = torch.randn(10, 4)
    y = torch.randint(0, 4, (10,))
    ce = loss_fn(logits, y, _cfg(idx_folder).train)
    nll = loss_fn(logits, y, _cfg(idx_folder, loss="nll").train)
    double = loss_fn(logits, y, _cfg(idx_folder, softmax_before_loss=True).train)
    assert torch.allclose(ce, nll) and not torch.allclose(ce, double)
    assert torch.allclose(double, torch.nn.functional.cross_entropy(logits.softmax(1), y))


def test_l1_shrinks_weights(idx_folder, tmp_path):
    plain = _cfg(idx_folder, epochs=2, optimizer="sgd", lr=0.05)
    l1 = _cfg(idx_folder, epochs=2, optimizer="sgd", lr=0.05, l1=0.01)
    norms = []
    for cfg in (plain, l1):
        data = load_dataset(cfg.data)
        pre = preprocess_for(cfg, data)
        torch.manual_seed(0)
        model = build_model(cfg.model, 4, pre.input_shape)
        fit([model], data, [cfg], pre, torch.device("cpu"))
        norms.append(sum(p.abs().sum().item() for p in model.parameters() if p.ndim > 1))
    assert norms[1] < 0.8 * norms[0]


def test_permutation_is_saved_and_used(idx_folder, tmp_path):
    cfg = _cfg(idx_folder, data={"permute_pixels": {"seed": 3}}, epochs=1)
    _train(cfg, tmp_path)
    pre = json.loads((tmp_path / "r" / "preprocessing.json").read_text())
    assert sorted(pre["permutation"]) == list(range(784)) and pre["permutation"] != list(range(784))
