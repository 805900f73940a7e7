"""The test pipeline of a trained run (plain, temperature-scaled, test-time augmented) and the summary.json
it ends in; the metrics themselves are classlab.metrics', the forward pass train/forward.py's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from classlab.calibration import fit_temperature
from classlab.config import RunConfig, TrainConfig
from classlab.errors import ClasslabError
from classlab.metrics import (
    ECE_BINS,
    METRICS,
    VALIDATION,
    class_counts,
    classification_report,
    expected_calibration_error,
    reliability_bins,
)
from classlab.results import RunSummary, row_from
from classlab.train.forward import predict_logits
from classlab.train.optim import loss_fn
from classlab.transforms import BatchTransform
from classlab.tta import tta_probs

CONFUSION_METRICS = tuple(m.name for m in METRICS.values() if m.of_confusion is not None)
WORST_MISTAKES = 16


def worst_mistakes(probs: torch.Tensor, labels: torch.Tensor, k: int = WORST_MISTAKES) -> torch.Tensor:
    """Indices of wrong predictions made with the highest confidence."""
    pred = probs.argmax(1)
    wrong = torch.nonzero(pred != labels).flatten()
    conf = probs[wrong, pred[wrong]]
    return wrong[conf.argsort(descending=True)[:k]]


@dataclass
class TestEvaluation:
    """A trained run on its test split: the metrics summary.json records, and what predictions.npz holds."""

    metrics: dict
    probs: torch.Tensor  # [N, classes] on the CPU (temperature-scaled when a temperature was fitted)
    worst: torch.Tensor  # indices of the most confident mistakes
    calibration: dict | None = None  # summary.json's "calibration": ECE (before / after), reliability bins
    temperature: dict | None = None  # temperature.json, when eval.temperature_scaling fitted one
    tta: dict | None = None  # summary.json's "test_tta", when eval.tta lists views


def evaluate_test(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform,
                  tc: TrainConfig, num_classes: int, device: torch.device) -> TestEvaluation:
    """Loss, accuracy, confusion matrix and per-class metrics on a split, from one forward pass (fp32)."""
    logits = predict_logits(model, images, transform, tc.eval_batch_size, device)
    labels = labels.to(device)
    metrics, probs = _split_metrics(logits, labels, tc, num_classes)
    reliability = reliability_bins(probs, labels)
    calibration = {"bins": ECE_BINS, "temperature": None, "ece": metrics["ece"], "reliability": reliability}
    return TestEvaluation(metrics, probs.cpu(), worst_mistakes(probs, labels).cpu(), calibration)


def _split_metrics(logits: torch.Tensor, labels: torch.Tensor, tc: TrainConfig, num_classes: int,
                   temperature: float = 1.0) -> tuple[dict, torch.Tensor]:
    """summary.json's metrics of one split's logits (divided by `temperature`), and the probabilities."""
    scaled = logits / temperature if temperature != 1.0 else logits
    loss = float(loss_fn(scaled, labels, tc, reduction="sum")) / max(len(labels), 1)
    probs = scaled.softmax(1)
    metrics = {"loss": loss, **classification_report(labels, scaled, num_classes),
               "ece": expected_calibration_error(probs, labels)}
    return metrics, probs


def evaluate_run(model: nn.Module, data, pre, cfg: RunConfig, device: torch.device) -> TestEvaluation:
    """The test evaluation of a trained run with its `eval` section: as `evaluate_test`, plus (with
    `eval.temperature_scaling`) one temperature fitted on the validation logits and applied to the test
    metrics and probabilities, ECE before and after; and (with `eval.tta`) the test metrics of the
    probabilities averaged over the augmented views, beside (never instead of) the plain ones."""
    tc, ec, k = cfg.train, cfg.eval, len(data.classes)
    transform = BatchTransform(pre, None, device)
    labels = data.test.labels.to(device)
    logits = predict_logits(model, data.test.images, transform, tc.eval_batch_size, device)
    plain, plain_probs = _split_metrics(logits, labels, tc, k)
    calibration = {"bins": ECE_BINS, "temperature": None, "ece": plain["ece"],
                   "reliability": reliability_bins(plain_probs, labels)}
    metrics, probs, record, t = plain, plain_probs, None, 1.0
    if ec.temperature_scaling:
        if data.val is None or len(data.val) == 0:
            raise ClasslabError("eval.temperature_scaling needs a validation split: set data.val_fraction")
        val_labels = data.val.labels.to(device)
        val_logits = predict_logits(model, data.val.images, transform, tc.eval_batch_size, device)
        record = fit_temperature(val_logits, val_labels)
        t = record["temperature"]
        metrics, probs = _split_metrics(logits, labels, tc, k, t)
        calibration.update({
            "temperature": t, "ece": metrics["ece"], "ece_before": plain["ece"], "loss_before": plain["loss"],
            "reliability": reliability_bins(probs, labels), "reliability_before": calibration["reliability"],
            "val": {key: record[key] for key in ("images", "nll_before", "nll_after", "ece_before", "ece_after")}})
    tta = None
    if ec.tta:
        views_probs, views = tta_probs(model, data.test.images, transform, tc.eval_batch_size, device, ec.tta, t)
        report = classification_report(labels, views_probs.log(), k)
        nll = float(torch.nn.functional.nll_loss(views_probs.clamp_min(1e-12).log(), labels, reduction="mean"))
        tta = {"views": views, **{name: report[name] for name in CONFUSION_METRICS}, "nll": nll,
               "ece": expected_calibration_error(views_probs, labels), "confusion_matrix": report["confusion_matrix"],
               "temperature": t if record else None, "plain_accuracy": metrics["accuracy"]}
    return TestEvaluation(metrics, probs.cpu(), worst_mistakes(probs, labels).cpu(), calibration, record, tta)


def _val_at(history: list[dict], epoch: int) -> dict | None:
    """The validation metrics of `epoch` (every registry metric the row has), or None without validation."""
    for row in map(row_from, history):
        if row.epoch == epoch and row.val("loss") is not None:
            values = {name: row.val(name) for name in VALIDATION}
            return {**{k: v for k, v in values.items() if v is not None}, "epoch": epoch}
    return None


def run_summary(cfg: RunConfig, data, result, test: TestEvaluation, parameters: dict, device: torch.device
                ) -> RunSummary:
    """summary.json: the test metrics, which epoch's weights they use, and how the run trained.

    `best_epoch` is the best validation epoch; `kept_epoch` (and `weights`: best or last) the epoch whose
    weights the test numbers use: the best with early stopping, else the last (docs/decisions.md #2)."""
    history = result.history
    epoch_seconds = [r["seconds"] for r in history]
    return RunSummary.model_validate({
        "name": cfg.name,
        "seed": cfg.seed,
        "classes": list(data.classes),
        "test": test.metrics,
        "best_epoch": result.best_epoch,
        "kept_epoch": result.kept_epoch,
        "weights": "best" if cfg.train.early_stopping is not None else "last",
        "epochs_run": len(history),
        "stopped_early": result.stopped_early,
        "final_train": {"loss": history[-1]["train_loss"], "accuracy": history[-1]["train_accuracy"]},
        "best_val": _val_at(history, result.best_epoch),
        "kept_val": _val_at(history, result.kept_epoch),
        "parameters": parameters,
        "seconds": float(sum(epoch_seconds)),
        "seconds_per_epoch": float(sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else 0.0,
        "device": str(device),
        "trained_together": result.stacked > 1,
        "data": {"source": data.source, "train": len(data.train), "val": len(data.val) if data.val else 0,
                 "test": len(data.test), "skipped_files": len(data.skipped), "origins": data.origins,
                 "class_counts": {name: class_counts(split.labels, len(data.classes))
                                  for name, split in (("train", data.train), ("val", data.val), ("test", data.test))
                                  if split is not None}},
        **({"calibration": test.calibration} if test.calibration is not None else {}),
        **({"test_tta": test.tta} if test.tta is not None else {}),
    })
