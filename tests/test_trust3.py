"""Issue 26 (trust, round 3): what a new user hit, each mended at its root -- the report describes the study as
its file now defines it, refusals come before training and name what differs, an evaluation-only change
re-evaluates instead of retraining, fixed-input-size architectures build at the run's size, and the report of a
pretrained run names its origin and every run.log warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from classlab.config import ZooConfig
from classlab.errors import ClasslabError
from tests.conftest import tiny_study, write_study


def _runs(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "toy"


def test_report_describes_the_study_as_its_file_now_defines_it(tmp_path, idx_folder, run_cli):
    """Issue 26.4: a variant removed from the YAML is listed as such, never compared (nor in the Holm family)."""
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "a"}, {"name": "b", "train": {"lr": 0.003}},
                                                   {"name": "c", "train": {"lr": 0.001}}])
    study["train"]["epochs"] = 1
    path = write_study(tmp_path / "s.yaml", study)
    code, _, err = run_cli("run", str(path))
    assert code == 0, err
    first = json.loads((_runs(tmp_path) / "comparison.json").read_text())
    assert {r["a"] for r in first["rows"]} == {"b", "c"} and first["outside_study"] == []
    study["runs"] = study["runs"][:2]  # c removed from the file
    code, out, err = run_cli("run", str(write_study(path, study)))
    assert code == 0, err
    doc = json.loads((_runs(tmp_path) / "comparison.json").read_text())
    assert {r["a"] for r in doc["rows"]} == {"b"} and doc["outside_study"] == ["c"]
    md = (_runs(tmp_path) / "report.md").read_text()
    assert "Not in the study as its file now defines it (left on disk, not compared): c" in md
    assert "| c " not in md and "c vs a" not in md
    assert (_runs(tmp_path) / "c" / "summary.json").is_file()  # left on disk
    holm = {r["a"]: r["p_adjusted"] for r in doc["rows"] if r["metric"] == "accuracy"}
    alone = {r["a"]: r["p_value"] for r in doc["rows"] if r["metric"] == "accuracy"}
    assert holm["b"] == pytest.approx(alone["b"])  # one test left in the family: nothing to correct for


def test_select_without_validation_fails_before_training(tmp_path, idx_folder, run_cli):
    """Issue 26.8: checked before any run trains, as early stopping is."""
    study = tiny_study(tmp_path, idx_folder, runs=[{"name": "a"}, {"name": "b", "train": {"lr": 0.003}}])
    study["data"]["val_fraction"] = None
    study["select"] = {"by": "accuracy"}
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "select picks the variant by a validation metric" in err and "a, b have no validation split" in err
    assert "set data.val_fraction" in err and "epoch" not in out and not (_runs(tmp_path) / "a").exists()


def test_a_different_config_names_the_keys_and_an_eval_change_re_evaluates(tmp_path, idx_folder, run_cli):
    """Issue 26.8: the refusal names the differing key(s); adding eval.tta / temperature scaling / eval_batch_size
    to a finished run re-evaluates it from its checkpoint (same weights, no epoch trained), and says so."""
    study = tiny_study(tmp_path, idx_folder)
    study["train"]["epochs"] = 1
    path = write_study(tmp_path / "s.yaml", study)
    assert run_cli("run", str(path))[0] == 0
    run = _runs(tmp_path) / "base"
    weights = (run / "checkpoints" / "last.pt").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    code, _, err = run_cli("run", str(path), "-o", "train.lr=0.02")
    assert code == 2 and "holds a run with a different config (train.lr: 0.01 -> 0.02)" in err

    code, out, err = run_cli("run", str(path), "-o", "eval.tta=[hflip]", "-o", "eval.temperature_scaling=true",
                             "-o", "train.eval_batch_size=64")
    assert code == 0, err
    assert "base: re-evaluated from its checkpoint (" in out and "not retrained" in out and "epoch 1/1" not in out
    assert (run / "checkpoints" / "last.pt").read_bytes() == weights and (run / "metrics.jsonl").read_text() == metrics
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_tta"]["views"] == ["identity", "hflip"] and summary["calibration"]["temperature"] > 0
    assert json.loads((run / "temperature.json").read_text())["temperature"] == summary["calibration"]["temperature"]
    assert "re-evaluated from last.pt" in (run / "run.log").read_text()
    assert run_cli("run", str(path), "-o", "eval.tta=[hflip]", "-o", "eval.temperature_scaling=true", "-o",
                   "train.eval_batch_size=64")[1].count("already complete, skipped") == 1  # config.yaml now says so
    code, out, err = run_cli("run", str(path))  # and back: the temperature no longer applies
    assert code == 0 and "re-evaluated" in out and not (run / "temperature.json").exists()


def test_fixed_input_size_architectures_build_at_the_runs_size(tmp_path):
    """Issue 26.7: a ViT is built at the run's input size (timm's img_size) and its pretrained position
    embeddings are resampled to that grid (timm's own checkpoint filter), not refused by a traceback."""
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    from classlab.models.zoo import build_zoo

    torch.manual_seed(0)
    full = timm.create_model("vit_tiny_patch16_224", num_classes=10)  # 14x14 patches, as the weights are
    torch.save(full.state_dict(), tmp_path / "vit.pth")
    model = build_zoo(ZooConfig(name="timm/vit_tiny_patch16_224", pretrained=str(tmp_path / "vit.pth")), 4,
                      (3, 64, 64))
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 4)
    expected = resample_abs_pos_embed(full.pos_embed, (4, 4), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)  # resampled, not left at random
    assert torch.equal(model.blocks[0].attn.qkv.weight, full.blocks[0].attn.qkv.weight)


def test_summary_of_a_vit_at_64px_and_a_forward_that_fails_are_one_line(tmp_path, idx_folder, run_cli):
    pytest.importorskip("timm")
    study = tiny_study(tmp_path, idx_folder)
    study["model"] = {"name": "timm/vit_tiny_patch16_224"}
    study["data"].update(resize=64, to_rgb=True)
    code, out, err = run_cli("summary", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0 and "Traceback" not in err and "input 3×64×64" in out

    from classlab.models.summary import model_table

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(10, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))  # 3*8*8 features, not 10

    with pytest.raises(ClasslabError, match=r"cannot take a 3x8x8 input \(.*\); check data.resize"):
        model_table(Broken(), (3, 8, 8))


def test_report_of_a_pretrained_run_names_its_origin_and_every_run_log_warning(tmp_path, idx_folder, run_cli):
    """Issue 26.9: the architecture, the weights and the resize are on the page, and a run.log warning (input under
    half the weights' size) is a sanity note, not "No warnings"."""
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "r10t.pth")
    study = tiny_study(tmp_path, idx_folder)
    study["model"] = {"name": "timm/resnet10t", "pretrained": str(tmp_path / "r10t.pth")}
    study["data"].update(resize=32, to_rgb=True, subset={"train": 96, "test": 40})
    study["train"].update(epochs=1)
    code, _, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    md = (_runs(tmp_path) / "report.md").read_text()
    assert f"- model: timm/resnet10t, weights: {tmp_path / 'r10t.pth'}" in md
    assert "resized bicubic from 28x28, gray copied to 3 channels" in md and "input_size from data.resize" in md
    assert "No warnings" not in md
    assert "**run.log warning**: input 32x32 is under half the" in md
    html = (_runs(tmp_path) / "report.html").read_text()
    assert "model: timm/resnet10t" in html and "run.log warning" in html


def test_smaller_messages_say_what_is_true(tmp_path, idx_folder, run_cli):
    """Issue 26.10: the did-you-mean's listing command lists something; a 1x1 photo is said to be tiny; a missing
    relative data.root says paths are taken from the working directory; lr_groups by role on a one-group MLP is
    refused."""
    from classlab.models.zoo import _torchvision_names, list_architectures, listing_pattern
    from classlab.photo import check_input

    pattern = listing_pattern("resnt18", _torchvision_names())
    assert pattern == "resn" and "torchvision/resnet18" in list_architectures(pattern)

    stats = {"image_mean_range": (0.18, 0.19), "floor_range": (0.0, 0.0), "border_mean_range": (0.0, 0.02)}
    tiny = check_input(__import__("numpy").full((1, 28, 28), 200, "uint8"), stats, decoded_size=[1, 1])
    assert tiny == ["the photo is 1x1 pixels, under half the run's 28x28: upscaled 28x, it holds little of what the "
                    "model was trained on (use a larger photo)"]

    study = tiny_study(tmp_path, idx_folder)
    study["data"]["root"] = "no/such/folder"
    code, _, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 2 and "a relative data.root is taken from the working directory" in err

    study = tiny_study(tmp_path, idx_folder)
    study["model"] = {"name": "mlp", "hidden": [16]}
    study["train"]["lr_groups"] = {"head": 0.1}
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code in (1, 2) and "'head' would be the whole network" in out + err and "epoch 1/" not in out


def test_stacked_seconds_skipped_images_and_resolved_class_weights(tmp_path, idx_folder, run_cli):
    """Issue 26.10: stacked runs' amortized seconds are not shown as 0.0; compare --images names skipped files on
    the console; class weights resolved from `auto` are in run.log."""
    from classlab.report.context import seconds_digits

    assert [seconds_digits(s) for s in (12.3, 0.47, 0.047, 0.0049, 0.0)] == [1, 2, 3, 4, 1]
    study = tiny_study(tmp_path, idx_folder, grid={"train.lr": [0.01, 0.001]})
    study["model"] = {"name": "mlp", "hidden": [16]}
    study["train"].update(epochs=1, class_weights="auto")
    study["data"]["subset"] = {"keep": {"3": 0.5}}
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    assert "training 2 runs together" in out
    summary = json.loads((_runs(tmp_path) / "lr0.01" / "summary.json").read_text())
    shown = f"{summary['seconds']:.{seconds_digits(summary['seconds'])}f}"
    assert shown != "0.0" and f"│ {shown} │" in out
    log = (_runs(tmp_path) / "lr0.01" / "run.log").read_text()
    line = next(x for x in log.splitlines() if x.startswith("class weights (auto): "))
    weights = dict(item.split() for item in line.split(": ", 1)[1].split(", "))
    assert float(weights["3"]) > float(weights["0"])  # the halved class weighs more

    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    Image.new("L", (28, 28), 30).save(images / "good.png")
    (images / "bad.png").write_bytes(b"not an image")
    code, out, err = run_cli("compare", str(_runs(tmp_path) / "lr0.01"), str(_runs(tmp_path) / "lr0.001"),
                             "--images", str(images))
    assert code == 0, err
    assert "skipped bad.png (" in out
