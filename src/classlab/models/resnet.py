"""torchvision's ResNet-18 with a replaceable head, optional pretrained weights and any input channels."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from classlab.config import ResNetConfig
from classlab.errors import ClasslabError
from classlab.models.cnn import CNN
from classlab.models.freeze import freeze_all_but
from classlab.models.weights import imagenet_weights_file, load_state_dict_from
from classlab.runs import safe_torch_load


def _head(cfg: ResNetConfig, in_features: int, num_classes: int) -> nn.Module:
    if not cfg.head:
        return nn.Linear(in_features, num_classes)
    head = CNN(list(cfg.head), (in_features,), num_classes)  # shape-tracked layer list on a feature vector
    return nn.Sequential(*head.features, head.classifier)


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load every non-head weight; a missing key, extra key or shape mismatch names the first offender."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClasslabError(f"{origin}: holds no state dict of tensors (not a weights file)")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    for key, value in own.items():
        if key not in state:
            raise ClasslabError(f"{origin}: weights do not fit resnet18: missing key '{key}'")
        if state[key].shape != value.shape:
            if key == "conv1.weight" and state[key].shape[1] == 3 and value.shape[1] != 3:
                # gray input: sum the RGB filters (the standard way to reuse ImageNet conv1 on 1 channel)
                state[key] = state[key].sum(1, keepdim=True).expand_as(value).clone() / value.shape[1]
                continue
            raise ClasslabError(
                f"{origin}: weights do not fit resnet18: key '{key}' has shape {list(state[key].shape)}, "
                f"expected {list(value.shape)}"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise ClasslabError(f"{origin}: weights do not fit resnet18: unexpected key '{extra[0]}'")
    model.load_state_dict({**model.state_dict(), **{k: state[k] for k in own}})


def build_resnet18(cfg: ResNetConfig, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    if in_shape[0] != 3:
        model.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
    source = cfg.pretrained
    if source == "imagenet":
        path = imagenet_weights_file("resnet18")
        state = safe_torch_load(path)  # weights_only=True; a broken or code-carrying file is one clear line
        load_backbone(model, state, str(path))
    elif source != "none":
        state, origin = load_state_dict_from(source)
        load_backbone(model, state, origin)
    model.fc = _head(cfg, model.fc.in_features, num_classes)
    if cfg.freeze != "none":
        freeze_all_but(model, list(cfg.freeze.all_but))
    return model
