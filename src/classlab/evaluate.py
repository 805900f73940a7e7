"""Classification metrics from tensors, all derived from one confusion matrix (checked against sklearn)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from classlab.config import RunConfig, TrainConfig
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

    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
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
    probs: torch.Tensor  # [N, classes] on the CPU
    worst: torch.Tensor  # indices of the most confident mistakes


def evaluate_test(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform,
                  tc: TrainConfig, num_classes: int, device: torch.device) -> TestEvaluation:
    """Loss, accuracy, confusion matrix and per-class metrics on a split, from one forward pass (fp32)."""
    from classlab.train.optim import loss_fn

    logits = predict_logits(model, images, transform, tc.eval_batch_size, device)
    labels = labels.to(device)
    loss = float(loss_fn(logits, labels, tc, reduction="sum")) / max(len(labels), 1)
    probs = logits.softmax(1)
    metrics = {"loss": loss, **classification_report(labels, logits, num_classes)}
    return TestEvaluation(metrics, probs.cpu(), worst_mistakes(probs, labels).cpu())


def _val_at(history: list[dict], epoch: int) -> dict | None:
    for row in history:
        if row["epoch"] == epoch and row.get("val_loss") is not None:
            return {"loss": row["val_loss"], "accuracy": row["val_accuracy"], "epoch": epoch}
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
                 "test": len(data.test), "skipped_files": len(data.skipped)},
    }
