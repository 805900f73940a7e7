"""Optimizers, schedulers and the loss, built from the train config."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.config import TrainConfig


def build_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch's own optimizers, with their fused kernels where torch has them for the device (Adam, AdamW
    and SGD on CPU and CUDA: one kernel per step instead of a loop of whole-tensor passes), else foreach.
    `params` may be a plain iterable or a list of param-group dicts (per-group learning rates)."""
    fast = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    name = cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **fast)
    if name in ("adam", "adamw"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    if name == "rmsprop":  # no fused RMSprop in torch
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
    wrote it); `softmax_before_loss` reproduces study D's softmax-then-CrossEntropy on purpose. `y` holds
    labels, or [N, classes] class probabilities (MixUp / CutMix), which F.cross_entropy takes as they are."""
    if logits.dtype.itemsize < 4:  # bf16 / fp16 logits under autocast: the loss in fp32
        logits = logits.float()
    if cfg.softmax_before_loss:
        logits = logits.softmax(1)
    if cfg.loss == "nll":
        if y.is_floating_point():  # class-probability targets (MixUp / CutMix)
            per = -(y * logits.log_softmax(1)).sum(1)
            return per if reduction == "none" else per.sum() if reduction == "sum" else per.mean()
        return F.nll_loss(logits.log_softmax(1), y, reduction=reduction)
    return F.cross_entropy(logits, y, reduction=reduction, label_smoothing=cfg.label_smoothing)
