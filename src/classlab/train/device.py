"""Which device a run trains on, and the mixed-precision context of its training step."""

from __future__ import annotations

import contextlib

import torch

from classlab.errors import ClasslabError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClasslabError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (no loss scaling needed); on CPU nothing (a null context: entering a disabled
    torch.autocast costs microseconds per step, which a small model's step notices)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
