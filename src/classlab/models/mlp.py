"""Multi-layer perceptron on flattened images."""

from __future__ import annotations

import torch
from torch import nn

from classlab.models.layers import activation


class MLP(nn.Module):
    """Linear → [BatchNorm] → activation → [Dropout] per hidden layer, then Linear to the classes."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, act: str = "relu",
                 batchnorm: bool = False, dropout: float = 0.0, dropout_after: list[int] | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for i, size in enumerate(hidden, start=1):
            layers.append(nn.Linear(width, size))
            if batchnorm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(activation(act))
            if dropout > 0 and (dropout_after is None or i in dropout_after):
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
