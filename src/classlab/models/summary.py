"""Model tables (layer, output shape, parameters, trainable / frozen) via torchinfo."""

from __future__ import annotations

import torch
import torchinfo
from torch import nn


def model_table(model: nn.Module, input_shape: tuple[int, int, int],
                lr_of: dict[str, float] | None = None) -> tuple[str, list[dict]]:
    """torchinfo's text table and one row per layer for the report; runs one forward pass on CPU."""
    device = next(model.parameters()).device
    stats = torchinfo.summary(
        model, input_size=(2, *input_shape), col_names=("output_size", "num_params", "trainable"),
        depth=4, verbose=0, device=device, mode="eval",
    )
    rows = []
    for layer in stats.summary_list:
        own = [p for p in layer.module.parameters(recurse=False)] if hasattr(layer, "module") else []
        rows.append({
            "layer": layer.get_layer_name(show_var_name=True, show_depth=False),
            "depth": layer.depth,
            "output_shape": list(layer.output_size) if layer.output_size else [],
            "params": int(sum(p.numel() for p in own)),
            "trainable": int(sum(p.numel() for p in own if p.requires_grad)),
            "leaf": layer.is_leaf_layer,
        })
    return str(stats), rows


def parameter_count(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


__all__ = ["model_table", "parameter_count", "torch"]
