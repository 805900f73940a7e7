"""Freezing top-level blocks, and keeping frozen BatchNorm layers in eval mode while training."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from classlab.errors import ClasslabError
from classlab.registry import suggest

ALIASES = {"head": "fc"}


def block_names(model: nn.Module) -> list[str]:
    """Top-level children that own parameters (conv1, bn1, layer1..4, fc for a ResNet)."""
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]


def freeze_all_but(model: nn.Module, keep: list[str]) -> None:
    names = block_names(model)
    keep = [ALIASES.get(k, k) for k in keep]
    for k in keep:
        if k not in names:
            raise ClasslabError(
                f"model.freeze.all_but: unknown block '{k}'{suggest(k, names)}; blocks: {', '.join(names)}"
            )
    for name, child in model.named_children():
        child.requires_grad_(name in keep)


def frozen_batchnorm_to_eval(model: nn.Module) -> None:
    """A frozen block's BatchNorm must not update its running statistics: put it in eval mode.
    Called after every model.train()."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def parameter_groups(model: nn.Module, lrs: dict[str, float]) -> list[dict]:
    """One optimizer group per configured block; every trainable parameter must be in exactly one."""
    names = block_names(model)
    resolved = {ALIASES.get(k, k): v for k, v in lrs.items()}
    for k in resolved:
        if k not in names:
            raise ClasslabError(f"train.lr_groups: unknown block '{k}'{suggest(k, names)}; blocks: {', '.join(names)}")
    groups = []
    missing = []
    for name, child in model.named_children():
        params = [p for p in child.parameters() if p.requires_grad]
        if not params:
            continue
        if name not in resolved:
            missing.append(name)
            continue
        groups.append({"params": params, "lr": resolved[name], "name": name})
    if missing:
        raise ClasslabError(
            f"train.lr_groups: trainable blocks without a learning rate: {', '.join(missing)}; "
            "give every trainable block one (or freeze it)"
        )
    return groups
