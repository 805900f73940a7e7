"""Calibration: ECE against a hand-computed case, balanced accuracy against sklearn, the temperature fit
(LBFGS) against a known temperature and scipy, and eval.temperature_scaling through a study, its run
folder, predict, and the report."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from classlab.calibration import fit_temperature
from classlab.config import RunConfig, validate
from classlab.errors import ClasslabError
from classlab.metrics import classification_report, expected_calibration_error, reliability_bins
from tests.conftest import make_idx_folder, tiny_study, write_study


def test_ece_matches_a_hand_computed_case():
    # 5 predictions, top-class confidences 0.95, 0.95, 0.65, 0.62, 0.42 (15 bins of width 1/15)
    probs = torch.tensor([[0.95, 0.05, 0.00], [0.95, 0.00, 0.05], [0.65, 0.35, 0.00],
                          [0.38, 0.62, 0.00], [0.29, 0.29, 0.42]])
    labels = torch.tensor([0, 1, 0, 0, 2])
    # bin 15 (14/15, 1]: confidences .95 .95, accuracy 1/2 -> |0.5 - 0.95| = 0.45, weight 2/5
    # bin 10 (9/15, 10/15]: .65 (right) and .62 (wrong): accuracy 0.5, mean confidence 0.635 -> 0.135, weight 2/5
    # bin 7 (6/15, 7/15]: .42 is the top of row 5 (class 2, right): |1 - 0.42| = 0.58, weight 1/5
    expected = 2 / 5 * 0.45 + 2 / 5 * 0.135 + 1 / 5 * 0.58
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    bins = reliability_bins(probs, labels)
    assert bins["bins"] == 15 and sum(bins["count"]) == 5
    assert bins["count"][14] == 2 and bins["count"][9] == 2 and bins["count"][6] == 1
    assert bins["accuracy"][9] == pytest.approx(0.5) and bins["confidence"][9] == pytest.approx(0.635)
    assert bins["accuracy"][0] is None  # an empty bin
    # perfectly confident and right: 0; a bin edge (exactly 1/15 * 10) falls in the bin it closes
    assert expected_calibration_error(torch.eye(3), torch.arange(3)) == 0.0
    edge = torch.tensor([[10 / 15, 5 / 15]], dtype=torch.float64)
    assert reliability_bins(edge, torch.tensor([0]))["count"][9] == 1


@pytest.mark.parametrize("seed", range(4))
def test_balanced_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    y = rng.integers(0, k, size=int(rng.integers(10, 200)))
    if seed == 3:
        y[y == 0] = 1  # a class absent from y_true: sklearn averages the classes present
    logits = rng.normal(size=(len(y), k))
    ours = classification_report(torch.tensor(y), torch.tensor(logits), k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about a predicted class absent from y_true
        expected = balanced_accuracy_score(y, logits.argmax(1))
    assert ours["balanced_accuracy"] == pytest.approx(expected)


def _sampled(n: int, k: int, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z whose labels are drawn from softmax(z / temperature): the right temperature is known."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 4
    y = torch.multinomial((z / temperature).softmax(1), 1, generator=g).flatten()
    return z, y


def test_temperature_fit_recovers_a_known_temperature_and_lowers_ece():
    z, y = _sampled(20000, 5, temperature=2.0, seed=0)
    fit = fit_temperature(z.float(), y)
    assert fit["temperature"] == pytest.approx(2.0, rel=0.05)
    assert fit["nll_after"] < fit["nll_before"] and fit["ece_after"] < fit["ece_before"]
    # the same optimum as a scalar search on the NLL
    from scipy.optimize import minimize_scalar

    best = minimize_scalar(lambda t: float(F.cross_entropy(z / t, y)), bounds=(0.05, 20), method="bounded",
                           options={"xatol": 1e-8})
    assert fit["temperature"] == pytest.approx(best.x, rel=1e-4)
    # an under-confident model gets T < 1; a calibrated one T near 1
    assert fit_temperature(*_sampled(20000, 5, 0.5, 1))["temperature"] == pytest.approx(0.5, rel=0.05)
    assert fit_temperature(*_sampled(20000, 5, 1.0, 2))["temperature"] == pytest.approx(1.0, rel=0.05)


def test_temperature_scaling_needs_a_validation_split():
    with pytest.raises(ClasslabError, match="needs a validation split"):
        validate(RunConfig, {"name": "x", "model": {"name": "mlp"}, "data": {"val_fraction": None},
                             "eval": {"temperature_scaling": True}})
    cfg = validate(RunConfig, {"name": "x", "model": {"name": "mlp"}, "data": {"val_fraction": 0.1},
                               "eval": {"temperature_scaling": True}})
    assert cfg.eval.temperature_scaling and cfg.eval.tta == []


def test_study_with_temperature_scaling_and_tta(tmp_path, run_cli):
    """The eval section flows from the study into each run; the run folder keeps the temperature; summary,
    predict and the report use it; TTA sits beside the plain test metrics."""
    from classlab.inference import load_run, predict_images
    from classlab.report import make_report
    from classlab.runs import RunFolder

    data = make_idx_folder(tmp_path / "toy")
    study = tiny_study(tmp_path, data, eval={"temperature_scaling": True, "tta": ["hflip", {"rotate": 10}]})
    path = write_study(tmp_path / "study.yaml", study)
    code, out, err = run_cli("run", str(path), "--device", "cpu")
    assert code == 0, out + err
    folder = RunFolder(tmp_path / "runs" / "toy" / "base")
    cal = folder.read_calibration()
    assert cal is not None and cal["temperature"] > 0 and cal["fitted_on"] == "validation"
    summary = folder.read_summary()
    c = summary["calibration"]
    assert c["temperature"] == pytest.approx(cal["temperature"]) and c["bins"] == 15
    assert c["ece"] == pytest.approx(summary["test"]["ece"]) and "ece_before" in c and "reliability_before" in c
    assert summary["test"]["accuracy"] == pytest.approx(summary["test_tta"]["plain_accuracy"])
    assert summary["test_tta"]["views"] == ["identity", "hflip", "rotate:10", "rotate:-10"]
    counts = summary["data"]["class_counts"]
    assert [sum(counts[s]) for s in ("train", "val", "test")] == [summary["data"][s] for s in ("train", "val", "test")]
    # predict: logits / T, averaged over the TTA views, as the run's own test numbers
    run = load_run(folder.path, "cpu")
    assert run.temperature == pytest.approx(cal["temperature"]) and run.tta == ("hflip", "rotate:10")
    from classlab.data import load_dataset
    from classlab.inference import transform
    from classlab.train.forward import predict_logits
    from classlab.tta import tta_probs

    test = load_dataset(run.config.data).test
    images = test.images[:20].numpy()
    probs = predict_images(run, images)
    expected, _ = tta_probs(run.model, torch.from_numpy(images), transform(run), 64, run.device, run.tta,
                            run.temperature)
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-5, atol=1e-6)
    plain = (predict_logits(run.model, torch.from_numpy(images), transform(run), 64, run.device)
             / run.temperature).softmax(1)
    stored = folder.read_predictions()["probs"][:20]  # predictions.npz holds the temperature-scaled probabilities
    np.testing.assert_allclose(stored, plain.numpy(), rtol=1e-4, atol=1e-5)
    # predict --cam: one figure per photo (the prepared input and the top classes' Grad-CAM maps)
    from PIL import Image

    for i in range(2):
        Image.fromarray(images[i, 0]).save(tmp_path / f"photo{i}.png")
    code, out, err = run_cli("predict", str(folder.path), str(tmp_path / "photo0.png"), str(tmp_path / "photo1.png"),
                             "--cam", str(tmp_path / "cam.png"), "--device", "cpu", "--no-prepare")
    assert code == 0, out + err
    for i in range(2):
        assert (tmp_path / f"cam-photo{i}.png").read_bytes()[:4] == b"\x89PNG"
    html_path, md_path = make_report(tmp_path / "runs" / "toy")
    html, md = html_path.read_text(), md_path.read_text()
    for text in (html, md):
        assert "Calibration" in text and "Test-time augmentation" in text and "Class distribution" in text
        assert "balanced accuracy" in text  # (no mistakes on this toy set, so no Grad-CAM section)
        assert f"T = {cal['temperature']:.3f}" in text


def test_retrain_drops_temperature_scaling():
    from classlab.config import StudyConfig
    from classlab.plan import expand, retrain_plan

    study = validate(StudyConfig, {"name": "s", "data": {"val_fraction": 0.2}, "model": {"name": "mlp"},
                                   "eval": {"temperature_scaling": True, "tta": ["hflip"]},
                                   "select": {"by": "accuracy"}, "retrain_on": "train+val"})
    planned = expand(study)
    assert planned[0].config.eval.temperature_scaling
    again = retrain_plan(planned, planned[0].variant, "s")
    assert not again[0].config.eval.temperature_scaling and again[0].config.eval.tta == ["hflip"]
