"""Test-time augmentation: deterministic views of each image (the image itself, its mirror image, rotations
by ±K degrees), each through the run's evaluation transform and `train.forward.predict_logits` (batched, on the
device), and the class probabilities averaged over the views.

A view acts on the image as stored (uint8, before the pixel permutation and resizing), where the training
augmentation acts too, so a permuted run's views are the permuted versions of the flipped / rotated images.
`eval.tta` lists the views besides the plain image: `hflip`, `vflip`, `rotate:K` (two views, +K and -K); each is
the deterministic view of an op of the augmentation table (transforms.AUGMENT_OPS), so a rotated view is the
training rotation at one angle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from classlab.train.forward import predict_logits
from classlab.transforms import VIEWS


def view_names(tta: list[str] | tuple[str, ...]) -> list[str]:
    """The views averaged, in order: 'identity' first, then each listed one (a rotation as +K and -K)."""
    names = ["identity"]
    for item in tta:
        if item.startswith("rotate:"):
            k = float(item.split(":", 1)[1])
            names += [f"rotate:{k:g}", f"rotate:{-k:g}"]
        else:
            names.append(item)
    return names


def rotate_uint8(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a uint8 N×C×H×W batch by `degrees` about the centre (the training rotation at one angle:
    bilinear, zeros outside), rounded back to uint8."""
    return VIEWS["rotate"].view(x, degrees)


def view_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A view's function on a uint8 batch: the identity, or an augmentation op's deterministic view
    (transforms.AUGMENT_OPS) with its value after the colon (`rotate:10`)."""
    if name == "identity":
        return lambda x: x
    op, _, value = name.partition(":")
    if op not in VIEWS:
        raise ValueError(f"unknown test-time augmentation view '{name}'")
    view, amount = VIEWS[op].view, float(value) if value else None
    return lambda x: view(x, amount)


class ViewTransform:
    """`transform` applied after one view: what predict_logits calls on each uint8 batch on the device."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], view: str) -> None:
        self.transform, self.view, self._fn = transform, view, view_fn(view)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(self._fn(x))


def tta_probs(model: nn.Module, images: torch.Tensor, transform, batch_size: int, device: torch.device,
              tta: list[str] | tuple[str, ...], temperature: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """Probabilities [N, K] averaged over the views of `tta` (softmax of logits / temperature per view), and
    the views' names."""
    names = view_names(tta)
    total = None
    for name in names:
        logits = predict_logits(model, images, ViewTransform(transform, name), batch_size, device)
        probs = (logits / temperature).softmax(1)
        total = probs if total is None else total + probs
    return total / len(names), names
