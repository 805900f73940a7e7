"""The member stack that `fit` trains: K ≥ 1 models behind one interface.

A single run is K = 1 (`Single`: the model itself, DDP-wrapped under torch.distributed). A stacked grid
group is K > 1 (`Stacked`): for study D's MLP on a CPU one model's step is mostly fixed overhead (data,
Python, kernel launches); K models stacked along a leading dimension pay it once and turn K small
matrix products into one wide or batched one. Each member keeps what makes it its own run: initial
weights (built by the caller exactly as for a run alone), optimizer state, L1 strength, dropout masks,
BatchNorm statistics, learning-rate schedule. Both kinds give `fit` the same things: a forward to
logits [K, B, C], one optimizer step for all members, per-member learning rates, and per-member
views in a run's own checkpoint format (a stacked member's checkpoint resumes alone and back).

Two stacked backends:
- `WideMLP` ("one wide batched model"): every member an `MLP` with the same layer widths and
  activation; BatchNorm and dropout may differ per member. With a shared batch the first layer is one GEMM.
- `VmapStack` (torch.func `stack_module_state` + `functional_call` + `vmap`): any other members of
  identical structure (same CNN, different optimizer / regularizer / seed), on a GPU.
Dropout masks of stacked members come from the global torch RNG per member, so they differ from a
run-alone's masks (same distribution, not the same draws).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import RunConfig, TrainConfig
from classlab.errors import ClasslabError
from classlab.models.freeze import frozen_batchnorm_to_eval, parameter_groups
from classlab.models.mlp import MLP
from classlab.plan import optimizer_key
from classlab.train import distributed
from classlab.train.forward import predict_logits
from classlab.train.optim import build_optimizer, build_scheduler, loss_fn
from classlab.train.speed import channels_last_input, to_channels_last
from classlab.transforms import BatchTransform


def _l1_targets(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """What L1 penalises: weight matrices and kernels (biases and norm scales are left alone)."""
    return [p for p in params if p.requires_grad and p.ndim > 1]


def param_groups(model: nn.Module, cfg: RunConfig) -> list:
    """Per-group learning rates when `train.lr_groups` is set (models.freeze: the model's own groups, by
    name or by stem / stages / head role, or layer-wise decay), else every trainable parameter in one group."""
    if cfg.train.lr_groups:
        return parameter_groups(model, dict(cfg.train.lr_groups), cfg.train.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ClasslabError(f"run '{cfg.name}': every parameter is frozen; unfreeze at least the head")
    return params


class Single:
    """One model (K = 1): its own optimizer and scheduler; DDP-wrapped after a resume has loaded it."""

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
        self.k, self.models, self.cfgs = 1, [model], [cfg]
        self.model = model
        self.channels_last = to_channels_last(model)  # conv models: NHWC (faster on oneDNN and CUDA)
        self.optimizer = build_optimizer(param_groups(model, cfg), cfg.train, device)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.l1 = cfg.train.l1
        self.l1_params = _l1_targets(list(model.parameters())) if self.l1 > 0 else []
        # every parameter the optimizer steps: zero_grad sets their .grad to None directly, which is what
        # Optimizer.zero_grad(set_to_none=True) does without its per-call profiler scope and grouping
        # (a measurable share of a small model's step)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.device = device
        self.train_model: nn.Module = model
        self.scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (train/device.py), set by fit

    def start(self) -> None:
        """After a resume has loaded the weights: SyncBatchNorm and DDP (which broadcasts rank 0's weights),
        then torch.compile. Compiled graphs are static: the ragged last batch compiles once more, in the
        first epoch, and both graphs are reused after that."""
        tc = self.cfgs[0].train
        if tc.sync_batchnorm and distributed.is_distributed():
            if self.device.type != "cuda":
                raise ClasslabError("train.sync_batchnorm needs CUDA GPUs (NCCL); set it to false on the CPU")
            self.model = self.models[0] = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.train_model = distributed.wrap(self.model, self.device)
        if tc.compile:
            self.train_model = torch.compile(self.train_model, dynamic=False, backend=COMPILE_BACKEND)

    def train(self, training: bool) -> None:
        self.train_model.train(training)
        if training:
            frozen_batchnorm_to_eval(self.model)

    def forward(self, x: torch.Tensor, shared: bool = True) -> torch.Tensor:
        return self.train_model(channels_last_input(x, self.channels_last)).unsqueeze(0)

    def eval_logits(self, images: torch.Tensor, transform: BatchTransform, batch_size: int) -> torch.Tensor:
        return predict_logits(self.model, images, transform, batch_size, self.device).unsqueeze(0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """L1's gradient (λ·sign w, exactly what autograd gives for λ·Σ|w|) added, then the optimizer."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.l1_params:
            with torch.no_grad():
                for p in self.l1_params:
                    if p.grad is not None:
                        p.grad.add_(p.sign(), alpha=self.l1)
        _optimizer_steps([self.optimizer], self.scaler)

    def scheduler_step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def lr(self, k: int) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        """Every group's learning rate to `lr` × its configured ratio to train.lr (the LR finder's sweep)."""
        base = self.cfgs[0].train.lr
        for group in self.optimizer.param_groups:
            group.setdefault("classlab_ratio", group["lr"] / base)
            group["lr"] = lr * group["classlab_ratio"]

    def lrs(self, k: int) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def sync(self, k: int) -> None:
        """The member's own module already holds its weights."""

    def optimizer_state(self, k: int) -> dict:
        return self.optimizer.state_dict()

    def scheduler_state(self, k: int) -> dict | None:
        return self.scheduler.state_dict() if self.scheduler is not None else None

    def load(self, states: Sequence[dict]) -> None:
        state = states[0]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


class Stacked:
    """K > 1 members in one backend, one real torch optimizer (and scheduler) per run of members that
    share optimizer settings (members are ordered by `plan.stack_order`, so each is a contiguous slice)."""

    def __init__(self, models: Sequence[nn.Module], cfgs: Sequence[RunConfig], device: torch.device) -> None:
        self.k, self.models, self.cfgs, self.device = len(models), list(models), list(cfgs), device
        self.backend = make_backend(models)
        b = self.backend
        self.groups: list[_Group] = []
        start = 0
        for i in range(1, self.k + 1):
            if i == self.k or optimizer_key(cfgs[i]) != optimizer_key(cfgs[start]):
                self.groups.append(_Group(start, i, cfgs[start], b.params, device, b.transposed))
                start = i
        self.group_of = [next(g for g in self.groups if g.start <= k < g.stop) for k in range(self.k)]
        self.l1 = [(k, c.train.l1) for k, c in enumerate(cfgs) if c.train.l1 > 0]
        self.matrix_keys = [n for n, t in b.params.items() if t.ndim > 2]  # member ndim > 1, as `Single`
        self.member_keys = [[b.names[k][n] for n, _ in m.named_parameters()] for k, m in enumerate(models)]
        self.training = True
        self.scaler: torch.amp.GradScaler | None = None

    def start(self) -> None:
        """Nothing to wrap: stacks never train under DDP, and torch.compile applies to single runs."""

    def train(self, training: bool) -> None:
        self.training = training
        self.backend.train(training)

    def forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        return self.backend.forward(x, shared=shared, training=self.training)

    @torch.inference_mode()
    def eval_logits(self, images: torch.Tensor, transform: BatchTransform, batch_size: int) -> torch.Tensor:
        self.train(False)
        out = [self.backend.forward(transform(images[i : i + batch_size]), shared=True, training=False).float()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out, dim=1) if out else torch.empty(self.k, 0)

    def zero_grad(self) -> None:
        for t in self.backend.params.values():
            t.grad = None

    def step(self) -> None:
        params = self.backend.params
        for g in self.groups:
            g.attach_grads(params)
            if self.scaler is not None:
                self.scaler.unscale_(g.optimizer)
        with torch.no_grad():
            for k, lam in self.l1:
                for key in self.matrix_keys:
                    params[key].grad[k].add_(params[key][k].sign(), alpha=lam)
        _optimizer_steps([g.optimizer for g in self.groups], self.scaler)

    def scheduler_step(self) -> None:
        for g in self.groups:
            if g.scheduler is not None:
                g.scheduler.step()

    def lr(self, k: int) -> float:
        return self.group_of[k].lr

    def lrs(self, k: int) -> dict[str, float]:
        return {"0": self.lr(k)}

    def sync(self, k: int) -> None:
        """Copy stacked member k into its own module (for checkpoints, early stopping, the final model)."""
        names, b = self.backend.names[k], self.backend
        with torch.no_grad():
            for key, target in self.models[k].state_dict().items():
                target.copy_(_as_member(_stacked(b, names[key])[k], names[key] in b.transposed))

    def optimizer_state(self, k: int) -> dict:
        g = self.group_of[k]
        return g.member_state(k - g.start, self.member_keys[k])

    def scheduler_state(self, k: int) -> dict | None:
        g = self.group_of[k]
        return g.scheduler.state_dict() if g.scheduler is not None else None

    def load(self, states: Sequence[dict]) -> None:
        """Every member from its run-format state (all at the same epoch)."""
        b = self.backend
        for k, (model, st) in enumerate(zip(self.models, states, strict=True)):
            model.load_state_dict(st["model"])
            names = b.names[k]
            with torch.no_grad():
                for key, value in model.state_dict().items():
                    _as_member(_stacked(b, names[key])[k], names[key] in b.transposed).copy_(value)
        for g in self.groups:
            g.load_member_states([states[k]["optimizer"] for k in range(g.start, g.stop)],
                                 self.member_keys[g.start : g.stop])
            if g.scheduler is not None and states[g.start].get("scheduler") is not None:
                g.scheduler.load_state_dict(states[g.start]["scheduler"])


COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests use "eager" (no C++ toolchain needed)


def _optimizer_steps(optimizers: Sequence[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None) -> None:
    """Each optimizer's step; under fp16 loss scaling through the scaler (which skips steps whose gradients
    overflowed), then one scale update for the whole step."""
    if scaler is None:
        for optimizer in optimizers:
            optimizer.step()
        return
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()


def build_members(models: Sequence[nn.Module], cfgs: Sequence[RunConfig], device: torch.device) -> Single | Stacked:
    return Single(models[0], cfgs[0], device) if len(models) == 1 else Stacked(models, cfgs, device)


def member_losses(logits: torch.Tensor, y: torch.Tensor, tc: TrainConfig, global_size: int, world: int,
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(scalar to backpropagate, per-member logged loss [K] or scalar, its weight): the sum of per-sample
    losses for the log is logged × weight. Members are independent, so backpropagating the sum of their
    mean losses gives each the gradient of its own. Under DDP (K = 1), which averages gradients over the
    ranks, each rank's sum is scaled by world / global batch size, so the averaged gradient is exactly the
    gradient of the whole global batch's mean loss, also when the last batch does not split evenly.
    With class weights (`weight`) each image's loss is weighted and the mean is over the images."""
    k, n, c = logits.shape
    if k == 1:
        if world == 1 and weight is None:
            loss = loss_fn(logits[0], y, tc)
            return loss, loss.detach(), n
        total = loss_fn(logits[0], y, tc, reduction="sum", weight=weight)
        return total * (world / global_size), total.detach(), 1
    per = loss_fn(logits.reshape(k * n, c), y.flatten(0, 1), tc, reduction="none", weight=weight).view(k, n)
    losses = per.mean(1)  # labels or soft targets
    return losses.sum(), losses.detach(), n


# ----------------------------------------------------------------------------- stacked backends


class WideMLP:
    """K MLPs of equal widths as stacked tensors, with per-member BN and dropout.

    The first layer's weights are [K, out, in] (one [K·out, in] GEMM when the batch is shared); later
    layers' are stored transposed, [K, in, out], so that their gradients come out of the batched
    matmul already in the stored layout (no transposing copy per step). `transposed` names them."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        layouts = [self._layout(m) for m in models]
        first = layouts[0]
        for lay in layouts[1:]:
            if lay["shapes"] != first["shapes"] or lay["act_key"] != first["act_key"]:
                raise ValueError("WideMLP members need equal layer widths and activation")
        self.k = len(models)
        self.act = first["act"]
        self.n_layers = len(first["shapes"])
        p0 = next(models[0].parameters())
        dev, dtype = p0.device, p0.dtype
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.names: list[dict[str, str]] = [{} for _ in models]  # member state key -> stacked key
        with torch.no_grad():
            for i in range(self.n_layers):
                lins = [lay["linear"][i] for lay in layouts]
                for part in ("weight", "bias"):
                    self.params[f"l{i}.{part}"] = torch.stack([getattr(m, part) for _, m in lins]).detach().clone()
                for k, (name, _) in enumerate(lins):
                    self.names[k].update({f"net.{name}.weight": f"l{i}.weight", f"net.{name}.bias": f"l{i}.bias"})
        self.transposed = {f"l{i}.weight" for i in range(1, self.n_layers)}
        for key in self.transposed:
            self.params[key] = self.params[key].transpose(1, 2).contiguous()
        self.bn_mask: list[torch.Tensor | None] = []
        self.bn_all: list[bool] = []
        self.bn_eps, self.bn_momentum = 1e-5, 0.1
        self.drop_p: list[list[tuple[int, float]]] = []  # per hidden layer: (member, p) with p > 0
        for i in range(self.n_layers - 1):
            width = first["shapes"][i][0]
            bns = [lay["bn"][i] for lay in layouts]
            if any(b is not None for b in bns):
                self._stack_bn(i, bns, width, dev, dtype)
            else:
                self.bn_mask.append(None)
                self.bn_all.append(False)
            self.drop_p.append([(k, lay["dropout"][i]) for k, lay in enumerate(layouts) if lay["dropout"][i] > 0])
        for t in self.params.values():
            t.requires_grad_(True)

    @staticmethod
    def _layout(model: nn.Module) -> dict:
        if not isinstance(model, MLP):
            raise ValueError(f"WideMLP needs classlab MLP members, got {type(model).__name__}")
        linear, bn, dropout, act = [], [], [], None
        for name, mod in model.net.named_children():
            if isinstance(mod, nn.Linear):
                linear.append((name, mod))
                bn.append(None)
                dropout.append(0.0)
            elif isinstance(mod, nn.BatchNorm1d):
                if not (mod.affine and mod.track_running_stats) or mod.eps != 1e-5 or mod.momentum != 0.1:
                    raise ValueError("WideMLP supports default BatchNorm1d settings only")
                bn[-1] = (name, mod)
            elif isinstance(mod, nn.Dropout):
                dropout[-1] = float(mod.p)
            elif not isinstance(mod, nn.Flatten):
                act = mod
        act_key = (type(act).__name__, getattr(act, "negative_slope", None))
        return {"linear": linear, "bn": bn, "dropout": dropout, "act": act, "act_key": act_key,
                "shapes": [tuple(m.weight.shape) for _, m in linear]}

    def _stack_bn(self, i: int, bns: list, width: int, dev: torch.device, dtype: torch.dtype) -> None:
        """Members without BN at layer i get unused identity parameters; a mask picks who normalizes."""
        def member(b, attr: str, default: float) -> torch.Tensor:
            if b is None:
                return torch.full((width,), default, device=dev, dtype=dtype)
            return getattr(b[1], attr).detach().clone()

        self.params[f"bn{i}.weight"] = torch.stack([member(b, "weight", 1.0) for b in bns])
        self.params[f"bn{i}.bias"] = torch.stack([member(b, "bias", 0.0) for b in bns])
        self.buffers[f"bn{i}.running_mean"] = torch.stack([member(b, "running_mean", 0.0) for b in bns])
        self.buffers[f"bn{i}.running_var"] = torch.stack([member(b, "running_var", 1.0) for b in bns])
        self.buffers[f"bn{i}.num_batches_tracked"] = torch.stack([
            b[1].num_batches_tracked.detach().clone() if b is not None else torch.zeros((), dtype=torch.long,
                                                                                        device=dev)
            for b in bns])
        mask = torch.tensor([b is not None for b in bns], device=dev)
        self.bn_all.append(bool(mask.all()))
        self.bn_mask.append(mask.view(-1, 1, 1))
        for k, b in enumerate(bns):
            if b is not None:
                name = b[0]
                self.names[k].update({f"net.{name}.{part}": f"bn{i}.{part}" for part in
                                      ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})

    def _batchnorm(self, i: int, h: torch.Tensor, training: bool) -> torch.Tensor:
        """BatchNorm1d per member and feature = one batch_norm over [B, K*width] features."""
        k, b, w = h.shape
        flat = h.permute(1, 0, 2).reshape(b, k * w)
        out = F.batch_norm(
            flat, self.buffers[f"bn{i}.running_mean"].view(-1), self.buffers[f"bn{i}.running_var"].view(-1),
            self.params[f"bn{i}.weight"].view(-1), self.params[f"bn{i}.bias"].view(-1),
            training=training, momentum=self.bn_momentum, eps=self.bn_eps,
        ).view(b, k, w).permute(1, 0, 2)
        if training:
            with torch.no_grad():
                self.buffers[f"bn{i}.num_batches_tracked"].add_(1)
        return out if self.bn_all[i] else torch.where(self.bn_mask[i], out, h)

    def _dropout_mask(self, j: int, h: torch.Tensor) -> torch.Tensor:
        """Inverted-dropout scale per member: ones for members without dropout at this layer, so random
        numbers are drawn only for those that have it."""
        mask = torch.ones_like(h)
        for k, p in self.drop_p[j]:
            mask[k] = (torch.rand(h.shape[1:], device=h.device, dtype=h.dtype) >= p) * (1 / (1 - p))
        return mask

    def forward(self, x: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        """x: [B, ...] shared by all members, or [K, B, ...]; returns logits [K, B, classes]."""
        w0, b0 = self.params["l0.weight"], self.params["l0.bias"]
        if shared:
            n = x.shape[0]
            h = F.linear(x.reshape(n, -1), w0.reshape(-1, w0.shape[-1]), b0.reshape(-1))
            h = h.view(n, self.k, -1).permute(1, 0, 2)
        else:
            h = torch.baddbmm(b0.unsqueeze(1), x.reshape(self.k, x.shape[1], -1), w0.transpose(1, 2))
        for i in range(1, self.n_layers):
            j = i - 1  # the hidden layer just computed
            if self.bn_mask[j] is not None:
                h = self._batchnorm(j, h, training)
            h = self.act(h)
            if training and self.drop_p[j]:
                h = h * self._dropout_mask(j, h)
            w, b = self.params[f"l{i}.weight"], self.params[f"l{i}.bias"]  # w: [K, in, out]
            h = torch.baddbmm(b.unsqueeze(1), h, w)
        return h

    def train(self, mode: bool) -> None:  # stateless: the mode is passed to forward
        pass


class VmapStack:
    """Identical-structure members through torch.func: stacked params and buffers, one vmapped call."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        from torch.func import stack_module_state

        shapes = [[(n, tuple(t.shape)) for n, t in m.state_dict().items()] for m in models]
        if any(s != shapes[0] for s in shapes[1:]) or any(repr(m) != repr(models[0]) for m in models[1:]):
            raise ValueError("VmapStack members need identical structure")
        self.k = len(models)
        params, buffers = stack_module_state(list(models))
        self.params = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
        self.buffers = {n: t.detach().clone() for n, t in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")
        names = {n: n for n in models[0].state_dict()}
        self.names = [dict(names) for _ in models]
        self.transposed: set[str] = set()

    def _call(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        return functional_call(self.base, (params, buffers), (x,))

    def train(self, mode: bool) -> None:
        self.base.train(mode)

    def forward(self, x: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        from torch.func import vmap

        self.base.train(training)
        fn = vmap(self._call, in_dims=(0, 0, None if shared else 0), randomness="different")
        return fn(self.params, self.buffers, x)


def make_backend(models: Sequence[nn.Module]) -> WideMLP | VmapStack:
    """WideMLP for MLP members (BN / dropout may differ), else VmapStack for identical structures."""
    if all(isinstance(m, MLP) for m in models):
        try:
            return WideMLP(models)
        except ValueError:
            pass
    return VmapStack(models)


class _Group:
    """Members [start, stop) of the stacked order sharing optimizer settings: one real torch optimizer
    (fused / foreach, exactly as `build_optimizer` makes it) over views of the stacked parameters, and
    one real scheduler, so hyper-parameters, learning rates and state formats are those of `fit`."""

    def __init__(self, start: int, stop: int, cfg: RunConfig, params: dict[str, torch.Tensor],
                 device: torch.device, transposed: set[str]) -> None:
        self.start, self.stop, self.cfg = start, stop, cfg
        self.keys = list(params)
        self.transposed = transposed
        with torch.no_grad():
            self.views = [params[k][start:stop] for k in self.keys]
        self.optimizer = build_optimizer(self.views, cfg.train, device)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)

    def attach_grads(self, params: dict[str, torch.Tensor]) -> None:
        for key, view in zip(self.keys, self.views, strict=True):
            grad = params[key].grad
            view.grad = grad[self.start : self.stop] if grad is not None else None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def member_state(self, row: int, member_keys: list[str]) -> dict:
        """Member `row` (within the group) as a torch optimizer state_dict over its own parameters."""
        sd = self.optimizer.state_dict()
        index = {k: i for i, k in enumerate(self.keys)}
        state = {}
        for j, key in enumerate(member_keys):
            entry = sd["state"].get(index[key])
            if entry is None:
                continue
            ndim = self.views[index[key]].ndim
            state[j] = {n: (_as_member(v[row], key in self.transposed).clone(memory_format=torch.contiguous_format)
                            if torch.is_tensor(v) and v.ndim == ndim else copy.deepcopy(v))
                        for n, v in entry.items()}
        group = {**copy.deepcopy(sd["param_groups"][0]), "params": list(range(len(member_keys)))}
        return {"state": state, "param_groups": [group]}

    def load_member_states(self, states: list[dict], member_keys: list[list[str]]) -> None:
        """Inverse of member_state for every member of the group (a resume)."""
        stacked: dict[int, dict] = {}
        for i, key in enumerate(self.keys):
            per_member = []
            for sd, keys in zip(states, member_keys, strict=True):
                per_member.append(sd["state"].get(keys.index(key)) if key in keys else None)
            present = [e for e in per_member if e is not None]
            if not present:
                continue
            entry = {}
            for name, value in present[0].items():
                if torch.is_tensor(value) and value.ndim == self.views[i].ndim - 1:
                    entry[name] = torch.stack([
                        _as_member(e[name] if e is not None else torch.zeros_like(value), key in self.transposed)
                        for e in per_member])
                else:
                    entry[name] = value
            stacked[i] = entry
        group = {**states[0]["param_groups"][0], "params": list(range(len(self.keys)))}
        self.optimizer.load_state_dict({"state": stacked, "param_groups": [group]})


def _as_member(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A member's slice in the member's own layout (a view; WideMLP stores later weights transposed)."""
    return t.transpose(-1, -2) if transposed else t


def _stacked(backend, name: str) -> torch.Tensor:
    return backend.params[name] if name in backend.params else backend.buffers[name]
