"""A run's results as types: `EpochRow` (one line of metrics.jsonl) and `RunSummary` (summary.json).

RunFolder reads and writes them; everything else reads a run's numbers through their attributes and the
metric registry (`summary.test.value(name)`, `row.val(name)`), never by spelling a file's keys.
Each metric of classlab.metrics is a field of its own (made from the registry, so a new metric is one
registry entry). `migrate` is the one place that brings a file of an older run format up to this one.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, create_model

from classlab import RUN_FORMAT_VERSION, metrics

# The run format (classlab.RUN_FORMAT_VERSION; RunFolder refuses a newer one). Additions within a format
# (test.<metric> for each registry metric, kept_val, weights) are filled in for older files by `migrate_summary`.
RESULTS_FORMAT = RUN_FORMAT_VERSION


class _Open(BaseModel):
    """A result record: typed where classlab reads it, open to keys a newer minor version adds."""

    model_config = ConfigDict(extra="allow", protect_namespaces=())

    def get(self, key: str, default: Any = None) -> Any:
        """Mapping-style read, for code written against the plain-dict summaries (new code: attributes)."""
        if key not in self.model_fields_set and key not in (self.model_extra or {}):
            return default
        return getattr(self, key)  # a nested record reads the same way (summary["test"]["accuracy"])

    def __getitem__(self, key: str) -> Any:
        missing = object()
        value = self.get(key, missing)
        if value is missing:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        """The keys the file has (those the record was made with), as a dict's."""
        return [k for k in self.__dict__ if k in self.model_fields_set] + list(self.model_extra or {})

    def __iter__(self):  # type: ignore[override]  # a dict's iteration (keys), not pydantic's (pairs)
        return iter(self.keys())

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self.get(k)) for k in self.keys()]


_METRIC_FIELDS: dict[str, Any] = {name: (float | None, None) for name in metrics.METRICS}


class _Split(_Open):
    """A split's metrics: every registry metric (fields made from metrics.METRICS), per class, averaged."""

    per_class: dict[str, list[int | float]] | None = None
    macro: dict[str, int | float] | None = None
    weighted: dict[str, int | float] | None = None
    confusion_matrix: list[list[int]] | None = None

    def value(self, name: str) -> float | None:
        """The metric `name` (a registry name) of this split; None when it was not recorded."""
        return getattr(self, metrics.get(name).name, None)


SplitMetrics = create_model("SplitMetrics", __base__=_Split, __module__=__name__, **_METRIC_FIELDS)


class _Val(_Open):
    epoch: int | None = None

    def value(self, name: str) -> float | None:
        return getattr(self, metrics.get(name).name, None)


# the validation metrics of an epoch
ValMetrics = create_model("ValMetrics", __base__=_Val, __module__=__name__, **_METRIC_FIELDS)


class RunSummary(_Open):
    """summary.json: the test metrics, which epoch's weights they use, and how the run trained.

    `best_epoch` is the best validation epoch; `kept_epoch` (and `weights`: best or last) the epoch whose
    weights the test numbers use: the best with early stopping, else the last (docs/decisions.md #2)."""

    classlab_version: str | None = None
    format: int = RESULTS_FORMAT
    name: str
    seed: int | None = None
    classes: list[str] = []
    test: SplitMetrics | None = None  # type: ignore[valid-type]
    best_epoch: int | None = None
    kept_epoch: int | None = None
    weights: Literal["best", "last"] = "best"
    epochs_run: int = 0
    stopped_early: bool = False
    final_train: dict[str, int | float] | None = None
    best_val: ValMetrics | None = None  # type: ignore[valid-type]
    kept_val: ValMetrics | None = None  # type: ignore[valid-type]
    parameters: dict[str, int] = {}
    seconds: float = 0.0
    seconds_per_epoch: float = 0.0
    device: str = ""
    trained_together: bool = False
    data: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    test_tta: dict[str, Any] | None = None

    @property
    def val(self) -> Any:
        """The validation metrics at the kept epoch (what selection compares), else at the best one."""
        return self.kept_val if self.kept_val is not None else self.best_val

    def test_value(self, name: str) -> float | None:
        return self.test.value(name) if self.test is not None else None

    def to_json(self) -> dict[str, Any]:
        """The document summary.json holds (the keys it was made with; none added as null)."""
        return self.model_dump(mode="json", exclude_unset=True)


class EpochRow(_Open):
    """One finished epoch of one run (fit's row, a line of metrics.jsonl): train loss and accuracy, each
    validation metric of the registry as val_<name> (None without validation), the learning rates and times."""

    epoch: int
    train_loss: float | None = None
    train_accuracy: float | None = None
    lr: float | None = None
    lrs: dict[str, int | float] = {}
    best: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    def val(self, name: str) -> float | None:
        """The validation metric `name` (registry name) at this epoch; None without validation."""
        value = getattr(self, metrics.VAL_PREFIX + metrics.get(name).name, None)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


# ----------------------------------------------------------------------------- older formats


def migrate_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """summary.json as this version writes it, from any older release: every registry metric of the test
    split by its own name (older files had the macro F1 only as test.macro.f1, and the first ones no balanced
    accuracy: both are derived from the stored confusion matrix), data.origins (empty before data.splits),
    and kept_val (the first runs had only best_val; their weights were the best epoch's, which `weights`'
    default says). Idempotent."""
    doc = dict(doc)
    test = doc.get("test")
    if isinstance(test, dict):
        test = dict(test)
        cm = test.get("confusion_matrix")
        if cm:
            import torch

            derived = metrics.of_confusion(torch.tensor(cm))
            for name, value in derived.items():
                test.setdefault(name, float(value))
        doc["test"] = test
    if isinstance(doc.get("data"), dict):  # where each split came from: recorded since data.splits
        doc["data"] = {"origins": {}, **doc["data"]}
    if doc.get("kept_val") is None and doc.get("best_val") is not None:
        doc["kept_val"] = doc["best_val"]
    doc["format"] = RESULTS_FORMAT
    return doc


def migrate_row(doc: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row of an older format: the keys have not changed (val_<name> since format 1)."""
    return doc


def summary_from(doc: dict[str, Any] | RunSummary) -> RunSummary:
    """A RunSummary from summary.json's document (migrated from an older format) or as it is."""
    if isinstance(doc, RunSummary):
        return doc
    return RunSummary.model_validate(migrate_summary(doc))


def row_from(doc: dict[str, Any] | EpochRow) -> EpochRow:
    return doc if isinstance(doc, EpochRow) else EpochRow.model_validate(migrate_row(doc))
