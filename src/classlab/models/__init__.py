"""Model registry: a config names a family or preset, `build_model` returns an nn.Module. What the rest of
classlab knows about each family without building one (stacking, input rules) is its record in
classlab.registry.MODEL_FAMILIES."""

from __future__ import annotations

from torch import nn

from classlab.config import CNNConfig, MLPConfig, PresetConfig, ZooConfig
from classlab.models.cnn import CNN
from classlab.models.mlp import MLP
from classlab.models.presets import CNN_PRESETS
from classlab.registry import MODELS, STUDY_D_MLP


@MODELS.register("mlp")
def _mlp(cfg: MLPConfig, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    c, h, w = in_shape
    return MLP(c * h * w, list(cfg.hidden), num_classes, cfg.activation, cfg.batchnorm, cfg.dropout,
               cfg.dropout_after)


@MODELS.register("cnn")
def _cnn(cfg: CNNConfig, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return CNN(list(cfg.layers), in_shape, num_classes)


@MODELS.register("study_d_mlp")
def _study_d(cfg: PresetConfig, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    """Study D: 784 → 256 → 128 → 64 → classes, tanh; BN after each hidden Linear; dropout after layer 2."""
    c, h, w = in_shape
    hidden, activation = STUDY_D_MLP
    return MLP(c * h * w, list(hidden), num_classes, activation, bool(cfg.batchnorm), cfg.dropout or 0.0, [2])


def _register_zoo(family: str) -> None:
    @MODELS.register(family)
    def _build(cfg: ZooConfig, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
        from classlab.models.zoo import build_zoo  # timm / torchvision only when one is asked for

        return build_zoo(cfg, num_classes, in_shape)


for _family in ("timm/<arch>", "torchvision/<arch>", "resnet18"):  # resnet18: torchvision/resnet18 (its record)
    _register_zoo(_family)


def _register_cnn_preset(name: str) -> None:
    @MODELS.register(name)
    def _build(cfg: PresetConfig, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
        return CNN(CNN_PRESETS[name](cfg), in_shape, num_classes)


for _name in CNN_PRESETS:
    _register_cnn_preset(_name)


def build_model(cfg: MLPConfig | CNNConfig | PresetConfig | ZooConfig, num_classes: int,
                in_shape: tuple[int, int, int]) -> nn.Module:
    return MODELS.create(cfg.name, cfg, num_classes, in_shape)
