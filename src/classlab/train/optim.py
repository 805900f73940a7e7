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
    if name in ("adam", "adamw"):
        cls = LeanAdamW if name == "adamw" else LeanAdam
        if device.type not in ("cpu", "cuda"):
            cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **_fast_kwargs(device, True))
    if name == "rmsprop":
        cls = FusedRMSprop if device.type == "cpu" and cfg.momentum == 0 else torch.optim.RMSprop
        return cls(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(name)


class _SharedStepPlan:
    """Per-step bookkeeping of a fused optimizer done once: the fast path of LeanAdam and FusedRMSprop.

    Why: torch's fused Adam step on a CPU spends as long in Python and small ops as in its kernel
    (study D's MLP: 0.2 ms in the kernel, 0.2 ms around it, out of a 1.8 ms training step): it rebuilds
    the tensor lists, groups them by device and adds 1 to each parameter's step counter, one tensor at a
    time. Once every parameter's state exists and all step counters agree, the plan lists each group's
    tensors once and makes its parameters share one step tensor, so a step is one add and one kernel.
    Sharing is internal: `state_dict()` hands out a copy per parameter, and `release()` (before any step
    taken by torch's own code, which would add 1 to the shared counter once per parameter) gives each
    parameter its own counter back."""

    def __init__(self, optimizer: torch.optim.Optimizer, state_keys: tuple[str, ...]) -> None:
        self.groups: list[tuple[dict, list[torch.Tensor], list[list[torch.Tensor]], torch.Tensor, list[dict]]] = []
        for group in optimizer.param_groups:
            params = list(group["params"])
            states = [optimizer.state.get(p) for p in params]
            missing = any(not st or "step" not in st for st in states)
            if not params or missing or any(torch.is_complex(p) for p in params):
                self.release()
                raise LookupError("state not initialised")
            if len({float(st["step"]) for st in states}) != 1:
                self.release()
                raise LookupError("step counters differ")
            shared = states[0]["step"].detach().clone()
            for st in states:
                st["step"] = shared
            self.groups.append((group, params, [[st[k] for st in states] for k in state_keys], shared, states))

    def release(self) -> None:
        for _, _, _, shared, states in self.groups:
            for st in states:
                st["step"] = shared.clone()
        self.groups = []

    @staticmethod
    def unshared(state_dict: dict) -> dict:
        return {**state_dict, "state": {i: {**st, "step": st["step"].clone()} if "step" in st else st
                                        for i, st in state_dict["state"].items()}}


class _LeanStepMixin:
    """The plan's lifecycle for a torch optimizer subclass: built after the first step (which torch's code
    takes, creating the state), dropped on load_state_dict / add_param_group, released before any step
    the fast path cannot take (a closure, a missing gradient, settings the kernel does not cover)."""

    _plan: _SharedStepPlan | None = None
    _plan_keys: tuple[str, ...] = ()

    def _fast_ok(self, group: dict) -> bool:
        raise NotImplementedError

    def _fast_step(self, plan: _SharedStepPlan) -> None:
        raise NotImplementedError

    def _slow_step(self, closure):
        raise NotImplementedError

    def _drop_plan(self) -> None:
        if self._plan is not None:
            self._plan.release()
            self._plan = None

    @torch.no_grad()
    def step(self, closure=None):
        fast = (closure is None and getattr(self, "grad_scale", None) is None
                and all(self._fast_ok(g) and all(p.grad is not None for p in g["params"]) for g in self.param_groups))
        if not fast:
            self._drop_plan()
            return self._slow_step(closure)
        if self._plan is None:
            try:
                self._plan = _SharedStepPlan(self, self._plan_keys)
            except LookupError:  # first step (no state yet) or counters that differ: torch's code
                return self._slow_step(closure)
        self._fast_step(self._plan)
        return None

    def state_dict(self) -> dict:
        return _SharedStepPlan.unshared(super().state_dict())  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict) -> None:
        self._drop_plan()
        super().load_state_dict(state_dict)  # type: ignore[misc]

    def add_param_group(self, param_group: dict) -> None:
        self._drop_plan()
        super().add_param_group(param_group)  # type: ignore[misc]


class LeanAdam(_LeanStepMixin, torch.optim.Adam):
    """torch's fused Adam with the per-step bookkeeping done once (see _SharedStepPlan). Same maths,
    state and state_dict as torch.optim.Adam(fused=True); checkpoints load into either class."""

    _plan_keys = ("exp_avg", "exp_avg_sq")

    def _fast_ok(self, group: dict) -> bool:
        return (group["fused"] and not group["amsgrad"] and not group["capturable"] and not group["differentiable"]
                and not torch.is_tensor(group["lr"]) and not any(torch.is_tensor(b) for b in group["betas"]))

    def _fast_step(self, plan: _SharedStepPlan) -> None:
        for group, params, (exp_avgs, exp_avg_sqs), shared, _ in plan.groups:
            shared += 1
            kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
            beta1, beta2 = group["betas"]
            kernel(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], [shared] * len(params),
                   amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                   eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None)

    def _slow_step(self, closure):
        return torch.optim.Adam.step(self, closure)


class LeanAdamW(LeanAdam, torch.optim.AdamW):
    """LeanAdam with decoupled weight decay: the state and state_dict of torch.optim.AdamW(fused=True)."""


class FusedRMSprop(_LeanStepMixin, torch.optim.RMSprop):
    """RMSprop (no momentum, not centered) stepped by torch's fused Adam kernel, for CPUs.

    Why: torch has no fused RMSprop, and on a CPU `foreach` is a loop of five whole-tensor passes per
    parameter; the fused Adam kernel does one. With β1 = 0 (Adam's first moment is then the gradient),
    β2 = α, and lr and eps both divided by c = sqrt(1 - α^t), Adam's bias-corrected update
    lr/c · g / (sqrt(v)/c + eps/c) is exactly RMSprop's lr · g / (sqrt(v) + eps), with v RMSprop's
    square_avg (weight decay is added to the gradient first in both). State and state_dict are
    torch RMSprop's, so checkpoints load into either class. The first step (creating the state) is
    torch's own."""

    _plan_keys = ("square_avg",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._scratch: dict[int, list[torch.Tensor]] = {}  # Adam's first moments: zeroed, then = the gradient

    def _fast_ok(self, group: dict) -> bool:
        return not (group["momentum"] or group["centered"] or group["maximize"] or group["differentiable"]
                    or group["capturable"] or torch.is_tensor(group["lr"]))

    def _fast_step(self, plan: _SharedStepPlan) -> None:
        for i, (group, params, (squares,), shared, _) in enumerate(plan.groups):
            firsts = self._scratch.get(i)
            if firsts is None or [f.shape for f in firsts] != [p.shape for p in params]:
                firsts = self._scratch[i] = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
            shared += 1
            alpha, eps = group["alpha"], group["eps"]
            c = math.sqrt(1 - alpha ** float(shared))
            torch._foreach_zero_(firsts)  # Adam's first moment becomes exactly the gradient (β1 = 0)
            torch._fused_adam_(params, [p.grad for p in params], firsts, squares, [], [shared] * len(params),
                               lr=group["lr"] / c, beta1=0.0, beta2=alpha, weight_decay=group["weight_decay"],
                               eps=eps / c, amsgrad=False, maximize=False)

    def _slow_step(self, closure):
        return torch.optim.RMSprop.step(self, closure)


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
