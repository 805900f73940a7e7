"""Training state as plain tensors and containers, so it loads with weights_only=True and a killed
run resumes bit-for-bit: model, optimizer, scheduler, early stopping, every RNG, history, epoch."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def training_state(epoch: int, model: dict, optimizer: dict, scheduler: dict | None, stopper: dict, rng: dict,
                   history: list[dict], scaler: dict | None = None) -> dict[str, Any]:
    """What checkpoints/last.pt holds, built in this one place (runs.py validates the same keys);
    `scaler`: the fp16 GradScaler's state, when the run trains with one."""
    state = {"epoch": epoch, "model": model, "optimizer": optimizer, "scheduler": scheduler, "stopper": stopper,
             "rng": rng, "history": history}
    if scaler is not None:
        state["scaler"] = scaler
    return state


def rng_state(order_gen: torch.Generator, aug_gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
        "order": order_gen.get_state(),
        "augment": aug_gen.get_state(),
        "augment_device": aug_gen.device.type,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], order_gen: torch.Generator, aug_gen: torch.Generator) -> bool:
    """Restore every stream; False when the augmentation stream was saved on another kind of device (a CUDA
    Philox state cannot seed a CPU MT19937 generator, nor the other way round): it is then left as is."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py.get("gauss_next")))
    order_gen.set_state(state["order"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if state.get("augment_device", aug_gen.device.type) != aug_gen.device.type:
        return False
    try:
        aug_gen.set_state(state["augment"])
    except RuntimeError:  # a checkpoint from before augment_device was recorded, saved on the other device kind
        return False
    return True
