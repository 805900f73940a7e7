"""Many small models trained at once, in one process, from one batch gather per step.

Why: for study D's MLP on a CPU the per-step cost of one model is mostly fixed overhead (data,
Python, kernel launches); K models stacked along a leading dimension pay that once and turn K small
matrix products into one wide or batched one. Each member keeps everything that makes it its own
run: its own initial weights (built by the caller exactly as for a one-by-one run), optimizer state,
L1 strength, dropout masks, BatchNorm statistics, learning-rate schedule, early stopping and
history. `fit_stacked` returns one `FitResult` per member, with the same meaning as `fit`'s.

Two backends:
- `WideMLP` ("one wide batched model"): every member an `MLP` with the same layer widths and
  activation; BatchNorm and dropout may differ per member (study D's grid: none / BN / dropout /
  L1 × Adam / RMSprop trains as one model). With a shared batch the first layer is one GEMM.
- `VmapStack` (torch.func `stack_module_state` + `functional_call` + `vmap`): any other members of
  identical structure (same CNN, different optimizer / regularizer / seed), on a GPU (on a CPU it
  is slower than one by one, see VMAP_ON_CPU).
Anything else (different shapes, ResNets, per-block learning rates, torch.distributed) falls back to
`fit`, one by one.

Data order: one-by-one `fit` draws its batch order and augmentation from generators seeded by the
run's seed, so runs with the same seed see the same batches. Stacked training keeps exactly that:
members sharing a seed share each step's batch (gathered and transformed once); members with
different seeds each get their own seed's batch, so every member sees the data order it would see
alone. Dropout masks come from the global torch RNG per member, so they differ from a one-by-one
run's masks (same distribution, not the same draws).

Time: the rows' `seconds`, `train_seconds` and `images_per_s` are the group's wall time divided by
the number of members (the amortized cost of a run); `group_seconds` holds the undivided time.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import RunConfig
from classlab.data import ImageData, Split
from classlab.models.mlp import MLP
from classlab.train import distributed
from classlab.train.callbacks import EarlyStopper
from classlab.train.checkpoint import rng_state, set_rng_state
from classlab.train.loop import FitResult, autocast, fit
from classlab.train.optim import build_optimizer, build_scheduler, loss_fn
from classlab.train.speed import cpu_threads_for
from classlab.transforms import BatchTransform, Preprocess

# Train settings that must be equal for members to share steps and evaluation; everything else
# (optimizer, lr, momentum, weight decay, L1, scheduler, early stopping, seed) may differ per member.
SHARED_TRAIN_KEYS = ("epochs", "batch_size", "eval_batch_size", "loss", "softmax_before_loss", "label_smoothing",
                     "amp", "device", "threads")
EpochHook = Callable[[int, dict, dict], None]


# ----------------------------------------------------------------------------- deciding


def _mlp_signature(cfg: RunConfig) -> tuple | None:
    """Widths and activation of an MLP-family model (what WideMLP needs equal), or None."""
    m = cfg.model
    if m.name == "study_d_mlp":
        return ("mlp", (256, 128, 64), "tanh")
    if m.name == "mlp":
        return ("mlp", tuple(m.hidden), m.activation)
    return None


# On a CPU, vmapped convolutions (grouped convolutions underneath, no channels-last) lose to one-by-one
# training: 3 × study A's CNN took 188 ms per step stacked against 78 ms one after another. So on a
# CPU only MLP-family runs stack; identical CNNs stack where the device is a GPU.
VMAP_ON_CPU = False


def _device_type(device: torch.device | str | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


def stack_key(cfg: RunConfig, device: torch.device | str | None = None) -> tuple | None:
    """Runs with equal keys can be trained together; None: this run trains alone (on `device`; None =
    assume a CPU)."""
    t = cfg.train
    if cfg.model.name == "resnet18" or t.lr_groups:
        return None
    model = _mlp_signature(cfg)
    if model is None:
        if _device_type(device) == "cpu" and not VMAP_ON_CPU:
            return None
        model = ("same", repr(cfg.model))
    data = repr(cfg.data)
    return model, data, tuple(getattr(t, k) for k in SHARED_TRAIN_KEYS)


def can_stack(cfgs: Sequence[RunConfig], device: torch.device | str | None = None) -> bool:
    """True when all runs can train as one stacked group on `device` (at least two, equal `stack_key`s)."""
    keys = [stack_key(c, device) for c in cfgs]
    return len(keys) > 1 and keys[0] is not None and all(k == keys[0] for k in keys)


def stack_groups(cfgs: Sequence[RunConfig], device: torch.device | str | None = None) -> list[list[int]]:
    """Partition run indices into stackable groups (in first-appearance order); singletons train alone."""
    groups: dict[Any, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        key = stack_key(cfg, device)
        groups.setdefault(key if key is not None else ("alone", i), []).append(i)
    return list(groups.values())


# ----------------------------------------------------------------------------- backends


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
        for i in range(1, self.n_layers + 1):
            j = i - 1  # the hidden layer just computed
            if self.bn_mask[j] is not None:
                h = self._batchnorm(j, h, training)
            h = self.act(h)
            if training and self.drop_p[j]:
                h = h * self._dropout_mask(j, h)
            w, b = self.params[f"l{i}.weight"], self.params[f"l{i}.bias"]  # w: [K, in, out]
            h = torch.baddbmm(b.unsqueeze(1), h, w)
            if i == self.n_layers - 1:
                return h
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


# ----------------------------------------------------------------------------- optimizers


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


def _group_key(cfg: RunConfig) -> tuple:
    t = cfg.train
    return t.optimizer, t.lr, t.momentum, t.nesterov, t.weight_decay, repr(t.scheduler)


# ----------------------------------------------------------------------------- training


def _as_member(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A member's slice in the member's own layout (a view; WideMLP stores later weights transposed)."""
    return t.transpose(-1, -2) if transposed else t


def _stacked(backend, name: str) -> torch.Tensor:
    return backend.params[name] if name in backend.params else backend.buffers[name]


def _member_state_dict(model: nn.Module, backend, k: int) -> None:
    """Copy stacked member k into its own module (for checkpoints, early stopping, the final model)."""
    names = backend.names[k]
    with torch.no_grad():
        for key, target in model.state_dict().items():
            target.copy_(_as_member(_stacked(backend, names[key])[k], names[key] in backend.transposed))


def _load_member(model: nn.Module, backend, k: int) -> None:
    names = backend.names[k]
    with torch.no_grad():
        for key, value in model.state_dict().items():
            _as_member(_stacked(backend, names[key])[k], names[key] in backend.transposed).copy_(value)


def _evaluate(backend, split: Split, transform: BatchTransform, cfg: RunConfig,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) per member over a split, members in eval mode, in large batches."""
    tc = cfg.train
    k = backend.k
    loss_sum = torch.zeros(k, device=device)
    correct = torch.zeros(k, device=device)
    bs = tc.eval_batch_size
    with torch.inference_mode():
        for i in range(0, len(split), bs):
            x = transform(split.images[i : i + bs])
            y = split.labels[i : i + bs]
            with autocast(device, tc.amp):
                logits = backend.forward(x, shared=True, training=False).float()
            n, c = logits.shape[1], logits.shape[2]
            per = loss_fn(logits.reshape(k * n, c), y.repeat(k), tc, reduction="none").view(k, n)
            loss_sum += per.sum(1)
            correct += (logits.argmax(2) == y).sum(1)
    total = max(len(split), 1)
    return loss_sum / total, correct / total


def _fit_one_by_one(models, data, cfgs, pre, device, on_epoch_end, resume, progress) -> list[FitResult]:
    results = []
    for k, (model, cfg) in enumerate(zip(models, cfgs, strict=True)):
        hook = (lambda row, state, k=k: on_epoch_end(k, row, state)) if on_epoch_end is not None else None
        results.append(fit(model, data, cfg, pre, device, on_epoch_end=hook,
                           resume=resume[k] if resume is not None else None,
                           progress=progress(cfg.name) if progress is not None else None))
        results[-1].extra["stacked"] = 1
    return results


def fit_stacked(
    models: Sequence[nn.Module],
    data: ImageData,
    cfgs: Sequence[RunConfig],
    pre: Preprocess,
    device: torch.device,
    *,
    on_epoch_end: EpochHook | None = None,
    resume: Sequence[dict | None] | None = None,
    progress: Callable[[str], Any] | None = None,
) -> list[FitResult]:
    """Train `models[k]` with `cfgs[k]` for every k, together when `can_stack(cfgs)`, else one by one.

    The caller builds each model as for `fit` (torch.manual_seed(cfg.seed) then build_model), so a
    member starts from the weights its one-by-one run would start from; on return each model holds its
    final weights (the best epoch's when early stopping is on, as `fit` does).
    `on_epoch_end(k, row, state)` gets member k's row and a state in `fit`'s checkpoint format (a
    stacked checkpoint resumes with `fit`, and the other way round); `resume[k]` is such a state (all
    members at the same epoch, else they train one by one). `progress(name)` returns an
    EpochProgress-like object. A member whose loss turns non-finite stops there: its FitResult has
    `extra["failed"]` (the message `fit` would raise as RunFailed) and the others train on.
    """
    if len(models) != len(cfgs):
        raise ValueError("fit_stacked: one config per model")
    resumed_epochs = {int(r["epoch"]) for r in resume if r is not None} if resume is not None else set()
    mixed_resume = resume is not None and (len(resumed_epochs) > 1 or (resumed_epochs and None in resume))
    if not can_stack(cfgs, device) or mixed_resume or distributed.is_distributed():
        return _fit_one_by_one(models, data, cfgs, pre, device, on_epoch_end, resume, progress)
    # members sorted so each optimizer group is a contiguous slice of the stacked tensors
    keys = [_group_key(c) for c in cfgs]
    first_seen = {key: i for i, key in reversed(list(enumerate(keys)))}
    order = sorted(range(len(cfgs)), key=lambda i: (first_seen[keys[i]], i))
    try:
        backend = make_backend([models[i] for i in order])
    except ValueError:
        return _fit_one_by_one(models, data, cfgs, pre, device, on_epoch_end, resume, progress)
    trainer = _StackedTrainer(backend, [models[i] for i in order], [cfgs[i] for i in order], data, pre, device)
    if resume is not None and resumed_epochs:
        trainer.load([resume[i] for i in order])
    hook = None
    if on_epoch_end is not None:
        def hook(pos: int, row: dict, state: dict) -> None:
            on_epoch_end(order[pos], row, state)
    sorted_results = trainer.run(hook, progress(f"{len(cfgs)} stacked runs") if progress is not None else None)
    results: list[FitResult | None] = [None] * len(cfgs)
    for pos, i in enumerate(order):
        results[i] = sorted_results[pos]
    return results  # type: ignore[return-value]


class _StackedTrainer:
    """The epoch loop of `fit`, for K members in the stacked order."""

    def __init__(self, backend, models: list[nn.Module], cfgs: list[RunConfig], data: ImageData,
                 pre: Preprocess, device: torch.device) -> None:
        self.backend, self.models, self.cfgs, self.device = backend, models, cfgs, device
        self.k = len(cfgs)
        self.tc = cfgs[0].train  # the shared settings (SHARED_TRAIN_KEYS) are equal across members
        self.images = data.train.images.to(device)
        self.labels = data.train.labels.to(device)
        self.val = Split(data.val.images.to(device), data.val.labels.to(device)) if data.val is not None else None
        self.eval_tf = BatchTransform(pre, None, device)
        self.input_shape = pre.input_shape
        seeds = list(dict.fromkeys(c.seed for c in cfgs))
        self.seeds = seeds
        self.seed_of = torch.tensor([seeds.index(c.seed) for c in cfgs], device=device)
        self.order_gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.aug_gens = [torch.Generator(device=device).manual_seed(s + 1) for s in seeds]
        self.train_tfs = [BatchTransform(pre, cfgs[0].data.augment, device, g) for g in self.aug_gens]
        self.groups: list[_Group] = []
        start = 0
        for i in range(1, self.k + 1):
            if i == self.k or _group_key(cfgs[i]) != _group_key(cfgs[start]):
                self.groups.append(_Group(start, i, cfgs[start], backend.params, device, backend.transposed))
                start = i
        self.group_of = [next(g for g in self.groups if g.start <= k < g.stop) for k in range(self.k)]
        l1 = [c.train.l1 for c in cfgs]
        self.l1 = [(k, v) for k, v in enumerate(l1) if v > 0]
        # one-by-one fit penalises weight matrices and kernels (member ndim > 1)
        self.matrix_keys = [n for n, t in backend.params.items() if t.ndim > 2]
        self.member_keys = [[backend.names[k][n] for n, _ in m.named_parameters()] for k, m in enumerate(models)]
        self.stoppers = []
        for c in cfgs:
            es = c.train.early_stopping
            # as fit: without early stopping a run keeps its final weights, with it the best epoch's
            self.stoppers.append(EarlyStopper(es.patience if es else None, es.monitor if es else "val_loss",
                                              es.min_delta if es else 0.0, keep_best=es is not None))
        self.histories: list[list[dict]] = [[] for _ in cfgs]
        self.active = [True] * self.k
        self.stopped_early = [False] * self.k
        self.failed: list[str | None] = [None] * self.k
        self.start_epoch = 1

    def load(self, states: list[dict]) -> None:
        """Resume every member from its `fit`-format state (all at the same epoch)."""
        for k, (model, st) in enumerate(zip(self.models, states, strict=True)):
            model.load_state_dict(st["model"])
            _load_member(model, self.backend, k)
            self.stoppers[k].load_state_dict(st["stopper"])
            self.histories[k] = list(st["history"])
            self.stopped_early[k] = self.stoppers[k].should_stop
            self.active[k] = not self.stopped_early[k]
        for g in self.groups:
            g.load_member_states([states[k]["optimizer"] for k in range(g.start, g.stop)],
                                 self.member_keys[g.start : g.stop])
            if g.scheduler is not None and states[g.start].get("scheduler") is not None:
                g.scheduler.load_state_dict(states[g.start]["scheduler"])
        for u, _ in enumerate(self.seeds):
            k = int((self.seed_of == u).nonzero()[0])
            set_rng_state(states[k]["rng"], self.order_gens[u], self.aug_gens[u])
        self.start_epoch = int(states[0]["epoch"]) + 1

    def _batch(self, perms: list[torch.Tensor], step: int, bs: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        xs, ys = [], []
        for u, perm in enumerate(perms):
            idx = perm[step * bs : (step + 1) * bs]
            xs.append(self.train_tfs[u](self.images.index_select(0, idx)))
            ys.append(self.labels.index_select(0, idx))
        if len(perms) == 1:
            return xs[0], ys[0].expand(self.k, -1), True
        return torch.stack(xs)[self.seed_of], torch.stack(ys)[self.seed_of], False

    def _step(self, x: torch.Tensor, y: torch.Tensor, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backend
        with autocast(self.device, self.tc.amp):
            logits = b.forward(x, shared=shared, training=True)
        k, n, c = logits.shape
        per = loss_fn(logits.reshape(k * n, c), y.reshape(-1), self.tc, reduction="none").view(k, n)
        losses = per.mean(1)
        for t in b.params.values():
            t.grad = None
        losses.sum().backward()  # members are independent: each gets the gradient of its own mean loss
        with torch.no_grad():
            for k_, lam in self.l1:
                for key in self.matrix_keys:
                    p = b.params[key]
                    p.grad[k_].add_(p[k_].sign(), alpha=lam)
        for g in self.groups:
            g.attach_grads(b.params)
            g.optimizer.step()
        return losses.detach(), (logits.detach().argmax(2) == y).sum(1)

    def _check_finite(self, loss_sum: torch.Tensor, epoch: int, step: int, steps: int) -> None:
        bad = (~torch.isfinite(loss_sum)).tolist()
        for k, is_bad in enumerate(bad):
            if is_bad and self.active[k]:
                self.active[k] = False
                self.failed[k] = (
                    f"run '{self.cfgs[k].name}': loss became non-finite at epoch {epoch}, by step {step}/{steps} "
                    f"(learning rate {self.group_of[k].lr:g}); lower train.lr or check the data"
                )

    def run(self, on_epoch_end, progress) -> list[FitResult]:
        tc, device, k = self.tc, self.device, self.k
        n = len(self.labels)
        bs = tc.batch_size
        steps = math.ceil(n / bs)
        if steps > 1 and n % bs == 1:
            steps -= 1  # as fit: a final batch of one sample breaks BatchNorm
        check_every = 25 if device.type == "cpu" else 100
        if device.type == "cpu" and self.tc.threads is None:  # as fit: the group's size decides (train/speed.py)
            torch.set_num_threads(cpu_threads_for(self.models[0], self.input_shape, bs, members=k))
        started = time.perf_counter()
        for epoch in range(self.start_epoch, tc.epochs + 1):
            if not any(self.active):
                break
            self.backend.train(True)
            t0 = time.perf_counter()
            perms = [torch.randperm(n, generator=g).to(device) for g in self.order_gens]
            loss_sum = torch.zeros(k, device=device)
            correct = torch.zeros(k, device=device, dtype=torch.long)
            seen = 0
            if progress is not None:
                progress.start_epoch(epoch, steps)
            for step in range(steps):
                x, y, shared = self._batch(perms, step, bs)
                losses, right = self._step(x, y, shared)
                seen += y.shape[1]
                loss_sum += losses * y.shape[1]
                correct += right
                if (step + 1) % check_every == 0 or step + 1 == steps:
                    self._check_finite(loss_sum, epoch, step + 1, steps)
                    if progress is not None and progress.wants_updates:
                        elapsed = max(time.perf_counter() - t0, 1e-9)
                        act = torch.tensor(self.active, device=device)
                        if act.any():
                            progress.step(step + 1, float(loss_sum[act].mean()) / seen,
                                          float(correct[act].float().mean()) / seen, seen * k / elapsed)
            train_seconds = time.perf_counter() - t0
            val_loss = val_acc = None
            if self.val is not None:
                self.backend.train(False)
                val_loss, val_acc = (v.tolist() for v in _evaluate(self.backend, self.val, self.eval_tf,
                                                                   self.cfgs[0], device))
            epoch_lrs = [self.group_of[m].lr for m in range(k)]  # the lr this epoch trained with, as fit reports
            for g in self.groups:
                if g.scheduler is not None:
                    g.scheduler.step()
            seconds = time.perf_counter() - t0
            train_loss = (loss_sum / seen).tolist()
            train_acc = (correct.float() / seen).tolist()
            summary_rows = []
            for m in range(k):
                if not self.active[m]:
                    continue
                row = self._row(m, epoch, train_loss[m], train_acc[m], val_loss, val_acc, epoch_lrs[m], seen,
                                seconds, train_seconds)
                summary_rows.append(row)
                if on_epoch_end is not None:
                    on_epoch_end(m, row, self._state(m, epoch))
                if self.stopped_early[m]:
                    self.active[m] = False
            if progress is not None and summary_rows:
                progress.end_epoch(_mean_row(summary_rows, epoch))
        return self._results(time.perf_counter() - started)

    def _row(self, m: int, epoch: int, train_loss: float, train_acc: float, val_loss, val_acc, lr: float,
             seen: int, seconds: float, train_seconds: float) -> dict:
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss[m] if val_loss is not None else None,
            "val_accuracy": val_acc[m] if val_acc is not None else None,
            "lr": lr,
        }
        row["lrs"] = {"0": row["lr"]}
        stopper = self.stoppers[m]
        monitored = row.get(stopper.monitor) if self.val is not None else None
        _member_state_dict(self.models[m], self.backend, m)
        row["best"] = stopper.update(epoch, monitored, self.models[m])
        row["seconds"] = seconds / self.k
        row["train_seconds"] = train_seconds / self.k
        row["images_per_s"] = seen * self.k / max(train_seconds, 1e-9)
        row["group_seconds"] = seconds
        row["stacked"] = self.k
        self.histories[m].append(row)
        self.stopped_early[m] = stopper.should_stop and epoch < self.tc.epochs
        return row

    def _state(self, m: int, epoch: int) -> dict:
        g = self.group_of[m]
        u = int(self.seed_of[m])
        return {
            "epoch": epoch,
            "model": self.models[m].state_dict(),
            "optimizer": g.member_state(m - g.start, self.member_keys[m]),
            "scheduler": g.scheduler.state_dict() if g.scheduler is not None else None,
            "stopper": self.stoppers[m].state_dict(),
            "rng": rng_state(self.order_gens[u], self.aug_gens[u]),
            "history": self.histories[m],
        }

    def _results(self, seconds: float) -> list[FitResult]:
        results = []
        for m, model in enumerate(self.models):
            _member_state_dict(model, self.backend, m)
            stopper = self.stoppers[m]
            if stopper.best_state is not None:
                model.load_state_dict(stopper.best_state)
            extra: dict[str, Any] = {"stacked": self.k, "group_seconds": seconds}
            if self.failed[m] is not None:
                extra["failed"] = self.failed[m]
            results.append(FitResult(history=self.histories[m], best_epoch=stopper.best_epoch,
                                     stopped_early=self.stopped_early[m], seconds=seconds / self.k, extra=extra))
        return results


def _mean_row(rows: list[dict], epoch: int) -> dict:
    """One progress line for the group: means over the members still training."""
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {"epoch": epoch, "train_loss": mean("train_loss"), "train_accuracy": mean("train_accuracy"),
            "val_loss": mean("val_loss"), "val_accuracy": mean("val_accuracy"),
            "seconds": rows[0]["group_seconds"], "best": False}
