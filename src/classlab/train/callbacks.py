"""What `fit` does beside the maths: early stopping (keeping the best weights), and the callbacks it calls
after every epoch of a member: TensorBoard scalars, the time estimate."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from classlab import metrics
from classlab.errors import ClasslabError
from classlab.results import EpochRow


@dataclass
class EarlyStopper:
    """Tracks the monitored metric; `best_state` holds the weights of the best epoch so far."""

    patience: int | None
    monitor: str = "loss"  # a validation metric of classlab.metrics (the epoch row's val_<monitor>)
    min_delta: float = 0.0
    keep_best: bool = True
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def sign(self) -> float:
        return -metrics.get(self.monitor).sign()  # minimised: -accuracy, +loss

    def update(self, epoch: int, value: float | None, model: nn.Module) -> bool:
        """Record an epoch; True when it is the best so far by the monitored validation metric (every epoch
        when there is no validation). Its weights are kept only with `keep_best` (early stopping)."""
        if value is None:
            self.best_epoch = epoch
            return True
        score = self.sign * value
        if score < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            if self.keep_best:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    @staticmethod
    def stops(state: dict, patience: int | None) -> bool:
        """Whether the stopper whose `state_dict()` this is stops training at this epoch (a checkpoint's view)."""
        return patience is not None and state["bad_epochs"] >= patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "best_state": copy.copy(self.best_state)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        self.best_state = state["best_state"]


# an epoch row's bookkeeping keys: not a measurement
NOT_LOGGED = ("epoch", "best", "stacked")


def epoch_scalars(row: dict | EpochRow) -> dict[str, float]:
    """Every finite number of an epoch row (train_*, val_* for each validation metric, lr, seconds, ...),
    with each parameter group's learning rate as lr.<group>: what the trackers log, so no key is missed."""
    row = row.to_json() if isinstance(row, EpochRow) else row
    out = {k: float(v) for k, v in row.items()
           if k not in NOT_LOGGED and isinstance(v, int | float) and not isinstance(v, bool)}
    out.update({f"lr.{g}": float(lr) for g, lr in (row.get("lrs") or {}).items()})
    return {k: v for k, v in out.items() if math.isfinite(v)}


class TensorBoardLogger:
    """`fit` callback: each member's epoch scalars into its own TensorBoard log folder (None: not logged)."""

    def __init__(self, log_dirs: list[Path | None]) -> None:
        self.writers: list[Any] = []
        for log_dir in log_dirs:
            self.writers.append(_summary_writer(log_dir) if log_dir is not None else None)

    def __call__(self, k: int, row: dict, state: dict) -> None:
        writer = self.writers[k]
        if writer is None:
            return
        epoch = row["epoch"]
        for key, value in epoch_scalars(row).items():
            group, _, name = key.partition("_")
            tag = f"{name}/{group}" if group in ("train", "val") else key.replace(".", "_group/", 1)
            writer.add_scalar(tag, value, epoch)
        writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            if writer is not None:
                writer.close()


def _summary_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ClasslabError(
            "train.tensorboard needs the tensorboard package: pip install 'classlab[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


class TimeEstimate:
    """`fit` callback: prints the study's expected duration once, from the first trained epoch."""

    def __init__(self, console: Console, epochs_left: int) -> None:
        self.console, self.epochs_left, self.done = console, epochs_left, False

    def __call__(self, k: int, row: dict, state: dict) -> None:
        if self.done:
            return
        self.done = True
        minutes = row["seconds"] * self.epochs_left / 60
        self.console.print(f"[dim]estimate: {self.epochs_left} epochs × {row['seconds']:.1f}s ≈ {minutes:.1f} min "
                           "(from the first epoch; early stopping may shorten it)[/]")
