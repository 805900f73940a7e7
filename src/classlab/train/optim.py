"""Optimizers, schedulers and the loss, built from the train config."""

from __future__ import annotations

import math

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
        cls = FusedRMSprop if device.type == "cpu" and cfg.momentum == 0 else torch.optim.RMSprop
        return cls(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(name)


class FusedRMSprop(torch.optim.RMSprop):
    """RMSprop (no momentum, not centered) stepped by torch's fused Adam kernel, for CPUs.

    Why: torch has no fused RMSprop, and on a CPU `foreach` is a loop of five whole-tensor passes per
    parameter; the fused Adam kernel does one. With β1 = 0 (Adam's first moment is then the gradient),
    β2 = α, and lr and eps both divided by c = sqrt(1 - α^t), Adam's bias-corrected update
    lr/c · g / (sqrt(v)/c + eps/c) is exactly RMSprop's lr · g / (sqrt(v) + eps), with v RMSprop's
    square_avg (weight decay is added to the gradient first in both). State and state_dict are
    torch RMSprop's, so checkpoints load into either class."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}  # Adam's first moment: zeroed, then = the gradient

    @torch.no_grad()
    def step(self, closure=None):
        if any(g["momentum"] or g["centered"] or g["maximize"] or g["differentiable"] or g["capturable"]
               for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[float, tuple[list, ...]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("FusedRMSprop supports dense real tensors only")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                scratch = self._scratch.get(p)
                if scratch is None:
                    scratch = self._scratch[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lists = by_step.setdefault(float(state["step"]), ([], [], [], [], []))
                for target, item in zip(lists, (p, p.grad, scratch, state["square_avg"], state["step"]), strict=True):
                    target.append(item)
            alpha, eps = group["alpha"], group["eps"]
            for t, (ps, grads, firsts, squares, steps) in by_step.items():
                c = math.sqrt(1 - alpha**t)
                torch._foreach_zero_(firsts)  # Adam's first moment becomes exactly the gradient (β1 = 0)
                torch._fused_adam_(ps, grads, firsts, squares, [], steps, lr=group["lr"] / c, beta1=0.0, beta2=alpha,
                                   weight_decay=group["weight_decay"], eps=eps / c, amsgrad=False, maximize=False)
        return loss


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
