"""A CNN written as a list of layer specs; shapes are tracked so Linear/BatchNorm sizes are inferred."""

from __future__ import annotations

import torch
from torch import nn

from classlab.config import LayerSpec
from classlab.errors import ClasslabError
from classlab.models.layers import activation


def _layer(spec: LayerSpec, shape: tuple[int, ...]) -> nn.Module:
    kind, p = spec.kind, spec.params
    if kind == "conv":
        if len(shape) != 3:
            raise ClasslabError(f"conv needs an image input (C×H×W) but receives shape {shape}; move it before flatten")
        return nn.Conv2d(shape[0], p.out, p.kernel, stride=p.stride, padding=p.padding)
    if kind in ("maxpool", "avgpool"):
        cls = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
        return cls(p.kernel, stride=p.stride)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), p.out)) if len(shape) > 1 \
            else nn.Linear(shape[0], p.out)
    if kind == "dropout":
        return nn.Dropout(p.p)
    if kind == "bn":
        return nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])
    if kind == "leaky_relu":
        return activation("leaky_relu", p.slope)
    if kind == "flatten":
        return nn.Flatten()
    if kind == "gap":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return activation(kind)


class CNN(nn.Module):
    """`features` (the listed layers) then `classifier`, a Linear to the class count."""

    def __init__(self, layers: list[LayerSpec], in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        shape: tuple[int, ...] = tuple(in_shape)
        x = torch.zeros(2, *in_shape)
        with torch.no_grad():
            for i, spec in enumerate(layers):
                module = _layer(spec, shape)
                try:
                    x = module.eval()(x)
                except RuntimeError as e:
                    raise ClasslabError(
                        f"model.layers[{i}] ({spec.kind}): does not fit input shape {list(shape)} ({str(e)[:120]})"
                    ) from None
                if x.numel() == 0:
                    raise ClasslabError(f"model.layers[{i}] ({spec.kind}): output shape {list(x.shape[1:])} is empty")
                shape = tuple(x.shape[1:])
                modules.append(module.train())
        self.features = nn.Sequential(*modules)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(int(torch.tensor(shape).prod()), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))
