"""Classification metrics from tensors, all derived from one confusion matrix (checked against sklearn)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from classlab.config import RunConfig, TrainConfig
from classlab.errors import ClasslabError
from classlab.train.speed import channels_last_input, is_channels_last
from classlab.transforms import BatchTransform


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """cm[i, j] = number of samples of true class i predicted as j."""
    index = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / b.clamp_min(1e-12), torch.zeros_like(a))


def metrics_from_confusion(cm: torch.Tensor) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, and macro and weighted averages.
    A class never predicted (or absent) gets 0 for the undefined ratio, as sklearn's zero_division=0."""
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = support.sum()
    weights = support / total if total > 0 else torch.zeros_like(support)

    def avg(kind: str) -> dict:
        w = weights if kind == "weighted" else torch.full_like(support, 1 / len(support))
        return {"precision": float((precision * w).sum()), "recall": float((recall * w).sum()),
                "f1": float((f1 * w).sum()), "support": int(total)}

    present = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        # the mean recall over the classes present (sklearn's balanced_accuracy_score)
        "balanced_accuracy": float(recall[present].mean()) if bool(present.any()) else 0.0,
        "per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                      "support": [int(s) for s in support.tolist()]},
        "macro": avg("macro"),
        "weighted": avg("weighted"),
    }


def classification_report(y_true: torch.Tensor, logits: torch.Tensor, num_classes: int) -> dict:
    """Everything summary.json records about a split's predictions (loss is computed by the caller)."""
    y_pred = logits.argmax(1)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    out = metrics_from_confusion(cm)
    out["confusion_matrix"] = cm.tolist()
    return out


ECE_BINS = 15


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Top-label reliability: the confidence (highest probability) of each prediction falls in one of `bins`
    equal-width bins ((0, 1/bins], ..., ((bins-1)/bins, 1]); per bin the count, the mean confidence and the
    accuracy (None for an empty bin)."""
    probs = probs.detach().double()
    confidence, pred = probs.max(1)
    correct = (pred == labels.to(pred.device)).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.zeros(bins, dtype=torch.float64, device=probs.device).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64, device=probs.device).index_add_(0, index, correct)
    def mean(total: torch.Tensor) -> list[float | None]:
        return [float(t / c) if c > 0 else None for t, c in zip(total.tolist(), count.tolist(), strict=True)]

    return {"bins": bins, "count": [int(c) for c in count.tolist()], "confidence": mean(conf_sum),
            "accuracy": mean(acc_sum)}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): sum over the equal-width confidence bins of |accuracy - mean confidence|, weighted
    by the bin's share of the predictions; top-label, `bins` = 15."""
    return ece_of(reliability_bins(probs, labels, bins))


def ece_of(reliability: dict) -> float:
    """The ECE of a `reliability_bins` result."""
    total = sum(reliability["count"])
    if total == 0:
        return 0.0
    return float(sum(n * abs(a - c) for n, a, c in zip(reliability["count"], reliability["accuracy"],
                                                      reliability["confidence"], strict=True) if n) / total)


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return [int(c) for c in torch.bincount(labels.long().cpu(), minlength=num_classes).tolist()]


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, transform: BatchTransform, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Logits for a whole uint8 set, in large batches, with the model in eval mode: the one forward pass
    behind validation, test metrics, predict and compare. Always fp32, also after mixed-precision training,
    so the test loss and the stored probabilities carry no bf16 / fp16 rounding."""
    was_training = model.training
    model.eval()
    channels_last = is_channels_last(model)
    out = []
    for i in range(0, len(images), batch_size):
        x = channels_last_input(transform(images[i : i + batch_size].to(device, non_blocking=True)), channels_last)
        out.append(model(x).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


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
    from classlab.train.optim import loss_fn

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
    from classlab.calibration import fit_temperature
    from classlab.tta import tta_probs

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
        tta = {"views": views, "accuracy": report["accuracy"], "balanced_accuracy": report["balanced_accuracy"],
               "macro_f1": report["macro"]["f1"], "nll": nll, "ece": expected_calibration_error(views_probs, labels),
               "confusion_matrix": report["confusion_matrix"], "temperature": t if record else None,
               "plain_accuracy": metrics["accuracy"]}
    return TestEvaluation(metrics, probs.cpu(), worst_mistakes(probs, labels).cpu(), calibration, record, tta)


def _val_at(history: list[dict], epoch: int) -> dict | None:
    for row in history:
        if row["epoch"] == epoch and row.get("val_loss") is not None:
            extra = {key.removeprefix("val_"): row[key] for key in ("val_macro_f1", "val_balanced_accuracy")
                     if row.get(key) is not None}
            return {"loss": row["val_loss"], "accuracy": row["val_accuracy"], **extra, "epoch": epoch}
    return None


def run_summary(cfg: RunConfig, data, result, test: TestEvaluation, parameters: dict, device: torch.device) -> dict:
    """summary.json: the test metrics, which epoch's weights they use, and how the run trained.

    `best_epoch` is the best validation epoch; `kept_epoch` (and `weights`: best or last) the epoch whose
    weights the test numbers use: the best with early stopping, else the last (docs/decisions.md #2)."""
    history = result.history
    epoch_seconds = [r["seconds"] for r in history]
    return {
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
    }
