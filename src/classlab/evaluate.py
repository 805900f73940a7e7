"""Classification metrics from tensors, all derived from one confusion matrix (checked against sklearn)."""

from __future__ import annotations

import torch
from torch import nn

from classlab.train.device import autocast
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
                   device: torch.device, amp: bool = False) -> torch.Tensor:
    """Logits for a whole uint8 set, in large batches, with the model in eval mode: the one forward pass
    behind validation, test metrics, predict and compare. fp32 unless `amp` (stored probabilities and
    test loss should not carry bf16 rounding)."""
    was_training = model.training
    model.eval()
    channels_last = is_channels_last(model)
    out = []
    for i in range(0, len(images), batch_size):
        x = channels_last_input(transform(images[i : i + batch_size].to(device, non_blocking=True)), channels_last)
        with autocast(device, amp):
            out.append(model(x).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
