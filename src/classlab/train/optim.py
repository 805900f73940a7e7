"""Optimizers, schedulers and the loss, built from the train config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import TrainConfig


def _fast_kwargs(device: torch.device, fused_ok: bool) -> dict:
    """fused kernels where torch has them for this device (much less per-step overhead), else foreach."""
    if fused_ok and device.type in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """`params` may be a plain iterable or a list of param-group dicts (per-group learning rates)."""
    name = cfg.optimizer
    if name == "sgd":
        kwargs = {"momentum": cfg.momentum, "nesterov": cfg.nesterov, "weight_decay": cfg.weight_decay}
        return torch.optim.SGD(params, lr=cfg.lr, **kwargs, **_fast_kwargs(device, True))
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **_fast_kwargs(device, True))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **_fast_kwargs(device, True))
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   foreach=True)
    raise ValueError(name)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    s = cfg.scheduler
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


def loss_fn(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on logits by default; `nll` = log-softmax + NLL (the same maths, as the studies
    wrote it); `softmax_before_loss` reproduces study D's softmax-then-CrossEntropy on purpose."""
    logits = logits.float()
    if cfg.softmax_before_loss:
        logits = logits.softmax(1)
    if cfg.loss == "nll":
        return F.nll_loss(logits.log_softmax(1), y, reduction=reduction)
    return F.cross_entropy(logits, y, reduction=reduction, label_smoothing=cfg.label_smoothing)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over weight matrices and kernels (biases and norm scales are left alone)."""
    terms = [p.abs().sum() for p in model.parameters() if p.requires_grad and p.ndim > 1]
    return torch.stack(terms).sum() if terms else torch.zeros(())
