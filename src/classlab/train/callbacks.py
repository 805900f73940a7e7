"""Early stopping on a validation metric, keeping the best weights."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class EarlyStopper:
    """Tracks the monitored metric; `best_state` holds the weights of the best epoch so far."""

    patience: int | None
    monitor: str = "val_loss"
    min_delta: float = 0.0
    keep_best: bool = True
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def sign(self) -> float:
        return -1.0 if self.monitor.endswith("accuracy") else 1.0

    def update(self, epoch: int, value: float | None, model: nn.Module) -> bool:
        """Record an epoch; True when it is the best so far."""
        if value is None or not self.keep_best:  # the last epoch is the one we keep
            self.best_epoch = epoch
            return True
        score = self.sign * value
        if score < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "best_state": copy.copy(self.best_state)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        self.best_state = state["best_state"]
