"""The metric registry: every metric classlab computes, stops on, selects by, logs or shows, defined once.

A metric has one name for every split: `macro_f1` is the validation macro F1 in an epoch row (`val_macro_f1`,
what early stopping and `select.by` read) and the test macro F1 in summary.json. Its function takes a
confusion matrix (any leading batch dimensions: fit validates K stacked members at once) or, for the
calibration ones, probabilities and labels; the loss is computed by its caller, which knows the training
loss settings. Adding a metric is one entry in METRICS (and, where the report should show it, a template
line). A leaf module: torch only, checked against scikit-learn in tests/test_metrics.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

VAL_PREFIX = "val_"  # an epoch row's key of a validation metric: val_<name>
TRAIN_PREFIX = "train_"


@dataclass(frozen=True)
class Metric:
    """One metric: how it is computed, which way is better and how it is shown."""

    name: str
    label: str  # a column title (the terminal's comparison table)
    higher_is_better: bool
    scale: float = 1.0  # shown as value × scale with `digits` decimals (accuracy in %)
    digits: int = 4
    of_confusion: Callable[[torch.Tensor], torch.Tensor] | None = None  # cm [..., C, C] -> [...]
    of_probs: Callable[[torch.Tensor, torch.Tensor], float] | None = None  # (probs [N, C], labels [N])
    validation: bool = True  # computed on the validation split every epoch (the epoch row's val_<name>)

    @property
    def val_key(self) -> str:
        return VAL_PREFIX + self.name

    def format(self, value: float) -> str:
        return f"{value * self.scale:.{self.digits}f}"

    def format_stat(self, stat: Any) -> str:
        """A mean ± std over seeds (a Stat with .format(scale, digits)) in this metric's display format."""
        return stat.format(self.scale, self.digits)

    def sign(self) -> float:
        """+1 when higher is better: `sign * value` is a score to maximise."""
        return 1.0 if self.higher_is_better else -1.0


# ----------------------------------------------------------------------------- confusion-matrix metrics


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """cm[..., i, j] = number of samples of true class i predicted as j. `y_pred` may carry leading
    dimensions ([K, N]: K members' predictions of the same N labels), giving [K, C, C]."""
    lead = y_pred.shape[:-1]
    groups = int(torch.tensor(lead).prod()) if lead else 1
    offset = torch.arange(groups, device=y_pred.device).view(*lead, 1) * num_classes if lead else 0
    index = ((offset + y_true.long()) * num_classes + y_pred.long()).flatten()
    cm = torch.bincount(index, minlength=groups * num_classes * num_classes)
    return cm.reshape(*lead, num_classes, num_classes)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, 0 where b is 0 (sklearn's zero_division=0)."""
    return torch.where(b > 0, a / b.clamp_min(1e-12), torch.zeros_like(a))


def _parts(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(true positives, support, predicted counts) per class, in float64."""
    cm = cm.double()
    return cm.diagonal(dim1=-2, dim2=-1), cm.sum(-1), cm.sum(-2)


def accuracy(cm: torch.Tensor) -> torch.Tensor:
    tp, support, _ = _parts(cm)
    return _safe_div(tp.sum(-1), support.sum(-1))


def balanced_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """The mean recall over the classes present (sklearn's balanced_accuracy_score)."""
    tp, support, _ = _parts(cm)
    present = (support > 0).double()
    return _safe_div((_safe_div(tp, support) * present).sum(-1), present.sum(-1))


def per_class(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class precision, recall, F1 and support; an undefined ratio is 0, as sklearn's zero_division=0."""
    tp, support, predicted = _parts(cm)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    return {"precision": precision, "recall": recall, "f1": _safe_div(2 * precision * recall, precision + recall),
            "support": support}


def macro_f1(cm: torch.Tensor) -> torch.Tensor:
    return per_class(cm)["f1"].mean(-1)


# ----------------------------------------------------------------------------- probability metrics

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


def ece_of(reliability: dict) -> float:
    """The ECE of a `reliability_bins` result."""
    total = sum(reliability["count"])
    if total == 0:
        return 0.0
    return float(sum(n * abs(a - c) for n, a, c in zip(reliability["count"], reliability["accuracy"],
                                                      reliability["confidence"], strict=True) if n) / total)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): sum over the equal-width confidence bins of |accuracy - mean confidence|, weighted
    by the bin's share of the predictions; top-label, `bins` = 15."""
    return ece_of(reliability_bins(probs, labels, bins))


# ----------------------------------------------------------------------------- the registry

METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("loss", "loss", higher_is_better=False),  # computed by the caller (train.loss, label smoothing, ...)
    Metric("accuracy", "acc %", higher_is_better=True, scale=100, digits=2, of_confusion=accuracy),
    Metric("balanced_accuracy", "balanced acc %", higher_is_better=True, scale=100, digits=2,
           of_confusion=balanced_accuracy),
    Metric("macro_f1", "macro F1", higher_is_better=True, of_confusion=macro_f1),
    Metric("ece", "ECE", higher_is_better=False, of_probs=expected_calibration_error, validation=False),
)}
VALIDATION = tuple(m.name for m in METRICS.values() if m.validation)  # an epoch row's val_<name> keys
TABLE = ("accuracy", "loss", "macro_f1")  # the comparison table's metric columns (terminal and report)
EVIDENCE = ("accuracy", "macro_f1")  # what evidence.py tests between variants (its bootstrap, vectorized in numpy,
# computes these two from confusion matrices; tests/test_evidence.py checks it against this registry)
# older spellings of a validation metric (early stopping's monitor said val_<name>)
OLD_NAMES = {VAL_PREFIX + name: name for name in VALIDATION}


def get(name: str) -> Metric:
    """The metric called `name` (a registry name or an older spelling)."""
    name = OLD_NAMES.get(name, name)
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric '{name}'; known: {', '.join(METRICS)}") from None


def canonical(name: str, where: str) -> str:
    """The registry's name for `name`; an older spelling (val_macro_f1) is read with a one-line warning."""
    if name in OLD_NAMES:
        warnings.warn(f"{where}: '{name}' is the older spelling of '{OLD_NAMES[name]}' (the validation metric); "
                      f"write {OLD_NAMES[name]}", FutureWarning, stacklevel=2)
        return OLD_NAMES[name]
    return name


def of_confusion(cm: torch.Tensor, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Every confusion-matrix metric of `cm` ([..., C, C]) by name (those in `names`, when given)."""
    return {m.name: m.of_confusion(cm) for m in METRICS.values()
            if m.of_confusion is not None and (names is None or m.name in names)}


def better(name: str, value: float, than: float) -> bool:
    m = get(name)
    return value > than if m.higher_is_better else value < than


# ----------------------------------------------------------------------------- a split's full report


def metrics_from_confusion(cm: torch.Tensor) -> dict:
    """Accuracy, balanced accuracy, per-class precision / recall / F1 / support, and macro and weighted
    averages: what summary.json records about a split besides its loss and ECE."""
    cm = cm.double()
    pc = per_class(cm)
    support = pc["support"]
    total = support.sum()
    weights = support / total if total > 0 else torch.zeros_like(support)

    def avg(kind: str) -> dict:
        w = weights if kind == "weighted" else torch.full_like(support, 1 / len(support))
        return {"precision": float((pc["precision"] * w).sum()), "recall": float((pc["recall"] * w).sum()),
                "f1": float((pc["f1"] * w).sum()), "support": int(total)}

    return {
        **{name: float(value) for name, value in of_confusion(cm).items()},
        "per_class": {"precision": pc["precision"].tolist(), "recall": pc["recall"].tolist(),
                      "f1": pc["f1"].tolist(), "support": [int(s) for s in support.tolist()]},
        "macro": avg("macro"),
        "weighted": avg("weighted"),
    }


def classification_report(y_true: torch.Tensor, logits: torch.Tensor, num_classes: int) -> dict:
    """Everything summary.json records about a split's predictions (loss and ECE are added by the caller)."""
    cm = confusion_matrix(y_true, logits.argmax(1), num_classes)
    return {**metrics_from_confusion(cm), "confusion_matrix": cm.tolist()}


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return [int(c) for c in torch.bincount(labels.long().cpu(), minlength=num_classes).tolist()]
