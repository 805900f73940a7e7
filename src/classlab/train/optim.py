"""Optimizers, schedulers and the loss, built from the train config."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.config import TrainConfig
from classlab.errors import ClasslabError


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


def loss_fn(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, reduction: str = "mean",
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on logits by default; `nll` = log-softmax + NLL (the same maths, as the studies
    wrote it); `softmax_before_loss` reproduces study D's softmax-then-CrossEntropy on purpose. `y` holds
    labels, or [N, classes] class probabilities (MixUp / CutMix), which F.cross_entropy takes as they are.
    `weight`: per-class weights (train.class_weights), used with reduction sum or none."""
    if logits.dtype.itemsize < 4:  # bf16 / fp16 logits under autocast: the loss in fp32
        logits = logits.float()
    if cfg.softmax_before_loss:
        logits = logits.softmax(1)
    if weight is not None:
        weight = weight.to(logits.dtype)
    if cfg.loss == "nll":
        if y.is_floating_point():  # class-probability targets (MixUp / CutMix)
            per = -((y if weight is None else y * weight) * logits.log_softmax(1)).sum(1)
            return per if reduction == "none" else per.sum() if reduction == "sum" else per.mean()
        return F.nll_loss(logits.log_softmax(1), y, weight=weight, reduction=reduction)
    return F.cross_entropy(logits, y, weight=weight, reduction=reduction, label_smoothing=cfg.label_smoothing)


def class_weights(spec: str | dict | None, classes: list[str] | tuple[str, ...], labels: torch.Tensor
                  ) -> torch.Tensor | None:
    """train.class_weights as a per-class tensor: `auto` = n / (classes × count) over the training labels
    (sklearn's "balanced": the mean image weight is 1, so the loss keeps its scale), or named weights."""
    if spec is None:
        return None
    if spec == "auto":
        counts = torch.bincount(labels.cpu(), minlength=len(classes)).double()
        balanced = labels.numel() / (len(classes) * counts.clamp_min(1))
        weights = torch.where(counts > 0, balanced, torch.ones_like(counts))
        return weights.float().to(labels.device)
    unknown = [name for name in spec if name not in classes]
    if unknown:
        from classlab.registry import suggest

        raise ClasslabError(f"train.class_weights: no class '{unknown[0]}'{suggest(unknown[0], list(classes))}; "
                            f"classes: {', '.join(classes)}")
    return torch.tensor([float(spec.get(name, 1.0)) for name in classes], device=labels.device)
