"""Which device a run trains on, and how: mixed precision, determinism and backend speed settings.

Precision policy (`train.amp`): on CUDA, bf16 autocast where the GPU has bf16 tensor cores (compute
capability >= 8.0: A100, H100, L4, RTX 30xx on), else fp16 autocast with a GradScaler (T4, V100, P100:
bf16 there is emulated, slow or missing). On the CPU, fp32 always: bf16 is slower than fp32 on CPUs
without AMX, and entering a disabled torch.autocast costs microseconds per step, which a small model's
step notices. Evaluation is fp32 everywhere (train.forward.predict_logits).
"""

from __future__ import annotations

import contextlib
import os

import torch

from classlab.errors import ClasslabError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClasslabError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def amp_dtype(device: torch.device, amp: str, capability: tuple[int, int] | None = None) -> torch.dtype | None:
    """The autocast dtype for `train.amp` on `device` (None: fp32). `capability`: the GPU's compute
    capability (read from the device when None)."""
    if device.type != "cuda" or amp == "off":
        return None
    major, minor = capability or torch.cuda.get_device_capability(device)
    bf16_cores = (major, minor) >= (8, 0)
    if amp == "bf16" and not bf16_cores:
        raise ClasslabError(f"train.amp: bf16 needs a GPU of compute capability 8.0 or newer; this one is "
                            f"{major}.{minor}: use amp: fp16 (or auto)")
    if amp == "bf16" or (amp == "auto" and bf16_cores):
        return torch.bfloat16
    return torch.float16


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on CUDA; a null context otherwise (see the module docstring)."""
    if dtype is not None and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Speed settings for CUDA, or deterministic kernels when asked. cuBLAS reads CUBLAS_WORKSPACE_CONFIG
    when it creates its handle, so it is set before the first CUDA matmul of the process."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
    elif torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic  # fixed shapes: autotune once
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls
