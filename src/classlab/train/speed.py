"""CPU speed settings: intra-op threads for small models, and the channels-last memory format.

Threads: torch's OpenMP threads spin at the end of every parallel region until all of them arrive.
When other processes hold the cores, one of our threads is often descheduled and the rest wait for
it: on this project's 2-core machine with other busy processes, a study-D MLP step took 50 ms with 2
threads and 4.8 ms with 1. A small model's step is made of small ops that gain little from a second
thread even on an idle machine (study D's MLP: 1.84 ms per step on one thread, 1.65 ms on two,
idle), so when `train.threads` is not set, a model whose training batch
costs under SMALL_STEP_MACS multiply-adds trains on one thread; larger ones get torch's default.
The choice depends only on the model and batch size (never on the current load), so a repeated or
resumed run uses the same thread count and gives the same numbers.

Channels-last: oneDNN's convolutions run faster on NHWC data (measured on the same CPU: study A's CNN
step 39 → 29 ms, study E's 63 → 51 ms); on CUDA it is the layout tensor cores want.
"""

from __future__ import annotations

import torch
from torch import nn

from classlab.config import TrainConfig

DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at import: one per core this process may use
SMALL_STEP_MACS = 50e6  # study D's MLP: 15.5 M per batch of 64; study A's CNN: 344 M


def forward_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass of one image (torch's own FLOP counter, eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            p = next(model.parameters())
            model.eval()(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def cpu_threads_for(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, members: int = 1) -> int:
    """1 for a small model (see the module docstring), else torch's default thread count. `members`:
    how many such models train as one stacked group (train/members.py); the group is the model whose
    step is sized (study D's 8-cell grid: 124 M multiply-adds per step, GEMMs wide enough for threads)."""
    small = forward_macs(model, input_shape) * batch_size * members < SMALL_STEP_MACS
    return 1 if small else DEFAULT_THREADS


def set_threads(tc: TrainConfig, model: nn.Module, input_shape: tuple[int, ...], members: int,
                device: torch.device, world: int) -> None:
    """The process's intra-op threads, decided here only: `train.threads` when set; on a CPU, one process
    alone, the model's size decides; otherwise (a GPU, or DDP, whose launcher sets OMP_NUM_THREADS) as is."""
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    elif device.type == "cpu" and world == 1:
        torch.set_num_threads(cpu_threads_for(model, input_shape, tc.batch_size, members))


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_channels_last(model: nn.Module) -> bool:
    """Put a convolutional model's 4-D weights in channels-last layout; True when done (inputs should follow)."""
    if not has_conv(model):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def is_channels_last(model: nn.Module) -> bool:
    """True when some convolution's weight is stored channels-last (and that is not also plain contiguous)."""
    return any(isinstance(m, nn.Conv2d) and m.weight.is_contiguous(memory_format=torch.channels_last)
               and not m.weight.is_contiguous() for m in model.modules())


def channels_last_input(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.dim() == 4 else x
