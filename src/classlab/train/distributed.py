"""Data-parallel training with PyTorch's own torch.distributed (DDP), as launched by `torchrun`.

torchrun starts one process per GPU (or per CPU worker) and gives each RANK, WORLD_SIZE and
LOCAL_RANK (plus the rendezvous address) in its environment. classlab joins that process group once
per study (`setup`), and from then on every process trains the same run at the same time:

- each process draws the same epoch permutation (the order generator is seeded identically) and takes
  a strided shard of every global batch, so `train.batch_size` stays the global batch size;
- DistributedDataParallel all-reduces the gradients; loss and accuracy sums are all-reduced before
  they are logged;
- rank 0 alone reads and writes the run folder and the report; what the other ranks need from it
  (skip or resume, the resume state, the summary, an error) is broadcast from rank 0.

Backends: NCCL on GPUs, gloo on CPU. Without torchrun (or with a world of one) every helper here is
a no-op, so the single-process path is exactly what it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from classlab.errors import ClasslabError

T = TypeVar("T")
# Rank r > 0 seeds its own dropout / augmentation streams with seed + RANK_SEED_STRIDE * r, so two
# processes never draw the same flips or masks for their shards (rank 0 keeps the run's own seeds).
RANK_SEED_STRIDE = 1_000_003


def launched() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    """True once this process is part of an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def setup(device: torch.device) -> tuple[torch.device, bool]:
    """Join torchrun's process group when launched by it; returns (this process's device, whether
    this call created the group, so the caller knows to destroy it). NCCL on CUDA, gloo on CPU; on
    CUDA each process takes the GPU of its LOCAL_RANK."""
    if not launched() or is_distributed():
        return device, False
    if not dist.is_available():
        raise ClasslabError("launched by torchrun, but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ClasslabError(f"process with LOCAL_RANK {local} has no GPU of its own "
                                f"({torch.cuda.device_count()} GPU(s) on this machine); lower --nproc-per-node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    # device_id binds NCCL's communicator to this process's GPU at once (no guessing from the current device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return device, True


def cleanup(created: bool) -> None:
    """Leave the process group, if `setup` created it (never one the caller's own code set up)."""
    if not (created and dist.is_initialized()):
        return
    try:  # every rank reaches the end before any tears down gloo/NCCL (else: abort at exit)
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=120))
        else:
            dist.barrier()
    except RuntimeError:
        pass  # another rank already failed; its error is the one that matters
    finally:
        dist.destroy_process_group()


def sum_over_ranks(values: torch.Tensor) -> list[float]:
    """A float64 vector summed over all processes (one collective); the values themselves when alone."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.tolist()


def finite_each(values: torch.Tensor) -> list[bool]:
    """Per entry: finite in every process (all ranks must agree before one of them fails a run)."""
    bad = (~torch.isfinite(values)).to(torch.float64)
    if is_distributed():
        dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    return [b == 0 for b in bad.tolist()]


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` in every process (pickled; for small decisions, summaries, a resume state)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, in every process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def decided_by_main(decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 only and hand its result to every rank. An error raised there is raised
    in every rank too: otherwise rank 0 would stop while the others wait for it forever."""
    result: Any = None
    if is_main():
        try:
            result = decide()
        except ClasslabError as e:
            result = e
    result = broadcast_object(result)
    if isinstance(result, ClasslabError):
        raise result
    return result


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` (the model itself when alone). BatchNorm stays per-rank
    (DDP's default: rank 0's running statistics are broadcast at each forward, so the saved ones are
    rank 0's); SyncBatchNorm would need CUDA and would change what one process computes."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False)


SMALL_RANK_BATCH = 16  # below this many images per process, BatchNorm statistics get noisy


def batch_warning(batch_size: int) -> str | None:
    """A warning when the global batch split over the processes leaves each only a few images."""
    world = world_size()
    if world > 1 and batch_size // world < SMALL_RANK_BATCH:
        return (f"train.batch_size {batch_size} over {world} processes is {batch_size // world} images each: "
                f"BatchNorm statistics get noisy below {SMALL_RANK_BATCH}; raise the batch size, use fewer "
                "processes, or train.sync_batchnorm on GPUs")
    return None


def describe() -> str:
    """One line for run.log: how many processes trained the run."""
    if not is_distributed():
        return "trained by 1 process"
    return f"trained by {world_size()} processes (torch.distributed, {dist.get_backend()})"
