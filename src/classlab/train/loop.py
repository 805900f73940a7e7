"""The plain training loop over in-memory uint8 tensors.

Per step: one index gather, one batched transform on the device, forward, backward, step. Loss and
accuracy are summed on the device (no per-step host sync on GPU); the host reads them once per
progress update and once per epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from classlab.config import RunConfig, TrainConfig
from classlab.data import ImageData, Split
from classlab.errors import ClasslabError, RunFailed
from classlab.evaluate import predict_logits
from classlab.models.freeze import frozen_batchnorm_to_eval, parameter_groups
from classlab.train import distributed
from classlab.train.callbacks import EarlyStopper
from classlab.train.checkpoint import rng_state, set_rng_state
from classlab.train.device import autocast
from classlab.train.optim import build_optimizer, build_scheduler, l1_penalty, loss_fn
from classlab.train.speed import channels_last_input, cpu_threads_for, to_channels_last
from classlab.transforms import BatchTransform, Preprocess


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate_split(model: nn.Module, split: Split, transform: BatchTransform, cfg: RunConfig,
                   device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, logits) over a split."""
    logits = predict_logits(model, split.images, transform, cfg.train.eval_batch_size, device, cfg.train.amp)
    labels = split.labels.to(device)
    loss = float(loss_fn(logits, labels, cfg.train, reduction="sum")) / max(len(labels), 1)
    acc = float((logits.argmax(1) == labels).float().mean()) if len(labels) else 0.0
    return loss, acc, logits


def param_groups(model: nn.Module, cfg: RunConfig) -> list:
    """Per-block learning rates when `train.lr_groups` is set, else every trainable parameter in one group."""
    if cfg.train.lr_groups:
        return parameter_groups(model, dict(cfg.train.lr_groups))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        from classlab.errors import ClasslabError

        raise ClasslabError(f"run '{cfg.name}': every parameter is frozen; unfreeze at least the head")
    return params


ProgressLike = Any  # classlab.train.progress.EpochProgress or None


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


def _restore_rng(saved: dict, seed: int, order_gen: torch.Generator, aug_gen: torch.Generator) -> None:
    """Each rank continues its own streams when resumed with the world size it was saved with; otherwise
    every rank starts from rank 0's states (the data order is the same in all ranks) and ranks > 0
    re-derive their own dropout / augmentation streams."""
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = saved.get("ranks")
    if per_rank is not None and len(per_rank) == world:
        set_rng_state(per_rank[rank], order_gen, aug_gen)
        return
    set_rng_state(saved, order_gen, aug_gen)
    if rank > 0:
        _seed_rank_streams(seed, rank, aug_gen)


def _shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's strided share of a global batch of indices (shares differ by at most one sample)."""
    return batch[rank::world] if world > 1 else batch


def _step_loss(logits: torch.Tensor, y: torch.Tensor, tc: TrainConfig, global_size: int, world: int
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss to backpropagate, logged loss, its weight): the sum of per-sample losses for the log is
    logged × weight. Alone: the batch mean. Under DDP, which averages gradients over the ranks, each
    rank's sum is scaled by world / global batch size, so the averaged gradient is exactly the gradient
    of the whole global batch's mean loss, also when the last batch does not split evenly."""
    if world == 1:
        loss = loss_fn(logits, y, tc)
        return loss, loss.detach(), len(y)
    total = loss_fn(logits, y, tc, reduction="sum")
    return total * (world / global_size), total.detach(), 1


def fit(
    model: nn.Module,
    data: ImageData,
    cfg: RunConfig,
    pre: Preprocess,
    device: torch.device,
    *,
    params: list | None = None,
    on_epoch_end: Callable[[dict, dict], None] | None = None,
    resume: dict | None = None,
    progress: ProgressLike = None,
) -> FitResult:
    """Train `model` on data.train, validating on data.val each epoch; returns the history.

    `on_epoch_end(row, state)` gets the epoch's metrics row and the full training state (for the
    checkpoint). `resume` is such a state: training continues after its epoch, bit-for-bit on CPU.

    Under torch.distributed (see train/distributed.py) every rank calls `fit` with the same arguments:
    `train.batch_size` is the global batch, each rank trains on its shard through DDP, the logged train
    metrics are all-reduced, rank 0 evaluates validation and broadcasts it (so all ranks take the same
    early-stopping decision), and only the callers on rank 0 should pass `on_epoch_end`.
    """
    tc = cfg.train
    world, rank = distributed.world_size(), distributed.rank()
    if tc.batch_size < world:
        raise ClasslabError(f"run '{cfg.name}': train.batch_size {tc.batch_size} is the global batch size and "
                            f"must be at least the number of processes ({world})")
    if device.type == "cpu" and tc.threads is None and world == 1:  # small models: 1 thread (train/speed.py)
        torch.set_num_threads(cpu_threads_for(model, pre.input_shape, tc.batch_size))
    channels_last = to_channels_last(model)  # conv models: NHWC weights and inputs (faster on oneDNN and CUDA)
    images = data.train.images.to(device)
    labels = data.train.labels.to(device)
    n = len(labels)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    if rank > 0:
        _seed_rank_streams(cfg.seed, rank, aug_gen)
    train_tf = BatchTransform(pre, cfg.data.augment, device, aug_gen)
    eval_tf = BatchTransform(pre, None, device)
    val = Split(data.val.images.to(device), data.val.labels.to(device)) if data.val is not None else None

    optimizer = build_optimizer(params if params is not None else param_groups(model, cfg), tc, device)
    scheduler = build_scheduler(optimizer, tc)
    es = tc.early_stopping
    # Without early stopping the run keeps its final weights (as a plain loop would); with it, the best.
    stopper = EarlyStopper(es.patience if es else None, es.monitor if es else "val_loss",
                           es.min_delta if es else 0.0, keep_best=es is not None)
    history: list[dict] = []
    start_epoch = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume.get("scheduler") is not None:
            scheduler.load_state_dict(resume["scheduler"])
        stopper.load_state_dict(resume["stopper"])
        _restore_rng(resume["rng"], cfg.seed, order_gen, aug_gen)
        history = list(resume["history"])
        start_epoch = int(resume["epoch"]) + 1

    train_model = distributed.wrap(model, device)  # DDP after loading: it broadcasts rank 0's weights
    bs = tc.batch_size
    steps = math.ceil(n / bs)
    if steps > 1 and 0 < n % bs < 2 * world:
        steps -= 1  # a final batch of one sample per process breaks BatchNorm; drop it (drop_last for that case)
    # the non-finite check reads a value on the host (a sync on GPU, a collective under DDP), so it runs
    # every few steps and at the end of every epoch (the summed loss stays non-finite once it is)
    check_every = 20 if device.type == "cpu" and world == 1 else 50
    started = time.perf_counter()
    stopped_early = stopper.should_stop
    for epoch in range(start_epoch, tc.epochs + 1):
        if stopped_early:
            break
        train_model.train()
        frozen_batchnorm_to_eval(model)
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=order_gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        if progress is not None:
            progress.start_epoch(epoch, steps)
        for step in range(steps):
            batch = perm[step * bs : (step + 1) * bs]
            idx = _shard(batch, rank, world)
            x = channels_last_input(train_tf(images.index_select(0, idx)), channels_last)
            y = labels.index_select(0, idx)
            with autocast(device, tc.amp):
                logits = train_model(x)
            loss, logged, weight = _step_loss(logits, y, tc, len(batch), world)
            total = loss + tc.l1 * l1_penalty(model) if tc.l1 > 0 else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            loss_sum.add_(logged, alpha=weight)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if (step + 1) % check_every == 0 or step + 1 == steps:
                if not distributed.all_finite(loss_sum):
                    lr = optimizer.param_groups[0]["lr"]
                    raise RunFailed(
                        f"run '{cfg.name}': loss became non-finite at epoch {epoch}, by step {step + 1}/{steps} "
                        f"(learning rate {lr:g}); lower train.lr or check the data"
                    )
                if progress is not None and progress.wants_updates:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    progress.step(step + 1, float(loss_sum) / seen, float(correct) / seen, seen / elapsed)
        train_seconds = time.perf_counter() - t0
        loss_total, correct_total, seen_total = distributed.all_reduce_sums([loss_sum, correct, seen], device)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_total / seen_total,
            "train_accuracy": correct_total / seen_total,
            "val_loss": None,
            "val_accuracy": None,
            "lr": optimizer.param_groups[0]["lr"],
            "lrs": {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)},
        }
        if val is not None:  # rank 0's numbers in every rank: they drive early stopping, which all must agree on
            row["val_loss"], row["val_accuracy"] = distributed.decided_by_main(
                lambda: evaluate_split(model, val, eval_tf, cfg, device)[:2])
        if scheduler is not None:
            scheduler.step()
        monitored = row.get(stopper.monitor) if val is not None else None
        row["best"] = stopper.update(epoch, monitored, model)
        row["seconds"] = time.perf_counter() - t0
        row["train_seconds"] = train_seconds
        row["images_per_s"] = seen_total / max(train_seconds, 1e-9)
        history.append(row)
        if progress is not None:
            progress.end_epoch(row)
        stopped_early = stopper.should_stop and epoch < tc.epochs
        rng = _checkpoint_rng(order_gen, aug_gen)
        if on_epoch_end is not None:
            state = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "stopper": stopper.state_dict(),
                "rng": rng,
                "history": history,
            }
            on_epoch_end(row, state)
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    seconds = time.perf_counter() - started
    return FitResult(history=history, best_epoch=stopper.best_epoch, stopped_early=stopped_early, seconds=seconds)
