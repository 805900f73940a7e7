"""A tiny name -> builder registry (the timm pattern), with did-you-mean on unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

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
ACTIVATIONS: Registry[Any] = Registry("activation", ("relu", "leaky_relu", "tanh", "gelu", "sigmoid", "elu", "silu"))
