"""The one training loop: K ≥ 1 members (train/members.py) over in-memory uint8 tensors.

Per step: one index gather per distinct seed, one batched transform on the device, forward to logits
[K, B, C], one backward, one optimizer step for all members. Loss and accuracy are summed on the device
(no per-step host sync on GPU); the host reads them every few steps (the non-finite check) and once per
epoch. Everything a run needs besides its maths (checkpoints, TensorBoard, the time estimate) is a
callback: `callback(k, row, state)` after every epoch of member k, on rank 0.

Data order: a run draws its batch order and augmentation from generators seeded by its seed, so members
sharing a seed share each step's batch (gathered and transformed once) and members with different seeds
each get their own seed's batch: every member sees the data order it would see alone.

Time: in a stacked group the rows' `seconds`, `train_seconds` and `images_per_s` are the group's wall time
divided by the number of members (a run's amortized cost); `group_seconds` holds the undivided time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from classlab import metrics
from classlab.config import RunConfig
from classlab.data import ImageData
from classlab.errors import ClasslabError
from classlab.plan import can_stack, stack_order
from classlab.train import distributed
from classlab.train.callbacks import EarlyStopper
from classlab.train.checkpoint import rng_state, set_rng_state, training_state
from classlab.train.device import amp_dtype, autocast, configure_backends, grad_scaler
from classlab.train.members import Single, Stacked, build_members, member_losses
from classlab.train.optim import class_weights, loss_fn
from classlab.train.speed import set_threads
from classlab.transforms import BatchTransform, Preprocess

Callback = Callable[[int, dict, dict], None]  # (member index, epoch row, training state)


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int  # the best validation epoch (the last epoch when there is no validation)
    kept_epoch: int  # the epoch whose weights the model holds on return (best with early stopping, else last)
    stopped_early: bool
    seconds: float
    stacked: int = 1  # how many members trained together
    failed: str | None = None  # why the member stopped (non-finite loss); its model is then not a result
    notes: list[str] = field(default_factory=list)  # for the run log (e.g. a resume on another kind of device)


def fit(
    models: Sequence[nn.Module],
    data: ImageData,
    cfgs: Sequence[RunConfig],
    pre: Preprocess,
    device: torch.device,
    *,
    callbacks: Sequence[Callback] = (),
    resume: Sequence[dict | None] | None = None,
    progress: Callable[[str], Any] | None = None,
    step_hook: Callable[[float], float | None] | None = None,
) -> list[FitResult]:
    """Train `models[k]` with `cfgs[k]` on data.train, validating on data.val each epoch.

    The caller builds each model as for a run alone (torch.manual_seed(cfg.seed), then build_model), so a
    stacked member starts from the weights it would start from alone. Members train together when
    `plan.can_stack` allows it and they resume from the same epoch; otherwise one after another, each
    through this same loop. `resume[k]` is a state as the callbacks get it: training continues after its
    epoch, bit-for-bit on CPU. On return each model holds its kept weights (the best epoch's with early
    stopping, else the last). `progress(name)` returns an EpochProgress-like object. `step_hook(loss)` (one
    run only; the LR finder) gets each step's mean training loss and returns the next step's learning rate,
    or None to stop training there.

    Under torch.distributed every rank calls `fit` with the same arguments (one member): `train.batch_size`
    is the global batch, each rank trains on its shard through DDP, the logged train metrics are
    all-reduced, rank 0 evaluates validation and broadcasts it (so all ranks take the same early-stopping
    decision), and only rank 0 should pass callbacks.
    """
    if len(models) != len(cfgs) or (step_hook is not None and len(models) != 1):
        raise ValueError("fit: one config per model (and one model with a step_hook)")
    resume = list(resume) if resume is not None else [None] * len(models)
    epochs = {None if r is None else int(r["epoch"]) for r in resume}
    if len(models) > 1 and (len(epochs) > 1 or not can_stack(cfgs, device.type) or distributed.is_distributed()):
        results = []
        for k, (model, cfg, state) in enumerate(zip(models, cfgs, resume, strict=True)):
            hooks = [lambda _, row, st, cb=cb, k=k: cb(k, row, st) for cb in callbacks]
            results += fit([model], data, [cfg], pre, device, callbacks=hooks, resume=[state], progress=progress)
        return results
    order = stack_order(cfgs)  # each optimizer group a contiguous slice of the stacked tensors
    members = build_members([models[i] for i in order], [cfgs[i] for i in order], device)
    hooks = [lambda pos, row, st, cb=cb: cb(order[pos], row, st) for cb in callbacks]
    loop = _Loop(members, data, pre, device, hooks)
    loop.step_hook = step_hook
    if any(r is not None for r in resume):
        loop.load([resume[i] for i in order])
    members.start()
    name = cfgs[0].name if len(cfgs) == 1 else f"{len(cfgs)} stacked runs"
    sorted_results = loop.run(progress(name) if progress is not None else None)
    results: list[FitResult | None] = [None] * len(cfgs)
    for pos, i in enumerate(order):
        results[i] = sorted_results[pos]
    return results  # type: ignore[return-value]


def _seed_rank_streams(seed: int, rank: int, aug_gen: torch.Generator) -> None:
    """Under DDP, rank r > 0 draws its own dropout masks and augmentations, so two processes never treat
    their shards alike; rank 0 keeps the run's own seeds (a one-process run is unchanged)."""
    torch.manual_seed(seed + distributed.RANK_SEED_STRIDE * rank)
    aug_gen.manual_seed(seed + 1 + distributed.RANK_SEED_STRIDE * rank)


def _checkpoint_rng(order_gen: torch.Generator, aug_gen: torch.Generator) -> dict:
    """This process's RNG states; under DDP also every rank's, in `ranks` (a collective: all ranks call it),
    so a resumed run continues each rank's own dropout and augmentation streams."""
    state = rng_state(order_gen, aug_gen)
    if distributed.is_distributed():
        state = {**state, "ranks": distributed.all_gather_objects(state)}
    return state


def _restore_rng(saved: dict, seed: int, epoch: int, order_gen: torch.Generator, aug_gen: torch.Generator
                 ) -> str | None:
    """Each rank continues its own streams when resumed with the world size it was saved with; otherwise
    every rank starts from rank 0's states (the data order is the same in all ranks) and ranks > 0
    re-derive their own dropout / augmentation streams. A checkpoint saved on another kind of device (GPU
    vs CPU) cannot restore the augmentation stream: it is reseeded from the seed and the epoch, and the
    returned note says so (the data order and every other stream still continue exactly)."""
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = saved.get("ranks")
    state = per_rank[rank] if per_rank is not None and len(per_rank) == world else saved
    restored = set_rng_state(state, order_gen, aug_gen)
    if state is saved and rank > 0:
        _seed_rank_streams(seed, rank, aug_gen)
    if restored:
        return None
    aug_gen.manual_seed(seed + 1 + RESEED_STRIDE * epoch + distributed.RANK_SEED_STRIDE * rank)
    return (f"resumed after epoch {epoch} on {aug_gen.device.type}, but the augmentation stream was saved on "
            f"{saved.get('augment_device', 'another device')}: reseeded from the seed and epoch, so later "
            "epochs' augmentations differ from an uninterrupted run's (the data order does not)")


RESEED_STRIDE = 7_919  # augmentation reseed after a cross-device resume: seed + 1 + stride × epoch


def _shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's strided share of a global batch of indices (shares differ by at most one sample)."""
    return batch[rank::world] if world > 1 else batch


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    """A final batch of one sample per process breaks BatchNorm: it is dropped (drop_last for that case)."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if steps > 1 and 0 < n % batch_size < 2 * world else steps


class _Loop:
    """The epoch loop over one member stack (members in stacked order)."""

    def __init__(self, members: Single | Stacked, data: ImageData, pre: Preprocess, device: torch.device,
                 callbacks: Sequence[Callback]) -> None:
        self.members, self.cfgs, self.device, self.callbacks = members, members.cfgs, device, callbacks
        self.k = members.k
        self.tc = self.cfgs[0].train  # settings members share (plan.SHARED_TRAIN_KEYS) are equal
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if self.tc.batch_size < self.world:
            raise ClasslabError(f"run '{self.cfgs[0].name}': train.batch_size {self.tc.batch_size} is the global "
                                f"batch size and must be at least the number of processes ({self.world})")
        set_threads(self.tc, members.models[0], pre.input_shape, self.k, device, self.world)
        configure_backends(device, self.tc.deterministic)
        self.amp = amp_dtype(device, self.tc.amp)
        members.scaler = grad_scaler(self.amp)
        self.notes: list[str] = []  # for the run log: what a resume could not continue exactly
        self.images = data.train.images.to(device)
        self.labels = data.train.labels.to(device)
        self.class_weight = class_weights(self.tc.class_weights, data.classes, self.labels)
        self.draw_weights = None  # data.sampler: balanced: each image drawn with probability 1 / its class's count
        if self.cfgs[0].data.sampler == "balanced":
            counts = torch.bincount(data.train.labels, minlength=len(data.classes)).double()
            self.draw_weights = 1 / counts[data.train.labels]
        self.val = None
        if data.val is not None:
            self.val = (data.val.images.to(device), data.val.labels.to(device))
        self.eval_tf = BatchTransform(pre, None, device)
        self.seeds = list(dict.fromkeys(c.seed for c in self.cfgs))
        self.seed_of = [self.seeds.index(c.seed) for c in self.cfgs]
        self.seed_index = torch.tensor(self.seed_of, device=device)
        self.order_gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.aug_gens = [torch.Generator(device=device).manual_seed(s + 1) for s in self.seeds]
        if self.rank > 0:
            _seed_rank_streams(self.seeds[0], self.rank, self.aug_gens[0])
        self.train_tfs = [BatchTransform(pre, self.cfgs[0].data.augment, device, g) for g in self.aug_gens]
        self.stoppers = []
        for c in self.cfgs:
            es = c.train.early_stopping
            # without early stopping a run keeps its final weights (as a plain loop would); with it, the best
            self.stoppers.append(EarlyStopper(es.patience if es else None, es.monitor if es else "loss",
                                              es.min_delta if es else 0.0, keep_best=es is not None))
        self.histories: list[list[dict]] = [[] for _ in range(self.k)]
        self.active = [True] * self.k
        self.stopped_early = [False] * self.k
        self.failed: list[str | None] = [None] * self.k
        self.start_epoch = 1
        self.step_hook: Callable[[float], float | None] | None = None

    def load(self, states: Sequence[dict]) -> None:
        """Resume every member from its state (all at the same epoch)."""
        self.members.load(states)
        for k, st in enumerate(states):
            self.stoppers[k].load_state_dict(st["stopper"])
            self.histories[k] = list(st["history"])
            self.stopped_early[k] = self.stoppers[k].should_stop
            self.active[k] = not self.stopped_early[k]
        epoch = int(states[0]["epoch"])
        for u, seed in enumerate(self.seeds):
            note = _restore_rng(states[self.seed_of.index(u)]["rng"], seed, epoch, self.order_gens[u],
                                self.aug_gens[u])
            if note is not None:
                self.notes.append(note)
        if self.members.scaler is not None and states[0].get("scaler") is not None:
            self.members.scaler.load_state_dict(states[0]["scaler"])
        self.start_epoch = epoch + 1

    def _batch(self, perms: list[torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
        """(x, y, shared, global batch size): one gather per seed; x is [B, ...] when every member shares it.
        With MixUp / CutMix, y holds class-probability targets ([..., B, classes]) instead of labels."""
        bs = self.tc.batch_size
        xs, ys = [], []
        size = 0
        for u, perm in enumerate(perms):
            batch = perm[step * bs : (step + 1) * bs]
            size = len(batch)
            idx = _shard(batch, self.rank, self.world)
            tf = self.train_tfs[u]
            x, y = tf(self.images.index_select(0, idx)), self.labels.index_select(0, idx)
            if tf.mixes:
                x, y = tf.mix(x, y)
            xs.append(x)
            ys.append(y)
        if len(perms) == 1:
            return xs[0], ys[0] if self.k == 1 else ys[0].expand(self.k, *ys[0].shape), True, size
        return torch.stack(xs)[self.seed_index], torch.stack(ys)[self.seed_index], False, size

    def _order(self, gen: torch.Generator) -> torch.Tensor:
        """An epoch's image order from the seed's order generator (checkpointed, so a resume continues it):
        a permutation, or a class-balanced draw with replacement of as many images."""
        n = len(self.labels)
        if self.draw_weights is None:
            return torch.randperm(n, generator=gen).to(self.device)
        return torch.multinomial(self.draw_weights, n, replacement=True, generator=gen).to(self.device)

    def _check_finite(self, loss_sum: torch.Tensor, epoch: int, step: int, steps: int) -> None:
        finite = distributed.finite_each(loss_sum.reshape(-1))
        for k, ok in enumerate(finite):
            if not ok and self.active[k]:
                self.active[k] = False
                self.failed[k] = (
                    f"run '{self.cfgs[k].name}': loss became non-finite at epoch {epoch}, by step {step}/{steps} "
                    f"(learning rate {self.members.lr(k):g}); lower train.lr or check the data")

    def _validate(self) -> dict[str, list[float]] | None:
        """Per-member validation metrics (every metric of the registry computed on validation, as val_<name>);
        rank 0's numbers in every rank (they drive early stopping, which all must agree on)."""
        if self.val is None:
            return None

        def evaluate() -> dict[str, list[float]]:
            images, labels = self.val
            logits = self.members.eval_logits(images, self.eval_tf, self.tc.eval_batch_size)
            k, n, c = logits.shape
            per = loss_fn(logits.reshape(k * n, c), labels.repeat(k), self.tc, reduction="none").view(k, n)
            cm = metrics.confusion_matrix(labels, logits.argmax(2), c)  # one per member: cm[k, true, predicted]
            values = {"loss": per.sum(1) / max(n, 1), **metrics.of_confusion(cm, metrics.VALIDATION)}
            return {metrics.VAL_PREFIX + name: values[name].tolist() for name in metrics.VALIDATION}

        return distributed.decided_by_main(evaluate)

    def run(self, progress) -> list[FitResult]:
        tc, device, k, m = self.tc, self.device, self.k, self.members
        n = len(self.labels)
        steps = steps_per_epoch(n, tc.batch_size, self.world)
        # the non-finite check reads a value on the host (a sync on GPU, a collective under DDP), so it runs
        # every few steps and at the end of every epoch (the summed loss stays non-finite once it is)
        check_every = 20 if device.type == "cpu" and self.world == 1 else 50
        mixes = self.train_tfs[0].mixes  # MixUp / CutMix: soft targets (every seed's transform has the same config)
        started = time.perf_counter()
        for epoch in range(self.start_epoch, tc.epochs + 1):
            if not any(self.active):
                break
            m.train(True)
            t0 = time.perf_counter()
            perms = [self._order(g) for g in self.order_gens]
            loss_sum = torch.zeros(k, device=device, dtype=torch.float64)  # summed over an epoch: fp64
            correct = torch.zeros(k, device=device, dtype=torch.long)
            seen = 0
            if progress is not None:
                progress.start_epoch(epoch, steps)
            for step in range(steps):
                x, y, shared, size = self._batch(perms, step)
                with autocast(device, self.amp):
                    logits = m.forward(x, shared)
                loss, logged, weight = member_losses(logits, y, tc, size, self.world, self.class_weight)
                m.zero_grad()
                (m.scaler.scale(loss) if m.scaler is not None else loss).backward()
                m.step()
                loss_sum.add_(logged, alpha=weight)
                # MixUp / CutMix: train accuracy counts against the argmax of each soft target
                labels = y.argmax(-1) if mixes else y
                correct += (logits.detach().argmax(-1) == labels).sum(-1)
                seen += labels.shape[-1]
                if self.step_hook is not None:  # the LR finder: a host read per step, which it needs anyway
                    next_lr = self.step_hook(float(logged) * weight / labels.shape[-1])
                    if next_lr is None:
                        self.active = [False] * k
                        break
                    m.set_lr(next_lr)
                if (step + 1) % check_every == 0 or step + 1 == steps:
                    self._check_finite(loss_sum, epoch, step + 1, steps)
                    if not any(self.active):
                        break
                    if progress is not None and progress.wants_updates:
                        act = torch.tensor(self.active, device=device)
                        elapsed = max(time.perf_counter() - t0, 1e-9)
                        progress.step(step + 1, float(loss_sum[act].mean()) / seen,
                                      float(correct[act].float().mean()) / seen, seen * k / elapsed)
            if not any(self.active):
                break
            train_seconds = time.perf_counter() - t0
            totals = distributed.sum_over_ranks(torch.cat([loss_sum, correct.double(),
                                                           loss_sum.new_tensor([seen], dtype=torch.float64)]))
            loss_sum, correct, seen = totals[:k], totals[k : 2 * k], totals[2 * k]
            val = self._validate()
            lrs = [(m.lr(i), m.lrs(i)) for i in range(k)]  # what this epoch trained with
            m.scheduler_step()
            seconds = time.perf_counter() - t0
            rngs = [_checkpoint_rng(self.order_gens[u], self.aug_gens[u]) for u in range(len(self.seeds))]
            done = []
            for i in range(k):
                if not self.active[i]:
                    continue
                row = {"epoch": epoch, "train_loss": loss_sum[i] / seen, "train_accuracy": correct[i] / seen,
                       "val_loss": None, "val_accuracy": None}
                row.update({key: values[i] for key, values in (val or {}).items()})
                row.update(lr=lrs[i][0], lrs=lrs[i][1])
                m.sync(i)
                stopper = self.stoppers[i]
                row["best"] = stopper.update(epoch, row.get(metrics.VAL_PREFIX + stopper.monitor) if self.val else None,
                                             m.models[i])
                row["seconds"] = seconds / k
                row["train_seconds"] = train_seconds / k
                row["images_per_s"] = seen * k / max(train_seconds, 1e-9)
                if k > 1:
                    row["group_seconds"], row["stacked"] = seconds, k
                self.histories[i].append(row)
                self.stopped_early[i] = stopper.should_stop and epoch < tc.epochs
                state = None
                if self.callbacks:
                    state = training_state(epoch, m.models[i].state_dict(), m.optimizer_state(i), m.scheduler_state(i),
                                           stopper.state_dict(), rngs[self.seed_of[i]], self.histories[i],
                                           m.scaler.state_dict() if m.scaler is not None else None)
                done.append((i, row, state))
                if self.stopped_early[i]:
                    self.active[i] = False
            if progress is not None and done:
                progress.end_epoch(done[0][1] if k == 1 else _mean_row([row for _, row, _ in done], epoch))
                for i, _, _ in done:
                    if self.stopped_early[i] and hasattr(progress, "note"):
                        stop = self.stoppers[i]
                        progress.note(f"{self.cfgs[i].name}: early stopping: no {metrics.VAL_PREFIX}{stop.monitor} "
                                      f"improvement for {stop.bad_epochs} epochs; keeping epoch {stop.best_epoch}")
            for i, row, state in done:
                for callback in self.callbacks:
                    callback(i, row, state)
        return self._results(time.perf_counter() - started)

    def _results(self, seconds: float) -> list[FitResult]:
        results = []
        for i, model in enumerate(self.members.models):
            self.members.sync(i)
            stopper = self.stoppers[i]
            last = self.histories[i][-1]["epoch"] if self.histories[i] else 0
            kept = last
            if stopper.best_state is not None:
                model.load_state_dict(stopper.best_state)
                kept = stopper.best_epoch
            results.append(FitResult(history=self.histories[i], best_epoch=stopper.best_epoch or last,
                                     kept_epoch=kept, stopped_early=self.stopped_early[i], seconds=seconds / self.k,
                                     stacked=self.k, failed=self.failed[i], notes=list(self.notes)))
        return results


def _mean_row(rows: list[dict], epoch: int) -> dict:
    """One progress line for a stacked group: means over the members still training."""
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {"epoch": epoch, "train_loss": mean("train_loss"), "train_accuracy": mean("train_accuracy"),
            "val_loss": mean("val_loss"), "val_accuracy": mean("val_accuracy"),
            "seconds": rows[0]["group_seconds"], "best": False}
