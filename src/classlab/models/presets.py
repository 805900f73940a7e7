"""The reference studies' networks (STUDIES.md), as layer lists, so they read like the papers."""

from __future__ import annotations

from typing import Any

from classlab.config import LayerSpec, PresetConfig


def _layers(items: list[Any]) -> list[LayerSpec]:
    return [LayerSpec.model_validate(item) for item in items]


def study_a(cfg: PresetConfig) -> list[LayerSpec]:
    """Study A: 120 / 10,392 / 27,680 / 25,800 parameters, then Linear(200 → classes)."""
    bn = ["bn"] if cfg.batchnorm else []
    return _layers([
        {"conv": {"out": 12, "kernel": 3}}, *bn, "relu",
        {"conv": {"out": 24, "kernel": 6}}, *bn, "relu", {"maxpool": 2},
        {"conv": {"out": 32, "kernel": 6}}, *bn, "relu", {"maxpool": 2},
        "flatten", {"linear": 200}, "relu",
    ])


def study_b(cfg: PresetConfig) -> list[LayerSpec]:
    """Study B: 3 × [conv k3 pad 1 → ReLU → MaxPool 2] (32/64/128), dropout, fc 1152 → 256 → 64 → classes."""
    bn = ["bn"] if cfg.batchnorm else []
    blocks: list[Any] = []
    for ch in (32, 64, 128):
        blocks += [{"conv": {"out": ch, "kernel": 3, "padding": 1}}, *bn, "relu", {"maxpool": 2}]
    p = 0.25 if cfg.dropout is None else cfg.dropout
    return _layers([*blocks, "flatten", {"dropout": p}, {"linear": 256}, "relu", {"linear": 64}, "relu"])


def study_c(cfg: PresetConfig) -> list[LayerSpec]:
    """Study C: conv 64 + BN, then 128 / 256 / 512 with max-pools, global average pool."""
    extra_bn = ["bn"] if cfg.batchnorm else []
    items: list[Any] = [{"conv": {"out": 64, "kernel": 3, "padding": 1}}, "bn", "relu"]
    for ch in (128, 256, 512):
        items += [{"conv": {"out": ch, "kernel": 3, "padding": 1}}, *extra_bn, "relu", {"maxpool": 2}]
    if cfg.dropout:
        items += [{"dropout": cfg.dropout}]
    return _layers([*items, "gap"])


def study_e(cfg: PresetConfig) -> list[LayerSpec]:
    """Study E: conv 5×5 (32, 64) with LeakyReLU(0.01) and max-pools, fc 3136 → 1000 → classes."""
    bn = ["bn"] if cfg.batchnorm else []
    items: list[Any] = [
        {"conv": {"out": 32, "kernel": 5, "padding": 2}}, *bn, "leaky_relu", {"maxpool": 2},
        {"conv": {"out": 64, "kernel": 5, "padding": 2}}, *bn, "leaky_relu", {"maxpool": 2},
        "flatten",
    ]
    if cfg.dropout:
        items += [{"dropout": cfg.dropout}]
    return _layers([*items, {"linear": 1000}, "leaky_relu"])


CNN_PRESETS = {"study_a_cnn": study_a, "study_b_cnn": study_b, "study_c_cnn": study_c, "study_e_cnn": study_e}
