"""Batched, on-device transforms: uint8 batch in, normalized float batch out.

Everything works on whole N×C×H×W batches (no per-sample PIL): flips are a `where`, rotations one
`affine_grid` + `grid_sample` call, the pixel permutation one gather. The same `Preprocess` (minus
augmentation) is stored with a run so `predict` applies exactly what evaluation did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from classlab.config import Augment


def pixel_permutation(seed: int, num_pixels: int) -> torch.Tensor:
    """One fixed permutation of pixel positions, the same for the same seed on every machine."""
    return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing of a run; serialisable to preprocessing.json."""

    input_shape: tuple[int, int, int]  # C×H×W the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    permutation: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        perm = d.get("permutation")
        return cls(
            input_shape=tuple(d["input_shape"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            classes=tuple(d["classes"]), permutation=tuple(perm) if perm is not None else None,
        )


def random_hflip(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own angle in ±degrees about the centre, zeros outside (torchvision's fill=0)."""
    n = x.shape[0]
    angles = (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class BatchTransform:
    """Callable turning a uint8 batch on the device into the model's float input."""

    def __init__(self, pre: Preprocess, augment: Augment | None, device: torch.device,
                 generator: torch.Generator | None = None) -> None:
        self.pre = pre
        self.augment = augment
        self.generator = generator
        c = pre.input_shape[0]
        self.mean = torch.tensor(pre.mean, device=device).view(1, c, 1, 1)
        self.std = torch.tensor(pre.std, device=device).view(1, c, 1, 1)
        self.perm = torch.tensor(pre.permutation, device=device) if pre.permutation is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        aug = self.augment
        if aug is not None and self.generator is not None:
            if aug.hflip > 0:
                x = random_hflip(x, aug.hflip, self.generator)
            if aug.rotate > 0:
                x = random_rotate(x, aug.rotate, self.generator)
        if self.perm is not None:
            n, c, h, w = x.shape
            x = x.reshape(n, c, h * w)[:, :, self.perm].reshape(n, c, h, w)
        return (x - self.mean) / self.std
