"""Layer builders shared by the model families: activations by their registered names."""

from __future__ import annotations

from torch import nn

from classlab.registry import ACTIVATIONS

for _name, _cls in {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
                    "silu": nn.SiLU}.items():
    ACTIVATIONS.register(_name)(lambda slope=0.01, cls=_cls: cls())
ACTIVATIONS.register("leaky_relu")(lambda slope=0.01: nn.LeakyReLU(slope))


def activation(name: str, slope: float = 0.01) -> nn.Module:
    return ACTIVATIONS.create(name, slope)
