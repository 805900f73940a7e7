"""A tiny name -> builder registry (the timm pattern), with did-you-mean on unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from classlab.errors import ClasslabError

T = TypeVar("T")


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """Maps names to builders so configs can name them and errors can list them.

    The names users may write are declared here, once, without importing torch (the config validates
    against them); the modules that build each thing register a builder under a declared name."""

    def __init__(self, kind: str, names: tuple[str, ...]) -> None:
        self.kind = kind
        self._names = names
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        if name not in self._names:
            raise ValueError(f"{self.kind} '{name}' is not declared in classlab/registry.py")

        def wrap(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = fn
            return fn

        return wrap

    def unknown(self, name: object) -> str:
        """What users read for a name that is not one of ours: the did-you-mean and every choice."""
        return f"unknown {self.kind} '{name}'{suggest(str(name), self._names)}; choose one of: {', '.join(self._names)}"

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        if name not in self._items and "/" in name:  # a family of names (timm/<arch>): one builder for all
            name = name.split("/", 1)[0] + "/<arch>"
        if name not in self._items:
            raise ClasslabError(self.unknown(name))
        return self._items[name](*args, **kwargs)

    def names(self) -> tuple[str, ...]:
        return self._names

    def registered(self) -> tuple[str, ...]:
        return tuple(sorted(self._items))


DATASETS: Registry[Any] = Registry("dataset", ("fashion-mnist", "mnist", "idx", "demo", "image-folder", "fer2013",
                                                "csv", "parquet"))
PRESETS = ("study_a_cnn", "study_b_cnn", "study_c_cnn", "study_d_mlp", "study_e_cnn")
ZOO_FAMILIES = ("timm", "torchvision")  # model: {name: timm/<arch>} or torchvision/<arch>: any of their architectures
MODELS: Registry[Any] = Registry("model", ("mlp", "cnn", "resnet18", *PRESETS, *(f"{f}/<arch>" for f in ZOO_FAMILIES)))


@dataclass(frozen=True)
class ModelFamily:
    """What the rest of classlab needs to know about a model family without building one (no torch): how its
    runs stack (plan) and where its input rules come from (transforms). One record per declared model name."""

    name: str
    stacking: Literal["mlp", "same", "alone"]  # mlp: equal widths train as one wide MLP; same: identical configs
    # stack (vmap; on a GPU only); alone: every run by itself (ImageNet-size networks)
    input: Literal["images", "weights"] = "images"  # images: the model takes the images' size, channels and
    # statistics; weights: the pretrained weights' own (their size, mean / std, interpolation, 3 channels)
    mlp: tuple[tuple[int, ...], str] | None = None  # a preset MLP's fixed (hidden widths, activation)
    alias: str | None = None  # built as this zoo model (resnet18: torchvision/resnet18)
    gray_stem: bool = False  # a zoo model whose first convolution takes the images' channels (1 for gray)

    def stack_signature(self, model: Any) -> tuple | None:
        """What runs must have equal to train as one stack (`model`: the run's model config), or None."""
        if self.stacking == "mlp":
            hidden, activation = self.mlp or (tuple(model.hidden), model.activation)
            return "mlp", tuple(hidden), activation
        return ("same", repr(model)) if self.stacking == "same" else None


STUDY_D_MLP = ((256, 128, 64), "tanh")  # study D: 784 → 256 → 128 → 64 → classes, tanh
MODEL_FAMILIES: dict[str, ModelFamily] = {
    "mlp": ModelFamily("mlp", "mlp"),
    "cnn": ModelFamily("cnn", "same"),
    **{name: ModelFamily(name, "same") for name in PRESETS if name != "study_d_mlp"},
    "study_d_mlp": ModelFamily("study_d_mlp", "mlp", mlp=STUDY_D_MLP),
    # the transfer-learning study's ResNet-18: torchvision's, on the images as they are (size, statistics, a
    # gray first convolution), as before it became a zoo model
    "resnet18": ModelFamily("resnet18", "alone", alias="torchvision/resnet18", gray_stem=True),
    **{f"{f}/<arch>": ModelFamily(f"{f}/<arch>", "alone", input="weights") for f in ZOO_FAMILIES},
}
MODEL_ALIASES = {name: f.alias for name, f in MODEL_FAMILIES.items() if f.alias}


def model_family(name: str) -> ModelFamily:
    """The family record of a model name (timm/<arch> and torchvision/<arch> share their family's)."""
    if name not in MODEL_FAMILIES and "/" in name:
        name = name.split("/", 1)[0] + "/<arch>"
    if name not in MODEL_FAMILIES:
        raise ClasslabError(MODELS.unknown(name))
    return MODEL_FAMILIES[name]
ACTIVATIONS: Registry[Any] = Registry("activation", ("relu", "leaky_relu", "tanh", "gelu", "sigmoid", "elu", "silu"))
