"""Layer builders shared by the model families."""

from __future__ import annotations

from torch import nn

from classlab.errors import ClasslabError


def activation(name: str, slope: float = 0.01) -> nn.Module:
    table = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
             "silu": nn.SiLU}
    if name == "leaky_relu":
        return nn.LeakyReLU(slope)
    if name not in table:
        raise ClasslabError(f"unknown activation '{name}'; choose one of: leaky_relu, {', '.join(table)}")
    return table[name]()
